"""The merge audit's figures (--audit), from per-tensor sums: task-vector norms, shares,
layers, cosines, notes (pure)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from merge_tools.common.merge_check import LAYER_INDEX_RE

if TYPE_CHECKING:
    import numpy as np


AUDIT_BLOCK_BYTES = 3 * 2**20  # float32 values read and computed at a time, all models together: the CPU cache's share


AUDIT_WORKERS = 2  # numpy releases the GIL in reads, conversions and BLAS: two tensors at a time


GRAM_BY_DOTS = 8  # up to this many models, the task vectors' Gram matrix by dot products


NEAR_DUPLICATE, CONFLICTING = 0.95, -0.3  # task-vector cosines named in the report


LOW_SHARE, HIGH_SHARE = 0.02, 0.5


LAYER_OUTLIER = 3.0  # a layer that moved this many times the model's median layer is named


TOP_TENSORS = 5


AUDIT_DTYPES = ("BF16", "F16", "F32", "F64")  # widened to float32 (sizes: DTYPE_SIZES)


@dataclass(frozen=True)
class TensorSums:
    """One tensor, streamed through every model: the Gram matrix of the models' task
    vectors (their difference from the reference), and the reference's squared norm."""

    name: str
    gram: np.ndarray  # (models, models) float64: <d_i, d_j>
    reference_square: float
    vocabulary: bool = False
    nonfinite: tuple[int, ...] = ()  # models whose values of it hold a NaN or an infinity (figures leave it out)
    overflow: bool = False  # finite values whose squares overflow float32 sums (figures leave it out)


@dataclass(frozen=True)
class ModelAudit:
    model: str
    weight: float | None  # None: not in the YAML's models (the base of a task-arithmetic merge)
    task_vector_norm: float
    relative_norm: float
    share: float | None  # None for the reference model itself
    layers: tuple[float, ...]
    top_tensors: tuple[tuple[str, float, float], ...]  # (tensor, norm, norm / the reference's)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "weight": self.weight,
            "task_vector_norm": self.task_vector_norm,
            "relative_norm": self.relative_norm,
            "share": self.share,
            "layers": list(self.layers),
            "top_tensors": [{"tensor": t, "norm": n, "relative": r} for t, n, r in self.top_tensors],
        }


@dataclass(frozen=True)
class MergeAudit:
    reference: str  # the base model, or "mean of the models"
    models: tuple[ModelAudit, ...]
    pairs: tuple[tuple[str, str, float], ...]
    vocabulary: tuple[tuple[str, str, float], ...]  # (model, tensor, task-vector norm), reported apart
    flags: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    bytes_read: int = 0
    problems: tuple[str, ...] = ()  # broken models (NaN or infinite weights): the merge check fails
    notes: tuple[str, ...] = ()  # what the figures mean here (the reference, passthrough, LoRAs left out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "models": [m.to_dict() for m in self.models],
            "pairs": [{"a": a, "b": b, "cosine": c} for a, b, c in self.pairs],
            "vocabulary_tensors": [{"model": m, "tensor": t, "norm": n} for m, t, n in self.vocabulary],
            "flags": list(self.flags),
            "notes": list(self.notes),
            "problems": list(self.problems),
            "skipped": list(self.skipped),
            "bytes_read": self.bytes_read,
        }


def merge_weights(config: Mapping[str, Any], name_of: Callable[[Any], str]) -> dict[str, float]:
    """Each model's weight in the YAML (`parameters.weight`, else the shared one, else 1): a
    gradient list by its mean, a per-tensor list ({filter, value}) by the mean of its values."""

    def value(raw: Any) -> float | None:
        if isinstance(raw, bool):
            return None
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, list) and raw:
            values = [value(item.get("value") if isinstance(item, Mapping) else item) for item in raw]
            numbers = [v for v in values if v is not None]
            return sum(numbers) / len(numbers) if numbers else None
        return None

    shared = config.get("parameters") if isinstance(config.get("parameters"), Mapping) else {}
    default = value(shared.get("weight"))
    weights: dict[str, float] = {}
    entries = [e for e in config.get("models") or [] if isinstance(e, Mapping)]
    entries += [s for slice_ in config.get("slices") or [] if isinstance(slice_, Mapping) for s in slice_.get("sources") or []]
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("model") is not None:
            parameters = entry.get("parameters") if isinstance(entry.get("parameters"), Mapping) else {}
            own = value(parameters.get("weight"))
            weights.setdefault(name_of(entry["model"]), own if own is not None else default if default is not None else 1.0)
    return weights


def layer_of(name: str) -> int | None:
    match = LAYER_INDEX_RE.search(name)  # the shared block's: group 1 is the prefix, the index follows it
    return int(name[match.end(1) : match.end() - 1]) if match else None


