"""compare_tokenizers.py's command line: build_parser, run, main."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from merge_tools import __version__
from merge_tools.common.cli import ArgumentParser, flag, non_negative_int, parse_arguments, run_guarded
from merge_tools.common.errors import CliError
from merge_tools.common.logs import log
from merge_tools.common.mergekit_config import (
    MERGEKIT_METHODS,
    local_or_hub,
    mergekit_config_problems,
    mergekit_references,
    parse_model_reference,
    read_mergekit_config,
)
from merge_tools.common.tokenizer_merge import tokenizer_merge_settings
from merge_tools.gate.audit_reading import audit_merge
from merge_tools.gate.audit_report import render_audit, write_audit_plot
from merge_tools.gate.comparison import compare, dedupe, with_architecture
from merge_tools.gate.reading import read_tokenizer_infos, resolve_tokenizer
from merge_tools.gate.report import build_report, refuse_configuration, render_human, strict_json
from merge_tools.gate.tokenizer_merge_audit import audit_tokenizer_merge, render_tokenizer_merge, tokenizer_source_outside

if TYPE_CHECKING:
    from merge_tools.common.mergekit_config import ModelRef
    from merge_tools.gate.reading import ResolvedSource


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Diff tokenizers against a reference before a linear model merge.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "sources: a local directory, a tokenizer.json file or a Hugging Face repo id (org/name[@rev]).\n\n"
            "examples:\n"
            "  %(prog)s meta-llama/Llama-3.1-8B-Instruct ./my-finetune            # gate one model against its base\n"
            "  %(prog)s --mergekit-config merge.yaml --json > gate.json           # the whole merge, for CI\n"
            "  %(prog)s base/tokenizer.json other/tokenizer.json --no-weights --strict\n\n"
            "exit codes:\n"
            "  0  vocabularies identical (same size, every token the same id): safe to merge linearly when the\n"
            "     weights were checked too (the verdict says when they were not)\n"
            "  1  mismatch: any token->id or size difference; with --strict also special tokens, added-token\n"
            "     flags, chat template, merges/normalizer/pre-tokenizer/decoder or fingerprint; with weights\n"
            "     also ghost tokens (ids with no embedding row), differing embedding row counts, and with\n"
            "     --mergekit-config an architecture or merge configuration mergekit cannot merge\n"
            "  2  usage error or unreadable input (one 'error: ...' line on stderr; --debug shows the traceback)\n"
            "  130  interrupted by Ctrl-C (143: SIGTERM, 129: SIGHUP)"
        ),
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("sources", nargs="*", metavar="REF OTHER", help="reference first, then one or more others")
    inputs.add_argument(
        *flag("--mergekit-config"),
        type=Path,
        metavar="FILE",
        help="compare every model of a mergekit YAML against its base_model (or first model)",
    )
    inputs.add_argument(*flag("--revision"), metavar="REV", help="Hub revision for repo ids without an @rev of their own")
    checks = parser.add_argument_group("checks")
    checks.add_argument(
        *flag("--weights"),
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read config.json and safetensors headers of model directories and repos: rows, padding, ghost tokens, "
        "and with --mergekit-config the architecture (default; --no-weights: tokenizers only)",
    )
    checks.add_argument(
        *flag("--strict"), action="store_true", help="also fail on special-token, chat-template, encoding and inherited-config differences"
    )
    add_audit_arguments(parser)
    output = parser.add_argument_group("output")
    output.add_argument(
        *flag("--json"), action="store_true", help="print one JSON document on stdout instead of the human report (errors too)"
    )
    output.add_argument(
        *flag("--head"),
        type=non_negative_int,
        default=20,
        metavar="N",
        help="list at most N tokens per section (default 20; counts are always complete)",
    )
    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument(*flag("--debug"), action="store_true", help="verbose logs and tracebacks")
    behaviour.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(tool="compare_tokenizers")  # names the JSON schema of an error document
    return parser


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    audit = parser.add_argument_group("merge audit (--mergekit-config)")
    audit.add_argument(
        *flag("--audit"),
        action="store_true",
        help="read every model's weights (once, streamed) and report what each contributes: task-vector norms against "
        "the base, shares, per-layer norms, cosines between models (needs numpy)",
    )
    audit.add_argument(
        *flag("--audit-base"),
        metavar="MODEL",
        help="the model task vectors are measured from (default: the merge's base_model; without one, the mean of the models, "
        "which supports no conclusion on shares and pairs): e.g. the model the fine-tunes started from; implies --audit",
    )
    audit.add_argument(
        *flag("--plot"),
        type=Path,
        metavar="FILE",
        help="also draw the audit (share per model, per-layer norms) into FILE (.png, .svg, .pdf); implies --audit; "
        "needs matplotlib: pip install 'merge_tools[plot]'",
    )


def run(args: argparse.Namespace) -> int:
    check_audit_options(args)
    if args.mergekit_config is not None:
        if args.sources:
            raise CliError("give either REF OTHER... or --mergekit-config, not both")
        config = read_mergekit_config(args.mergekit_config)
        problems = mergekit_config_problems(config, MERGEKIT_METHODS)
        if problems:
            return refuse_configuration(args, problems)
        yaml_dir = args.mergekit_config.resolve().parent
        source_of: dict[ModelRef, str] = {}
        for reference in dedupe(mergekit_references(config, args.mergekit_config)):
            ref = parse_model_reference(reference)
            if ref.lora:
                log.warning("%s: the LoRA %s is not applied; comparing the base model's tokenizer", ref.path, ref.lora)
            local = local_or_hub(ref, yaml_dir)
            source_of[ref] = f"{local}@{ref.revision}" if ref.revision else local
        sources = dedupe(list(source_of.values()))
        if len(sources) < 2:
            raise CliError(f"{args.mergekit_config}: names only one model ({sources[0]}); nothing to compare")
        log.debug("reference: %s (%s)", sources[0], "base_model" if config.get("base_model") is not None else "first model")
    else:
        sources = args.sources
        if len(sources) < 2:
            raise CliError("need a reference and at least one other tokenizer (or --mergekit-config FILE)")
    resolved = [resolve_tokenizer(source, args.revision) for source in sources]
    audit_base = resolve_tokenizer(args.audit_base, args.revision) if args.audit_base is not None else None
    if args.plot is not None:
        refuse_plot_inside_models(args.plot, [*resolved, *([audit_base] if audit_base else [])])
    infos = read_tokenizer_infos(resolved, args.weights)
    ref = infos[0]
    settings = tokenizer_merge_settings(config) if args.mergekit_config is not None else None
    mapped_by = settings[0] if settings is not None else None
    comparisons = [compare(ref, o, strict=args.strict, head=args.head, weights=args.weights, mapped_by=mapped_by) for o in infos[1:]]
    merge_problems = None
    if args.mergekit_config is not None and args.weights:
        comparisons, merge_problems = with_architecture(config, source_of, sources, infos, comparisons, args.strict)
    merged = None
    if settings is not None:
        outside = tokenizer_source_outside(config, source_of, args.mergekit_config.resolve().parent, args.revision)
        merged, merge_problems = audit_tokenizer_merge(config, source_of, sources, infos, merge_problems, args.strict, outside)
    audit = audit_merge(config, source_of, resolved, infos, comparisons, audit_base) if args.audit else None
    if audit is not None:
        merge_problems = [*(merge_problems or []), *audit.problems]
        if args.plot is not None:
            write_audit_plot(audit, args.plot)
    report = build_report(ref, comparisons, strict=args.strict, weights=args.weights, merge_problems=merge_problems, merged=merged)
    if audit is not None:
        report["audit"] = audit.to_dict()
    if args.json:
        sys.stdout.write(json.dumps(strict_json(report), ensure_ascii=False, indent=2, allow_nan=False) + "\n")
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        lines = render_tokenizer_merge(merged, args.head) if merged is not None else []
        text = render_human(ref, comparisons, color=color, merge_problems=merge_problems, merged_lines=lines)
        sys.stdout.write(text + ("\n".join(render_audit(audit)) + "\n" if audit is not None else ""))
    return report["exit_code"]


def refuse_plot_inside_models(plot: Path, resolved: Sequence[ResolvedSource]) -> None:
    """--plot never writes into a model's directory (nor onto one of its files)."""
    target = plot.resolve()
    for source in resolved:
        if target.is_relative_to(source.directory.resolve()):
            raise CliError(f"--plot {plot}: inside the model directory {source.directory}; write the chart elsewhere")


