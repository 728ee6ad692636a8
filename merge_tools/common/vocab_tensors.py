"""Which tensors of a checkpoint carry the vocabulary: embeddings, heads, and every other
tensor with a row per token."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight", "tok_embeddings.weight")


OUTPUT_EMBEDDING_SUFFIXES = ("lm_head.weight", "embed_out.weight", "lm_head.linear.weight", "output.weight")


# Names of tensors that hold a row (or a value) per token: second input embeddings and
# heads (DeepSeek-V3's MTP layers, Medusa), per-layer embeddings (Gemma-3n), logit biases,
# and the per-row scales of quantized heads (bitsandbytes SCB, FP8 weight_scale).
PER_TOKEN_NAME_RE = re.compile(
    r"(embed_tokens|word_embeddings|tok_embeddings|(^|\.)wte\.|embed_in\.|lm_head|embed_out|shared_head\.head|medusa_head|"
    r"(^|\.)head\.|logits?_bias|(^|\.)output\.)"
)


NOT_PER_TOKEN_NAME_RE = re.compile(r"(norm|position|wpe|rotary|inv_freq)", re.IGNORECASE)


def per_token_name(name: str) -> bool:
    return bool(PER_TOKEN_NAME_RE.search(name)) and not NOT_PER_TOKEN_NAME_RE.search(name)


def vocab_axis_last(shape: Sequence[int], rows: int) -> bool:
    """A [1, V] tensor (final_logits_bias): its tokens run along the last axis."""
    return len(shape) == 2 and shape[0] == 1 and shape[1] == rows and rows != 1


# Per-token tensors that must have exactly the embedding's rows (a second input embedding,
# a second head, a logit bias); a count of their own means a half-resized checkpoint.
SAME_ROWS_NAME_RE = re.compile(r"(embed_tokens|word_embeddings|tok_embeddings|head\.weight$|logits?_bias$|lm_head\.bias$)")


def vocab_tensors_off(shapes: Mapping[str, Sequence[int]], rows: int) -> list[tuple[str, int | None]]:
    """(name, token count) of the tensors named SAME_ROWS_NAME_RE whose count is not `rows`."""
    found = []
    for name, shape in shapes.items():
        if per_token_name(name) and SAME_ROWS_NAME_RE.search(name) and len(shape) in (1, 2):
            count = token_count(shape, rows)
            if count != rows:
                found.append((name, count))
    return found


def token_count(shape: Sequence[int], rows: int) -> int | None:
    """How many tokens a per-token tensor has rows for (its first dimension; the last for
    a [1, N] bias), None for a scalar."""
    if not shape:
        return None
    return shape[1] if len(shape) == 2 and shape[0] == 1 and shape[1] != 1 and rows != 1 else shape[0]
