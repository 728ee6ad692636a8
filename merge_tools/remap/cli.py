"""remap_tokenizer.py's command line: build_parser, options_from_args, run, main."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from merge_tools import __version__
from merge_tools.common.cli import ArgumentParser, fail, flag, non_negative_int, parse_arguments, run_guarded
from merge_tools.common.errors import CliError
from merge_tools.common.logs import log
from merge_tools.common.mergekit_config import mergekit_references, parse_model_reference, read_mergekit_config
from merge_tools.common.sources import split_revision
from merge_tools.remap.alignment import align_mergekit, align_table
from merge_tools.remap.config_outputs import write_json
from merge_tools.remap.matching import MATCH_MODES
from merge_tools.remap.options import AlignOptions, RemapOptions
from merge_tools.remap.output_dir import PUBLISHED, release_outputs
from merge_tools.remap.plan import INIT_METHODS
from merge_tools.remap.remap import remap
from merge_tools.remap.shard_streaming import SelfCheckError
from merge_tools.remap.shards import parse_size
from merge_tools.remap.summary import human_summary, mergeable_with_base, mergekit_snippet


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def pad_multiple(text: str) -> int:
    value = positive_int(text)
    if value > 2**20:
        raise argparse.ArgumentTypeError(f"{value} rows is not a padding multiple (models pad to 8 ... 1024; at most {2**20})")
    return value


def size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Permute a model's embedding and lm_head rows into a base tokenizer's token order.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "M and T: a local directory or a Hugging Face repo id; every flag also takes the other spelling (--drop_extra).\n\n"
            "examples:\n"
            "  %(prog)s --src-model M --base-tokenizer T --out-dir D --drop-extra      # ready to merge with T's models\n"
            "  %(prog)s --src-model M --base-tokenizer T --dry-run > plan.txt          # the plan, nothing written\n"
            "  %(prog)s --src-model M --base-tokenizer T --out-dir D --drop-extra --init donor --donor-model B\n"
            "  %(prog)s --mergekit-config merge.yaml --out-dir ALIGNED                 # align a whole merge\n\n"
            "exit codes:\n"
            "  0    ok (the output directory is complete and self-checked)\n"
            "  1    the self-check of the written output failed (nothing is left in --out_dir); with\n"
            "       --mergekit-config also: the aligned configuration fails the gate\n"
            "  2    usage or input error (one 'error: ...' line on stderr; --debug shows the traceback)\n"
            "  130  interrupted by Ctrl-C; the error line says whether --out_dir was completed, else it is as before\n"
            "  143  stopped by SIGTERM, as 130\n"
            "  129  stopped by SIGHUP, as 130"
        ),
    )
    add_inputs_arguments(parser)
    add_output_arguments(parser)
    add_initialisation_arguments(parser)
    add_alignment_arguments(parser)
    add_behaviour_arguments(parser)
    parser.set_defaults(tool="remap_tokenizer")  # names the JSON schema of an error document
    return parser


def add_inputs_arguments(parser: argparse.ArgumentParser) -> None:
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(*flag("--src-model"), dest="src_model", metavar="M", help="the model to remap")
    inputs.add_argument(
        *flag("--base-tokenizer"), dest="base_tokenizer", metavar="T", help="the tokenizer whose token order the output follows"
    )
    inputs.add_argument(*flag("--revision"), metavar="REV", help="Hub revision of M")
    inputs.add_argument(*flag("--base-revision"), metavar="REV", help="Hub revision of T")
    inputs.add_argument(*flag("--embed-name"), metavar="NAME", help="checkpoint name of the input embedding, for unknown architectures")
    inputs.add_argument(
        *flag("--head-name"), metavar="NAME", help="checkpoint name of the output embedding (lm_head), for unknown architectures"
    )
    inputs.add_argument(
        *flag("--trust-remote-code"),
        action="store_true",
        help="allow transformers to run the model repo's code (only to find the embeddings)",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument(
        *flag("--out-dir"),
        dest="out_dir",
        metavar="D",
        type=Path,
        help="where to write the remapped model (with --mergekit-config: the aligned models and merge.yaml); not needed with --dry-run",
    )
    output.add_argument(
        *flag("--drop-extra"),
        action="store_true",
        help="drop M's tokens that T lacks: vocabulary and vocab_size become exactly T's (for merges)",
    )
    output.add_argument(
        *flag("--chat-template"),
        choices=("base", "source"),
        default="base",
        help="whose chat template the output gets: T's (default: base) or M's (source)",
    )
    output.add_argument(
        *flag("--max-shard-size"),
        type=size_argument,
        default="5GB",
        metavar="SIZE",
        help="largest output shard, decimal units (default: 5GB; 2GiB for binary)",
    )
    output.add_argument(
        *flag("--pad-to-multiple-of"),
        type=pad_multiple,
        metavar="N",
        help="round the row count up to a multiple of N (padding rows get the mean row)",
    )
    output.add_argument(*flag("--overwrite"), action="store_true", help="replace an earlier output of this tool in --out_dir")
    output.add_argument(*flag("--dry-run"), action="store_true", help="print the plan and the shard plan on stdout; write nothing")
    output.add_argument(*flag("--report"), type=Path, metavar="FILE", help="also write the report (remap_report.json) to FILE")
    output.add_argument(*flag("--json"), action="store_true", help="print the report as JSON on stdout (errors too)")


def add_initialisation_arguments(parser: argparse.ArgumentParser) -> None:
    initialisation = parser.add_argument_group("initialisation (rows of T's tokens that M lacks)")
    initialisation.add_argument(
        *flag("--init"),
        choices=INIT_METHODS,
        help="auto, fvt, mean, unk, zero, donor or omp (default: auto: the donor's rows when it is of M's family, a calibrated "
        "FVT/OMP blend across families, fvt without a donor; with --mergekit-config: donor, the target's own rows, when the "
        "target is a model with weights)",
    )
    initialisation.add_argument(
        *flag("--calibration-text"),
        metavar="FILE",
        help="with --init auto: the UTF-8 text its calibration measures on (default: a built-in mix of prose, code, numbers "
        "and several scripts)",
    )
    initialisation.add_argument(
        *flag("--donor-model"),
        metavar="D",
        help="with --init donor / omp / auto: the model whose rows are used (default: T, when it has weights); org/name@rev for a revision",
    )
    initialisation.add_argument(
        *flag("--omp-k"),
        type=positive_int,
        default=64,
        metavar="K",
        help="with --init omp: rows of shared tokens combined per missing token (default: 64)",
    )
    initialisation.add_argument(
        *flag("--match"),
        choices=MATCH_MODES,
        default="auto",
        help="match tokens by spelling (exact) or by their bytes (bytes); auto: bytes when the conventions differ (default: auto)",
    )
    initialisation.add_argument(
        *flag("--init-report"),
        type=non_negative_int,
        default=0,
        metavar="N",
        help="show the N most telling examples of each initialisation rule",
    )


def add_alignment_arguments(parser: argparse.ArgumentParser) -> None:
    alignment = parser.add_argument_group("alignment")
    alignment.add_argument(
        *flag("--mergekit-config"),
        type=Path,
        metavar="FILE",
        help="align every model of a mergekit YAML to one tokenizer (T, else the YAML's tokenizer source or base_model) "
        "and write D/merge.yaml",
    )
    alignment.add_argument(
        *flag("--copy"),
        action="store_true",
        help="with --mergekit-config: write full copies of the aligned models (default: their shards without a vocabulary "
        "tensor are linked to the sources: a reflink, a hard link, or across file systems a symbolic link)",
    )


def add_behaviour_arguments(parser: argparse.ArgumentParser) -> None:
    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument(*flag("--debug"), action="store_true", help="verbose logs and tracebacks")
    behaviour.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def options_from_args(args: argparse.Namespace) -> RemapOptions | AlignOptions:
    """The options of either mode from the command line, with the flags that belong to the
    other mode refused."""
    common = {
        "match": args.match, "max_shard_size": args.max_shard_size, "base_revision": args.base_revision, "overwrite": args.overwrite,
        "dry_run": args.dry_run, "trust_remote_code": args.trust_remote_code, "show_progress": not args.json and sys.stderr.isatty(),
        "donor_model": args.donor_model, "omp_k": args.omp_k, "chat_template": args.chat_template,
    }  # fmt: skip
    if args.mergekit_config is None:
        if args.calibration_text is not None and args.init not in (None, "auto"):
            raise CliError(f"--calibration-text applies to --init auto, not --init {args.init}")
        if args.src_model is None or args.base_tokenizer is None:
            raise CliError("--src_model and --base_tokenizer are required (or --mergekit-config FILE)")
        if args.copy:
            raise CliError("--copy applies to --mergekit-config (a single remap always writes its output in full)")
        src_model, revision = with_revision(args.src_model, args.revision, "--revision")
        base_tokenizer, common["base_revision"] = with_revision(args.base_tokenizer, args.base_revision, "--base-revision")
        return RemapOptions(
            src_model=src_model, base_tokenizer=base_tokenizer, out_dir=args.out_dir, drop_extra=args.drop_extra,
            init=args.init or "auto", pad_to_multiple_of=args.pad_to_multiple_of, revision=revision, embed_name=args.embed_name,
            head_name=args.head_name, init_report=args.init_report, calibration_text=args.calibration_text, **common,
        )  # fmt: skip
    if args.src_model is not None:
        raise CliError("--mergekit-config aligns the models of the YAML: leave out --src_model")
    single = {
        "--revision": args.revision,
        "--embed-name": args.embed_name,
        "--head-name": args.head_name,
        "--pad-to-multiple-of": args.pad_to_multiple_of,
        "--calibration-text": args.calibration_text,
    }
    for option, value in single.items():
        if value is not None:
            raise CliError(f"{option} applies to a single remap, not to --mergekit-config (write model@revision in the YAML)")
    if args.init == "auto":
        raise CliError(
            "--init auto applies to a single remap; an alignment takes the target's rows (donor) or mergekit's (union) by "
            "default, or the --init you name among the others"
        )
    if args.out_dir is None:
        raise CliError("--mergekit-config needs --out_dir ALIGNED (where the aligned models and merge.yaml go)")
    return AlignOptions(
        config=args.mergekit_config, out_dir=args.out_dir, base_tokenizer=args.base_tokenizer, init=args.init, copy=args.copy, **common
    )


def with_revision(source: str, revision: str | None, flag_name: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`), as in a mergekit YAML; a local path keeps any
    `@` it has. A revision given both ways must agree."""
    name, pinned = split_revision(source)
    if pinned is not None and revision is not None and pinned != revision:
        raise CliError(f"{source} pins revision {pinned!r} but {flag_name} says {revision!r}; give one")
    return name, pinned or revision


