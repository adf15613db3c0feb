"""hupt's own messages: on stderr, coloured on a terminal, plain lines otherwise.

hupt never writes its own messages to stdout from ``hupt run``, so a server's
output can be piped as before (as it is on a terminal; elsewhere each of its
lines prefixed with its generation, hupt/output.py).  Plain lines carry a
timestamp and "hupt[PID]:" so they can be told apart from the server's in a
journal.  Colours are ANSI escapes written directly: rich would cost tens of
milliseconds that ``hupt run`` should not spend before the server starts,
even on a terminal.

One error repeating (a fault hit at every wake-up, a flood of bad control
requests) must not grow a log without bound: of identical lines (same kind
and text), at most REPEAT_BURST are written per REPEAT_WINDOW seconds; the
rest are counted, and the count is written as "… repeated N times" once the
window is over (at the next line written after it, or at ``flush()``).  At
most REPEAT_KEYS distinct lines are tracked; the oldest make way.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

_verbose = False
_is_tty = sys.stderr.isatty()
# SGR codes: cyan, green, yellow, bold red, dim.
_STYLE = {"info": "36", "ok": "32", "warn": "33", "error": "1;31", "debug": "2"}

REPEAT_WINDOW = 10.0
REPEAT_BURST = 5
REPEAT_KEYS = 64
_clock = time.monotonic


class _Seen:
    __slots__ = ("since", "suppressed", "written")

    def __init__(self, since: float) -> None:
        self.since = since
        self.written = 0
        self.suppressed = 0


_seen: dict[tuple[str, str], _Seen] = {}
# Called before each line of hupt's own is written: the servers' lines hupt has
# not written yet to the same stderr go first (hupt/output.py), so that no
# line of hupt's lands in the middle of one of theirs.
_before_write: Callable[[], None] | None = None


def before_write(fn: Callable[[], None] | None) -> None:
    global _before_write
    _before_write = fn


def configure(*, verbose: bool = False, color: bool | None = None) -> None:
    global _verbose, _is_tty
    _verbose = verbose or bool(os.environ.get("HUPT_DEBUG"))
    _is_tty = sys.stderr.isatty() if color is None else color
    _seen.clear()  # a fresh start: nothing counted


def _emit(kind: str, msg: str) -> None:
    now = _clock()
    _summarize(now)
    key = (kind, msg)
    seen = _seen.get(key)
    if seen is None:
        if len(_seen) >= REPEAT_KEYS:
            oldest = min(_seen, key=lambda k: _seen[k].since)
            _repeated(oldest, _seen.pop(oldest))
        seen = _seen[key] = _Seen(now)
    if seen.written >= REPEAT_BURST:
        seen.suppressed += 1
        return
    seen.written += 1
    _write(kind, msg)


def _summarize(now: float) -> None:
    """Write the counts of the windows that are over, and forget them."""
    for key in [k for k, s in _seen.items() if now - s.since >= REPEAT_WINDOW]:
        _repeated(key, _seen.pop(key))


def _repeated(key: tuple[str, str], seen: _Seen) -> None:
    if seen.suppressed:
        kind, msg = key
        first = msg.splitlines()[0] if msg else msg
        short = first if len(first) <= 80 else first[:77] + "..."
        _write(kind, f"… repeated {seen.suppressed} times: {short}")


def flush() -> None:
    """Write every count not written yet (at exit)."""
    for key in list(_seen):
        _repeated(key, _seen.pop(key))


def _write(kind: str, msg: str) -> None:
    # A message that cannot be written (the terminal hung up, stderr closed)
    # must never take the supervisor, and so the servers' handoffs, down.
    try:
        if _before_write is not None:
            _before_write()
        if _is_tty:
            line = f"\x1b[{_STYLE[kind]}mhupt\x1b[0m: {msg}\n"
        else:
            line = f"{time.strftime('%H:%M:%S')} hupt[{os.getpid()}]: {kind}: {msg}\n"
        sys.stderr.write(line)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def info(msg: str) -> None:
    _emit("info", msg)


def ok(msg: str) -> None:
    _emit("ok", msg)


def warn(msg: str) -> None:
    _emit("warn", msg)


def error(msg: str) -> None:
    _emit("error", msg)


def debug(msg: str) -> None:
    if _verbose:
        _emit("debug", msg)


def prompt_fd() -> int | None:
    """stdin if a person can answer on it: a terminal whose foreground job is hupt.

    A background job reading its terminal would be stopped by SIGTTIN, and
    its question would land in someone else's session.
    """
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
            return 0
    except OSError:
        pass
    return None


def prompt(question: str) -> None:
    """Write a question for the terminal, without a newline after it."""
    try:
        sys.stderr.write(question)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
