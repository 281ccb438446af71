"""Progress of a long command: one line per finished stage on stderr, with the elapsed time.

    lfm-zonal: [  12.3 s] zones: K = 16 done

The command line turns it on (:func:`reporting`, around ``run``, ``clear``, ``zones``,
``powerflow`` and ``sensitivities``; not with ``--quiet``) and ends it with
:func:`finished`; a stage says it is done with :func:`stage`, which does nothing when no
command turned progress on (the Python API and the tests of stages stay silent).

**A refused input is still one line.** Some inputs can be checked only once the grid is
solved (the resources' buses, the zone counts against the energised buses, the reference
MTU), so the lines of the first stages are held back until the study says its inputs are
accepted (:func:`inputs_accepted`) and dropped if the command fails before: a refusal
prints its one error line and nothing else. A run whose preparation takes longer than
:data:`HOLD_S` (a grid of thousands of buses) shows the held lines then, so a redirected
run is never silent for long; only a refusal after that much work follows them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

#: Signals a command turns into exceptions, so that it cleans up on the way out (the
#: command line's handlers; worker processes block them while they are being forked).
COMMAND_SIGNALS = frozenset(
    {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
)
#: The command's signals so far, in order (the command line's handler records each before
#: it raises it). Python ignores an exception raised inside an at-fork callback (logging's
#: lock release, when a handler runs there because another thread took the signal while
#: this one forked): ``raise_if_signalled`` raises it again before an output is made final.
SIGNALLED: list[int] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP): cleaned up like Ctrl-C."""


def signal_exception(signum: int) -> KeyboardInterrupt:
    """What a signal raises: KeyboardInterrupt for SIGINT, Terminated for the others."""
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return Terminated(signal.Signals(signum).name)


def raise_if_signalled() -> None:
    """Raise the command's first signal if one came (and was swallowed: the command goes on
    only then)."""
    if SIGNALLED:
        raise signal_exception(SIGNALLED[0])


#: Seconds the lines of the first stages are held back at most (see the module docstring).
HOLD_S = 20.0
PREFIX = "lfm-zonal"


class _Reporter:
    def __init__(self, hold_s: float) -> None:
        self.started = time.perf_counter()
        self.held: list[str] | None = []  # None: lines go out as they come
        self.lock = threading.Lock()
        self.timer = threading.Timer(hold_s, self.release)
        self.timer.daemon = True
        self.timer.start()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def line(self, message: str) -> None:
        text = f"{PREFIX}: [{self.elapsed_s():6.1f} s] {message}"
        with self.lock:
            if self.held is not None:
                self.held.append(text)
            else:
                _write([text])

    def release(self) -> None:
        with self.lock:
            if self.held is not None:
                _write(self.held)
                self.held = None

    def close(self, flush: bool) -> None:
        self.timer.cancel()
        if flush:
            self.release()
        else:
            with self.lock:
                self.held = None if self.held is None else []


def _write(lines: list[str]) -> None:
    if lines:
        stream = sys.stderr  # looked up at each write: the stream of the moment
        stream.write("".join(f"{text}\n" for text in lines))
        stream.flush()


_ACTIVE: _Reporter | None = None


@contextlib.contextmanager
def reporting(enabled: bool = True, hold_s: float = HOLD_S) -> Iterator[None]:
    """Stage lines on stderr for the duration of a command (none if not ``enabled``); held
    lines are written when the command succeeds and dropped when it fails."""
    global _ACTIVE
    if not enabled or _ACTIVE is not None:
        yield
        return
    _ACTIVE = _Reporter(hold_s)
    reporter = _ACTIVE
    ok = False
    try:
        yield
        ok = True
    finally:
        _ACTIVE = None
        reporter.close(flush=ok)


def stage(message: str) -> None:
    """One progress line: ``message`` after the elapsed time (nothing if progress is off).
    A signal the command owes (``raise_if_signalled``) stops it here, between stages."""
    raise_if_signalled()
    reporter = _ACTIVE
    if reporter is not None:
        reporter.line(message)


#: Checks to run when a command's inputs are accepted (``checked_when_accepted``).
_CHECKS: list[Callable[[], None]] = []


@contextlib.contextmanager
def checked_when_accepted(check: Callable[[], None]) -> Iterator[None]:
    """Run ``check`` (which refuses by raising) as the last input check of the block's
    command, at :func:`inputs_accepted`: the command line checks there that ``--out`` may
    be written, so that a taken folder is refused before the work, not after it."""
    _CHECKS.append(check)
    try:
        yield
    finally:
        _CHECKS.remove(check)


def inputs_accepted() -> None:
    """Every input of the command has been checked (the last ones by the checks of
    :func:`checked_when_accepted`): held lines go out, later ones at once."""
    for check in list(_CHECKS):
        check()
    reporter = _ACTIVE
    if reporter is not None:
        reporter.release()


def finished() -> None:
    """The last line of a command that succeeded: its total elapsed time."""
    reporter = _ACTIVE
    if reporter is not None:
        reporter.line(f"finished in {reporter.elapsed_s():.1f} s")


def elapsed_s() -> float | None:
    """Seconds since the command turned progress on (None if it is off)."""
    reporter = _ACTIVE
    return None if reporter is None else reporter.elapsed_s()


def _lock_of_its_own() -> None:
    """A forked child (``study.workers``) writes its stage lines with a lock of its own: the
    parent's timer thread (``_Reporter.release`` at HOLD_S) may hold the inherited one at
    the fork, and no thread of the child would ever release it."""
    reporter = _ACTIVE
    if reporter is not None:
        reporter.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_lock_of_its_own)
