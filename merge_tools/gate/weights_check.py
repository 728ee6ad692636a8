"""The weights check (rows, padding, ghost tokens) and the architecture check of a merge."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from merge_tools.common.merge_check import compare_models
from merge_tools.common.vocab_tensors import vocab_tensors_off
from merge_tools.gate.vocab_check import CheckResult, show_token

if TYPE_CHECKING:
    from merge_tools.common.merge_check import ModelFacts
    from merge_tools.gate.reading import TokenizerInfo


def ghost_tokens(info: TokenizerInfo, rows: int) -> list[tuple[str, int]]:
    return sorted(((token, token_id) for token, token_id in info.vocab.items() if token_id >= rows), key=lambda item: item[1])


def describe_weights(info: TokenizerInfo, head: int) -> dict[str, Any]:
    weights = info.weights
    assert weights is not None
    rows = weights.rows
    ghosts = ghost_tokens(info, rows) if rows is not None else []
    return {
        "embed_tensor": weights.embed_name,
        "embed_rows": weights.embed_rows,
        "lm_head_tensor": weights.head_name,
        "lm_head_rows": weights.head_rows,
        "config_vocab_size": weights.config_vocab_size,
        "tokenizer_size": len(info.vocab),
        "padding_rows": max(0, rows - len(info.vocab)) if rows is not None else None,
        "ghost_count": len(ghosts),
        "ghost_tokens": [{"token": t, "id": i} for t, i in ghosts[:head]],
    }


def weights_check(ref: TokenizerInfo, other: TokenizerInfo, head: int, mapped_by: str | None = None) -> CheckResult:
    """Rows, padding and ghost tokens of both sides. `mapped_by` (a tokenizer_source merge):
    ghost tokens and differing row counts are mapped by token (the vocabulary audit judges
    them), not a failure; stale per-token tensors still are."""
    sides = {
        label: describe_weights(info, head)
        for label, info in (("ref", ref), ("other", other))
        if info.weights is not None and info.weights.checked
    }
    unchecked = [label.upper() for label, info in (("ref", ref), ("other", other)) if info.weights is None or not info.weights.checked]
    if not sides:
        return CheckResult(
            "weights",
            "skipped",
            f"not checked: {' and '.join(unchecked)} {'have' if len(unchecked) > 1 else 'has'} no safetensors",
            {"not_checked": unchecked},
        )
    problems = [
        f"{label.upper()} has {side['ghost_count']} ghost token(s) (ids with no embedding row)"
        for label, side in sides.items()
        if side["ghost_count"]
    ]
    if ref.weights is not None and other.weights is not None and ref.weights.rows != other.weights.rows:
        problems.append(f"embedding rows differ: {ref.weights.rows} vs {other.weights.rows}")
    mapped = len(problems) if mapped_by is not None else 0  # the first `mapped` problems are mapped by token
    for label, info in (("ref", ref), ("other", other)):
        if label in sides and info.weights is not None and info.weights.rows is not None:
            shapes = {name: shape for name, (_, shape) in (info.weights.tensors or {}).items()}
            problems += [
                f"{label.upper()}'s {name} has {count} rows, its embedding {info.weights.rows}"
                for name, count in vocab_tensors_off(shapes, info.weights.rows)
            ]
    lines = [f"{'':<6} {'embed rows':>10} {'lm_head rows':>12} {'config':>8} {'tokenizer':>9} {'padding':>7} {'ghosts':>6}"]
    for label, side in sides.items():
        head_rows = side["lm_head_rows"] if side["lm_head_tensor"] else "tied"
        lines.append(
            f"{label.upper():<6} {side['embed_rows']!s:>10} {head_rows!s:>12} {side['config_vocab_size']!s:>8} "
            f"{side['tokenizer_size']:>9} {side['padding_rows']!s:>7} {side['ghost_count']:>6}"
        )
    for label, side in sides.items():
        info = ref if label == "ref" else other
        for ghost in side["ghost_tokens"]:
            lines.append(f"{label.upper()} ghost: id {ghost['id']} {show_token(ghost['token'], info.convention, info.byte_fallback)}")
    rows = sorted({str(side["embed_rows"] or side["config_vocab_size"]) for side in sides.values()})
    summary = "; ".join(problems) if problems else f"{' / '.join(rows)} embedding rows, no ghost tokens"
    if unchecked:
        summary += f"; {unchecked[0]} not checked (no safetensors)"
        lines.append(f"{unchecked[0]}: not checked (no safetensors)")
    failing = problems[mapped:]
    if mapped and not failing:
        summary += " (mapped by token; ghost tokens: see the merge's tokenizer above)"
    elif mapped:
        summary = "; ".join(failing)
    return CheckResult("weights", "fail" if failing else "ok", summary, {**sides, "not_checked": unchecked}, tuple(lines))


def architecture_check(base: ModelFacts | None, other: ModelFacts | None, strict: bool, same_layers: bool, lora: str | None) -> CheckResult:
    """Whether mergekit can merge OTHER with the base and keeps what OTHER expects."""
    if lora is not None:
        return CheckResult("architecture", "skipped", f"not checked: a LoRA ({lora}) is applied to this model")
    if base is None or other is None:
        return CheckResult("architecture", "skipped", "not checked: no config.json / safetensors headers on one side")
    found = compare_models(base, other, strict, same_layers)
    levels = {level for level, _ in found}
    status = "fail" if "fail" in levels else "warn" if "warn" in levels else "ok"
    summary = "; ".join(message for level, message in found if level != "info") or "same architecture, config and tensors"
    if "info" in levels and status == "ok":
        summary = "same architecture and tensors; " + "; ".join(message for level, message in found if level == "info")
    return CheckResult(
        "architecture",
        status,
        summary,
        {"differences": [{"level": level, "message": message} for level, message in found]},
        tuple(f"{level}: {message}" for level, message in found),
    )
