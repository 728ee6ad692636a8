"""The calibration's logits, block by block (torch): log-sum-exps over the output rows that
do not depend on the choice (copied, mean, padding rows) once per forward, then for each
(lambda, alpha) over the calibrated rows only, whose logits are linear in lambda: the
states times the FVT rows and times the OMP rows, computed once per block of positions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

POSITION_BLOCK = 128  # positions per block of calibrated logits: 3 x (128 x rows) float32


@dataclass(frozen=True)
class FixedPart:
    """Per position (float64): the log-sum-exp over the rows the choice leaves alone, over
    those of them that are initialised (mean, padding), and the target's logit when the
    target is one of them (NaN when it is a calibrated row)."""

    lse_all: Any
    lse_init: Any
    target_logit: Any


def transformed(z: Any, scale: float, cap: float | None) -> Any:
    """The head's own transform of H @ W^T (output_logit_transform)."""
    import torch

    z = z * scale if scale != 1.0 else z
    return cap * torch.tanh(z / cap) if cap is not None else z


def torch_rows(values: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def fixed_part(
    states: Any,
    targets: np.ndarray,
    chunks: Iterator[tuple[int, np.ndarray]],
    calibrated: np.ndarray,
    initialised: np.ndarray,
    scale: float,
    cap: float | None,
) -> FixedPart:
    """FixedPart over every output row that `calibrated` leaves out, the rows given chunk
    by chunk (start, float rows)."""
    import torch

    n = states.shape[0]
    target = torch.from_numpy(targets)
    lse_all = torch.full((n,), -torch.inf, dtype=torch.float64)
    lse_init = torch.full((n,), -torch.inf, dtype=torch.float64)
    picked = torch.full((n,), torch.nan, dtype=torch.float64)
    for start, rows in chunks:
        keep = ~calibrated[start : start + len(rows)]
        if not keep.any():
            continue
        ids = np.flatnonzero(keep) + start
        z = transformed(states @ torch_rows(rows[keep]).T, scale, cap)
        lse_all = torch.logaddexp(lse_all, torch.logsumexp(z, dim=1).double())
        init = torch.from_numpy(initialised[ids])
        if bool(init.any()):
            lse_init = torch.logaddexp(lse_init, torch.logsumexp(z[:, init], dim=1).double())
        column = torch.from_numpy(np.searchsorted(ids, np.clip(targets, ids[0], ids[-1])))
        inside = torch.from_numpy(np.isin(targets, ids))
        picked[inside] = z[inside, column[inside]].double()
    del target
    return FixedPart(lse_all, lse_init, picked)


def calibrated_parts(
    states: Any,
    targets: np.ndarray,
    rows: np.ndarray,
    fvt: np.ndarray,
    omp: np.ndarray,
    combos: Sequence[tuple[float, float]],
    scale: float,
    cap: float | None,
) -> list[tuple[Any, Any]]:
    """For each (lambda, alpha): per position, the log-sum-exp over the calibrated rows
    `rows` (whose rows are alpha * (lambda * fvt + (1 - lambda) * omp)) and the target's
    logit when it is one of them (NaN otherwise)."""
    import torch

    n = states.shape[0]
    column = np.searchsorted(rows, np.clip(targets, rows[0], rows[-1])) if len(rows) else np.zeros(n, np.int64)
    inside = np.isin(targets, rows)
    results = [(torch.full((n,), -torch.inf, dtype=torch.float64), torch.full((n,), torch.nan, dtype=torch.float64)) for _ in combos]
    if not len(rows):
        return results
    fvt_t, omp_t = torch_rows(fvt), torch_rows(omp)
    for start in range(0, n, POSITION_BLOCK):
        block = states[start : start + POSITION_BLOCK]
        by_fvt, by_omp = block @ fvt_t.T, block @ omp_t.T
        here = torch.from_numpy(inside[start : start + POSITION_BLOCK])
        where = torch.from_numpy(column[start : start + POSITION_BLOCK])
        for (share, alpha), (lse, picked) in zip(combos, results):
            z = by_fvt * share + by_omp * (1 - share) if share != 1.0 else by_fvt
            z = transformed(z, scale * alpha, cap)
            lse[start : start + len(block)] = torch.logsumexp(z, dim=1).double()
            picked[start : start + len(block)][here] = z[here, where[here]].double()
    return results


def nll_and_mass(fixed: FixedPart, lse_calibrated: Any, target_calibrated: Any, known: np.ndarray) -> tuple[float, float]:
    """(total NLL in nats, mean probability on initialised rows over the positions whose
    target is `known`, not initialised)."""
    import torch

    lse_all = torch.logaddexp(fixed.lse_all, lse_calibrated)
    lse_init = torch.logaddexp(fixed.lse_init, lse_calibrated)
    target = torch.where(torch.isnan(fixed.target_logit), target_calibrated, fixed.target_logit)
    known_t = torch.from_numpy(known)
    mass = float((lse_init - lse_all).exp()[known_t].mean()) if bool(known_t.any()) else 0.0
    return float((lse_all - target).sum()), mass
