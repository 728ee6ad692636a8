"""The alignment's folder: what it reads is never written, and what an earlier alignment left
is removed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_tools import __version__
from merge_tools.common.errors import CliError
from merge_tools.common.logs import log
from merge_tools.common.sources import split_revision
from merge_tools.common.strict_json import read_optional_json
from merge_tools.remap.config_outputs import REPORT_NAME
from merge_tools.remap.union import MERGED_TOKENIZER_DIR

if TYPE_CHECKING:
    from merge_tools.remap.alignment import AlignmentPlan
    from merge_tools.remap.model_views import ModelView
    from merge_tools.remap.options import AlignOptions
    from merge_tools.remap.union import TokenizerMerge


def alignment_inputs(
    opts: AlignOptions, views: Mapping[tuple[str, str | None], ModelView], merge: TokenizerMerge | None, target: ModelView | None
) -> dict[Path, str]:
    """Every local file and folder an alignment reads (resolved -> what it is): the YAML,
    every model, the target tokenizer, the donor, the tokenizer a merge extends."""
    inputs = {opts.config.resolve(): f"the merge configuration {opts.config}"}
    for (source, _), view in views.items():
        inputs.setdefault(view.directory.resolve(), f"the model {source}")
    if target is not None:
        inputs.setdefault(target.directory.resolve(), f"the target tokenizer {target.source}")
    if merge is not None:
        inputs.setdefault(merge.source_dir.resolve(), f"the tokenizer source {merge.source_dir}")
    if opts.donor_model is not None and Path(split_revision(opts.donor_model)[0]).expanduser().exists():
        inputs.setdefault(Path(split_revision(opts.donor_model)[0]).expanduser().resolve(), f"the donor model {opts.donor_model}")
    return inputs


def refuse_writing_inputs(opts: AlignOptions, inputs: Mapping[Path, str], plan: AlignmentPlan) -> None:
    """No byte of an alignment lands on an input: --out_dir is not inside one, and no path
    it writes (merge.yaml, tokenizer/, each aligned model) is, holds or lies inside one.
    Checked before anything is written."""
    out_dir = opts.out_dir.resolve()
    for path, what in inputs.items():
        if path.is_dir() and (out_dir == path or path in out_dir.parents):
            where = "is" if out_dir == path else "is inside"
            raise CliError(f"--out_dir {opts.out_dir} {where} {what} ({path}), an input; choose a directory outside it")
    outputs = {out_dir / "merge.yaml": "the aligned merge.yaml", **{Path(e["output"]): "an aligned model" for e, _ in plan.to_remap}}
    if plan.merge is not None:
        outputs[out_dir / MERGED_TOKENIZER_DIR] = "the merged tokenizer"
    for output, written in outputs.items():
        target = output.resolve()
        for path, what in inputs.items():
            if target == path or path in target.parents or target in path.parents:
                relation = "is" if target == path else "would be written inside" if path in target.parents else "holds"
                raise CliError(
                    f"{output} ({written}) {relation} {what}, an input of the alignment; nothing was written: choose another --out_dir"
                )


ALIGNMENT_MANIFEST = ".merge_tools-alignment.json"  # in ALIGNED: the folders this tool wrote there


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """What the last alignment into `out_dir` recorded: the folders it wrote (`outputs`)
    and the configuration mergekit validated (`validated`: validation_key)."""
    manifest = out_dir / ALIGNMENT_MANIFEST
    try:
        return read_optional_json(manifest) if manifest.is_file() else {}
    except CliError:  # a damaged manifest is as good as none: nothing is reused from it
        return {}


def validation_key(config_path: Path) -> str:
    """What mergekit's own validation of a configuration depends on: the YAML's bytes and
    the installed mergekit (and this tool's) versions; read without importing mergekit."""
    import importlib.metadata

    try:
        mergekit = importlib.metadata.version("mergekit")
    except importlib.metadata.PackageNotFoundError:
        mergekit = "none"
    return f"{hashlib.sha256(config_path.read_bytes()).hexdigest()} mergekit {mergekit} merge_tools {__version__}"


def remove_stale_outputs(out_dir: Path, plan: AlignmentPlan, validated: str) -> None:
    """Remove what an earlier alignment into the same folder wrote and the new merge.yaml no
    longer names (a model dropped from the YAML, the tokenizer of a former union): only
    folders the manifest lists and that still hold this tool's output, never an input. The
    new manifest also records the configuration mergekit validated (`validated`)."""
    manifest = out_dir / ALIGNMENT_MANIFEST
    previous = read_manifest(out_dir).get("outputs", [])
    current = [Path(e["output"]).name for e in plan.entries if e["status"] in ("remapped", "reused", "failed")]
    current += [MERGED_TOKENIZER_DIR] if plan.merge is not None else []
    inputs = {Path(e["source"]).resolve() for e in plan.entries}
    for name in previous if isinstance(previous, list) else []:
        stale = out_dir / str(name)
        if name in current or "/" in str(name) or stale.is_symlink() or not stale.is_dir() or stale.resolve() in inputs:
            continue
        if name == MERGED_TOKENIZER_DIR or (stale / REPORT_NAME).is_file():
            log.info("removing %s: written by an earlier alignment, the new merge.yaml no longer uses it", stale)
            shutil.rmtree(stale, ignore_errors=True)
    staged = manifest.with_name(f"{ALIGNMENT_MANIFEST}.{os.getpid()}.tmp")
    staged.write_text(json.dumps({"outputs": current, "validated": validated}) + "\n", encoding="utf-8")
    os.replace(staged, manifest)
