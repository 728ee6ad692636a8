"""Seeded synthetic tokenizers and checkpoints for the benchmarks (no Hub needed).

The tokenizer imitates Llama-3's layout: a byte-level BPE whose regular tokens are built
by merges from the 256 byte symbols, `ignore_merges`, and 256 special tokens after the
regular ones. The checkpoint imitates a Llama model in bf16 with a chosen depth.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from merge_tools.common.spellings import bytes_to_unicode  # noqa: E402

LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
WORDS = (
    "the of and to in is that for it as with was on be by at this are from or have an they which one you had her all "
    "there were been has their more will would when who what time some into than could other only new also its our two "
    "model token merge weight layer vocabulary embedding tensor python return import class def self value index"
).split()


def byte_level_alphabet() -> list[str]:
    mapping = bytes_to_unicode()
    return [mapping[b] for b in range(256)]


def synthetic_tokenizer(regular: int = 128_000, specials: int = 256, seed: int = 0) -> dict[str, Any]:
    """A valid byte-level BPE tokenizer.json with `regular` + `specials` tokens."""
    rng = random.Random(seed)
    alphabet = byte_level_alphabet()
    vocab: dict[str, int] = {char: i for i, char in enumerate(alphabet)}
    tokens = list(alphabet)
    merges: list[list[str]] = []
    space = alphabet[ord(" ")]
    # Real words first so that encoding English exercises long merge chains.
    for word in WORDS:
        for spelled in (word, space + word):
            current = spelled[0]
            for char in spelled[1:]:
                if current + char not in vocab:
                    merges.append([current, char])
                    vocab[current + char] = len(tokens)
                    tokens.append(current + char)
                current += char
    while len(tokens) < regular:
        left = tokens[int(len(tokens) * rng.random() ** 3)]
        right = tokens[int(len(tokens) * rng.random() ** 6)]
        merged = left + right
        if len(merged) > 16 or merged in vocab:
            continue
        merges.append([left, right])
        vocab[merged] = len(tokens)
        tokens.append(merged)
    special_names = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    special_names += [f"<|reserved_special_token_{i}|>" for i in range(specials - len(special_names))]
    added = [
        {"id": regular + i, "content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, name in enumerate(special_names[:specials])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def variant(tokenizer_json: Mapping[str, Any], missing: float = 0.05, new: float = 0.01, seed: int = 1) -> dict[str, Any]:
    """A base-tokenizer variant: `missing` of the regular tokens removed (with the merges
    that need them), `new` fresh tokens added, and every regular id shuffled (the special
    tokens keep their place at the end)."""
    rng = random.Random(seed)
    data = copy.deepcopy(dict(tokenizer_json))
    model = data["model"]
    alphabet = byte_level_alphabet()
    regular = [t for t in model["vocab"] if t not in set(alphabet)]
    # remove tokens no merge builds on, so that exactly `missing` of them go
    parts = {part for merge in model["merges"] for part in merge}
    leaves = [t for t in regular if t not in parts]
    removed = set(rng.sample(leaves, min(len(leaves), int(len(regular) * missing))))
    alive = set(alphabet)
    merges = []
    for left, right in model["merges"]:  # a merge survives if its parts do
        merged = left + right
        if left in alive and right in alive and merged not in removed and merged not in alive:
            alive.add(merged)
            merges.append([left, right])
    kept = [t for t in model["vocab"] if t in alive]
    fresh: list[str] = []
    pool = list(kept)
    while len(fresh) < int(len(regular) * new):
        left, right = rng.choice(pool), rng.choice(pool[:2000])
        merged = left + right
        if len(merged) <= 16 and merged not in alive:
            merges.append([left, right])
            alive.add(merged)
            fresh.append(merged)
            pool.append(merged)
    order = kept + fresh
    rng.shuffle(order)
    model["vocab"] = {token: i for i, token in enumerate(order)}
    model["merges"] = merges
    for i, added in enumerate(data["added_tokens"]):
        added["id"] = len(order) + i
    return data


def write_tokenizer_dir(directory: Path, tokenizer_json: Mapping[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory
