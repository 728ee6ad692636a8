"""Tiny tokenizers and checkpoints built from scratch, so the tests never need the Hub."""

from __future__ import annotations

import copy
import functools
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "the theory of the thing is that there is the other thing there",
    "Merging language models adds their weight matrices row by row.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tcontinue",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2026 3.14",
    "日本語のテキストです。東京と大阪。",
    "中文文本测试，你好世界。",
    "Emoji 🦙🚀 and café naïve résumé.",
    "fifteenth sixteenth seventeenth eighteenth",
    "tokenizer vocabulary embedding remap merge",
]
BYTE_SPECIALS = dict(bos="<|begin_of_text|>", eos="<|end_of_text|>")
SP_SPECIALS = dict(bos="<s>", eos="</s>", unk="<unk>")
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "日本語のテキストです。",
    "Emoji 🦙 and café.",
    "the thing there is the theory",
    "Numbers 2026 and 3.14",
]


def corpus(repeat: int = 30) -> list[str]:
    return CORPUS * repeat


@functools.cache
def _byte_level_json(vocab_size: int, specials: tuple[str, ...], ignore_merges: bool) -> str:
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(specials),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    return tokenizer.to_str()


def byte_level_bpe(
    vocab_size: int = 400, specials: Sequence[str] = ("<|begin_of_text|>", "<|end_of_text|>"), ignore_merges: bool = False
) -> dict[str, Any]:
    """A GPT-2 / Llama-3 style tokenizer.json (byte-level BPE, `Ġ` for a space)."""
    return json.loads(_byte_level_json(vocab_size, tuple(specials), ignore_merges))


@functools.cache
def _metaspace_json(vocab_size: int, specials: tuple[str, ...]) -> str:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*specials, *byte_tokens], show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    data = json.loads(tokenizer.to_str())
    # Byte tokens are ordinary vocabulary entries in SentencePiece models, not added tokens.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in set(byte_tokens)]
    return json.dumps(data)


def metaspace_bpe(vocab_size: int = 500, specials: Sequence[str] = ("<unk>", "<s>", "</s>")) -> dict[str, Any]:
    """A Llama-2 / SentencePiece style tokenizer.json (`▁` for a space, byte fallback)."""
    return json.loads(_metaspace_json(vocab_size, tuple(specials)))


def vocab_of(tokenizer_json: Mapping[str, Any]) -> dict[str, int]:
    return Tokenizer.from_str(json.dumps(tokenizer_json)).get_vocab(with_added_tokens=True)


def permuted(tokenizer_json: Mapping[str, Any], seed: int = 0, keep: Iterable[str] = ()) -> dict[str, Any]:
    """The same tokenizer with its ids shuffled (merges refer to strings, so they stay)."""
    data = copy.deepcopy(dict(tokenizer_json))
    vocab = data["model"]["vocab"]
    keep = set(keep)
    movable = [t for t in vocab if t not in keep]
    ids = [vocab[t] for t in movable]
    random.Random(seed).shuffle(ids)
    vocab.update(zip(movable, ids))
    for added in data["added_tokens"]:
        added["id"] = vocab[added["content"]]
    data["added_tokens"].sort(key=lambda t: t["id"])
    return data


def with_tokens(
    tokenizer_json: Mapping[str, Any], regular: Sequence[str] = (), added: Sequence[str] = (), special: bool = True
) -> dict[str, Any]:
    """Append regular tokens and added tokens at the next ids. A regular token that two
    tokens of the vocabulary spell gets a merge of them (the last one), as a BPE extended
    for real would: without one the tokenizer could never produce it."""
    data = copy.deepcopy(dict(tokenizer_json))
    vocab = data["model"]["vocab"]
    merges = data["model"].get("merges")
    next_id = len(vocab_of(data))
    for token in regular:
        vocab[token] = next_id
        next_id += 1
        split = next((token[:cut] for cut in range(len(token) - 1, 0, -1) if token[:cut] in vocab and token[cut:] in vocab), None)
        if isinstance(merges, list) and split is not None:
            pair = [split, token[len(split) :]]
            merges.append(pair if not merges or isinstance(merges[0], list) else " ".join(pair))
    for token in added:
        vocab[token] = next_id
        data["added_tokens"].append(
            {
                "id": next_id,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
        )
        next_id += 1
    return data


def without_tokens(tokenizer_json: Mapping[str, Any], tokens: Iterable[str]) -> dict[str, Any]:
    """Remove regular tokens (and merges producing or using them), renumbering densely."""
    data = copy.deepcopy(dict(tokenizer_json))
    removed = set(tokens)
    vocab = data["model"]["vocab"]
    kept = sorted((i, t) for t, i in vocab.items() if t not in removed)
    data["model"]["vocab"] = {t: new for new, (_, t) in enumerate(kept)}
    merges = []
    for merge in data["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if removed.isdisjoint((left, right, left + right)):
            merges.append(merge)
    data["model"]["merges"] = merges
    for added in data["added_tokens"]:
        added["id"] = data["model"]["vocab"][added["content"]]
    return data


def write_tokenizer(
    directory: Path,
    tokenizer_json: Mapping[str, Any],
    *,
    bos: str | None = None,
    eos: str | None = None,
    pad: str | None = None,
    unk: str | None = None,
    chat_template: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False, indent=1), encoding="utf-8")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048, "clean_up_tokenization_spaces": False}
    for role, token in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
        if token is not None:
            config[f"{role}_token"] = token
    if chat_template is not None:
        config["chat_template"] = chat_template
    config.update(extra_config or {})
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    return directory


