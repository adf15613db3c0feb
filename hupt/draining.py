"""How generations stop: paused, drained, retired, killed.

Draining generations are polled: their accepted, still-open connections are
counted in the kernel's tables; at zero (or at the drain timeout) a
``Drained`` event says so, and whoever routes it retires the generation or,
in exec mode, execs its root.  A drain still going after DRAIN_REPORT_AFTER
seconds says once what holds it (``DrainSlow``: the connections still open).

--drain-signal asks a generation to drain itself: it is sent when the
generation stops accepting for good (``start_draining``: a reload promoted
its successor, a reload failed, hupt stops), never on a mere pause (the
--ready http probe pauses the old generation, which a rollback resumes).
Only the server knows where its requests end, so only it can close a busy
keep-alive connection without cutting a request: Go's Shutdown and nginx's
QUIT answer with ``Connection: close`` and close at the next boundary.
hupt still counts what is in flight and enforces the drain timeout.

A datagram socket has no connections to count: a generation that reads one
is drained when its stream connections are, but never sooner than
DATAGRAM_GRACE after its pause.  The pause interrupts a thread wherever it
is, maybe between reading a request and answering it; given that moment it
sends the answer (from the dummy, which sends from the held address), and
only then does it get the stop signal or, in exec mode, the exec, which would
lose the datagram in hand.

A generation paused but not given up yet (a --ready http probe, an exec
that may fail) can be resumed: it accepts again exactly as it did.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterable
from typing import TYPE_CHECKING

from hupt import log
from hupt.fleet import Drained, DrainSlow, Event, Fleet
from hupt.generations import Generation, State

if TYPE_CHECKING:
    from hupt.options import Options

DRAIN_POLL = 0.1
DRAIN_REPORT_AFTER = 5.0
DATAGRAM_GRACE = 0.3


def oldest_connection(g: Generation, now: float) -> float | None:
    """Seconds the longest-open connection of draining ``g`` has been seen open."""
    if g.state is not State.DRAINING or not g.connections_seen:
        return None
    return now - min(g.connections_seen.values())


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class Draining:
    def __init__(self, fleet: Fleet, options: Options) -> None:
        self.fleet = fleet
        self.sys = fleet.sys
        self.opts = options

    def in_flight(self, gen: Generation) -> int | None:
        return self.sys.in_flight(gen.pids, gen.listened)

    def drained_now(self, gen: Generation) -> bool:
        """Nothing in flight, and no datagram socket read (those get DATAGRAM_GRACE)."""
        return not any(a.is_datagram for a in gen.listened) and self.in_flight(gen) == 0

    def pause(self, gen: Generation, pids: set[int], lives_on: set[int]) -> list[str]:
        problems = self.sys.pause(gen.number, pids, lives_on)
        for p in problems:
            log.warn(f"{gen}: could not stop accepting: {p}")
        gen.paused |= pids
        return problems

    def resume(self, gen: Generation) -> list[str]:
        problems = self.sys.resume(gen.number)
        gen.paused = set()
        return problems

    def seal(self, gen: Generation) -> None:
        for p in self.sys.seal(gen.number, gen.paused):
            log.warn(f"{gen}: {p}")

    def drain(self, gen: Generation, lives_on: Iterable[int] = ()) -> None:
        """Stop ``gen`` accepting and let its in-flight connections finish."""
        gen.lives_on = set(lives_on)
        self.pause(gen, gen.pids, gen.lives_on)
        self.start_draining(gen)

    def start_draining(self, gen: Generation) -> None:
        """``gen`` has stopped accepting for good: it drains (and gets --drain-signal)."""
        gen.to(State.DRAINING)
        now = self.sys.now()
        gen.drain_started_at = now
        gen.drain_deadline = now + self.opts.drain_timeout
        gen.drain_polled_at = -math.inf
        gen.drain_reported = False
        gen.drain_ended_at = gen.drain_end = gen.drain_end_open = None
        self._send_drain_signal(gen, gen.pids)

    def _send_drain_signal(self, gen: Generation, pids: Iterable[int]) -> None:
        """--drain-signal to these processes of ``gen`` (never to one that lives on:
        exec mode's root, which execs)."""
        sig = self.opts.drain_signal
        targets = set(pids) - gen.lives_on - gen.drain_signaled
        if sig is None or not targets:
            return
        self.sys.signal(targets, sig)
        first = not gen.drain_signaled
        gen.drain_signal = sig
        gen.drain_signaled |= targets
        gen.retired_by_hupt = True  # its exit from now on is the one asked for
        if first:
            log.info(f"{gen}: sent {signal_name(sig)} (--drain-signal) to "
                     f"{len(targets)} process(es)")
        else:
            log.debug(f"{gen}: sent {signal_name(sig)} to late process(es) "
                      f"{sorted(targets)}")

    def signal_root(self, gen: Generation) -> None:
        """Exec mode, the root's exit followed: the root gets --drain-signal too
        (its exit becomes the exec)."""
        sig = self.opts.drain_signal
        if sig is None or gen.pid in gen.drain_signaled:
            return
        self.sys.signal([gen.pid], sig)
        gen.drain_signal = sig
        gen.drain_signaled.add(gen.pid)
        gen.retired_by_hupt = True
        log.info(f"{gen}: sent {signal_name(sig)} (--drain-signal) to pid {gen.pid}; "
                 "its exit becomes the exec")

    def retire(self, gen: Generation, why: str) -> None:
        log.info(f"retiring {gen}: {why}")
        gen.to(State.RETIRING)
        gen.retired_by_hupt = True
        self.sys.signal(gen.pids, self.opts.stop_signal)
        gen.kill_at = self.sys.now() + self.opts.kill_timeout

    def kill_all(self) -> None:
        now = self.sys.now()
        for g in self.fleet.gens:
            if g.alive:
                g.retired_by_hupt = True
                g.killed = True
                if g.state is State.DRAINING:
                    g.drain_over(now, "request", len(g.connections_seen))
                self.sys.signal(g.pids, signal.SIGKILL)

    # -- timers --------------------------------------------------------------------------------
    def deadline(self) -> float:
        if self.fleet.detached:
            return math.inf
        out = math.inf
        for g in self.fleet.gens:
            if g.state is State.DRAINING:  # at once when it starts, then every poll
                out = min(out, g.drain_polled_at + DRAIN_POLL)
            elif g.state is State.RETIRING and g.kill_at is not None:
                out = min(out, g.kill_at)
        return out

    def tick(self, now: float) -> None:
        if self.fleet.detached:
            return
        drained: list[Event] = []
        for g in self.fleet.gens:
            if g.state is State.DRAINING:
                drained += self._poll_drain(g, now)
            elif g.state is State.RETIRING and g.kill_at is not None and now >= g.kill_at:
                log.warn(f"{g} still running {self.opts.kill_timeout:g} s after the stop "
                         "signal: SIGKILL")
                self.sys.signal(g.pids, signal.SIGKILL)
                g.kill_at = None
                g.killed = True
        self.fleet.emit(drained)

    def _poll_drain(self, g: Generation, now: float) -> list[Event]:
        # A process forked just before the pause (or by one not yet paused)
        # shows up in a later scan: it stops accepting too, and is asked to drain.
        late = g.pids - g.paused
        if late:
            self.pause(g, late, g.lives_on & late)
            self._send_drain_signal(g, late)
        if self.opts.close_idle_ms is not None:
            closed = self.sys.close_idle(g.pids, g.listened, self.opts.close_idle_ms)
            if closed:
                log.debug(f"{g}: closed {closed} idle connection(s)")
        # Uncounted (the tables could not be read) is not drained: the drain
        # timeout still ends it.
        g.drain_polled_at = now
        conns = self.sys.connections(g.pids, g.listened)
        n = None if conns is None else len(conns)
        if conns is not None:
            g.connections_seen = {c: g.connections_seen.get(c, now) for c in conns}
        took = now - (g.drain_started_at if g.drain_started_at is not None else now)
        if n == 0 and took < DATAGRAM_GRACE and any(a.is_datagram for a in g.listened):
            return []  # what it read before the pause, it still answers
        if n == 0:
            g.drain_over(now, "drained", 0)
            return [Drained(g, f"no connections in flight after {took:.1f} s of draining",
                            False)]
        if g.drain_deadline is not None and now >= g.drain_deadline:
            g.drain_over(now, "timeout", n)
            return [Drained(g, f"drain timeout with {'?' if n is None else n} connection(s) "
                            "still open", True)]
        if not g.drain_reported and took >= DRAIN_REPORT_AFTER:
            g.drain_reported = True
            message = self.drain_holdup(g, n, took)
            log.warn(message)
            return [DrainSlow(g, message)]
        return []

    def drain_holdup(self, g: Generation, n: int | None, took: float) -> str:
        """What holds ``g``'s drain, and what would end it sooner."""
        count = f"{'?' if n is None else n} connection(s) still open"
        oldest = oldest_connection(g, self.sys.now())
        age = f" (the oldest open for {oldest:.0f} s at least)" if oldest is not None else ""
        limit = f"--drain-timeout {self.opts.drain_timeout:g} s"
        if g.drain_signal is not None:
            return (f"{g}: {count} {took:.0f} s after {signal_name(g.drain_signal)} "
                    f"(--drain-signal){age}; waiting for them up to {limit}")
        if self.opts.exec_mode:
            return (f"{g}: {count} after {took:.0f} s of draining before its exec{age}; "
                    f"waiting up to {limit} (keep-alive clients hold connections open; "
                    "--close-idle closes idle ones; with --drain-signal a server that "
                    "closes them itself exits, and its exit becomes the exec)")
        return (f"{g}: {count} after {took:.0f} s of draining{age}; keep-alive clients hold "
                f"them until {limit}. A server that closes its connections itself on its "
                "graceful-stop signal drains at once: see --drain-signal")
