"""The report: the JSON document and the human text."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from merge_tools.common.tokenizer_merge import MergedVocab
    from merge_tools.gate.comparison import Comparison
    from merge_tools.gate.reading import TokenizerInfo


JSON_SCHEMA_ID = "merge_tools.compare_tokenizers/1"


STATUS_LABEL = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skipped": "-"}


def build_report(
    ref: TokenizerInfo,
    comparisons: Sequence[Comparison],
    *,
    strict: bool,
    weights: bool,
    merge_problems: Sequence[str] | None = None,
    merged: MergedVocab | None = None,
) -> dict[str, Any]:
    failed = any(c.failed for c in comparisons) or bool(merge_problems)
    report = {
        "schema": JSON_SCHEMA_ID,
        "equal": not failed,
        "exit_code": 1 if failed else 0,
        "strict": strict,
        "weights": weights,
        "reference": {
            "source": ref.source,
            "path": ref.path,
            "vocab_size": len(ref.vocab),
            "model_type": ref.model_type,
            "convention": ref.convention,
            "fingerprint_sha256": ref.fingerprint,
        },
        "comparisons": [c.to_dict() for c in comparisons],
    }
    if merge_problems is not None:
        report["merge"] = {"status": "fail" if merge_problems else "ok", "problems": list(merge_problems)}
    if merged is not None:
        audit = merged.to_dict()
        report.setdefault("merge", {"status": "fail" if merge_problems else "ok", "problems": list(merge_problems or [])})
        report["merge"] |= {"tokenizer": audit, "union": audit.pop("union"), "fills": audit.pop("fills")}
    return report


def render_human(
    ref: TokenizerInfo,
    comparisons: Sequence[Comparison],
    color: bool = False,
    merge_problems: Sequence[str] | None = None,
    merged_lines: Sequence[str] = (),
) -> str:
    def paint(text: str, status: str) -> str:
        codes = {"ok": "32", "warn": "33", "fail": "31"}
        return f"\033[{codes[status]}m{text}\033[0m" if color and status in codes else text

    out: list[str] = [f"REF    {ref.source}  ({ref.model_type}, {len(ref.vocab)} tokens, {ref.convention})"]
    if merge_problems:
        out += [f"merge  {paint('FAIL', 'fail')} {problem}" for problem in merge_problems]
    out += list(merged_lines)
    if len(comparisons) > 1:
        width = max(len(c.other) for c in comparisons)
        out.append("")
        out.append(f"{'model':<{width}}  {'tokens':>7}  verdict")
        for comparison in comparisons:
            verdict = "MISMATCH" if comparison.failed else "mapped" if comparison.mapped_by and not comparison.vocab.equal else "identical"
            bad = [check.name for check in comparison.checks if check.status == "fail"]
            note = f" ({', '.join(bad)})" if bad else ""
            out.append(f"{comparison.other:<{width}}  {comparison.vocab.other_size:>7}  {paint(verdict, 'fail' if bad else 'ok')}{note}")
    for comparison in comparisons:
        out.append("")
        out.append(f"OTHER  {comparison.other}")
        verdict = comparison.verdict_text()
        if merge_problems and not comparison.failed:  # never "safe to merge" under a failing merge check
            verdict = verdict.replace("identical: safe to merge linearly", "identical")
            verdict += " (but the merge fails: see merge above)"
        out.append(f"verdict  {paint(verdict, 'fail' if comparison.failed else 'ok' if comparison.weights_checked else 'warn')}")
        for check in comparison.checks:
            label = paint(f"{STATUS_LABEL[check.status]:<4}", check.status)
            out.append(f"  {check.name:<15} {label} {check.summary}")
            if check.status != "ok" or check.name == "weights":
                out += [f"      {line}" for line in check.lines]
    return "\n".join(out) + "\n"


def strict_json(data: Any) -> Any:
    """`data` with every NaN or infinity as null: --json is JSON every reader takes (a
    figure that is undefined is null, and the audit's notes say why)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, Mapping):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def refuse_configuration(args: argparse.Namespace, problems: Sequence[str]) -> int:
    """A configuration mergekit refuses, found from the YAML alone: the merge check fails
    before any model is read or downloaded (exit 1)."""
    if args.json:
        report = {"schema": JSON_SCHEMA_ID, "equal": False, "exit_code": 1, "strict": args.strict, "weights": args.weights}
        report |= {"reference": None, "comparisons": [], "merge": {"status": "fail", "problems": list(problems)}}
        sys.stdout.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    else:
        lines = [f"merge  FAIL {problem}" for problem in problems]
        lines.append(f"verdict  do not merge: mergekit refuses {args.mergekit_config} (no model was read)")
        sys.stdout.write("\n".join(lines) + "\n")
    return 1
