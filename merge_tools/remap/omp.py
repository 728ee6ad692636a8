"""Orthogonal Matching Pursuit (--init omp): each missing token's row as a sparse combination
of shared tokens' rows (torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OMP_EXACT_FLOP_BUDGET = 1e13  # past this many multiply-adds, CPU runs pick from each target's most correlated atoms only


def omp_coefficients(
    targets: Any,
    atoms: Any,
    k: int,
    *,
    chunk: int = 256,
    device: str | None = None,
    exact: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Any, Any]:
    """Orthogonal Matching Pursuit, batched (torch): each target row (n, h) as a k-sparse
    combination of `atoms` (m, h), as mergekit-tokensurgeon does (Goddard & Neto, 2025).
    Returns (indices (n, k') into atoms, coefficients (n, k') float64), k' = min(k, m, h).

    Exact greedy OMP correlates the residual with every atom at each of the k steps:
    n * m * h * k multiply-adds, seconds on a GPU, an hour on two CPU cores for 10^4
    targets against 128k atoms of width 2048. So `exact` defaults to True on CUDA or below
    OMP_EXACT_FLOP_BUDGET; otherwise each target picks only among the 2k' atoms most
    correlated with it (one matrix product per chunk of targets), on their Gram matrix.
    Either way the coefficients are the least-squares fit (float64 Cholesky) to the atoms
    chosen, which is what keeps OMP's residual orthogonal to them."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    n, m = targets.shape[0], atoms.shape[0]
    k = max(0, min(k, m, atoms.shape[1]))
    if n == 0 or k == 0:
        return torch.zeros((n, k), dtype=torch.long), torch.zeros((n, k), dtype=torch.float64)
    if exact is None:
        exact = device.startswith("cuda") or float(n) * m * atoms.shape[1] * k <= OMP_EXACT_FLOP_BUDGET
    atoms = torch.as_tensor(atoms, dtype=torch.float32, device=device)
    norms = atoms.norm(dim=1)
    unit = atoms / norms.clamp(min=1e-12).unsqueeze(1)
    unit[norms == 0] = 0  # an all-zero atom is never chosen
    all_indices, all_coefficients = [], []
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # correlations and Gram matrices in full fp32
    try:
        for start in range(0, n, chunk):
            y = torch.as_tensor(targets[start : start + chunk], dtype=torch.float32, device=device)
            atom_ids, coefficients = tame_coefficients(y, unit, *omp_chunk(y, unit, k, exact))
            all_indices.append(atom_ids.cpu())
            all_coefficients.append((coefficients / norms[atom_ids].double().clamp(min=1e-12)).cpu())
            if progress is not None:
                progress(len(y))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return torch.cat(all_indices), torch.cat(all_coefficients)


def omp_chunk(y: Any, unit: Any, k: int, exact: bool) -> tuple[Any, Any]:
    """(atom ids, coefficients for the unit atoms) of a batch of targets."""
    import torch

    if exact:
        atom_ids = omp_select_exact(y, unit, k)
        basis = unit[atom_ids]
        gram = torch.bmm(basis, basis.transpose(1, 2)).double()
        return atom_ids, least_squares(gram, torch.bmm(basis, y.unsqueeze(2)).squeeze(2).double())
    correlation = y @ unit.T
    chosen = correlation.abs().topk(min(unit.shape[0], 2 * k), dim=1).indices  # (b, C)
    candidates = unit[chosen]
    picked = omp_on_gram(torch.bmm(candidates, candidates.transpose(1, 2)).double(), correlation.gather(1, chosen).double(), k)
    atom_ids = chosen.gather(1, picked)
    basis = unit[atom_ids]
    gram = torch.bmm(basis, basis.transpose(1, 2)).double()
    return atom_ids, least_squares(gram, torch.bmm(basis, y.unsqueeze(2)).squeeze(2).double())


def tame_coefficients(y: Any, unit: Any, atom_ids: Any, coefficients: Any) -> tuple[Any, Any]:
    """OMP's last picks can be nearly collinear, and exact least squares then cancels large
    coefficients: harmless in the donor's space, wild once applied to M's rows (on
    Gemma-3 -> SmolLM2 some rows came out 20x too long, and the model's bits per byte went
    from 4 to 170). Rows whose coefficients outweigh their target 3:1 are solved again with
    a ridge of 1e-2 (the unit atoms' Gram diagonal is 1); well-posed rows keep the exact fit."""
    import torch

    wild = coefficients.norm(dim=1) > 3 * y.double().norm(dim=1)
    if bool(wild.any()):
        basis = unit[atom_ids[wild]]
        gram = torch.bmm(basis, basis.transpose(1, 2)).double()
        projection = torch.bmm(basis, y[wild].unsqueeze(2)).squeeze(2).double()
        coefficients = coefficients.clone()
        coefficients[wild] = least_squares(gram, projection, ridge=1e-2)
    return atom_ids, coefficients


