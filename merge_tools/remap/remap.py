"""One remap: read the inputs, plan, report, write."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_tools import __version__
from merge_tools.common.errors import CliError, check_interrupt
from merge_tools.common.logs import log
from merge_tools.common.sources import CONFIG_FILES, SAFETENSORS_INDEX, TOKENIZER_FILES, resolve_source, split_revision
from merge_tools.common.strict_json import is_int, read_optional_json
from merge_tools.remap.calibration import AutoChoice, auto_method
from merge_tools.remap.calibration_run import calibrated_rows, same_space_cosine
from merge_tools.remap.calibration_text import CALIBRATION_TEXT
from merge_tools.remap.checkpoints import config_value, find_vocab_tensors, read_checkpoint, refuse_encoder_decoder, resolve_model
from merge_tools.remap.config_outputs import (
    REPORT_NAME,
    as_id_list,
    config_token_ids,
    copy_other_files,
    file_digest,
    output_role_ids,
    patch_config,
    patch_generation_config,
    write_json,
)
from merge_tools.remap.donor import donor_tokens, initialised_rows, read_donor_for
from merge_tools.remap.matching import effective_match_mode, match_tokens
from merge_tools.remap.mergekit_rows import mergekit_rows
from merge_tools.remap.model_views import directory_fingerprint
from merge_tools.remap.output_dir import OWNER_FILE, HeldOutputs, OutputDirectory, check_free_space, check_out_dir
from merge_tools.remap.plan import plan_remap
from merge_tools.remap.shard_streaming import self_check, write_shards
from merge_tools.remap.shards import human_bytes, output_entries, plan_linked_shards, plan_shards
from merge_tools.remap.summary import transplant_warning
from merge_tools.remap.tokenizer_outputs import check_chat_template, patched_tokenizer, write_source_chat_template, write_tokenizer_files
from merge_tools.remap.tokenizers_in import (
    BaseTokenizerCheck,
    ForkedCall,
    fvt_decompositions,
    read_tokenizer,
    token_texts,
    unreachable_tokens,
)

if TYPE_CHECKING:
    from merge_tools.remap.checkpoints import Checkpoint, VocabTensors
    from merge_tools.remap.donor import Donor
    from merge_tools.remap.matching import Matches
    from merge_tools.remap.options import RemapOptions
    from merge_tools.remap.plan import RemapPlan
    from merge_tools.remap.shards import ShardPlan
    from merge_tools.remap.tokenizers_in import TokenizerSource, VocabSpec


REPORT_SCHEMA_ID = "merge_tools.remap_report/1"


UNTIED_HEAD_NAME = "lm_head.weight"  # the output embedding --init auto gives a tied model when it scales output rows


@dataclass(frozen=True)
class RemapInputs:
    """M's checkpoint and configs, and both tokenizers, read and checked."""

    src_dir: Path
    base_path: Path
    config: Mapping[str, Any]
    ckpt: Checkpoint
    vocab: VocabTensors
    base: TokenizerSource
    src: TokenizerSource

    @functools.cached_property
    def src_token_of_id(self) -> dict[int, str]:
        return {token_id: token for token, token_id in self.src.spec.vocab.items()}


@dataclass(frozen=True)
class PlannedRemap:
    """The plan and what carries it out: shards, role ids, the donor (--init donor/omp)."""

    plan: RemapPlan
    match_mode: str
    shards: ShardPlan
    donor: Donor | None
    donor_of_token: Mapping[str, int]
    config_ids: Mapping[str, Any]
    generation_ids: Mapping[str, Any]
    config_token_ids: Mapping[tuple[str | None, str], Any] = field(default_factory=dict)  # config_token_ids
    donor_unreachable: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())  # (the donor's, M's) ids never produced
    auto: AutoChoice | None = None  # what --init auto chose
    given_rows: Mapping[str, tuple[Any, Any]] | None = None  # rows computed while planning (--init auto, calibrated)
    untied: bool = False  # a tied M gets an lm_head (config: tie_word_embeddings false)

    @functools.cached_property
    def appended_added(self) -> dict[str, Any]:
        appended = {token for token, _, _ in self.plan.appended}
        return {token: flags for token, flags in self.plan.src_added_flags.items() if token in appended}


