"""The other tokenizer checks: special tokens and flags, the chat template, the encoding
(merges, normalizer, pre-tokenizer, decoder, fingerprint)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from merge_tools.common.tokenizer_files import ADDED_TOKEN_FLAGS, SPECIAL_ROLES
from merge_tools.gate.vocab_check import CheckResult, show_token

if TYPE_CHECKING:
    from merge_tools.gate.reading import TokenizerInfo


def describe_special(info: TokenizerInfo, role: str) -> dict[str, Any]:
    token = info.special_tokens.get(role)
    return {
        "token": token,
        "id": info.vocab.get(token) if token is not None else None,
        "config_id": info.config_ids.get(role),
        "generation_config_id": info.generation_ids.get(role),
    }


def inconsistent_role_ids(info: TokenizerInfo) -> list[str]:
    """config.json / generation_config.json ids that disagree with the tokenizer."""
    problems = []
    for role in SPECIAL_ROLES:
        described = describe_special(info, role)
        for key, label in (("config_id", "config.json"), ("generation_config_id", "generation_config.json")):
            value = described[key]
            if value is None or described["id"] is None:
                continue
            ids = value if isinstance(value, list) else [value]
            if described["id"] not in ids:
                problems.append(
                    f"{label} {role}_token_id={value} but the tokenizer's {role} token "
                    f"{show_token(described['token'])} is id {described['id']}"
                )
    return problems


def special_tokens_check(ref: TokenizerInfo, other: TokenizerInfo, strict: bool) -> CheckResult:
    roles = {role: {"ref": describe_special(ref, role), "other": describe_special(other, role)} for role in SPECIAL_ROLES}
    differing = [
        role
        for role, sides in roles.items()
        if (sides["ref"]["token"], sides["ref"]["id"]) != (sides["other"]["token"], sides["other"]["id"])
    ]
    ref_added = {token.content: token for token in ref.added_tokens}
    other_added = {token.content: token for token in other.added_tokens}
    flag_diffs = []
    for content in sorted(ref_added.keys() & other_added.keys(), key=lambda c: ref_added[c].id):
        ref_flags, other_flags = ref_added[content].flags(), other_added[content].flags()
        changed = {name: [ref_flags[name], other_flags[name]] for name in ADDED_TOKEN_FLAGS if ref_flags[name] != other_flags[name]}
        if changed:
            flag_diffs.append({"token": content, "changed": changed})
    added_only = sorted(ref_added.keys() ^ other_added.keys())
    inconsistencies = {"ref": inconsistent_role_ids(ref), "other": inconsistent_role_ids(other)}
    problems = bool(differing or flag_diffs or added_only)
    status = "ok" if not problems else ("fail" if strict else "warn")
    parts = [f"roles differ: {', '.join(differing)}" if differing else "bos/eos/pad/unk agree"]
    if flag_diffs:
        parts.append(f"{len(flag_diffs)} added-token flag difference(s)")
    if added_only:
        parts.append(f"{len(added_only)} token(s) added in only one tokenizer")
    lines = [f"{'role':<5} {'REF':<36} OTHER"]
    for role, sides in roles.items():
        cells = []
        for side in (sides["ref"], sides["other"]):
            token = side["token"]
            cells.append("-" if token is None else f"{show_token(token)} id {side['id']}")
        mark = "  <-- differs" if role in differing else ""
        lines.append(f"{role:<5} {cells[0]:<36} {cells[1]}{mark}")
    for diff in flag_diffs:
        changes = ", ".join(f"{name} {a}->{b}" for name, (a, b) in diff["changed"].items())
        lines.append(f"flags of {show_token(diff['token'])}: {changes}")
    for side, problems_of_side in inconsistencies.items():
        lines += [f"{side.upper()}: {problem}" for problem in problems_of_side]
    return CheckResult(
        "special_tokens",
        status,
        "; ".join(parts),
        {"roles": roles, "flag_differences": flag_diffs, "added_in_one_only": added_only, "inconsistent_ids": inconsistencies},
        tuple(lines),
    )


def chat_template_check(ref: TokenizerInfo, other: TokenizerInfo, strict: bool, max_lines: int = 20) -> CheckResult:
    if ref.chat_template == other.chat_template:
        summary = "equal" if ref.chat_template is not None else "neither has one"
        return CheckResult("chat_template", "ok", summary, {"equal": True})
    diff = list(
        difflib.unified_diff(
            (ref.chat_template or "").splitlines(),
            (other.chat_template or "").splitlines(),
            "REF",
            "OTHER",
            lineterm="",
            n=1,
        )
    )
    shown = diff[:max_lines] + ([f"... {len(diff) - max_lines} more diff lines"] if len(diff) > max_lines else [])
    return CheckResult("chat_template", "fail" if strict else "warn", "differs", {"equal": False}, tuple(shown))


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def encoding_check(ref: TokenizerInfo, other: TokenizerInfo, strict: bool) -> CheckResult:
    details: dict[str, Any] = {
        "model_type": [ref.model_type, other.model_type],
        "byte_fallback": [ref.byte_fallback, other.byte_fallback],
        "convention": [ref.convention, other.convention],
    }
    differing = [key for key, (a, b) in details.items() if a != b]
    if ref.merges == other.merges:
        details["merges_equal"] = True
    else:
        rank = first_difference(ref.merges or (), other.merges or ())
        details["merges_equal"] = rank is None
        details["merges_first_difference_rank"] = rank
        if rank is not None:
            differing.append(f"merges (first difference at rank {rank})")
    for name in ("normalizer", "pre_tokenizer", "decoder"):
        equal = getattr(ref, name) == getattr(other, name)
        details[f"{name}_equal"] = equal
        if not equal:
            differing.append(name)
    same_ids = ref.fingerprint_ids == other.fingerprint_ids
    details["fingerprint"] = {"identical": same_ids, "ref_sha256": ref.fingerprint, "other_sha256": other.fingerprint}
    if not same_ids:
        differing.append("fingerprint")
    if differing:
        status = "fail" if strict else "warn"
        summary = "differs: " + ", ".join(differing)
    else:
        status, summary = "ok", f"same model, merges, normalizer, pre-tokenizer, decoder; fingerprint {ref.fingerprint[:16]}"
    lines = (
        f"model type      {ref.model_type} / {other.model_type}",
        f"merges          {'equal' if details['merges_equal'] else 'differ at rank ' + str(details.get('merges_first_difference_rank'))}",
        *(f"{name:<15} {'equal' if details[name + '_equal'] else 'differs'}" for name in ("normalizer", "pre_tokenizer", "decoder")),
        f"byte_fallback   {ref.byte_fallback} / {other.byte_fallback}",
        f"fingerprint     {'identical' if same_ids else 'DIFFERS'}  REF {ref.fingerprint[:16]}  OTHER {other.fingerprint[:16]}",
    )
    return CheckResult("encoding", status, summary, details, lines)
