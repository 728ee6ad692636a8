"""One comparison (every check of OTHER against REF), and the merge's architecture added to
each."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from merge_tools.common.merge_check import ModelFacts, check_merge_config
from merge_tools.common.mergekit_config import parse_model_reference
from merge_tools.gate.tokenizer_checks import chat_template_check, encoding_check, special_tokens_check
from merge_tools.gate.vocab_check import CheckResult, diff_vocab, vocab_check
from merge_tools.gate.weights_check import architecture_check, weights_check

if TYPE_CHECKING:
    from merge_tools.common.mergekit_config import ModelRef
    from merge_tools.gate.reading import TokenizerInfo
    from merge_tools.gate.vocab_check import VocabDiff


@dataclass(frozen=True)
class Comparison:
    ref: str
    other: str
    vocab: VocabDiff
    checks: tuple[CheckResult, ...]
    mapped_by: str | None = None  # the tokenizer_source of a merge that maps rows by token

    @property
    def failed(self) -> bool:
        return any(check.status == "fail" for check in self.checks)

    @property
    def weights_checked(self) -> bool:
        weights = next((check for check in self.checks if check.name == "weights"), None)
        return weights is not None and weights.status != "skipped" and not weights.details.get("not_checked")

    def verdict_text(self) -> str:
        """Never "safe" on what was not checked."""
        if self.failed:
            return "MISMATCH: do not merge linearly"
        if self.mapped_by is not None and not self.vocab.equal:
            return f"vocabularies differ: mergekit maps the rows by token (tokenizer_source: {self.mapped_by})"
        if self.weights_checked:
            return "identical: safe to merge linearly"
        weights = next(check for check in self.checks if check.name == "weights")
        sides = list(weights.details.get("not_checked") or ["REF", "OTHER"])
        reason = (
            "--no-weights"
            if weights.summary.endswith("--no-weights")
            else f"{' and '.join(sides)} {'have' if len(sides) > 1 else 'has'} no safetensors"
        )
        return f"tokenizers identical (weights not checked: {reason})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "other": self.other,
            "equal": self.vocab.equal,
            "verdict": "mismatch" if self.failed else "mapped" if self.mapped_by is not None and not self.vocab.equal else "identical",
            "verdict_text": self.verdict_text(),
            "weights_checked": self.weights_checked,
            "checks": {check.name: check.to_dict() for check in self.checks},
        }


def compare(
    ref: TokenizerInfo, other: TokenizerInfo, *, strict: bool, head: int, weights: bool = True, mapped_by: str | None = None
) -> Comparison:
    """Every check of OTHER against REF; `mapped_by`: the tokenizer_source of a merge
    that maps rows by token (vocab_check, weights_check)."""
    diff = diff_vocab(ref, other, head)
    checks = [
        vocab_check(diff, ref, other, mapped_by),
        special_tokens_check(ref, other, strict),
        chat_template_check(ref, other, strict),
        encoding_check(ref, other, strict),
    ]
    checks.append(
        weights_check(ref, other, head, mapped_by)
        if weights
        else CheckResult("weights", "skipped", "not checked: --no-weights", {"not_checked": ["REF", "OTHER"]})
    )
    return Comparison(ref.source, other.source, diff, tuple(checks), mapped_by)


def with_architecture(
    config: Mapping[str, Any],
    source_of: Mapping[ModelRef, str],
    sources: Sequence[str],
    infos: Sequence[TokenizerInfo],
    comparisons: Sequence[Comparison],
    strict: bool,
) -> tuple[list[Comparison], list[str]]:
    """The comparisons with an `architecture` check each, and the problems of the merge
    configuration itself (merge method, slices)."""
    info_of = dict(zip(sources, infos))

    def facts_of_source(source: str) -> ModelFacts | None:
        weights = info_of[source].weights
        return ModelFacts(weights.config, weights.tensors) if weights is not None and weights.config else None

    def facts(reference: Any) -> ModelFacts | None:
        return facts_of_source(source_of[parse_model_reference(reference)]) if reference is not None else None

    lora_of = {source: ref.lora for ref, source in source_of.items() if ref.lora}
    same_layers = not config.get("slices")
    base = facts_of_source(sources[0])
    checked = [
        dataclasses.replace(
            c, checks=(*c.checks, architecture_check(base, facts_of_source(source), strict, same_layers, lora_of.get(source)))
        )
        for c, source in zip(comparisons, sources[1:])
    ]
    return checked, check_merge_config(config, facts)


def dedupe(items: Sequence[Any]) -> list[Any]:
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen
