"""hupt's own messages: on stderr, coloured with rich on a terminal, plain lines otherwise.

The server's stdout and stderr pass through untouched; hupt never writes to
stdout from ``hupt run`` so a server's output can be piped as before.  Plain
lines carry a timestamp and "hupt[PID]:" so they can be told apart from the
server's in a journal.  rich is imported only when stderr is a terminal:
it costs tens of milliseconds that ``hupt run`` should not spend before the
server starts.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

_console: Any = None
_verbose = False
_is_tty = sys.stderr.isatty()
_STYLE = {"info": "cyan", "ok": "green", "warn": "yellow", "error": "bold red", "debug": "dim"}


def configure(*, verbose: bool = False, color: bool | None = None) -> None:
    global _console, _verbose, _is_tty
    _verbose = verbose or bool(os.environ.get("HUPT_DEBUG"))
    _is_tty = sys.stderr.isatty() if color is None else color
    _console = None


def _emit(kind: str, msg: str) -> None:
    global _console
    # A message that cannot be written (the terminal hung up, stderr closed)
    # must never take the supervisor, and so the servers' handoffs, down.
    try:
        if _is_tty:
            if _console is None:
                from rich.console import Console

                _console = Console(stderr=True, highlight=False)
            _console.print(f"[{_STYLE[kind]}]hupt[/]: {_escape(msg)}", style=None)
            return
        stamp = time.strftime("%H:%M:%S")
        sys.stderr.write(f"{stamp} hupt[{os.getpid()}]: {kind}: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _escape(msg: str) -> str:
    return msg.replace("[", r"\[")


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