def remap(opts: RemapOptions, before_publish: Callable[[], None] | None = None, held: HeldOutputs | None = None) -> dict[str, Any]:
    """Plan and (unless dry_run) write one remapped model. Returns the report; raises
    CliError for bad input and SelfCheckError when the written output is wrong.
    `before_publish`: called once the output is complete, before it is published (it may
    refuse: an alignment waits there for mergekit's verdict); `held` may take the finished
    output instead, to publish it later (an alignment, while the verdict is pending)."""
    started = time.monotonic()
    inputs = read_inputs(opts)
    match_mode = effective_match_mode(opts.match, inputs.base.spec, inputs.src.spec)
    base_check = BaseTokenizerCheck(inputs.base, emission_candidates(inputs.base.spec, inputs.src.spec, match_mode))
    src_unreachable = unreachable_tokens(inputs.src, inputs.src.spec.vocab) if match_mode == "bytes" else frozenset()
    base_unreachable = base_check.result()
    check_interrupt()
    planned = plan_outputs(opts, inputs, match_mode, base_unreachable, src_unreachable)
    check_interrupt()
    report = remap_report(opts, inputs, planned)
    announce(report, planned)
    check_chat_template(opts, inputs.src, planned.plan)
    # The patched tokenizer is built and checked in a forked worker while the shards are
    # written (0.5 s of GIL-bound work for a 128k-token BPE).
    patched = PatchedTokenizer(inputs.base, planned) if planned.plan.mode == "append" and planned.plan.appended else None
    if opts.dry_run:
        report["tokenizer"] = patched.result()[1] if patched is not None else {}
    else:
        write_output(opts, inputs, planned, report, patched, before_publish, held)
    report["seconds"] = round(time.monotonic() - started, 3)
    return report


def read_inputs(opts: RemapOptions) -> RemapInputs:
    """Resolve M and T (directories or Hub repos), check --out_dir, read M's headers and
    configs and both tokenizers; everything that can be wrong with them is found here."""
    src_dir = resolve_model(opts.src_model, opts.revision)
    base_path = resolve_source(opts.base_tokenizer, opts.base_revision, [*TOKENIZER_FILES, *CONFIG_FILES])
    if not src_dir.is_dir():
        raise CliError(f"--src_model {opts.src_model}: expected a model directory or repo id, got a file")
    base_dir = base_path if base_path.is_dir() else base_path.parent
    if opts.out_dir is not None:
        protected = {"source model": src_dir, "base tokenizer": base_dir}
        donor = Path(split_revision(opts.donor_model)[0]).expanduser() if opts.donor_model is not None else None
        if donor is not None and donor.exists():
            protected["donor model"] = donor
        check_out_dir(opts.out_dir, protected, opts.overwrite)
    elif not opts.dry_run:
        raise CliError("--out_dir is required (or --dry-run to see the plan)")
    if opts.calibration_text is not None and not Path(opts.calibration_text).expanduser().is_file():
        raise CliError(f"--calibration-text {opts.calibration_text}: no such file")
    if not (src_dir / "config.json").is_file():
        raise CliError(f"{src_dir}: no config.json; is this a transformers model directory?")
    config = read_optional_json(src_dir / "config.json")
    ckpt = read_checkpoint(src_dir)
    refuse_encoder_decoder(config, ckpt)
    vocab = find_vocab_tensors(ckpt, config, embed_name=opts.embed_name, head_name=opts.head_name, trust_remote_code=opts.trust_remote_code)
    config_rows = config_value(config, "vocab_size")
    if isinstance(config_rows, int) and config_rows != vocab.rows and opts.init == "mergekit":  # mergekit's IndexError: fixed here
        log.warning(
            "%s: config.json says vocab_size %s, %s has %s rows (the aligned copy is consistent)",
            src_dir,
            config_rows,
            vocab.embed,
            vocab.rows,
        )
    elif isinstance(config_rows, int) and config_rows != vocab.rows:
        raise CliError(
            f"{src_dir / 'config.json'}: vocab_size {config_rows} disagrees with {vocab.embed}, which has {vocab.rows} rows; "
            f"the tensors are right (transformers cannot load this checkpoint as is): set vocab_size to {vocab.rows}"
        )
    return RemapInputs(src_dir, base_path, config, ckpt, vocab, read_tokenizer(base_path), read_tokenizer(src_dir))


