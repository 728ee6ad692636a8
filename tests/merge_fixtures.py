"""Tiny models whose tokenizers differ the ways community checkpoints do, and a merge YAML."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

import factories
from factories import (
    BYTE_SPECIALS,
    tensors,  # noqa: F401 - re-exported for the e2e tests
)

CHAT = ["<|im_start|>", "<|im_end|>"]


def build_models(root: Path, byte_tok: dict) -> dict[str, Path]:
    """base; same (same tokenizer, other weights); padded (rows padded to 448);
    chat (chat tokens added, ids shuffled); permuted (the base's tokens, ids shuffled)."""
    keep = list(BYTE_SPECIALS.values())
    chat_json = factories.permuted(factories.with_tokens(byte_tok, added=CHAT), seed=11, keep=keep)
    return {
        "base": factories.write_model(root / "base", byte_tok, seed=1, **BYTE_SPECIALS),
        "same": factories.write_model(root / "same", byte_tok, seed=2, **BYTE_SPECIALS),
        "padded": factories.write_model(root / "padded", byte_tok, rows=448, seed=3, **BYTE_SPECIALS),
        "chat": factories.write_model(
            root / "chat", chat_json, seed=4, bos=BYTE_SPECIALS["bos"], eos="<|im_end|>", chat_template="{{ messages }}"
        ),
        "permuted": factories.write_model(root / "permuted", factories.permuted(byte_tok, seed=12, keep=keep), seed=5, **BYTE_SPECIALS),
    }


def linear_yaml(path: Path, base: Path, weighted: list[tuple[Path, float]], **extra: object) -> Path:
    config = {
        "merge_method": "linear",
        "base_model": str(base),
        "models": [{"model": str(model), "parameters": {"weight": weight}} for model, weight in weighted],
        "dtype": "float32",
        **extra,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def mergekit_linear(inputs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """What mergekit 0.1.5's linear method computes, operation for operation, in fp32."""
    weight = torch.tensor(weights, dtype=torch.float32)
    result = torch.zeros_like(inputs[0], dtype=torch.float32)
    for tensor, coefficient in zip(inputs, weight):
        result.addcmul_(tensor.float(), coefficient.reshape(1, 1))
    return result.div_(weight.sum())


UNION_TOKENS = {"sib1": ["<tool_call>", "</tool_call>", "<both>"], "sib2": ["<think>", "<both>"]}


def build_union_models(root: Path, byte_tok: dict) -> dict[str, Path]:
    """Fine-tunes that each add their own tokens, as `tokenizer_source: union` merges them:
    base; sib1 (+ <tool_call>, </tool_call>, <both>); sib2 (+ <think>, not special, and
    <both>: the two hold it at different ids); ghost (sib1's tokenizer, but only the
    base's 400 embedding rows: its two tool-call tokens are ghost tokens); regular (the
    base's tokenizer with <think> as a regular token); regular_added (regular's vocabulary,
    <think> an added special token at the same id); tied (the base with tied embeddings);
    templated (the base's vocabulary, its own chat template and eos); split (the base's BPE
    extended with the regular token "own" but no merge that makes it)."""
    sib1 = factories.with_tokens(byte_tok, added=UNION_TOKENS["sib1"])
    sib2 = factories.with_tokens(byte_tok, added=UNION_TOKENS["sib2"])
    sib2["added_tokens"][-2]["special"] = False
    regular = factories.with_tokens(byte_tok, regular=["<think>"])
    regular_added = copy.deepcopy(regular)
    regular_added["added_tokens"].append({**sib1["added_tokens"][-1], "content": "<think>", "id": regular["model"]["vocab"]["<think>"]})
    split = copy.deepcopy(byte_tok)
    split["model"]["vocab"]["own"] = len(factories.vocab_of(byte_tok))
    return {
        "base": factories.write_model(root / "base", byte_tok, seed=1, **BYTE_SPECIALS),
        "sib1": factories.write_model(root / "sib1", sib1, seed=2, **BYTE_SPECIALS),
        "sib2": factories.write_model(root / "sib2", sib2, seed=3, **BYTE_SPECIALS),
        "ghost": factories.write_model(
            root / "ghost", factories.with_tokens(byte_tok, added=UNION_TOKENS["sib1"][:2]), rows=400, seed=4, **BYTE_SPECIALS
        ),  # a base that has <think> as a regular token (its BPE never produces it), which sib2 adds as an added token
        "regular": factories.write_model(root / "regular", regular, seed=5, **BYTE_SPECIALS),
        "regular_added": factories.write_model(root / "regular_added", regular_added, seed=6, **BYTE_SPECIALS),
        "tied": factories.write_model(root / "tied", byte_tok, seed=7, config_overrides={"tie_word_embeddings": True}, **BYTE_SPECIALS),
        "templated": factories.write_model(
            root / "templated", byte_tok, seed=8, bos=BYTE_SPECIALS["bos"], eos=BYTE_SPECIALS["bos"], chat_template="{{ messages }}!"
        ),
        "split": factories.write_model(root / "split", split, seed=9, **BYTE_SPECIALS),
    }


def union_yaml(
    path: Path, models: dict[str, Path], names: list[str], method: str = "linear", base: str | None = "base", **extra: object
) -> Path:
    """A merge of `names` (base_model: `base`, None for none) with tokenizer_source: union
    unless `extra` says otherwise (tokenizer_source=None removes it); `slices=[[name,
    [start, end]], ...]` makes it a passthrough of one source per slice instead."""
    config: dict[str, object] = {"merge_method": method, "base_model": str(models[base]) if base else None}
    config["models"] = [{"model": str(models[n]), "parameters": {"weight": round(1 / len(names), 4)}} for n in names]
    slices = extra.pop("slices", None)
    if slices:
        config["models"] = None
        config["slices"] = [{"sources": [{"model": str(models[n]), "layer_range": r}]} for n, r in slices]  # type: ignore[union-attr]
    config |= {"dtype": "float32", "tokenizer_source": "union", **extra}
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}, sort_keys=False))
    return path


def expected_row(
    weights: dict[str, dict[str, torch.Tensor]],
    vocabs: dict[str, dict[str, int]],
    model: str,
    token: str,
    tensor: str,
    base: str | None = "base",
) -> torch.Tensor:
    """The row mergekit's tokenizer merge gives `model` for `token` (mergekit/tokenizer/
    embed.py, written out from its rules): its own row; else the one holder's; else the
    base's (no base_model: none); else the mean of the holders'; zero when none holds it.
    A ghost id is not held. `weights`: the models' tensors by name (factories.tensors)."""
    rows = {n: w["model.embed_tokens.weight"].shape[0] for n, w in weights.items()}
    holders = [n for n in weights if vocabs[n].get(token, rows[n]) < rows[n]]
    if model in holders:
        return weights[model][tensor][vocabs[model][token]]
    chosen = [base] if base in holders else holders
    if not chosen:
        return torch.zeros_like(weights[model][tensor][0])
    return sum(weights[n][tensor][vocabs[n][token]] for n in chosen) / len(chosen)
