"""What a remap says: the human summary and the examples of each initialisation rule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from merge_tools.common.cli import quoted
from merge_tools.remap.shards import human_bytes


def describe_counts(plan_report: Mapping[str, Any]) -> str:
    counts = plan_report["counts"]
    rules = ", ".join(f"{rule} {n}" for rule, n in plan_report["init_rules"].items())
    return (
        f"copied {counts['copied'] + counts['moved']} ({counts['moved']} of them to new ids), appended {counts['appended']}, "
        f"initialised {counts['initialised']}{f' ({rules})' if rules else ''}, dropped {counts['dropped']}, "
        f"ghost {counts['ghost']}, padding {counts['padding']}"
    )


def human_summary(report: Mapping[str, Any], dry_run: bool, init_report: int = 0) -> str:
    plan = report["plan"]
    lines = [
        f"{'plan' if dry_run else 'remapped'}: {report['inputs']['src_model']['source']} -> token order of "
        f"{report['inputs']['base_tokenizer']['source']} ({plan['mode']} mode, init {plan['init']}, match {report['match_mode']})",
        f"rows: {plan['rows']['source']} -> {plan['rows']['output']} (base tokenizer: {plan['rows']['base_tokens']} tokens); "
        f"tensors {report['vocab_tensors']['embed']}"
        + (f", {report['vocab_tensors']['head']}" if report["vocab_tensors"]["head"] else " (tied)"),
        describe_counts(plan),
    ]
    if report.get("init_auto"):
        lines.append(auto_line(report["init_auto"]))
    dropped_special = [item["token"] for item in plan["dropped"] if item.get("added")]
    if dropped_special:
        lines.append(
            "dropped special/added tokens: "
            f"{', '.join(quoted(token) for token in dropped_special[:20])}{' ...' if len(dropped_special) > 20 else ''}"
        )
    shards = report["shards"]
    lines.append(f"shards: {len(shards['shards'])} file(s), {human_bytes(shards['total_size'])}")
    if dry_run:
        lines += [f"  {s['file']}  {s['tensors']} tensors  {human_bytes(s['bytes'])}" for s in shards["shards"]]
    elif "self_check" in report:
        lines.append(f"self-check: ok ({report['self_check']['copied_rows_checked']} copied rows bit-identical)")
    if init_report or dry_run:
        lines += init_examples(plan, init_report or 5)
    return "\n".join(lines)


def auto_line(auto: Mapping[str, Any]) -> str:
    """What --init auto chose, and the masses and bits per byte it measured."""
    if auto["chose"] != "calibrated":
        return f"init auto: {auto['chose']} ({auto['reason']})"
    natural = f"natural {auto['natural_mass']:.3f}, " if auto["natural_mass"] is not None else ""
    output = (
        f"output rows x {auto['alpha']:g}" + (", untied" if auto["untied"] else "") if auto["alpha"] != 1 else "output rows as input rows"
    )
    return (
        f"init auto: calibrated on {auto['calibration_text']['source']} text ({auto['lambda']:g} FVT + {1 - auto['lambda']:g} OMP, "
        f"{output}); mass on initialised rows: {natural}fvt {auto['mass_before']:.3f} -> {auto['mass_after']:.3f}; "
        f"bits/byte {auto['bits_per_byte_before']:.3f} -> {auto['bits_per_byte_after']:.3f} "
        f"({auto['omp_seconds']:.0f} s of OMP, {auto['seconds'] - auto['omp_seconds']:.0f} s of calibration)"
    )


RULE_NOTES = {
    "unreachable": "T's tokenizer never produces these tokens (another token spells their text): the mean row, "
    "which takes no probability from the tokens it does produce",
}


def init_examples(plan: Mapping[str, Any], per_rule: int) -> list[str]:
    """The `per_rule` most telling examples of each initialisation rule: tokens built from
    the most parts, longest first (the first ids are byte fallbacks and single characters);
    then tokens that spell the same bytes as another token of their tokenizer."""
    by_rule: dict[str, list[Mapping[str, Any]]] = {}
    for item in plan["initialised"]:
        by_rule.setdefault(item["rule"], []).append(item)
    lines = []
    if by_rule:
        lines.append(
            "initialised rows, by rule (TOKEN <- the rows it is made of: A + B is the mean of their rows; "
            "<donor row N>: row N of the donor):"
        )
    for rule, items in sorted(by_rule.items()):
        chosen = sorted(items, key=lambda item: (-len(item["from"]), -len(item["token"]), item["id"]))[:per_rule]
        lines.append(f"  {rule} ({len(items)}){': ' + RULE_NOTES[rule] if RULE_NOTES.get(rule) else ''}:")
        lines += [f"    {item['id']:>7} {quoted(item['token'])} <- {shown_parts(item['from'])}" for item in chosen]
    match = plan["match"]
    if match["collisions"]:
        lines.append(
            f"tokens that spell the same bytes as another token of their tokenizer ({match['collisions']}): "
            "the one the tokenizer produces keeps the match (KEPT over DROPPED):"
        )
        lines += [
            f"    {c['side']}: {quoted(c['kept'])} ({c['kept_id']}) over {quoted(c['dropped'])} ({c['dropped_id']})"
            for c in match["collision_examples"][:per_rule]
        ]
    return lines


def shown_parts(parts: Sequence[str]) -> str:
    return (
        " + ".join(part if part.startswith("<") and part.endswith(">") and " row " in part else quoted(part) for part in parts)
        or "(the mean row)"
    )


def transplant_warning(plan: Mapping[str, Any]) -> str | None:
    initialised, rows = plan["counts"]["initialised"], plan["rows"]["output"]
    if rows and initialised * 2 > rows:
        return f"mostly initialised ({initialised} of {rows} rows): this is a tokenizer transplant, expect a large quality loss"
    return None


def mergeable_with_base(report: Mapping[str, Any], base_rows: int) -> str | None:
    """None when the output has the row count of T's models, else why it cannot merge."""
    rows = report["plan"]["rows"]["output"]
    if rows == base_rows:
        return None
    return f"not mergeable with T's models ({rows} vs {base_rows} rows): use --drop-extra for merges"


def mergekit_snippet(out_dir: str) -> str:
    return f"  - model: {out_dir}\n    parameters:\n      weight: 1.0\n"
