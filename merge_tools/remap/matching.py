"""Matching the tokens of two tokenizers: by spelling, or by the bytes they stand for."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from merge_tools.remap.tokenizers_in import is_byte_fallback_token, text_bytes

if TYPE_CHECKING:
    from merge_tools.remap.tokenizers_in import VocabSpec


LIST_CAP = 50  # entries per list in remap_report.json; counts are always complete


MATCH_MODES = ("auto", "exact", "bytes")


def emission_order(spec: VocabSpec, unreachable: frozenset[int]) -> Callable[[tuple[str, int]], tuple[bool, bool, int]]:
    """Sort key over (token, id) of one tokenizer: among tokens that spell the same bytes,
    the one the tokenizer produces for those bytes comes first (it is not `unreachable`),
    then a regular token before a byte-fallback one (`A` before `<0x41>`, which the model
    hardly ever saw), then the lowest id."""
    return lambda item: (item[1] in unreachable, is_byte_fallback_token(item[0], spec), item[1])


@dataclass(frozen=True)
class Matches:
    """Which source token each base token was matched to."""

    mode: str  # exact | bytes
    src_of_base: Mapping[int, int]
    collisions: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "matched": len(self.src_of_base),
            "collisions": len(self.collisions),
            "collision_examples": list(self.collisions[:LIST_CAP]),
        }


def match_tokens(
    base: VocabSpec,
    src: VocabSpec,
    mode: str,
    base_unreachable: frozenset[int] = frozenset(),
    src_unreachable: frozenset[int] = frozenset(),
) -> Matches:
    """Pair base ids with source ids. `exact` pairs equal spellings; `bytes` pairs added
    tokens by content, then every token that is text (regular tokens, non-special added
    tokens: text_bytes) by the bytes it stands for. When several tokens of one side spell
    the same bytes, the one its tokenizer produces for them keeps the match (emission_order)
    and the others are reported as collisions; a token its tokenizer never produces
    (`*_unreachable`, ids) neither gives nor takes a match."""
    if mode == "exact":
        return Matches("exact", {base_id: src.vocab[token] for token, base_id in base.vocab.items() if token in src.vocab})
    collisions: list[dict[str, Any]] = []
    token_of_id = {side: {i: t for t, i in spec.vocab.items()} for side, spec in (("source", src), ("base", base))}

    def by_bytes(spec: VocabSpec, side: str, unreachable: frozenset[int]) -> dict[bytes, int]:
        table: dict[bytes, int] = {}
        for token, token_id in sorted(spec.vocab.items(), key=emission_order(spec, unreachable)):
            key = text_bytes(token, spec)
            if key is None:
                continue
            if key in table:
                kept_id = table[key]
                collisions.append(
                    {
                        "side": side,
                        "bytes": key.decode("utf-8", "backslashreplace"),
                        "kept": token_of_id[side][kept_id],
                        "kept_id": kept_id,
                        "dropped": token,
                        "dropped_id": token_id,
                    }
                )
            elif token_id not in unreachable:
                table[key] = token_id
        return table

    src_by_bytes = by_bytes(src, "source", src_unreachable)
    base_by_bytes = by_bytes(base, "base", base_unreachable)
    src_of_base: dict[int, int] = {}
    for content in base.added:
        if content in src.vocab:
            src_of_base[base.vocab[content]] = src.vocab[content]
    claimed = set(src_of_base.values())
    for key, base_id in base_by_bytes.items():
        src_id = src_by_bytes.get(key)
        if src_id is not None and src_id not in claimed and base_id not in src_of_base:
            src_of_base[base_id] = src_id
            claimed.add(src_id)
    return Matches("bytes", src_of_base, tuple(collisions))


def effective_match_mode(requested: str, base: VocabSpec, src: VocabSpec) -> str:
    if requested != "auto":
        return requested
    same = (base.convention, base.byte_fallback) == (src.convention, src.byte_fallback)
    return "exact" if same else "bytes"