def write_model(
    directory: Path,
    tokenizer_json: Mapping[str, Any] | None,
    *,
    rows: int | None = None,
    arch: str = "llama",
    seed: int = 0,
    shard_size: str = "20KB",
    bos: str | None = None,
    eos: str | None = None,
    pad: str | None = None,
    unk: str | None = None,
    hidden: int = 32,
    dtype: str = "float32",
    chat_template: str | None = None,
    state_dict_overrides: Mapping[str, Any] | None = None,
    safe_serialization: bool = True,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """A tiny causal LM whose embedding has `rows` rows (default: the tokenizer's size),
    saved with small shards, plus its tokenizer."""
    import torch
    import transformers

    vocab = vocab_of(tokenizer_json) if tokenizer_json is not None else {}
    rows = rows if rows is not None else len(vocab)
    ids = {role: vocab.get(token) if token else None for role, token in (("bos", bos), ("eos", eos), ("pad", pad))}
    common = dict(vocab_size=rows, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    # every architecture but gpt2 names its sizes the same way
    sized = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=4, **common)
    if arch == "llama":
        config = transformers.LlamaConfig(**{**sized, "num_hidden_layers": 2}, num_key_value_heads=2)
    elif arch == "llama_tied":
        config = transformers.LlamaConfig(**sized, num_key_value_heads=2, tie_word_embeddings=True)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**sized, num_key_value_heads=2, tie_word_embeddings=False)
    elif arch == "gemma":
        config = transformers.GemmaConfig(**sized, num_key_value_heads=1, head_dim=8)
    elif arch == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden, n_layer=1, n_head=4, n_positions=128, **common)
    elif arch == "gpt_neox":
        config = transformers.GPTNeoXConfig(**sized, max_position_embeddings=128, tie_word_embeddings=False)
    elif arch == "phi":
        config = transformers.PhiConfig(**sized, max_position_embeddings=128)
    else:
        raise ValueError(arch)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
        for name, value in (state_dict_overrides or {}).items():
            model.state_dict()[name].copy_(value)
    model = model.to(getattr(torch, dtype))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size=shard_size, safe_serialization=safe_serialization)
    if tokenizer_json is not None:
        write_tokenizer(directory, tokenizer_json, bos=bos, eos=eos, pad=pad, unk=unk, chat_template=chat_template)
    return directory


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file below `directory`, to prove a source was not touched."""
    import hashlib

    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def to_pytorch_bin(directory: Path) -> Path:
    """The checkpoint rewritten as one pytorch_model.bin (torch.save), its safetensors
    removed: the older format many Hub repos still ship (transformers 5 writes none)."""
    import torch
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(shard)))
        shard.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def call_main(main: Any, capsys: Any, *argv: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a tool's main() called in-process, as the tests drive it;
    what building the fixtures printed before is dropped."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def report_of(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "remap_report.json").read_text())


def tensors(directory: Path) -> dict[str, Any]:
    """Every tensor of a safetensors checkpoint directory, by name."""
    from safetensors import safe_open

    result = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            result.update({name: handle.get_tensor(name) for name in handle.keys()})
    return result


def two_token_word(tokenizer_json: dict) -> tuple[str, str]:
    """Two regular tokens whose concatenation the source's model splits back into them."""
    vocab = tokenizer_json["model"]["vocab"]
    stripped = dict(tokenizer_json, normalizer=None, pre_tokenizer=None, post_processor=None, added_tokens=[])
    model_only = Tokenizer.from_str(json.dumps(stripped))
    words = [t for t in vocab if t.startswith("Ġ") and len(t) > 3]
    tails = [t for t in vocab if t.isalpha() and len(t) > 2]
    for head in words:
        for tail in tails:
            if head + tail not in vocab and model_only.encode(head + tail).ids == [vocab[head], vocab[tail]]:
                return head, tail
    raise AssertionError("no two-token word in the test vocabulary")