def check_audit_options(args: argparse.Namespace) -> None:
    """--audit and --plot, checked before anything is read: they need the merge, the
    weights, numpy (and matplotlib for --plot), and --plot a file outside every model."""
    args.audit = args.audit or args.plot is not None or args.audit_base is not None
    if not args.audit:
        return
    if args.mergekit_config is None:
        raise CliError("--audit needs --mergekit-config: the models, their weights and the base come from the merge")
    if not args.weights:
        raise CliError("--audit reads the weights: drop --no-weights")
    # the audit's two worker threads each run BLAS dot products: one BLAS thread each, not a pool per call
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    missing = [name for name in ("numpy", *(["matplotlib"] if args.plot is not None else [])) if importlib.util.find_spec(name) is None]
    if missing:
        raise CliError(f"--{'plot' if 'matplotlib' in missing else 'audit'} needs {' and '.join(missing)}: pip install 'merge_tools[plot]'")
    if args.plot is not None:
        check_plot_path(args.plot)


def check_plot_path(plot: Path) -> None:
    """--plot names a new or regular file in an existing directory, with a format matplotlib writes."""
    if plot.is_dir() or not plot.resolve().parent.is_dir():
        raise CliError(f"--plot {plot}: not a file in an existing directory")
    if plot.exists() and not plot.is_file():
        raise CliError(f"--plot {plot}: exists and is not a regular file; name a file")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if plot.suffix.lower().lstrip(".") not in formats:
        raise CliError(
            f"--plot {plot}: matplotlib writes no {plot.suffix or 'extension-less'} files (it writes .{', .'.join(sorted(formats))})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(build_parser(), argv)
    if isinstance(args, int):
        return args
    return run_guarded(args, run, stopped=str, cleanup=lambda: None)


if __name__ == "__main__":
    raise SystemExit(main())
