"""The vocabulary check: token -> id differences, and the tokens two tokenizers share exactly
and by bytes."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import ne
from typing import TYPE_CHECKING, Any

from merge_tools.common.cli import quoted
from merge_tools.common.spellings import BYTE_LEVEL_TO_LATIN1, token_bytes
from merge_tools.common.strict_json import escape_text

if TYPE_CHECKING:
    from merge_tools.gate.reading import TokenizerInfo


@dataclass(frozen=True)
class CheckResult:
    """One named check of a comparison: `ok`, `warn` (a difference tolerated without
    --strict), `fail` (counts towards exit code 1) or `skipped`."""

    name: str
    status: str
    summary: str
    details: Mapping[str, Any] = field(default_factory=dict)
    lines: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "summary": self.summary, **self.details}


@dataclass(frozen=True)
class VocabDiff:
    ref_size: int
    other_size: int
    moved: tuple[tuple[str, int, int], ...]
    only_in_ref: tuple[tuple[str, int], ...]
    only_in_other: tuple[tuple[str, int], ...]
    moved_count: int
    only_in_ref_count: int
    only_in_other_count: int
    shared_exact: int
    shared_by_bytes: int

    @property
    def equal(self) -> bool:
        return self.ref_size == self.other_size and not (self.moved_count or self.only_in_ref_count or self.only_in_other_count)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.equal else "fail",
            "ref_size": self.ref_size,
            "other_size": self.other_size,
            "counts": {
                "moved": self.moved_count,
                "only_in_ref": self.only_in_ref_count,
                "only_in_other": self.only_in_other_count,
                "shared_exact": self.shared_exact,
                "shared_by_bytes": self.shared_by_bytes,
            },
            "moved": [{"token": t, "ref_id": a, "other_id": b} for t, a, b in self.moved],
            "only_in_ref": [{"token": t, "id": i} for t, i in self.only_in_ref],
            "only_in_other": [{"token": t, "id": i} for t, i in self.only_in_other],
        }


def in_byte_level_alphabet(text: str) -> bool:
    """True when every character is one of the 256 byte-level symbols (code points 33-126,
    161-172 and 174-323), checked in one regex scan."""
    return NOT_BYTE_LEVEL_RE.search(text) is None


NOT_BYTE_LEVEL_RE = re.compile("[^\x21-\x7e\xa1-\xac\xae-\u0143]")


def tokens_as_bytes(tokens: Sequence[str], convention: str, byte_fallback: bool) -> list[bytes]:
    """`token_bytes` for many tokens at once: byte-level vocabularies are translated in one
    pass (one character per byte), which is ~10x faster than token by token."""
    joined = byte_level_joined(tokens) if convention == "byte_level" and not byte_fallback else None
    if joined is None:
        return [token_bytes(token, convention, byte_fallback) for token in tokens]
    out, start = [], 0
    for token in tokens:
        out.append(joined[start : start + len(token)])
        start += len(token)
    return out


def byte_level_joined(tokens: Sequence[str]) -> bytes | None:
    """The bytes of all tokens back to back, or None if a token has a character outside
    the byte-level alphabet (then bytes and characters no longer correspond one to one)."""
    try:
        return "".join(tokens).translate(BYTE_LEVEL_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return None


def regular_tokens(info: TokenizerInfo) -> list[str]:
    added = {token.content for token in info.added_tokens}
    return [token for token in info.vocab if token not in added]


def count_shared_by_bytes(ref: TokenizerInfo, other: TokenizerInfo, shared_exact: int) -> int:
    """How many tokens two tokenizers share when regular tokens match by their bytes and
    added tokens by content (what `remap_tokenizer.py --match bytes` copies)."""
    same_convention = (ref.convention, ref.byte_fallback) == (other.convention, other.byte_fallback)
    # Within the alphabet the byte map is one character per byte and injective, so
    # matching by bytes is matching by spelling: no need to build 2 x 128k keys. (Usually
    # the added tokens are in the alphabet too, and one scan of everything settles it.)
    if (
        same_convention
        and ref.convention == "byte_level"
        and not ref.byte_fallback
        and all(
            in_byte_level_alphabet("".join(info.vocab)) or in_byte_level_alphabet("".join(regular_tokens(info))) for info in (ref, other)
        )
    ):
        return shared_exact
    keys = []
    for info in (ref, other):
        added = {token.content for token in info.added_tokens}
        keys.append((added, set(tokens_as_bytes(regular_tokens(info), info.convention, info.byte_fallback))))
    (ref_added, ref_bytes), (other_added, other_bytes) = keys
    return len(ref_added & other_added) + len(ref_bytes & other_bytes)


def show_token(token: str, convention: str = "plain", byte_fallback: bool = False) -> str:
    """`'Ġthe' (" the")`: the token as stored, plus its text when the spelling differs."""
    shown = quoted(token)
    text = token_bytes(token, convention, byte_fallback).decode("utf-8", "surrogateescape")
    if text != token:
        shown += ' ("' + escape_text(text).replace('"', '\\"') + '")'
    if not unicodedata.is_normalized("NFC", token):  # `é` as e + U+0301 looks like `é`: show what it is
        shown += " [not NFC: " + " ".join(f"U+{ord(char):04X}" for char in token) + "]"
    return shown


def diff_vocab(ref: TokenizerInfo, other: TokenizerInfo, head: int) -> VocabDiff:
    """Counts over the whole vocabularies, lists of the first `head` by REF id (OTHER id
    for tokens only in OTHER). Ids are 0..n-1 (vocab_from_json makes sure). Shuffled
    128k-token vocabularies differ in nearly every id, so each pass over all tokens is a
    sort, a set operation or a map() that runs in C: one lookup per REF token in all."""
    ref_vocab, other_vocab = ref.vocab, other.vocab
    moved: list[tuple[str, int, int]] = []
    only_ref: list[tuple[str, int]] = []
    only_other: list[tuple[str, int]] = []
    counts = (0, 0, 0)
    if ref_vocab != other_vocab:
        ref_tokens = sorted(ref_vocab, key=ref_vocab.__getitem__)
        other_id_of = list(map(other_vocab.get, ref_tokens))  # None: only in REF
        missing = other_id_of.count(None)
        shared = len(ref_tokens) - missing
        counts = (sum(map(ne, other_id_of, range(len(ref_tokens)))) - missing, missing, len(other_vocab) - shared)
        for ref_id, other_id in enumerate(other_id_of):
            if len(moved) == min(head, counts[0]):
                break
            if other_id is not None and other_id != ref_id:
                moved.append((ref_tokens[ref_id], ref_id, other_id))
        ref_id = -1
        for _ in range(min(head, missing)):
            ref_id = other_id_of.index(None, ref_id + 1)
            only_ref.append((ref_tokens[ref_id], ref_id))
        if counts[2]:
            other_tokens = dict(zip(other_vocab.values(), other_vocab.keys()))
            extra_ids = sorted(set(range(len(other_vocab))).difference(other_id_of))[:head]
            only_other = [(other_tokens[other_id], other_id) for other_id in extra_ids]
    return VocabDiff(
        ref_size=len(ref_vocab),
        other_size=len(other_vocab),
        moved=tuple(moved),
        only_in_ref=tuple(only_ref),
        only_in_other=tuple(only_other),
        moved_count=counts[0],
        only_in_ref_count=counts[1],
        only_in_other_count=counts[2],
        shared_exact=len(ref_vocab) - counts[1],
        shared_by_bytes=count_shared_by_bytes(ref, other, len(ref_vocab) - counts[1]),
    )


def vocab_check(diff: VocabDiff, ref: TokenizerInfo, other: TokenizerInfo, mapped_by: str | None = None) -> CheckResult:
    """`mapped_by`: the tokenizer_source of a merge that maps rows by token, where a
    vocabulary that differs is reported, not a failure."""
    if diff.equal:
        summary = f"identical: {diff.ref_size} tokens, every token the same id"
    else:
        summary = (
            f"MISMATCH: {diff.ref_size} vs {diff.other_size} tokens; "
            f"{diff.moved_count} moved, {diff.only_in_ref_count} only in REF, "
            f"{diff.only_in_other_count} only in OTHER"
        )
    summary += f"; shared tokens: exact {diff.shared_exact}, by bytes {diff.shared_by_bytes}"
    lines: list[str] = []
    if diff.moved:
        lines.append(f"moved tokens (REF id -> OTHER id), {len(diff.moved)} of {diff.moved_count}:")
        lines += [f"  {a:>8} -> {b:<8} {show_token(t, ref.convention, ref.byte_fallback)}" for t, a, b in diff.moved]
    for title, entries, info, count in (
        ("only in REF", diff.only_in_ref, ref, diff.only_in_ref_count),
        ("only in OTHER", diff.only_in_other, other, diff.only_in_other_count),
    ):
        if entries:
            lines.append(f"{title}, {len(entries)} of {count}:")
            lines += [f"  {i:>8}  {show_token(t, info.convention, info.byte_fallback)}" for t, i in entries]
    if mapped_by is not None and not diff.equal:
        summary = summary.replace("MISMATCH: ", f"differs, mergekit maps the rows by token (tokenizer_source: {mapped_by}): ", 1)
    return CheckResult("vocab", "ok" if diff.equal or mapped_by is not None else "fail", summary, diff.to_dict(), tuple(lines))
