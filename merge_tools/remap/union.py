"""Merges that build their tokenizer (tokenizer_source: union, base or a model): the merged
tokenizer and its rows."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_tools.common.errors import CliError
from merge_tools.common.logs import log
from merge_tools.common.mergekit_config import ModelRef, local_or_hub, parse_model_reference
from merge_tools.common.sources import TOKENIZER_FILES
from merge_tools.common.strict_json import parse_json
from merge_tools.common.tokenizer_files import ADDED_TOKEN_FLAGS
from merge_tools.common.tokenizer_merge import (
    merged_tokenizer_json,
    named_tokens,
    plan_merged_vocab,
    tokenizer_merge_settings,
    vocabulary_groups,
)
from merge_tools.remap.model_views import ModelView, directory_fingerprint, view_model
from merge_tools.remap.options import RemapOptions
from merge_tools.remap.tokenizer_outputs import SLOW_TOKENIZER_FILES
from merge_tools.remap.tokenizers_in import read_tokenizer

if TYPE_CHECKING:
    from merge_tools.common.tokenizer_merge import MergedVocab, RowFill
    from merge_tools.remap.alignment import AlignmentPlan
    from merge_tools.remap.options import AlignOptions, MergekitFill


MERGED_TOKENIZER_DIR = "tokenizer"  # ALIGNED/tokenizer: the tokenizer mergekit's tokenizer merge would build


@dataclass(frozen=True)
class TokenizerMerge:
    """The tokenizer a tokenizer_source merge gets (plan_merged_vocab), written to
    `directory`, and what each model's remap onto it needs: the rows mergekit would fill
    from the other models (init mergekit)."""

    merged: MergedVocab
    directory: Path
    source_dir: Path  # the tokenizer it extends: the base's (union, base) or the source model's
    names: Mapping[tuple[str, str | None], str]  # (source, revision) -> the model's name in `merged`
    views: Mapping[tuple[str, str | None], ModelView]
    pad_to_multiple_of: int | None
    inputs_digest: str  # every model's directory_fingerprint: the filled rows come from all of them

    @functools.cached_property
    def view(self) -> ModelView:
        vocab = {token: token_id for token_id, token in enumerate(self.merged.tokens)}
        return ModelView(str(self.directory), None, self.directory, vocab, self.merged.size, 0)

    @functools.cached_property
    def files(self) -> dict[str, bytes]:
        """The merged tokenizer's files (merged_tokenizer_files)."""
        return merged_tokenizer_files(self)

    def fills_of(self, key: tuple[str, str | None]) -> tuple[MergekitFill, ...]:
        """RemapOptions.mergekit_fills of one model: each token it lacks (or that is forced),
        the rule, and the rows to average for its input embedding and for its lm_head, as
        (model source, revision, row id)."""
        key_of_name = {name: k for k, name in self.names.items()}
        name = self.names[key]

        def rows_of(token: str, fill: RowFill) -> tuple[tuple[str, str | None, int], ...]:
            sources = []
            for model in fill.models:
                other = key_of_name[model]
                row = fill.token_id if fill.token_id is not None else self.views[other].vocab[fill.token or token]
                sources.append((other[0], other[1], row))
            return tuple(sources)

        output = self.merged.output_fills.get(name, {})
        return tuple(
            (token, fill.rule, rows_of(token, fill), rows_of(token, output.get(token, fill)))
            for token, fill in self.merged.fills[name].items()
        )

    def untied_head(self, key: tuple[str, str | None], fills: Sequence[MergekitFill]) -> str | None:
        """For a model with tied embeddings whose filled output rows mergekit takes from an
        untied model's lm_head (or from other models than its input rows), the name of the
        lm_head its aligned copy gets; None when its copy stays tied."""
        view = self.views[key]
        if view.head_name is not None or view.facts is None:
            return None
        untied = {k: v.head_name for k, v in self.views.items() if v.head_name is not None}
        differs = any(embed != head or any((source, revision) in untied for source, revision, _ in head) for _, _, embed, head in fills)
        return next(iter(untied.values()), "lm_head.weight") if differs else None

    def remap_options(self, opts: AlignOptions, entry: Mapping[str, Any], view: ModelView) -> RemapOptions:
        """A model's remap onto the merged tokenizer: tokens matched by spelling as mergekit
        matches them, rows it lacks by mergekit's rules (unless --init says otherwise)."""
        init = opts.init or "mergekit"
        key = (entry["source"], entry["revision"])
        fills = self.fills_of(key)
        return RemapOptions(
            src_model=entry["source"], base_tokenizer=str(self.directory), out_dir=Path(entry["output"]), drop_extra=True, init=init,
            match="exact" if init == "mergekit" else opts.match, max_shard_size=opts.max_shard_size,
            pad_to_multiple_of=self.pad_to_multiple_of, revision=entry["revision"], trust_remote_code=opts.trust_remote_code,
            show_progress=opts.show_progress, donor_model=opts.donor_model, omp_k=opts.omp_k, chat_template=opts.chat_template,
            mergekit_fills=fills if init == "mergekit" else (), untie_head=self.untied_head(key, fills) if init == "mergekit" else None,
            mergekit_inputs=self.inputs_digest if init == "mergekit" else None, link=not opts.copy,
        )  # fmt: skip


