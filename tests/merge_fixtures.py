"""Tiny models whose tokenizers differ the ways community checkpoints do, and a merge YAML."""

from __future__ import annotations

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
