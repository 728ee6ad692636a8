"""Command-line scaffolding both tools share: argparse with one-line errors, the guarded run
(exit codes 2 and 128 + signal)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import gc
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from merge_tools.common.errors import CliError, finish_main, signal_name, signals_handled
from merge_tools.common.logs import configure_logging, log, print_error
from merge_tools.common.sources import show_hub_progress
from merge_tools.common.strict_json import escape_text


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are a CliError (one line, exit 2), with a "did you mean"
    for a mistyped flag (Python's own suggest_on_error arrives only in 3.14). Abbreviated
    flags are refused: `--drop-extr` is a typo, not a request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            known = [option for action in self._actions for option in action.option_strings]
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], known, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
        raise CliError(message)


def flag(name: str) -> list[str]:
    """A long option in both spellings users type, kebab-case first (what help shows):
    flag("--drop-extra") == ["--drop-extra", "--drop_extra"]."""
    kebab = name.replace("_", "-")
    snake = "--" + kebab[2:].replace("-", "_")
    return [kebab] if snake == kebab else [kebab, snake]


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code: 0 after --help / --version, 2 (one error
    line, and a JSON document with --json) for a usage error."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version print and exit
        return int(exc.code or 0)
    except CliError as exc:
        message = f"{exc} (see --help)"
        if "--json" in (sys.argv[1:] if argv is None else argv):
            print_json_error(message, 2, parser.get_default("tool"))
        print_error(message)
        return 2


def print_json_error(message: str, code: int, tool: str) -> None:
    """With --json, stdout carries one JSON document on every exit, failures included
    (`tool`: compare_tokenizers or remap_tokenizer, the parser's default `tool`)."""
    sys.stdout.write(json.dumps({"schema": f"merge_tools.{tool}/1", "exit_code": code, "error": message}, ensure_ascii=False) + "\n")


def quoted(token: str) -> str:
    """A token as the reports show it: in single quotes, control characters escaped."""
    return "'" + escape_text(token).replace("'", "\\'") + "'"


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.json:
        print_json_error(message, code, args.tool)
    print_error(message)
    return code


def run_guarded(
    args: argparse.Namespace, run: Callable[[argparse.Namespace], int], stopped: Callable[[], str], cleanup: Callable[[], None]
) -> int:
    """run(args) with the stop signals handled and every failure turned into one line on
    stderr (and a JSON document with --json): exit 2 for bad input, 128 + signal when
    stopped (`stopped()` says what was completed), and never a traceback without --debug."""
    configure_logging(args.debug)
    show_hub_progress(sys.stderr.isatty() and not args.json)
    try:
        with signals_handled(), collection_paused():
            try:
                return run(args)
            finally:
                cleanup()
                finish_main()
    except CliError as exc:
        if args.debug:
            log.exception("traceback")
        return fail(args, str(exc), 2)
    except KeyboardInterrupt as exc:  # Ctrl-C, or Interrupted by SIGTERM / SIGHUP
        signum = getattr(exc, "signum", 2)
        return fail(args, f"interrupted ({signal_name(signum)}){stopped()}", 128 + signum)
    except OSError as exc:  # a path the file system refuses: too long, a symlink loop, no permission to list
        if args.debug:
            raise
        hints = {errno.ENAMETOOLONG: ": shorten it", errno.ELOOP: ": a loop of symbolic links", errno.EACCES: ": check its permissions"}
        name = str(exc.filename or "")
        where = f"{name[:100]}{'...' if len(name) > 100 else ''}: " if name else ""
        return fail(args, f"{where}{exc.strerror or exc}{hints.get(exc.errno or 0, '')}", 2)
    except Exception as exc:  # a bug or an input nobody foresaw: still one line, exit 2
        if args.debug:
            raise
        return fail(args, f"unexpected {type(exc).__name__}: {str(exc)[:300]} (rerun with --debug for the traceback)", 2)


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: two 128k-token tokenizers make ~10^6 objects
    that all live on, so the collections they would trigger free nothing and cost ~10 %
    of a run's preparation."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