def plan_tokenizer_merge(
    opts: AlignOptions,
    config: Mapping[str, Any],
    unique: Mapping[tuple[str, str | None], ModelRef],
    views: Mapping[tuple[str, str | None], ModelView],
    yaml_dir: Path,
) -> TokenizerMerge | None:
    """The tokenizer merge of a configuration with tokenizer_source (None without one):
    mergekit's union, base or model tokenizer and its rows, planned from the models'
    tokenizers and row counts. Ghost tokens mergekit would fail on are filled here; a
    `tokenizer.tokens` mergekit refuses is exit 2."""
    settings = tokenizer_merge_settings(config)
    if settings is None:
        return None
    source, tokens, pad = settings
    names = {key: str(ref) for key, ref in unique.items()}

    def name_of(reference: Any) -> str:
        ref = parse_model_reference(reference)
        key = (local_or_hub(ref, yaml_dir), ref.revision)
        if key not in names:
            raise CliError(f"{opts.config}: {ref} is named in the tokenizer settings but is not a model of the merge")
        return names[key]

    base = name_of(config["base_model"]) if config.get("base_model") is not None else None
    models = [view.merge_vocab(names[key]) for key, view in views.items()]
    views = dict(views)
    if source not in ("union", "base"):
        ref = parse_model_reference(source)
        key = (local_or_hub(ref, yaml_dir), ref.revision)
        if key not in names:  # a tokenizer that is no model of the merge: mergekit takes its tokens, none of its rows
            names[key], views[key] = str(ref), view_model(*key, opts.trust_remote_code)
            models.append(views[key].merge_vocab(names[key], merged=False))
        source = names[key]
    merged = plan_merged_vocab(models, base, source, named_tokens(tokens, name_of), pad, vocabulary_groups(config, name_of))
    if merged.problems:
        raise CliError(f"{opts.config}: mergekit would refuse it: {'; '.join(merged.problems[:3])}; nothing was remapped")
    for text in merged.unreadable:
        log.warning("%s", text.split("; remap_tokenizer.py")[0] + "; its row is filled from the models that hold the token")
    key_of_name = {name: key for key, name in names.items()}
    source_dir = views[key_of_name[merged.tokenizer_model]].directory
    digest = hashlib.sha256("".join(directory_fingerprint(view.directory) for view in views.values()).encode()).hexdigest()
    return TokenizerMerge(merged, opts.out_dir.resolve() / MERGED_TOKENIZER_DIR, source_dir, names, views, pad, digest)


