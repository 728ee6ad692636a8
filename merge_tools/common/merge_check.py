"""The merge as a whole: architectures, tensors, layers: what mergekit refuses, or silently
settles with the base model's value, read from config.json and safetensors headers only."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from merge_tools.common.mergekit_config import parse_model_reference
from merge_tools.common.strict_json import is_int
from merge_tools.common.vocab_tensors import INPUT_EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING_SUFFIXES

# What mergekit refuses, or silently settles with the base model's value, read from
# config.json and safetensors headers only.
ARCH_MUST_MATCH = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


ARCH_INHERITED = (
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "hidden_act",
    "hidden_activation",
    "sliding_window",
    "attention_bias",
    "mlp_bias",
)


LAYER_RE = re.compile(r"(^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


LAYER_INDEX_RE = re.compile(r"((?:^|\.)(?:layers|h|blocks|layer)\.)\d+\.")


@dataclass(frozen=True)
class ModelFacts:
    """A model as the merge check sees it: config.json and its tensors' dtypes and shapes
    (None when it has no safetensors headers to read)."""

    config: Mapping[str, Any]
    tensors: Mapping[str, tuple[str, tuple[int, ...]]] | None

    def value(self, key: str) -> Any:
        text = self.config.get("text_config")
        return text[key] if isinstance(text, Mapping) and key in text and key not in self.config else self.config.get(key)

    def layers(self) -> int | None:
        """The layer count mergekit iterates: config.json's (else the tensors' highest layer + 1)."""
        value = self.value("num_hidden_layers") or self.value("n_layer")
        if is_int(value):
            return value
        found = {int(m.group(2)) for name in self.tensors or () for m in [LAYER_RE.search(name)] if m}
        return max(found) + 1 if found else None


def layer_template(tensors: Mapping[str, tuple[str, tuple[int, ...]]], keep_index: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensors with the layer index taken out (`model.layers.N.mlp...` -> `model.layers.*.mlp...`;
    `keep_index`: left in), vocabulary tensors left out."""
    vocab = INPUT_EMBEDDING_SUFFIXES + OUTPUT_EMBEDDING_SUFFIXES + tuple(s.replace(".weight", ".bias") for s in OUTPUT_EMBEDDING_SUFFIXES)
    return {name if keep_index else LAYER_INDEX_RE.sub(r"\1*.", name): info for name, info in tensors.items() if not name.endswith(vocab)}


def compare_models(base: ModelFacts, other: ModelFacts, strict: bool, same_layers: bool) -> list[tuple[str, str]]:
    """(level, message) differences of `other` from `base`: fail, warn (fail with strict) or info."""
    found: list[tuple[str, str]] = []
    for key in ARCH_MUST_MATCH:
        if base.value(key) != other.value(key) and not (key == "head_dim" and None in (base.value(key), other.value(key))):
            found.append(("fail", f"{key} {other.value(key)!r}, the base has {base.value(key)!r}"))
    for key in ARCH_INHERITED:
        if base.value(key) != other.value(key):
            found.append(
                ("fail" if strict else "warn", f"{key} {other.value(key)!r}: the merged model takes the base's {base.value(key)!r}")
            )
    base_tied, other_tied = bool(base.value("tie_word_embeddings")), bool(other.value("tie_word_embeddings"))
    if base_tied and not other_tied:
        found.append(
            (
                "warn",
                "tie_word_embeddings false, the base's true: mergekit writes a merged lm_head but keeps the base's config, so "
                "transformers 4 ties the output layer to the merged embedding (the merged lm_head is ignored) where "
                "transformers 5 uses it; set tie_word_embeddings: false in the merged config.json",
            )
        )
    elif base_tied != other_tied:
        found.append(("info", "tie_word_embeddings differs (mergekit merges a tied embedding into lm_head)"))
    if same_layers and base.layers() != other.layers():
        found.append(
            (
                "fail",
                f"{other.layers()} layers, the base has {base.layers()} (mergekit: "
                "all inputs to a slice must have the same number of layers)",
            )
        )
    if base.tensors is not None and other.tensors is not None:
        # the same layers of both are merged (models:): every tensor of every layer must be in both; slices: by layer template
        ours, theirs = (layer_template(t, keep_index=same_layers) for t in (base.tensors, other.tensors))
        missing = sorted(set(ours) ^ set(theirs), key=lambda name: (name not in theirs, name))
        if missing:
            shown = ", ".join(f"{name} ({'only OTHER' if name in theirs else 'only the base'})" for name in missing[:3])
            found.append(
                ("fail", f"{len(missing)} tensor name(s) only in one of the two (mergekit: 'required but not present'), e.g. {shown}")
            )
        shapes = [name for name in sorted(set(ours) & set(theirs)) if ours[name][1] != theirs[name][1]]
        if shapes:
            found.append(
                (
                    "fail",
                    f"{len(shapes)} tensor(s) of another shape, e.g. {shapes[0]} "
                    f"{list(theirs[shapes[0]][1])} vs {list(ours[shapes[0]][1])}",
                )
            )
        dtypes = [name for name in sorted(set(ours) & set(theirs)) if ours[name][0] != theirs[name][0]]
        if dtypes:
            found.append(
                ("warn", f"{len(dtypes)} tensor(s) of another dtype, e.g. {dtypes[0]} {theirs[dtypes[0]][0]} vs {ours[dtypes[0]][0]}")
            )
    return found


def check_merge_config(config: Mapping[str, Any], facts: Callable[[Any], ModelFacts | None]) -> list[str]:
    """Problems of the configuration itself: a method that needs base_model without one;
    slices whose layer ranges leave their model or whose sources differ in length."""
    problems = []
    method = str(config.get("merge_method", "")).lower()
    for index, slice_ in enumerate(config.get("slices") or []):
        lengths = set()
        for source in slice_.get("sources") or [] if isinstance(slice_, Mapping) else []:
            layer_range = source.get("layer_range") if isinstance(source, Mapping) else None
            if not (
                isinstance(layer_range, list)
                and len(layer_range) == 2
                and all(map(is_int, layer_range))
                and 0 <= layer_range[0] <= layer_range[1]
            ):
                problems.append(f"slices[{index}]: layer_range {layer_range!r} is not [start, end]")
                continue
            lengths.add(layer_range[1] - layer_range[0])
            model = facts(source.get("model"))
            layers = model.layers() if model is not None else None
            if layers is not None and layer_range[1] > layers:
                problems.append(
                    f"slices[{index}]: layer_range {layer_range} of "
                    f"{parse_model_reference(source.get('model'))} goes past its {layers} layers"
                )
        if len(lengths) > 1 and method != "passthrough":
            problems.append(f"slices[{index}]: its sources take {sorted(lengths)} layers; mergekit needs the same number from each")
    return problems
