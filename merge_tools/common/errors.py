"""Errors and stop signals: CliError (one `error: ...` line, exit 2), and SIGINT, SIGTERM,
SIGHUP turned into one Interrupted exception."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class CliError(Exception):
    """An input or usage problem, reported as one `error: ...` line and exit code 2."""


# Signals: SIGINT, SIGTERM (timeout, Slurm, Docker, systemd) and SIGHUP all stop a run the
# same way: an Interrupted exception in the main thread, cleanup, one line, 128 + signal.
# Inside deferred_signals() (publishing an output) a signal only sets a flag, and is raised
# once the output directory is in a known state.
class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; KeyboardInterrupt so that every cleanup path sees it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class SignalState:
    deferring = 0
    pending: int | None = None
    stopping = False  # a signal was raised: later ones wait for the cleanup to end
    swallowed: int | None = None  # raised where Python drops exceptions (a finalizer): raised again at the next check


def _unraisable(unraisable: Any) -> None:
    """Python drops an exception raised inside a finalizer or weakref callback, printing
    "Exception ignored": for our own stop, keep it instead, for check_interrupt()."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        SignalState.swallowed = getattr(unraisable.exc_value, "signum", signal.SIGINT)
        return
    sys.__unraisablehook__(unraisable)


def check_interrupt() -> None:
    """Raise a stop whose signal arrived where Python could not raise it."""
    if SignalState.swallowed is not None and not SignalState.deferring:
        signum, SignalState.swallowed = SignalState.swallowed, None
        raise Interrupted(signum)


def _on_signal(signum: int, _frame: Any) -> None:
    if SignalState.deferring or SignalState.stopping:
        SignalState.pending = SignalState.pending or signum
        return
    SignalState.stopping = True
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_handled() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread (elsewhere, as in a
    worker thread of a caller, the process keeps its own handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable
    SignalState.deferring, SignalState.pending, SignalState.stopping, SignalState.swallowed = 0, None, False, None
    try:
        yield
        check_interrupt()
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    SignalState.deferring += 1
    try:
        yield
    finally:
        SignalState.deferring -= 1
    if not SignalState.deferring and SignalState.pending is not None and not SignalState.stopping:
        SignalState.stopping = True
        raise Interrupted(SignalState.pending)
    check_interrupt()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


MAIN_FINISHED = False  # main() has decided the outcome: a late signal changes nothing


def _signal_outside_main(signum: int, _frame: object) -> None:
    if not MAIN_FINISHED:  # before main() installs its handlers nothing was written yet
        os.write(2, f"error: interrupted ({signal_name(signum)}); nothing was written\n".encode())
        os._exit(128 + signum)


if __name__ == "__main__":
    for _signum in STOP_SIGNALS:
        signal.signal(_signum, _signal_outside_main)


def finish_main() -> None:
    """main() has decided the outcome. When the script runs as a program the process exits
    right after, and Python restores the default handlers while it exits: block the stop
    signals, so that one arriving then cannot turn a finished run into a kill."""
    global MAIN_FINISHED
    MAIN_FINISHED = True
    if __name__ == "__main__" and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