def plan_outputs(
    opts: RemapOptions, inputs: RemapInputs, match_mode: str, base_unreachable: frozenset[int], src_unreachable: frozenset[int]
) -> PlannedRemap:
    """Match the tokens (`*_unreachable`: the ids each tokenizer never produces), decide
    every row (reading the donor and encoding FVT texts only when some row needs them), the
    shards and the output's role ids."""
    base, src, vocab = inputs.base, inputs.src, inputs.vocab
    matches = match_tokens(base.spec, src.spec, match_mode, base_unreachable, src_unreachable)
    donor_is_t = opts.donor_model is None and match_mode == "bytes"  # T's ids were all checked (emission_candidates)
    donor_unreachable = (base_unreachable if donor_is_t else frozenset(), src_unreachable)
    rows = choose_rows(opts, inputs, matches, base_unreachable, donor_unreachable)
    plan = rows.plan
    src_eos = as_id_list(src.generation_config.get("eos_token_id", config_value(inputs.config, "eos_token_id")))
    config_ids, generation_ids = output_role_ids(
        base.spec.roles,
        base.spec.vocab,
        base.config,
        base.generation_config,
        [inputs.src_token_of_id[i] for i in src_eos if i in inputs.src_token_of_id],
        plan,
    )
    token_ids = config_token_ids(inputs.config, plan, inputs.src_token_of_id, base)
    entries = output_entries(inputs.ckpt, vocab, plan.n_rows, opts.untie_head or rows.untie_head)
    unchanged = plan.n_rows == plan.src_rows and all(source == row for row, source in enumerate(plan.row_source))
    link = opts.link and inputs.ckpt.kind == "safetensors"
    shards = plan_linked_shards(inputs.ckpt, entries, unchanged) if link else plan_shards(entries, opts.max_shard_size)
    return PlannedRemap(
        plan, match_mode, shards, rows.donor, rows.donor_of_token, config_ids, generation_ids, token_ids, donor_unreachable,
        rows.auto, rows.given_rows, rows.untie_head is not None,
    )  # fmt: skip


@dataclass(frozen=True)
class RowChoice:
    """The plan's rows and what fills those M lacks: the donor, and for --init auto what
    it chose (with the calibrated rows computed, and whether a tied M gets an lm_head)."""

    plan: RemapPlan
    donor: Donor | None
    donor_of_token: Mapping[str, int]
    auto: AutoChoice | None = None
    given_rows: Mapping[str, tuple[Any, Any]] | None = None
    untie_head: str | None = None


def choose_rows(
    opts: RemapOptions,
    inputs: RemapInputs,
    matches: Matches,
    base_unreachable: frozenset[int],
    donor_unreachable: tuple[frozenset[int], frozenset[int]],
) -> RowChoice:
    """The plan by --init; for auto, the method auto_method picks, then (calibrated) the
    rows measure_points and choose_point decide."""
    base, src, vocab = inputs.base, inputs.src, inputs.vocab
    matched = {b for b, s in matches.src_of_base.items() if s < vocab.rows}
    unmatched = len(base.spec.vocab) - len(matched)  # rows to initialise; none: no donor is read
    init, auto_reason = opts.init, None
    donor = read_donor_for(opts, vocab) if init in ("donor", "omp", "auto") and unmatched else None
    if init == "auto":
        same_hidden = donor is not None and donor.vocab.hidden == vocab.hidden
        cosine = same_space_cosine(donor, inputs, opts.match) if same_hidden else None
        init, auto_reason = auto_method(donor is not None, unmatched, same_hidden, cosine)
        donor = donor if init != "fvt" else None
    donor_of_token = donor_tokens(base.spec, donor, opts.match, base_unreachable) if donor is not None else {}
    missing = [
        t
        for t, i in base.spec.vocab.items()
        if i not in matched and i not in base_unreachable and (init == "auto" or t not in donor_of_token)
    ]
    decompositions = fvt_decompositions(token_texts(missing, base.spec), src) if init in ("fvt", "donor", "omp", "auto") and missing else {}
    plan = plan_remap(
        base.spec,
        src.spec,
        src_rows=vocab.rows,
        matches=matches,
        drop_extra=opts.drop_extra,
        init=init,
        base_config_vocab_size=config_value(base.config, "vocab_size"),
        pad_to_multiple_of=opts.pad_to_multiple_of,
        decompositions=decompositions,
        donor_of_token=donor_of_token,
        unreachable=base_unreachable,
        fill_rules={token: rule for token, rule, _, _ in opts.mergekit_fills},
    )
    if init != "auto" or donor is None:
        return RowChoice(plan, donor, donor_of_token, AutoChoice(init, auto_reason) if auto_reason else None)
    text, source = calibration_text(opts)
    choice, given, untie = calibrated_rows(plan, inputs, donor, opts, donor_unreachable, text, source)
    return RowChoice(plan, donor, donor_of_token, choice, given, UNTIED_HEAD_NAME if untie else None)


