"""Logging: one logger for both tools, and how its lines and the error line look."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("merge_tools")  # both tools log through it; its name shows nowhere (LogFormatter)


class LogFormatter(logging.Formatter):
    """`warning: ...` and `error: ...` as the one-line errors read; plain text for progress."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return printable(message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}")


def printable(text: str) -> str:
    """Text that stderr can take whatever its encoding: lone surrogates and characters it
    cannot encode become backslash escapes instead of a UnicodeEncodeError."""
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


def print_error(message: str) -> None:
    """The one `error: ...` line of a failed run."""
    sys.stderr.write(printable("error: " + " ".join(str(message).splitlines())) + "\n")


def configure_logging(debug: bool) -> None:
    """Logs go to the current stderr (tests swap it), never to stdout."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