def summarize_audit(
    names: Sequence[str], weights: Mapping[str, float], sums: Sequence[TensorSums], reference: str | None, conclusions: bool = True
) -> MergeAudit:
    """Every figure of the audit from the per-tensor sums (pure). `reference`: the base
    model's name (its own task vector is zero: it takes no share), None for the mean.
    Tensors with NaN or infinite values are left out of every figure and named as
    problems. `conclusions` False: no notes on shares and pairs (a reference that cannot
    support them, a merge that averages nothing); a layer out of its model's line still is."""
    import numpy as np

    problems = tuple(
        f"{names[k]}: {s.name} holds NaN or infinite values: a broken model (a merge spreads them into the result)"
        for s in sums
        for k in s.nonfinite
    )
    skipped = tuple(f"{s.name}: its values overflow float32 sums" for s in sums if s.overflow)
    sums = [s for s in sums if not s.nonfinite and not s.overflow]
    body = [s for s in sums if not s.vocabulary]
    square = np.sum([s.gram.diagonal() for s in body], axis=0) if body else np.zeros(len(names))
    norms = np.sqrt(square)
    reference_norm = math.sqrt(sum(s.reference_square for s in body)) or 1.0
    voices = {n: weights.get(n, 1.0) * float(norms[i]) for i, n in enumerate(names) if n != reference}
    total_voice = sum(abs(v) for v in voices.values()) or 1.0
    layer_count = max((layer_of(s.name) for s in body if layer_of(s.name) is not None), default=-1) + 1
    layer_square = np.zeros((len(names), layer_count))
    for s in body:
        layer = layer_of(s.name)
        if layer is not None:
            layer_square[:, layer] += s.gram.diagonal()
    models = []
    for i, name in enumerate(names):
        ranked = sorted(body, key=lambda s: -s.gram[i, i])[:TOP_TENSORS] if name != reference else []
        top = tuple(
            (s.name, math.sqrt(s.gram[i, i]), math.sqrt(s.gram[i, i] / s.reference_square) if s.reference_square else None) for s in ranked
        )
        share = abs(voices[name]) / total_voice if name in voices else None
        models.append(
            ModelAudit(
                name,
                weights.get(name),
                float(norms[i]),
                float(norms[i]) / reference_norm,
                share,
                tuple(np.sqrt(layer_square[i]).tolist()),
                top,
            )
        )
    gram = np.sum([s.gram for s in body], axis=0) if body else np.zeros((len(names), len(names)))
    pairs = tuple(
        (names[i], names[j], float(gram[i, j] / (norms[i] * norms[j])) if norms[i] and norms[j] else 0.0)
        for i, j in itertools.combinations(range(len(names)), 2)
        if reference not in (names[i], names[j])
    )
    vocabulary = tuple((n, s.name, math.sqrt(s.gram[i, i])) for s in sums if s.vocabulary for i, n in enumerate(names) if n != reference)
    flags = audit_flags(models, pairs, conclusions)
    if any(relative is None for m in models for _, _, relative in m.top_tensors):
        flags += ("a tensor that is all zeros in the reference has no relative change (null)",)
    return MergeAudit(
        "mean of the models" if reference is None else reference, tuple(models), pairs, vocabulary, flags, skipped, problems=problems
    )


def audit_flags(models: Sequence[ModelAudit], pairs: Sequence[tuple[str, str, float]], conclusions: bool = True) -> tuple[str, ...]:
    """What the human report points at: a model that hardly contributes or dominates,
    near-duplicate and conflicting pairs (only with `conclusions`), a layer far out of a
    model's line."""
    import numpy as np

    flags = []
    voiced = [m for m in models if m.share is not None]
    for m in voiced if conclusions else ():
        if m.share is not None and m.share < LOW_SHARE:
            flags.append(f"{m.model} hardly contributes (share {m.share:.1%}): drop it or raise its weight")
        if m.share is not None and m.share > HIGH_SHARE and len(voiced) >= 3:
            flags.append(f"{m.model} dominates the merge (share {m.share:.1%})")
    for a, b, cosine in pairs if conclusions else ():
        if cosine >= NEAR_DUPLICATE:
            flags.append(f"{a} and {b} are near-duplicates (task-vector cosine {cosine:.3f}): one of them adds little")
        elif cosine <= CONFLICTING:
            flags.append(f"{a} and {b} conflict (task-vector cosine {cosine:.3f}): their changes cancel in a linear merge")
    for m in voiced:
        moved = [value for value in m.layers if value > 0]
        median = float(np.median(moved)) if len(moved) >= 3 else 0.0
        outliers = [layer for layer, value in enumerate(m.layers) if median and value > LAYER_OUTLIER * median]
        for run in consecutive_runs(outliers):
            ratios = [m.layers[layer] / median for layer in run]
            where = f"layer {run[0]}" if len(run) == 1 else f"layers {run[0]}-{run[-1]}"
            low, high = min(ratios), max(ratios)
            flags.append(f"{m.model}: {where} moved {low:.1f}x" + (f"-{high:.1f}x" if high - low >= 0.05 else "") + " its median layer")
    return tuple(flags)


def consecutive_runs(values: Sequence[int]) -> list[list[int]]:
    """[1, 2, 3, 7] -> [[1, 2, 3], [7]]."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return runs
