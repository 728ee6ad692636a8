"""The encoding fingerprint: the ids a tokenizer gives a fixed sample text."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from merge_tools.common.errors import CliError
from merge_tools.common.spellings import bpe_model_for_words, merge_results
from merge_tools.common.tokenizer_files import tokenizers_library

# Encoded by every tokenizer: the ids' sha256 identifies the encoding behaviour, the way
# llama.cpp's convert_hf_to_gguf.py identifies pre-tokenizers (its text differs from ours).
FINGERPRINT_SAMPLE = (
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; don't PANIC!\n"
    "def remap(rows: list[int]) -> dict[int, int]:\n"
    "    return {i: r for i, r in enumerate(rows) if r != -1}  # 0x1F &&= ||\n"
    "3 33 333 3333 33333 333333 1234567890 3.14159 -42 1e-9 100,000 ２０２６\n"
    "   \t\t  \n\n\n    trailing   spaces   \r\n"
    "日本語のテキスト、東京都。中文测试，简体。한국어 텍스트입니다.\n"
    "🦙🚀 👩\u200d💻 emoji 🏳\ufe0f\u200d🌈\n"
    "e\u0301 n\u0303 a\u0308 combining marks; café naïve Ünïcödé ñ ß İ ﬁ\n"
    "Ελληνικά русский العربية हिन्दी עברית ไทย\n"
)


def build_library_tokenizer(text: str, where: Path) -> Any:
    from tokenizers import Tokenizer

    return tokenizers_library(where, Tokenizer.from_str, text)


def encode_fingerprint(
    tokenizer_json: Mapping[str, Any], merges: Sequence[Sequence[str]] | None, raw: bytes, where: Path, sample: str = FINGERPRINT_SAMPLE
) -> tuple[int, ...]:
    """The ids the tokenizers library gives `sample` (no special tokens added).

    Building a whole 128k-token BPE costs ~0.2 s of CPU; a BPE that only holds the
    entries the sample can reach (bpe_model_for_words) builds in milliseconds and encodes
    it the same. That needs the sample's words exactly as the model sees them, which the
    library's own normalizer and pre-tokenizer give as long as no added token occurs in the
    sample (added tokens split the text before both). Otherwise, and for other models,
    the whole tokenizer is built."""
    model = tokenizer_json.get("model") or {}
    if (
        model.get("type") == "BPE"
        and isinstance(model.get("vocab"), Mapping)
        and merges is not None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
    ):
        probe_json = {**tokenizer_json, "added_tokens": [], "model": {"type": "WordLevel", "vocab": {"<probe>": 0}, "unk_token": "<probe>"}}
        probe = build_library_tokenizer(json.dumps(probe_json), where)
        normalizer = probe.normalizer

        def normalize(text: str) -> str:
            return tokenizers_library(where, normalizer.normalize_str, text) if normalizer is not None else text

        normalized = normalize(sample)
        # the library skips added tokens with empty content
        contents = [entry["content"] for entry in tokenizer_json.get("added_tokens") or [] if entry.get("content")]
        if not any(content in sample or content in normalized or normalize(content) in normalized for content in contents):
            # The library refuses a merge of or into a token it does not know; the pruned
            # build no longer sees most merges, so they are checked here.
            vocab, merged = model["vocab"], merge_results(merges)
            if not (all(map(vocab.__contains__, merged)) and vocab.keys() >= set(chain.from_iterable(merges))):
                raise CliError(f"{where}: not a valid tokenizer.json (a merge names a token that is not in the model vocabulary)")
            pre_tokenized = (
                tokenizers_library(where, probe.pre_tokenizer.pre_tokenize_str, normalized)
                if probe.pre_tokenizer is not None
                else [(normalized, None)]
            )
            pruned = {
                **tokenizer_json,
                "added_tokens": [],
                "model": bpe_model_for_words(model, merged, [word for word, _ in pre_tokenized]),
            }
            return tuple(
                tokenizers_library(where, build_library_tokenizer(json.dumps(pruned), where).encode, sample, add_special_tokens=False).ids
            )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{where}: not UTF-8 ({exc})") from exc
    return tuple(tokenizers_library(where, build_library_tokenizer(text, where).encode, sample, add_special_tokens=False).ids)