def calibration_text(opts: RemapOptions) -> tuple[str, str]:
    """(the calibration text, where it comes from): --calibration-text, else the built-in one."""
    if opts.calibration_text is None:
        return CALIBRATION_TEXT, "built-in"
    path = Path(opts.calibration_text).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"--calibration-text {opts.calibration_text}: cannot read it as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise CliError(f"--calibration-text {opts.calibration_text}: the file is empty")
    return text, str(path)


def emission_candidates(base: VocabSpec, src: VocabSpec, match_mode: str) -> list[str]:
    """T's tokens whose emission is checked: matching by bytes (across families), every
    one, since any may take a match; matching by spelling, those M lacks (guessed rows)."""
    return list(base.vocab) if match_mode == "bytes" else [token for token in base.vocab if token not in src.vocab]


def remap_report(opts: RemapOptions, inputs: RemapInputs, planned: PlannedRemap) -> dict[str, Any]:
    """remap_report.json: its whole schema in one place. write_output adds self_check,
    copied_files and files; remap adds tokenizer and seconds."""
    plan, vocab, donor = planned.plan, inputs.vocab, planned.donor
    plan_report = plan.to_dict(inputs.src_token_of_id)
    transplant = transplant_warning(plan_report)
    if transplant:
        plan_report["warnings"].append(transplant)
    return {
        "schema": REPORT_SCHEMA_ID,
        "tool": f"remap_tokenizer.py {__version__}",
        "inputs": {
            "src_model": {
                "source": opts.src_model,
                "revision": opts.revision,
                "path": str(inputs.src_dir),
                "fingerprint": directory_fingerprint(inputs.src_dir),
            },
            "base_tokenizer": {
                "source": opts.base_tokenizer,
                "revision": opts.base_revision,
                "path": str(inputs.base_path),
                "fingerprint": directory_fingerprint(inputs.base_path),
            },
        },
        "options": opts.identity(),
        "out_dir": str(opts.out_dir) if opts.out_dir is not None else None,
        "dry_run": opts.dry_run,
        "match_mode": planned.match_mode,
        "vocab_tensors": dataclasses.asdict(vocab) | {"tied": vocab.head is None},
        "base_rows": base_model_rows(inputs.base),
        "plan": plan_report,
        "shards": planned.shards.to_dict(),
        "config": {
            "vocab_size": plan.n_rows,
            **{f"{role}_token_id": value for role, value in planned.config_ids.items()},
            **{f"{section}.{key}" if section else key: value for (section, key), value in planned.config_token_ids.items()},
        },
        "init_auto": planned.auto.to_dict() if planned.auto is not None else None,
        "donor": {
            "source": donor.source,
            "rows": donor.vocab.rows,
            "hidden": donor.vocab.hidden,
            "tokens_matched": len(planned.donor_of_token),
        }
        if donor is not None
        else None,
    }


def announce(report: Mapping[str, Any], planned: PlannedRemap) -> None:
    """The plan's warnings, on stderr."""
    for warning in report["plan"]["warnings"]:
        log.warning("%s", warning)
    if planned.plan.matches.collisions:
        log.warning(
            "%d token(s) spell the same bytes as another token of their tokenizer; the one the tokenizer produces keeps the match "
            "(see the report)",
            len(planned.plan.matches.collisions),
        )


class PatchedTokenizer:
    """The append-mode tokenizer.json, built and checked in a forked worker (ForkedCall)."""

    def __init__(self, base: TokenizerSource, planned: PlannedRemap) -> None:
        spec = base.spec
        self.job = ForkedCall(patched_tokenizer, base.tokenizer_json, planned.plan, planned.appended_added, spec)
        self.value: tuple[str, dict[str, int]] | None = None

    def result(self) -> tuple[str, dict[str, int]]:
        """(the patched tokenizer.json, the report's `tokenizer` entry); warns once."""
        if self.value is None:
            patched, reachable = self.job.result()
            self.value = patched, {"appended_reachable_by_encoding": reachable}
            if reachable:
                log.warning(
                    "%d appended token(s) can be produced by encoding text with the patched tokenizer (whole words the base "
                    "matches against its vocabulary, e.g. with ignore_merges): encodings differ from the base's for them; "
                    "use --drop-extra for merges",
                    reachable,
                )
        return self.value