def report_inputs(args: argparse.Namespace) -> list[Path]:
    """The local files and directories a --report must stay out of: M, T, the donor, the
    YAML and every model it names (Hub repo ids are not local paths and are skipped)."""
    names = [args.src_model, args.base_tokenizer, args.donor_model]
    if args.mergekit_config is not None:
        config = read_mergekit_config(args.mergekit_config)
        names += [args.mergekit_config, *(parse_model_reference(ref).path for ref in mergekit_references(config, args.mergekit_config))]
    paths = []
    for name in names:
        if name is not None:
            path = Path(split_revision(str(name))[0]).expanduser()
            if path.exists():
                paths.append(path.parent if path.is_file() and path != args.mergekit_config else path)
    return paths


def check_report_path(report: Path, inputs: Sequence[Path], out_dir: Path | None) -> None:
    """--report gets --out_dir's checks, before anything is written: never onto or inside
    an input, never inside D (publishing D replaces what is there), a file in a directory
    that exists and can be written."""
    resolved = report.expanduser().resolve()
    if report.is_dir():
        raise CliError(f"--report {report} is a directory; give a file name")
    for path in inputs:
        source = path.resolve()
        if resolved == source or source in resolved.parents:
            raise CliError(f"--report {report} is {'the input' if resolved == source else 'inside the input'} {path}; write it elsewhere")
    if out_dir is not None and (resolved == out_dir.resolve() or out_dir.resolve() in resolved.parents):
        raise CliError(f"--report {report} is inside --out_dir {out_dir}, which the remap replaces; write it elsewhere")
    if not resolved.parent.is_dir():
        raise CliError(f"--report {report}: the directory {resolved.parent} does not exist")
    if not os.access(resolved.parent, os.W_OK | os.X_OK):
        raise CliError(f"--report {report}: cannot write in {resolved.parent} (permission denied)")


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if args.report is not None:
        check_report_path(args.report, report_inputs(args), opts.out_dir)
    if isinstance(opts, AlignOptions):
        return run_align(args, opts)
    try:
        report = remap(opts)
    except SelfCheckError as exc:
        return fail(args, f"self-check failed, nothing was written to {opts.out_dir}: {exc}", 1)
    if args.report is not None:
        write_json(args.report, report)
    summary = human_summary(report, opts.dry_run, opts.init_report)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    elif opts.dry_run:
        sys.stdout.write(summary + "\n")  # the plan is the report: `--dry-run > plan.txt` keeps it
    if opts.dry_run:
        return 0
    log.info("%s", summary)
    if not args.json:
        not_mergeable = mergeable_with_base(report, report["base_rows"])
        snippet = "# mergekit: add the remapped model to your merge configuration\nmodels:\n" + mergekit_snippet(str(opts.out_dir))
        sys.stdout.write(f"# {not_mergeable}\n" if not_mergeable else snippet)
    return 0


def run_align(args: argparse.Namespace, opts: AlignOptions) -> int:
    summary, code = align_mergekit(opts)
    if args.report is not None:
        write_json(args.report, summary)
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(align_table(summary) + "\n")
        if "command" in summary and code == 0:
            sys.stdout.write(f"\nnow run:\n  {summary['command']}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(build_parser(), argv)
    if isinstance(args, int):
        return args
    PUBLISHED.clear()
    return run_guarded(args, run, stopped=lambda: f"; {what_was_written()}", cleanup=release_outputs)


def what_was_written() -> str:
    """For the interrupt message: the outputs this run completed, or that none was."""
    return f"{', '.join(map(str, PUBLISHED))}: complete, kept" if PUBLISHED else "nothing was written"


if __name__ == "__main__":
    raise SystemExit(main())
