"""``hupt reload --wait-old``: the outcome once the generations the reload
replaced have exited, with their drain figures.

A deploy script that must know the old code is gone (a migration that
drops what it used, a release directory to delete) waits for this instead
of the reload alone.  The generations waited for are those alive when the
reload was asked for and older than the one that serves after it: the one
it replaced, and any still draining from earlier reloads.  A failed reload
is told at once, as without --wait-old (nothing was replaced).  A reload
that succeeded but whose new generation died while the old one drained
rolls back (the old one serves again, see Supervisor._fall_back): that is
told as a failure, since the old code did not go.

For each: how long its drain took, what ended it (nothing left in flight,
the drain timeout, a request to end every drain, or its own exit, e.g. on
--drain-signal), the connections still open then, and how it exited (its
status; SIGKILL after --kill-timeout; exec mode: its root runs the next
image).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from hupt.draining import signal_name
from hupt.fleet import Fleet
from hupt.generations import DRAIN_ENDS, Generation, State, describe
from hupt.upgrade import Waiter


def figures(g: Generation, since: float) -> dict[str, Any]:
    """What ``g``'s end looked like, ``since`` being when the reload was asked for."""
    drain = (g.drain_ended_at - g.drain_started_at
             if g.drain_ended_at is not None and g.drain_started_at is not None else None)
    signal = signal_name(g.drain_signal) if g.drain_signal is not None else None
    if g.replaced_by is not None:
        how = f"its root process runs generation {g.replaced_by}"
    else:
        how = describe(g.exit_status)
    if g.killed and "SIGKILL" not in how:
        how += ", SIGKILLed"
    after = g.exited_at - since if g.exited_at is not None else None
    if drain is None:
        text = f"{g}: no drain"
    else:
        why = DRAIN_ENDS.get(g.drain_end or "", g.drain_end or "?")
        if signal is not None and g.drain_end == "exited":
            why += f" after {signal} (--drain-signal)"
        still = "?" if g.drain_end_open is None else str(g.drain_end_open)
        text = (f"{g}: drained {drain:.2f} s, ended by {why}, {still} connection(s) still "
                "open then")
    text += (f"; exited {after:.2f} s after the reload began ({how})" if after is not None
             else f"; exited ({how})")
    return {"generation": g.number, "pid": g.pid,
            "drain_s": round(drain, 3) if drain is not None else None,
            "drain_end": g.drain_end, "open_at_end": g.drain_end_open,
            "drain_signal": signal, "exit": how, "killed": g.killed,
            "exited_after_s": round(after, 3) if after is not None else None,
            "summary": text}


class WaitOld(Waiter):
    """Stands between a reload and its waiter: on success, the outcome waits for the
    old generations' exits (``check``, at each exit); on failure it goes at once."""

    def __init__(self, inner: Waiter, fleet: Fleet, now: float,
                 on_pending: Callable[[WaitOld], None]) -> None:
        self.inner = inner
        self.fleet = fleet
        self.since = now
        self._before = {g.number for g in fleet.gens if g.alive}
        self._on_pending = on_pending
        self.watch: list[Generation] = []
        self.reason = ""
        self.over = False
        self._told: set[int] = set()

    def progress(self, message: str) -> None:
        self.inner.progress(message)

    def served(self, message: str) -> None:
        self.inner.served(message)

    def add_details(self, details: dict[str, Any]) -> None:
        self.inner.add_details(details)

    def done(self, ok: bool, reason: str) -> None:
        if not ok:
            self._end(False, reason)
            return
        cur = self.fleet.current
        newest = cur.number if cur is not None else math.inf
        self.watch = [g for g in self.fleet.gens if g.number in self._before
                      and g.number < newest]
        self.reason = reason
        self._told = {g.number for g in self.watch if not g.alive}
        left = [g for g in self.watch if g.alive]
        if left:
            self.inner.served(f"{reason}; waiting for {', '.join(map(str, left))} to exit "
                              "(--wait-old)")
        if not self.check():
            self._on_pending(self)

    def check(self) -> bool:
        """Tell the outcome if it is known (each exit); True once told."""
        if self.over:
            return True
        back = [g for g in self.watch if g.alive and g.state is State.SERVING]
        if back:
            self._end(False, f"{self.reason}; but {back[0]} serves again: the new generation "
                             "died while it drained, and it was rolled back")
            return True
        for g in self.watch:
            if not g.alive and g.number not in self._told:
                self._told.add(g.number)
                self.inner.progress(f"{g} exited ({figures(g, self.since)['exit']})")
        if any(g.alive for g in self.watch):
            return False
        self.inner.add_details({"old_generations": [figures(g, self.since)
                                                    for g in self.watch]})
        gone = (", ".join(map(str, self.watch)) + (" have" if len(self.watch) > 1 else " has")
                + " exited") if self.watch else "no older generation was running"
        self._end(True, f"{self.reason}; {gone}")
        return True

    def abandon(self, why: str) -> None:
        """hupt exits (or detaches) before the old generations are all gone."""
        if not self.check():
            self._end(False, f"{self.reason}; {why} before "
                             f"{', '.join(str(g) for g in self.watch if g.alive)} exited")

    def _end(self, ok: bool, reason: str) -> None:
        if not self.over:
            self.over = True
            self.inner.done(ok, reason)
