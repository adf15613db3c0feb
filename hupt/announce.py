"""What hupt tells its service manager (sd_notify), and when.

hupt's PID is the service's main PID, so hupt speaks for the server:
READY=1 once the server is ready, RELOADING=1 at the start of a reload and
READY=1 at its end (whatever the outcome: the manager waits for it),
STOPPING=1 when it stops or detaches.  Never READY=1 after STOPPING=1, and
no RELOADING=1 for a revive (bringing a crashed server back is no reload).

Generation 1 has no one to take over from: it serves from its first
listen(), but READY=1 waits for the --ready policy (readiness, not
liveness).  Nothing is rolled back here (there is nothing to roll back to);
a policy still unmet after the ready timeout is logged once and awaited on.
While a reload is in progress, the reload announces instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hupt import log
from hupt.generations import Generation
from hupt.loop import Loop
from hupt.readiness import Policy, ReadinessCheck


class ServiceManager(Protocol):
    """Who hears it: systemd through NOTIFY_SOCKET (hupt.sdnotify.Notifier), or no one."""

    def ready(self, status: str) -> None: ...

    def reloading(self, status: str) -> None: ...

    def stopping(self, status: str) -> None: ...

    def status(self, status: str) -> None: ...


@dataclass
class _First:
    gen: Generation
    since: float
    check: ReadinessCheck
    warned: bool = False


class Announcer:
    def __init__(self, notifier: ServiceManager, policy: Policy, ready_timeout: float,
                 loop: Loop, *, current: Callable[[], Generation | None],
                 reloading: Callable[[], bool], stopping: Callable[[], bool]) -> None:
        self._notifier = notifier
        self._policy = policy
        self._ready_timeout = ready_timeout
        self._loop = loop
        self._current = current
        self._reloading = reloading
        self._stopping = stopping
        self.announced = False
        self._first: _First | None = None

    # -- what the supervisor says ------------------------------------------------
    def reloading(self) -> None:
        self._notifier.reloading("reloading")

    def serving(self, gen: Generation) -> None:
        """``gen`` serves and is ready (a reload's end, or generation 1's policy met)."""
        self._drop_first()
        self.announced = True
        self._notifier.ready(f"serving: {gen}")

    def status(self, status: str) -> None:
        self._notifier.status(status)

    def reload_failed(self, reason: str) -> None:
        self._notifier.ready(f"reload failed: {reason}")
        f = self._first
        if f is not None and not self._stale(f):
            # That READY=1 counts for generation 1 too if its policy is met by
            # now (a delay over during the reload); if not, it is awaited on.
            f.check.on_met = None  # said already
            f.check.tick(self._loop.now())
            f.check.on_met = self._first_met
            if f.check.met is not None:
                self._drop_first()
                self.announced = True

    def stopping(self, status: str) -> None:
        self._drop_first()  # no READY=1 after STOPPING=1
        self._notifier.stopping(status)

    # -- generation 1 ------------------------------------------------------------------
    def first_listened(self, gen: Generation) -> None:
        if self.announced or self._first is not None:
            return
        check = ReadinessCheck(self._policy, lambda: gen.listened, self._loop,
                               on_met=self._first_met)
        self._first = _First(gen, self._loop.now(), check)
        if gen.sent_ready:
            check.notified()
        if check.met is not None and self._first is not None:
            self._announce(gen, "" if self._policy.kind == "listen" else check.met)
        elif self._policy.kind == "notify":
            log.info(f"{gen} listened; waiting for READY=1 (--ready notify)")

    def sent_ready(self, gen: Generation) -> None:
        f = self._first
        if f is not None and f.gen is gen:
            f.check.notified()

    def _held_back(self) -> bool:
        return self._reloading() or self._stopping()

    def _first_met(self, how: str) -> None:
        f = self._first
        if f is None:
            return
        if self._held_back():
            # During a reload the probe may have reached the new generation: no verdict.
            f.check.retry()
            return
        self._announce(f.gen, how)

    def _announce(self, gen: Generation, how: str) -> None:
        if how:
            log.ok(f"{gen} is ready ({how})")
        self.serving(gen)

    def _stale(self, f: _First) -> bool:
        # A reload or a revive announces instead.
        return f.gen is not self._current() or not f.gen.alive or self._stopping()

    def _drop_first(self) -> None:
        f, self._first = self._first, None
        if f is not None:
            f.check.close()

    def deadline(self) -> float:
        f = self._first
        if f is None:
            return math.inf
        if self._stale(f):
            return -math.inf  # dropped at the next tick
        if self._reloading():
            return math.inf  # the reload's outcome decides; awaited after it
        if f.check.met is not None:
            return -math.inf
        out = f.check.deadline()
        if not f.warned:
            out = min(out, f.since + self._ready_timeout)
        return out

    def tick(self, now: float) -> None:
        f = self._first
        if f is None:
            return
        if self._stale(f):
            self._drop_first()
            return
        if self._reloading():
            return
        if f.check.met is not None:
            self._announce(f.gen, f.check.met)
            return
        f.check.tick(now)
        if self._first is None:
            return
        if not f.warned and now - f.since >= self._ready_timeout:
            f.warned = True
            last = f.check.last_probe
            why = f" (last probe: {last})" if last else ""
            log.warn(f"{f.gen} serves but is not ready after {self._ready_timeout:g} s: "
                     f"--ready {self._policy} not satisfied{why}; READY=1 waits for it")