def omp_select_exact(y: Any, unit: Any, k: int) -> Any:
    """The atoms greedy OMP picks for each target of a batch: at every step the one most
    correlated with the residual, which is kept orthogonal to an orthonormal basis of the
    atoms picked so far (Gram-Schmidt twice per step: fp32 keeps its orthogonality).
    `unit`: the atoms all targets share (m, h), or each target's own candidates (b, m, h);
    returns (b, k) indices into them."""
    import torch

    batch, width = y.shape
    per_target = unit.dim() == 3
    rows = torch.arange(batch, device=y.device)
    basis = torch.zeros((batch, width, k), dtype=y.dtype, device=y.device)
    picked = torch.zeros((batch, k), dtype=torch.long, device=y.device)
    used = torch.zeros((batch, unit.shape[-2]), dtype=torch.bool, device=y.device)
    residual = y.clone()
    for step in range(k):
        correlation = torch.bmm(unit, residual.unsqueeze(2)).squeeze(2) if per_target else residual @ unit.T
        correlation = correlation.abs_().masked_fill_(used, -1.0)
        picked[:, step] = correlation.argmax(dim=1)
        used[rows, picked[:, step]] = True
        direction = unit[rows, picked[:, step]] if per_target else unit[picked[:, step]]
        for _ in range(2):
            done = basis[:, :, :step]
            direction = direction - torch.bmm(done, torch.bmm(done.transpose(1, 2), direction.unsqueeze(2))).squeeze(2)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp(min=1e-12)
        basis[:, :, step] = direction
        residual = residual - direction * (direction * residual).sum(dim=1, keepdim=True)
    return picked


def least_squares(gram: Any, projection: Any, ridge: float = 1e-10) -> Any:
    """x solving (gram + ridge I) x = projection per batch (float64 Cholesky; the default
    ridge only keeps atoms that depend on the ones before them from breaking it)."""
    import torch

    size = gram.shape[-1]
    factor, _ = torch.linalg.cholesky_ex(gram + ridge * torch.eye(size, dtype=gram.dtype, device=gram.device))
    return torch.cholesky_solve(projection.unsqueeze(2), factor).squeeze(2)


def omp_on_gram(gram: Any, projection: Any, k: int) -> Any:
    """Greedy OMP's picks from a batch's own candidates, in coefficient space (Batch-OMP,
    Rubinstein, Zibulevsky & Elad 2008): gram (b, C, C) of unit candidates, projection
    (b, C) of each target on them. The Cholesky factor of the picked atoms' Gram grows by
    one row per step (two triangular solves), so a step costs O(C k), not O(C h) or a new
    factorisation. Returns (b, k) positions into the candidates."""
    import torch

    batch, size = projection.shape
    rows = torch.arange(batch, device=gram.device)
    picked = torch.zeros((batch, k), dtype=torch.long, device=gram.device)
    factor = torch.zeros((batch, k, k), dtype=gram.dtype, device=gram.device)
    columns = torch.zeros((batch, size, k), dtype=gram.dtype, device=gram.device)  # gram[:, :, picked]
    used = torch.zeros((batch, size), dtype=torch.bool, device=gram.device)
    correlation = projection.clone()  # <residual, candidate> for every candidate
    for step in range(k):
        choice = correlation.abs().masked_fill_(used, -1.0).argmax(dim=1)
        picked[:, step], used[rows, choice] = choice, True
        columns[:, :, step] = gram[rows, :, choice]
        if step:
            known = factor[:, :step, :step]
            w = torch.linalg.solve_triangular(known, columns[rows, :, step].gather(1, picked[:, :step]).unsqueeze(2), upper=False)
            factor[:, step, :step] = w.squeeze(2)
            factor[:, step, step] = (1.0 - w.squeeze(2).pow(2).sum(dim=1)).clamp(min=1e-10).sqrt()
        else:
            factor[:, 0, 0] = 1.0
        lower = factor[:, : step + 1, : step + 1]
        target = projection.gather(1, picked[:, : step + 1]).unsqueeze(2)
        coefficients = torch.cholesky_solve(target, lower, upper=False)
        correlation = projection - torch.bmm(columns[:, :, : step + 1], coefficients).squeeze(2)
    return picked
