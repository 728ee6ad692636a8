"""Token spellings (byte-level, SentencePiece, WordPiece) and the part of a BPE that acts on
some words."""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte maps to one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# str.translate table from byte-level characters to the latin-1 character of their byte,
# so that `token.translate(...).encode("latin-1")` decodes a token at C speed.
BYTE_LEVEL_TO_LATIN1 = {ord(char): byte for byte, char in bytes_to_unicode().items()}


BYTE_FALLBACK_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


BYTE_FALLBACK_TOKENS = frozenset(f"<0x{byte:02X}>" for byte in range(256))


def token_bytes(token: str, convention: str, byte_fallback: bool) -> bytes:
    """The raw bytes a regular token stands for, whatever the tokenizer's spelling."""
    if byte_fallback and token.startswith("<0x"):
        match = BYTE_FALLBACK_RE.match(token)
        if match:
            return bytes([int(match.group(1), 16)])
    if convention == "byte_level":
        try:
            return token.translate(BYTE_LEVEL_TO_LATIN1).encode("latin-1")
        except UnicodeEncodeError:  # a character outside the byte-level alphabet
            return token.encode()
    if convention == "metaspace":
        return token.replace("▁", " ").encode()
    if convention == "wordpiece":  # a piece that starts a word stands for the word's leading space too
        return token[2:].encode() if token.startswith("##") and len(token) > 2 else b" " + token.encode()
    return token.encode()


def substrings(words: Iterable[str], longest: int) -> set[str]:
    """Every substring of every word, up to `longest` characters."""
    found: set[str] = set()
    for word in set(words):
        for start in range(len(word)):
            found.update(word[start:end] for end in range(start + 1, min(len(word), start + longest) + 1))
    return found


def merge_results(merges: Sequence[Sequence[str]]) -> list[str]:
    """The token each BPE merge makes ([left, right] -> left + right), computed in C."""
    return list(map(operator.add, map(operator.itemgetter(0), merges), map(operator.itemgetter(1), merges)))


def bpe_model_for_words(model: Mapping[str, Any], merged: Sequence[str], words: Iterable[str]) -> dict[str, Any]:
    """The part of a BPE model (tokenizer.json "model"; `merged`: merge_results of its
    merges) that can act on `words` (spelled as the model sees them): encoding any of
    them with it gives the same tokens and ids as with the whole model.

    BPE only merges two adjacent pieces of one word into a piece that is again a substring
    of that word, and `ignore_merges` looks the whole word up; so it can only use the
    vocabulary entries that are substrings of a word, byte-fallback tokens, the unk token,
    and merges whose result is one of those (kept in their order, which is all that rank
    means). Ids are kept. Not for continuing_subword_prefix / end_of_word_suffix models,
    whose pieces are spelled differently from the word."""
    vocab = model["vocab"]
    wanted = substrings(words, max(map(len, vocab), default=0))
    if model.get("byte_fallback"):
        wanted |= BYTE_FALLBACK_TOKENS
    if isinstance(model.get("unk_token"), str):
        wanted.add(model["unk_token"])
    kept = wanted & vocab.keys()
    return {
        **model,
        "vocab": {token: vocab[token] for token in kept},
        "merges": list(itertools.compress(model["merges"], map(kept.__contains__, merged))),
    }
