"""Aligning a mergekit configuration (--mergekit-config): plan, remaps, merge.yaml, gate."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_tools.common.errors import CliError, check_interrupt
from merge_tools.common.logs import log
from merge_tools.common.merge_check import check_merge_config, compare_models
from merge_tools.common.mergekit_config import (
    MERGEKIT_METHODS,
    ModelRef,
    installed_mergekit_methods,
    local_or_hub,
    map_model_references,
    mergekit_config_problems,
    mergekit_references,
    parse_model_reference,
    read_mergekit_config,
)
from merge_tools.common.sources import looks_like_hub_id
from merge_tools.common.strict_json import read_optional_json
from merge_tools.remap.alignment_dir import alignment_inputs, read_manifest, refuse_writing_inputs, remove_stale_outputs, validation_key
from merge_tools.remap.config_outputs import REPORT_NAME
from merge_tools.remap.model_views import directory_fingerprint, view_model
from merge_tools.remap.options import RemapOptions
from merge_tools.remap.output_dir import HeldOutputs, check_free_space
from merge_tools.remap.remap import remap
from merge_tools.remap.shard_streaming import SelfCheckError
from merge_tools.remap.shards import human_bytes
from merge_tools.remap.tokenizers_in import ForkedCall
from merge_tools.remap.union import (
    MERGED_TOKENIZER_DIR,
    place_merged_tokenizer,
    plan_tokenizer_merge,
    same_tokenizer_files,
    tokenizer_carriers,
    tokenizer_merge_lines,
)

if TYPE_CHECKING:
    from merge_tools.common.merge_check import ModelFacts
    from merge_tools.remap.model_views import ModelView
    from merge_tools.remap.options import AlignOptions
    from merge_tools.remap.union import TokenizerMerge


@dataclass(frozen=True)
class AlignmentPlan:
    """What an alignment does: the target, and for every model (first appearance) an
    entry of the summary; the models to remap, with their views."""

    config: Mapping[str, Any]
    yaml_dir: Path
    target_ref: ModelRef
    target_source: str
    target: ModelView
    entries: list[dict[str, Any]]
    to_remap: list[tuple[dict[str, Any], ModelView]]
    merge: TokenizerMerge | None = None  # a merge with tokenizer_source: its tokenizer and rows
    verdict: MergekitVerdict = field(default_factory=lambda: MergekitVerdict(None), compare=False, repr=False)

    def confirm(self, config_path: Path) -> None:
        """Refuse the merge where mergekit does (its verdict, awaited): asked for before
        anything is published (a remap, the merged tokenizer, merge.yaml)."""
        refuse_what_mergekit_refuses(config_path, self.verdict.problems())

    def summary(self, config_path: Path) -> dict[str, Any]:
        summary = {
            "schema": "merge_tools.align/1",
            "config": str(config_path),
            "target": {"model": str(self.target_ref), "tokens": len(self.target.vocab), "rows": self.target.rows},
            "models": self.entries,
        }
        if self.merge is not None:
            summary["tokenizer_merge"] = self.merge.merged.to_dict()
        return summary


def align_mergekit(opts: AlignOptions) -> tuple[dict[str, Any], int]:
    """Remap, with --drop-extra, every model of a mergekit configuration whose vocabulary
    or row count differs from the target tokenizer's, and write a configuration that
    merges the aligned models. Returns (summary, exit code)."""
    plan = plan_alignment(opts)
    summary = plan.summary(opts.config)
    if opts.dry_run:  # the plans need only tokenizers and headers: problems show before any byte is written
        plan.confirm(opts.config)
        with tempfile.TemporaryDirectory(prefix="merge_tools-tokenizer-") as scratch:
            plan = place_merged_tokenizer(plan, Path(scratch)) if plan.merge is not None else plan
            for entry, view in plan.to_remap:
                dry = dataclasses.replace(aligned_remap_options(opts, entry, view, plan), out_dir=None, dry_run=True)
                record_counts(entry, remap(dry))
        return summary, 0
    placed: list[Path] = []  # created for the merged tokenizer: removed again if mergekit refuses the merge
    if plan.merge is not None:
        if plan.merge.directory.exists():
            plan.confirm(opts.config)  # an earlier ALIGNED/tokenizer is rewritten in place: only once mergekit agrees
        check_free_space(opts.out_dir, sum(view.bytes_to_write(not opts.copy) for _, view in plan.to_remap))
        placed = [path for path in (opts.out_dir, plan.merge.directory) if not path.exists()]
        plan = place_merged_tokenizer(plan, plan.merge.directory)
        summary["target"]["model"] = str(plan.merge.directory)
    code = run_remaps(opts, plan, placed)
    plan.confirm(opts.config)
    aligned, merge_yaml = write_aligned_yaml(opts, plan)
    remove_stale_outputs(opts.out_dir, plan, validation_key(opts.config))
    summary["merge_yaml"] = str(merge_yaml)
    summary["command"] = f"mergekit-yaml {merge_yaml} OUTPUT_DIR --copy-tokenizer"
    failures = (
        check_aligned_models(aligned, plan.yaml_dir, plan.target, opts.trust_remote_code)
        if code == 0
        else ["a remap failed its self-check"]
    )
    summary["gate"] = {"ok": not failures, "problems": failures}
    remapped = [entry["bytes"] for entry in plan.entries if entry.get("status") == "remapped" and entry.get("bytes")]
    summary["bytes"] = {key: sum(b[key] for b in remapped) for key in ("written", "linked")}
    return summary, 1 if failures else code


def refuse_mergekit_markers(out_dir: Path, sources: Sequence[str]) -> None:
    """mergekit reads `@` in a model path as a revision and `+` as a LoRA: the aligned YAML
    names ALIGNED/... and the local models as absolute paths, so neither may hold them
    (checked before anything is written, not after publishing a YAML mergekit misreads)."""
    for label, path in [("--out_dir", str(out_dir.resolve())), *(("the model", s) for s in sources if os.path.exists(s))]:
        marker = next((m for m in "@+" if m in path), None)
        if marker is not None:
            what = "a revision" if marker == "@" else "a LoRA"
            raise CliError(
                f"{label} {path} contains {marker!r}, which mergekit reads as the start of {what}: the aligned merge.yaml could not "
                "name it; move it to a path without '@' or '+'"
            )


def mergekit_schema_problems(config: Mapping[str, Any]) -> list[str]:
    """The installed mergekit's own reading of the configuration (its pydantic schema), []
    without mergekit (the project's checks then stand alone)."""

    if importlib.util.find_spec("mergekit") is None:
        return []
    from mergekit.config import MergeConfiguration

    try:
        MergeConfiguration.model_validate(config)
    except Exception as exc:  # pydantic's ValidationError, or the RuntimeError of mergekit's own validators
        errors = getattr(exc, "errors", None)
        if callable(errors):
            return [f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in errors()[:3]]
        return [str(exc).splitlines()[0]]
    return []


def installed_mergekit_problems(config: Mapping[str, Any]) -> list[str]:
    """What the installed mergekit refuses in the configuration: its schema, its methods."""
    return mergekit_schema_problems(config) + mergekit_config_problems(config, installed_mergekit_methods() or MERGEKIT_METHODS)


class MergekitVerdict:
    """The installed mergekit's problems with a configuration (installed_mergekit_problems),
    worked out in a forked worker: importing mergekit costs seconds of CPU (peft,
    transformers, torch), spent while the models are read and written. None: known to
    pass (the manifest says this YAML passed with this mergekit before)."""

    def __init__(self, config: Mapping[str, Any] | None) -> None:
        self.job = ForkedCall(installed_mergekit_problems, config) if config is not None else None
        self.answer: list[str] | None = None if self.job is not None else []

    def ready(self) -> bool:
        return self.answer is not None or (self.job is not None and self.job.ready())

    def problems(self) -> list[str]:
        if self.answer is None:
            assert self.job is not None
            self.answer = self.job.result()
        return self.answer


def start_mergekit_verdict(opts: AlignOptions, config: Mapping[str, Any]) -> MergekitVerdict:
    """The installed mergekit's verdict on the configuration, from a worker started now;
    none at all when the manifest says this YAML passed with this mergekit before."""
    validated = read_manifest(opts.out_dir).get("validated") == validation_key(opts.config)
    return MergekitVerdict(None if validated else config)


class MergekitRefused(CliError):
    """mergekit's own verdict refuses the configuration: raised before anything is published."""


def refuse_what_mergekit_refuses(config_path: Path, problems: Sequence[str]) -> None:
    if problems:
        raise MergekitRefused(f"{config_path}: mergekit would refuse it: {'; '.join(problems)}; nothing was remapped")


def plan_alignment(opts: AlignOptions) -> AlignmentPlan:
    """Read the YAML, choose the target (or plan the tokenizer a tokenizer_source merge
    gets), view every model (tokenizer and headers), refuse a merge mergekit would refuse,
    and name the output of each model to remap."""
    config = read_mergekit_config(opts.config)
    references = [parse_model_reference(r) for r in mergekit_references(config, opts.config)]
    refuse_what_mergekit_refuses(opts.config, mergekit_config_problems(config, MERGEKIT_METHODS))
    mergekit_verdict = start_mergekit_verdict(opts, config)
    yaml_dir = opts.config.resolve().parent
    refuse_mergekit_markers(opts.out_dir, [local_or_hub(ref, yaml_dir) for ref in references])
    for ref in references:
        if ref.lora:
            raise CliError(
                f"{opts.config}: {ref} applies a LoRA ({ref.lora}); its vocabulary rows cannot be remapped before the LoRA is "
                "merged: merge it first (e.g. with PEFT's merge_and_unload) and reference the merged model"
            )
    unique: dict[tuple[str, str | None], ModelRef] = {}
    for ref in references:
        unique.setdefault((local_or_hub(ref, yaml_dir), ref.revision), ref)
    views = {key: view_model(*key, opts.trust_remote_code) for key in unique}
    check_mergeable(config, views, unique, yaml_dir)
    merge = plan_tokenizer_merge(opts, config, unique, views, yaml_dir) if opts.base_tokenizer is None else None
    if merge is not None:
        target_ref, target_source, target = ModelRef(str(merge.directory)), str(merge.directory), merge.view
    else:
        target_ref = choose_target(opts, config, references)
        target_source = local_or_hub(target_ref, yaml_dir) if opts.base_tokenizer is None else target_ref.path
        target = view_model(target_source, target_ref.revision, opts.trust_remote_code)
    inputs = alignment_inputs(opts, views, merge, None if merge is not None else target)
    entries: list[dict[str, Any]] = []
    to_remap = []
    out_dir = opts.out_dir.resolve()
    taken = {MERGED_TOKENIZER_DIR, *(path.name for path in inputs if path.parent == out_dir)}
    carriers = tokenizer_carriers(config, unique, yaml_dir) if merge is not None else set()
    for (source, revision), ref in unique.items():
        view = views[(source, revision)]
        same = (
            view.vocab == target.vocab and view.rows == target.rows and not (merge and merge.merged.fills[merge.names[(source, revision)]])
        )
        entry = {"model": str(ref), "source": source, "revision": revision, "status": "identical" if same else "to remap",
                 "rows": view.rows, "vocab_size": len(view.vocab), "output": source}  # fmt: skip
        if same and merge is not None and (source, revision) in carriers and not same_tokenizer_files(view.directory, merge.files):
            same, entry["status"], entry["reason"] = False, "to remap", "carries the merged tokenizer"
        if not same:
            entry["output"] = str(opts.out_dir.resolve() / aligned_name(ref, taken))
            to_remap.append((entry, view))
        entries.append(entry)
    plan = AlignmentPlan(config, yaml_dir, target_ref, target_source, target, entries, to_remap, merge, mergekit_verdict)
    refuse_writing_inputs(opts, inputs, plan)
    return plan


def choose_target(opts: AlignOptions, config: Mapping[str, Any], references: Sequence[ModelRef]) -> ModelRef:
    """--base_tokenizer, else base_model, else the first model."""
    if opts.base_tokenizer is not None:
        return ModelRef(opts.base_tokenizer, opts.base_revision)
    return parse_model_reference(config["base_model"]) if config.get("base_model") is not None else references[0]


def check_mergeable(
    config: Mapping[str, Any],
    views: Mapping[tuple[str, str | None], ModelView],
    unique: Mapping[tuple[str, str | None], ModelRef],
    yaml_dir: Path,
) -> None:
    """compare_tokenizers.py's architecture check, before anything is written: a merge
    mergekit would refuse (or one that mixes incompatible tensors) is exit 2."""
    keys = list(unique)
    base = views[keys[0]].facts

    def facts(reference: Any) -> ModelFacts | None:
        ref = parse_model_reference(reference)
        view = views.get((local_or_hub(ref, yaml_dir), ref.revision))
        return view.facts if view is not None else None

    problems = check_merge_config(config, facts)
    for key in keys[1:]:
        other = views[key].facts
        if base is None or other is None:
            continue
        for level, message in compare_models(base, other, False, not config.get("slices")):
            if level == "fail":
                problems.append(f"{unique[key]}: {message}")
            elif level == "warn":
                log.warning("%s: %s", unique[key], message)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CliError(f"the merge would fail or mix incompatible models, nothing was remapped: {'; '.join(problems[:3])}{more}")


def aligned_name(ref: ModelRef, taken: set[str]) -> str:
    """A readable directory name for a remapped model: one plain path component (never
    empty, `.`, `..` or hidden, whatever the model path ends with), unique among `taken`
    (compared case-insensitively, for case-insensitive file systems)."""
    path = ref.path.rstrip("/\\")
    if looks_like_hub_id(path) and not os.path.exists(path):
        stem = path.replace("/", "--")
    else:
        stem = os.path.basename(os.path.normpath(os.path.abspath(os.path.expanduser(path or "."))))
    stem = re.sub(r"[^\w.-]+", "_", stem + (f"-{ref.revision}" if ref.revision else "")).lstrip(".") or "model"
    if len(stem) > 100:
        stem = f"{stem[:80]}-{hashlib.sha1(stem.encode()).hexdigest()[:12]}"
    name, counter = stem, 2
    while name.lower() in {n.lower() for n in taken}:
        name, counter = f"{stem}-{counter}", counter + 1
    taken.add(name)
    return name


def aligned_remap_options(opts: AlignOptions, entry: Mapping[str, Any], view: ModelView, plan: AlignmentPlan) -> RemapOptions:
    """One model's remap in an alignment: --drop-extra onto the target; by default the
    target's own rows for the tokens the model lacks, when the widths allow."""
    target = plan.target
    if plan.merge is not None:
        return plan.merge.remap_options(opts, entry, view)
    init = opts.init or ("donor" if target.weight_bytes and view.hidden == target.hidden else "fvt")
    return RemapOptions(
        src_model=entry["source"], base_tokenizer=plan.target_source, out_dir=Path(entry["output"]), drop_extra=True, init=init,
        match=opts.match, max_shard_size=opts.max_shard_size, revision=entry["revision"], base_revision=plan.target_ref.revision,
        trust_remote_code=opts.trust_remote_code, show_progress=opts.show_progress, donor_model=opts.donor_model,
        omp_k=opts.omp_k, chat_template=opts.chat_template, link=not opts.copy,
    )  # fmt: skip


def run_remaps(opts: AlignOptions, plan: AlignmentPlan, placed: Sequence[Path] = ()) -> int:
    """Remap every model that needs it (reusing a finished remap with the same options);
    0, or 1 when a remap failed its self-check. `placed`: folders this alignment created
    before (--out_dir, the merged tokenizer's), removed if mergekit refuses the merge."""
    check_free_space(opts.out_dir, sum(view.bytes_to_write(not opts.copy) for _, view in plan.to_remap))
    created = list(placed) if placed or opts.out_dir.exists() else [opts.out_dir]
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return remap_each(opts, plan)
    except CliError as exc:
        # refused (mergekit's verdict) before any model was published: what this run created goes too
        for path in reversed(created):
            if path != opts.out_dir and isinstance(exc, MergekitRefused):
                shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def remap_each(opts: AlignOptions, plan: AlignmentPlan) -> int:
    """run_remaps' loop: a model is published only once mergekit's verdict is in; a remap
    that finishes before it is held (HeldOutputs) and the next one starts, and whatever is
    held is published as soon as the verdict is in (awaited after the last model)."""
    with HeldOutputs(plan.verdict.ready, lambda: plan.confirm(opts.config)) as held:
        code = remap_models(opts, plan, held)
        held.publish_all()
    return code


def remap_models(opts: AlignOptions, plan: AlignmentPlan, held: HeldOutputs) -> int:
    """Each model's remap, or the earlier one reused: 0, or 1 when a remap failed its self-check."""
    code = 0
    for entry, view in plan.to_remap:
        check_interrupt()
        out = Path(entry["output"])
        remap_opts = aligned_remap_options(opts, entry, view, plan)
        previous = read_optional_json(out / REPORT_NAME) if (out / REPORT_NAME).is_file() else None
        if reusable(previous, remap_opts, view, plan.target):
            entry["status"], report = "reused", previous
        else:
            if previous is None and (out.is_symlink() or out.exists()) and not (out.is_dir() and not any(out.iterdir())):
                raise CliError(
                    f"{out} exists and holds files this tool did not write (no {REPORT_NAME}); remove it or choose another --out_dir"
                )
            try:
                report = remap(dataclasses.replace(remap_opts, overwrite=out.exists()), lambda: plan.confirm(opts.config), held)
                entry["status"] = "remapped"
            except SelfCheckError as exc:
                log.error("%s: self-check failed: %s", entry["model"], exc)
                entry["status"], code = "failed", 1
            if plan.verdict.ready():
                held.publish_all()
            if entry["status"] == "failed":
                continue
        record_counts(entry, report)
    return code


def reusable(previous: Mapping[str, Any] | None, remap_opts: RemapOptions, view: ModelView, target: ModelView) -> bool:
    """An earlier remap in ALIGNED is kept only when it passed its self-check with the same
    options and read the same model and target (directory_fingerprint), not merely the same paths."""
    if previous is None or not previous.get("self_check", {}).get("ok"):
        return False
    inputs = previous.get("inputs") or {}
    return (
        previous.get("options") == json.loads(json.dumps(remap_opts.identity()))
        and (inputs.get("src_model") or {}).get("fingerprint") == directory_fingerprint(view.directory)
        and (inputs.get("base_tokenizer") or {}).get("fingerprint") == directory_fingerprint(target.directory)
    )


def record_counts(entry: dict[str, Any], report: Mapping[str, Any]) -> None:
    """The alignment table's words for a remap: copied (in place or moved), initialised, dropped."""
    counts = report["plan"]["counts"]
    entry.update(
        copied=counts["copied"] + counts["moved"], initialised=counts["initialised"], dropped=counts["dropped"], init=report["plan"]["init"]
    )
    entry["init_rules"] = report["plan"]["init_rules"]
    entry["bytes"] = report.get("bytes") or {"written": sum(s["bytes"] for s in report["shards"]["shards"]), "linked": 0}


def write_aligned_yaml(opts: AlignOptions, plan: AlignmentPlan) -> tuple[dict[str, Any], Path]:
    """ALIGNED/merge.yaml: the configuration with the remapped models' paths (local paths
    made absolute), without the tokenizer source: the vocabularies now agree."""
    import yaml

    replacement = {
        entry["source"] + "@" + str(entry["revision"]): entry["output"]
        for entry in plan.entries
        if entry["status"] in ("remapped", "reused")
    }

    spellings: dict[str, str] = {}  # the YAML's spelling of a model -> its spelling in the aligned YAML
    spelled: dict[str, int] = {}  # aligned model -> spellings of it given out

    def substitute(reference: Any) -> Any:
        ref = parse_model_reference(reference)
        source = local_or_hub(ref, plan.yaml_dir)
        new = replacement.get(source + "@" + str(ref.revision))
        if new is not None:
            # two spellings of one model are two inputs to mergekit: they stay two spellings
            # (`D/m`, `D/m/.`), never one path listed twice, which mergekit refuses
            if str(ref) not in spellings:
                spellings[str(ref)] = new + "/." * spelled.get(new, 0)
                spelled[new] = spelled.get(new, 0) + 1
            new = spellings[str(ref)]
            return new if not (isinstance(reference, Mapping) and reference.get("override_architecture")) else {**reference, "model": new}
        if source != ref.path:  # a local path: absolute, so the aligned YAML works from anywhere
            return str(ModelRef(source, ref.revision)) if isinstance(reference, str) else reference
        return reference

    aligned = map_model_references(plan.config, substitute)
    aligned.pop("tokenizer_source", None)
    block = aligned.pop("tokenizer", None)
    if isinstance(block, Mapping) and block.get("chat_template") is not None and aligned.get("chat_template") is None:
        aligned["chat_template"] = block["chat_template"]  # mergekit reads only the top-level key: the user's intent, honoured
    merge_yaml = opts.out_dir / "merge.yaml"
    staged_yaml = merge_yaml.with_name(f".merge.yaml.{os.getpid()}-{os.urandom(3).hex()}.tmp")  # two alignments never share it
    staged_yaml.write_text(
        f"# Written by remap_tokenizer.py from {opts.config}: every model uses the token order of {plan.target_ref}.\n"
        + yaml.safe_dump(aligned, sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
    os.replace(staged_yaml, merge_yaml)
    return aligned, merge_yaml


def check_aligned_models(config: Mapping[str, Any], yaml_dir: Path, target: ModelView, trust_remote_code: bool) -> list[str]:
    """What compare_tokenizers.py --weights would object to in the aligned configuration."""
    problems = []
    seen = set()
    for reference in mergekit_references(config):
        ref = parse_model_reference(reference)
        key = (local_or_hub(ref, yaml_dir), ref.revision)
        if key in seen:
            continue
        seen.add(key)
        view = view_model(key[0], ref.revision, trust_remote_code)
        if view.vocab != target.vocab:
            problems.append(f"{ref}: vocabulary differs from the target's")
        if view.rows != target.rows:
            problems.append(f"{ref}: {view.rows} embedding rows, the target has {target.rows}")
    return problems


def align_table(summary: Mapping[str, Any]) -> str:
    width = max(len(m["model"]) for m in summary["models"])
    lines = [f"target tokenizer: {summary['target']['model']} ({summary['target']['tokens']} tokens, {summary['target']['rows']} rows)", ""]
    lines.append(f"{'model':<{width}}  {'status':<10} {'copied':>7} {'initialised':>11}  {'rows from':<28} output")
    for m in summary["models"]:
        rules = ", ".join(f"{rule} {n}" for rule, n in (m.get("init_rules") or {}).items()) or "-"
        lines.append(
            f"{m['model']:<{width}}  {m['status']:<10} {m.get('copied', '-')!s:>7} "
            f"{m.get('initialised', '-')!s:>11}  {rules:<28} {m['output']}"
        )
    if summary.get("tokenizer_merge"):
        lines[1:1] = tokenizer_merge_lines(summary["tokenizer_merge"])
    written = sum(m["bytes"]["written"] for m in summary["models"] if m.get("bytes") and m["status"] == "remapped")
    linked = sum(m["bytes"]["linked"] for m in summary["models"] if m.get("bytes") and m["status"] == "remapped")
    if written or linked:
        lines += [
            "",
            f"written {human_bytes(written)}, linked {human_bytes(linked)} (shards without a vocabulary tensor; --copy copies them)",
        ]
    if "gate" in summary:
        lines.append("")
        lines.append(
            "gate: ok, every model now has the target's token->id map and rows"
            if summary["gate"]["ok"]
            else "gate: FAILED: " + "; ".join(summary["gate"]["problems"])
        )
    return "\n".join(lines)