def merged_tokenizer_files(merge: TokenizerMerge) -> dict[str, bytes]:
    """The files of the merged tokenizer: the tokenizer it extends, without the ghost
    tokens the merge drops, with the appended tokens as added tokens at their ids (flags
    kept: what mergekit's add_tokens writes), tokenizer_config.json's added_tokens_decoder
    to match; special_tokens_map.json and chat templates copied."""
    source = read_tokenizer(merge.source_dir)
    position = {token: token_id for token_id, token in enumerate(merge.merged.tokens)}
    data = merged_tokenizer_json(source.tokenizer_json, merge.merged, merge.source_dir)
    dropped = {token for token in source.spec.vocab if token not in position}
    config = dict(source.tokenizer_config)
    decoder = {
        key: value
        for key, value in (config.get("added_tokens_decoder") or {}).items()
        if not (isinstance(value, Mapping) and value.get("content") in dropped)
    }
    for token, flags in merge.merged.appended.items():
        decoder[str(position[token])] = {"content": token, **{f: bool(flags[f]) for f in ADDED_TOKEN_FLAGS}}
    if decoder:
        config["added_tokens_decoder"] = decoder
    files = {
        "tokenizer.json": (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode(),
        "tokenizer_config.json": (json.dumps(config, ensure_ascii=False, indent=2) + "\n").encode(),
    }
    for name in ("special_tokens_map.json", "chat_template.jinja", "chat_template.json"):
        if (merge.source_dir / name).is_file():
            files[name] = (merge.source_dir / name).read_bytes()
    return files


def place_merged_tokenizer(plan: AlignmentPlan, directory: Path) -> AlignmentPlan:
    """Write the merged tokenizer into `directory` (files rewritten only when they change,
    so that a finished alignment stays reusable) and point the plan at it."""
    assert plan.merge is not None
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in plan.merge.files.items():
        path = directory / name
        if not path.is_file() or path.read_bytes() != content:
            staged = path.with_name(f".{name}.{os.getpid()}.tmp")
            staged.write_bytes(content)
            os.replace(staged, path)
    merge = dataclasses.replace(plan.merge, directory=directory)
    return dataclasses.replace(plan, merge=merge, target_ref=ModelRef(str(directory)), target_source=str(directory), target=merge.view)


def tokenizer_merge_lines(merged: Mapping[str, Any], head: int = 10) -> list[str]:
    """The alignment table's lines on a tokenizer merge: what each model adds, ghost tokens."""
    lines = [f"tokenizer_source {merged['source']}: {merged['tokens']} tokens, {merged['size']} rows"]
    for model, added in ((merged.get("union") or {}).get("added") or {}).items():
        if added:
            lines.append(f"  {model} adds {len(added)}: {', '.join(map(repr, added[:head]))}" + (" ..." if len(added) > head else ""))
    for model, ghosts in merged["ghosts"].items():
        shown = ", ".join(f"{g['token']!r} (id {g['id']})" for g in ghosts[:head])
        lines.append(f"  {model}: {len(ghosts)} ghost token(s), rows filled from the models that hold them: {shown}")
    return lines


def tokenizer_carriers(
    config: Mapping[str, Any], unique: Mapping[tuple[str, str | None], ModelRef], yaml_dir: Path
) -> set[tuple[str, str | None]]:
    """The models whose tokenizer `mergekit-yaml --copy-tokenizer` may copy into the merged
    model: the base_model; without one, any model (it takes the first of a Python set)."""
    if config.get("base_model") is None:
        return set(unique)
    ref = parse_model_reference(config["base_model"])
    return {(local_or_hub(ref, yaml_dir), ref.revision)}


TOKENIZER_COPIED = tuple(name for name in TOKENIZER_FILES if name not in SLOW_TOKENIZER_FILES)  # what a fast tokenizer reads


def same_tokenizer_files(directory: Path, files: Mapping[str, bytes]) -> bool:
    """Whether mergekit's --copy-tokenizer, copying from `directory`, gives the fast
    tokenizer `files` hold: the same files, JSON compared as data."""
    for name in TOKENIZER_COPIED:
        path = directory / name
        ours, theirs = (path.read_bytes() if path.is_file() else None), files.get(name)
        if ours is None or theirs is None:
            if ours is not theirs:
                return False
        elif ours != theirs and (not name.endswith(".json") or parse_json(ours, path) != parse_json(theirs, name)):
            return False
    return True
