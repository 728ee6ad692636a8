"""The options of one remap and of an alignment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

RowSources = tuple[tuple[str, str | None, int], ...]  # the rows a filled row averages: (model source, revision, row id)


MergekitFill = tuple[str, str, RowSources, RowSources]  # (token, RowFill.rule, input rows, output rows)


@dataclass(frozen=True)
class RemapOptions:
    src_model: str
    base_tokenizer: str
    out_dir: Path | None  # None: a dry run
    drop_extra: bool = False
    init: str = "fvt"
    match: str = "auto"
    max_shard_size: int = 5 * 10**9
    pad_to_multiple_of: int | None = None
    revision: str | None = None
    base_revision: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    embed_name: str | None = None
    head_name: str | None = None
    trust_remote_code: bool = False
    init_report: int = 0
    show_progress: bool = False
    donor_model: str | None = None
    omp_k: int = 64
    chat_template: str = "base"
    # init mergekit (alignments of a merge with tokenizer_source): T's token -> (RowFill.rule,
    # the rows to average for the input and for the output embedding), a hash of those models,
    # and the lm_head a tied model's copy gets when its output rows differ from its input rows
    mergekit_fills: tuple[MergekitFill, ...] = ()
    mergekit_inputs: str | None = None
    untie_head: str | None = None
    link: bool = False  # an alignment's remap: the source's shards without a vocabulary tensor are linked, not copied
    calibration_text: str | None = None  # --init auto: the text it measures on (None: the built-in one)

    def identity(self) -> dict[str, Any]:
        """What determines the output: equal identities give equal outputs."""
        keys = (
            "src_model",
            "base_tokenizer",
            "drop_extra",
            "init",
            "match",
            "max_shard_size",
            "pad_to_multiple_of",
            "revision",
            "base_revision",
            "embed_name",
            "head_name",
            "donor_model",
            "omp_k",
            "chat_template",
            "mergekit_fills",
            "mergekit_inputs",
            "untie_head",
            "link",
            "calibration_text",
        )
        return {key: getattr(self, key) for key in keys}


@dataclass(frozen=True)
class AlignOptions:
    config: Path
    out_dir: Path
    base_tokenizer: str | None = None
    base_revision: str | None = None
    init: str | None = None  # None: donor (the target's rows) when the target has weights of M's width, else fvt
    match: str = "auto"
    max_shard_size: int = 5 * 10**9
    dry_run: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    show_progress: bool = False
    donor_model: str | None = None
    omp_k: int = 64
    chat_template: str = "base"
    copy: bool = False  # full copies of every aligned model (default: shards without a vocabulary tensor are linked)
