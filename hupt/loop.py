"""The one event loop: a selector over file descriptors, and timers.

hupt's supervisor is single-threaded (so that fork() in spawn is safe and no
state needs a lock).  Everything it reacts to arrives here: a generation's
notify fd, an attached root's pidfd, the signal wakeup pipe, the control
socket and its clients, the --metrics endpoint and its clients, hook output,
sd_notify datagrams, ready probes.

A file descriptor is registered with the handler that serves it.  A
component with timers is a ``Timer``: ``deadline()`` says when it next has
something to do and ``tick(now)`` does it; the two sit side by side in the
component, so a timer cannot exist in one and be missing in the other.  Each
step waits until the earliest deadline or an fd event, runs the handlers,
then ticks every timer (a tick checks its own conditions: one early tick does
no harm, a missed one would).

After every step the loop checks the supervisor's invariants:

* every ``check`` registered (at most one generation is STARTING, ...);
* no busy loop: once ticked, no timer may still be due.  A deadline that
  stays in the past makes the selector return at once for ever; two such
  bugs once came from the deadline and the tick drifting apart.

A violated invariant is a bug in hupt.  It is logged, and the supervisor
goes on (its death would leave every server process with a filter nobody
answers).  With HUPT_STRICT=1 in the environment (the test suites) it raises
``InvariantViolation`` instead, so that no test passes over one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import selectors
from collections.abc import Callable
from typing import Protocol

from hupt import log
from hupt.command import STRICT_ENV

# Rounds of ticks for timers still due after the first: a tick may make
# another component due at once (a drained generation retired, a revive due).
TICK_ROUNDS = 3

Handler = Callable[[int], None]  # called with the selector's event mask


class Timer(Protocol):
    def deadline(self) -> float:
        """When tick() next has something to do (math.inf: nothing)."""

    def tick(self, now: float) -> None: ...


class InvariantViolation(AssertionError):
    """The supervisor's state broke one of its invariants: a bug in hupt."""


class Loop:
    def __init__(self, clock: Callable[[], float], *, strict: bool | None = None) -> None:
        self._clock = clock
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[str, Timer]] = []
        self._checks: list[Callable[[], str | None]] = []
        self._after: list[Callable[[], None]] = []
        self._on_wake: list[tuple[str, Callable[[], None]]] = []
        self.strict = os.environ.get(STRICT_ENV) == "1" if strict is None else strict
        self.violations: list[str] = []

    def now(self) -> float:
        return self._clock()

    # -- file descriptors --------------------------------------------------
    def add(self, fd: int, handler: Handler, events: int = selectors.EVENT_READ) -> None:
        self._sel.register(fd, events, handler)

    def modify(self, fd: int, events: int, handler: Handler | None = None) -> None:
        key = self._sel.get_key(fd)
        self._sel.modify(fd, events, handler if handler is not None else key.data)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (already closed or never registered: nothing to do)."""
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(fd)

    def handler(self, fd: int) -> Handler | None:
        try:
            h: Handler = self._sel.get_key(fd).data
        except (KeyError, ValueError):
            return None
        return h

    # -- timers, deferred work, invariants ----------------------------------
    def add_timer(self, name: str, timer: Timer) -> None:
        self._timers.append((name, timer))

    def on_wake(self, name: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` at every step, after the handlers and before the timers: for
        input that arrives on its own (signals noted by their handler), which a
        timer's deadline could not follow without looking like a busy loop."""
        self._on_wake.append((name, fn))

    def add_check(self, check: Callable[[], str | None]) -> None:
        """``check()`` returns what is wrong, or None."""
        self._checks.append(check)

    def later(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the handler or tick in progress has returned.

        For reactions that must not run inside a query: a membership scan
        finds a generation gone, and what that sets off (an upgrade failed,
        fds closed) waits until whoever asked has finished with its state.
        """
        self._after.append(fn)

    def run_later(self) -> None:
        while self._after:
            fn = self._after.pop(0)
            self._guard(fn, "on a deferred event")

    def timeout(self) -> float:
        now = self.now()
        nearest = min((t.deadline() for _, t in self._timers), default=math.inf)
        return max(0.0, nearest - now) if nearest != math.inf else 3600.0

    # -- one step ------------------------------------------------------------
    def step(self) -> None:
        for key, mask in self._sel.select(self.timeout()):
            handler: Handler = key.data
            self._guard(functools.partial(handler, mask), f"handling {_name(handler)}")
            self.run_later()
        for name, fn in self._on_wake:
            self._guard(fn, f"handling {name}")
            self.run_later()
        self.tick()

    def tick(self) -> None:
        """Tick every timer, then those still due, then check the invariants."""
        now = self.now()
        due = self._timers
        for _ in range(TICK_ROUNDS):
            for name, timer in due:
                self._guard(functools.partial(timer.tick, now), f"on the {name} timer")
                self.run_later()
            due = [(n, t) for n, t in self._timers if t.deadline() <= now]
            if not due:
                break
        else:
            names = ", ".join(n for n, _ in due)
            self.violated(f"busy loop: {names} still due at {now:.3f} after ticking")
        for check in self._checks:
            problem = check()
            if problem is not None:
                self.violated(problem)

    def violated(self, problem: str) -> None:
        self.violations.append(problem)
        del self.violations[:-10]
        if self.strict:
            raise InvariantViolation(problem)
        log.error(f"internal error: invariant violated: {problem} (a bug in hupt; please "
                  "report it)")

    def _guard(self, fn: Callable[[], None], where: str) -> None:
        """A bug in hupt must not take the supervisor down: its death would leave
        every server process with a filter nobody answers (bind/listen -> ENOSYS)."""
        try:
            fn()
        except InvariantViolation:
            raise
        except Exception:
            import traceback

            log.error(f"internal error {where} (a bug in hupt; please report it):\n"
                      + traceback.format_exc().rstrip())

    def close(self) -> None:
        self._sel.close()


def _name(handler: Handler) -> str:
    """What a handler serves, for an error message: its method name without the '_on_'."""
    fn = getattr(handler, "func", handler)  # a functools.partial: the function it binds
    name = getattr(fn, "__name__", "an event")
    return name.removeprefix("_").removeprefix("on_").replace("_", " ")