def write_output(
    opts: RemapOptions,
    inputs: RemapInputs,
    planned: PlannedRemap,
    report: dict[str, Any],
    patched: PatchedTokenizer | None,
    before_publish: Callable[[], None] | None = None,
    held: HeldOutputs | None = None,
) -> None:
    """Write D: the donor's or OMP's rows first (they may need the whole donor embedding),
    then, in a locked staging directory, the shards (streamed, verified), configs,
    tokenizer files, M's other files and the report; then publish it."""
    assert opts.out_dir is not None
    plan, shards = planned.plan, planned.shards
    given_rows = (
        planned.given_rows
        if planned.given_rows is not None
        else initialised_rows(plan, inputs.ckpt, inputs.vocab, inputs.src.spec, planned.donor, opts, planned.donor_unreachable)
        if planned.donor is not None
        else mergekit_rows(plan, inputs.ckpt, inputs.vocab, opts)
        if opts.init == "mergekit"
        else {}
    )
    check_free_space(opts.out_dir.parent, shards.written_size)
    try:
        with contextlib.ExitStack() as staging:
            output = staging.enter_context(OutputDirectory(opts.out_dir, opts.overwrite))
            out = output.path
            assert out is not None
            digests, verified, linked = write_shards(out, inputs.ckpt, shards, plan, inputs.src_token_of_id, opts.show_progress, given_rows)
            self_check(out, shards)
            report["self_check"] = {"ok": True, "copied_rows_checked": verified, "tensors_checked": sum(len(t) for t in shards.tensors)}
            write_configs(out, inputs, planned)
            patched_text = None
            if patched is not None:
                patched_text, report["tokenizer"] = patched.result()
            write_tokenizer_files(inputs.base, out, patched_text, plan, planned.appended_added)
            if opts.chat_template == "source":
                write_source_chat_template(inputs.src, out)
            report["copied_files"] = copy_other_files(inputs.src_dir, out)
            listed = sorted(path for path in out.iterdir() if path.is_file() and path.name not in (OWNER_FILE, *linked))
            report["files"] = {path.name: digests.get(path.name) or file_digest(path) for path in listed}
            report["linked"] = {file: {"source": str(shards.links[file].resolve()), "how": how} for file, how in linked.items()}
            report["bytes"] = {"written": sum(p.stat().st_size for p in listed), "linked": sum((out / f).stat().st_size for f in linked)}
            write_json(out / REPORT_NAME, report)
            if held is not None and held.take(staging, output):
                return  # published with the others once the go-ahead is in
            if before_publish is not None:
                before_publish()
            output.publish()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CliError(
                f"disk full while writing into {opts.out_dir.parent}; nothing "
                f"was left behind: free at least {human_bytes(shards.total_size)}"
            ) from exc
        raise CliError(f"cannot write {exc.filename or opts.out_dir}: {exc.strerror}; nothing was left behind") from exc


def write_configs(out: Path, inputs: RemapInputs, planned: PlannedRemap) -> None:
    """The shard index (sharded output only), config.json and generation_config.json."""
    shards = planned.shards
    if len(shards.files) > 1:
        write_json(out / SAFETENSORS_INDEX, {"metadata": {"total_size": shards.total_size}, "weight_map": shards.weight_map()})
    config = patch_config(inputs.config, planned.plan.n_rows, planned.config_ids, planned.config_token_ids, untied=planned.untied)
    write_json(out / "config.json", config)
    if inputs.src.generation_config:
        write_json(out / "generation_config.json", patch_generation_config(inputs.src.generation_config, planned.generation_ids))


def base_model_rows(base: TokenizerSource) -> int:
    """The rows of T's models: its config.json's vocab_size when T has one, else its tokens."""
    rows = config_value(base.config, "vocab_size")
    return rows if is_int(rows) and rows >= len(base.spec.vocab) else len(base.spec.vocab)
