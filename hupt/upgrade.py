"""The upgrade: one reload in progress, as an explicit state machine.

The invariant (as in tableflip): **at most one generation is STARTING, and
it is the upgrade's.**  A reload requested while an upgrade is in progress
joins it and hears the same outcome; a reload while older generations still
drain is fine (they drain on, they are no longer the upgrade's business).

Phases, and the only transitions (anything else is a bug and raises)::

    NEW ──► BEFORE ──────────────► LISTENING ──► CONFIRMING ──► DONE
     │        │  --before-reload     ▲
     │        │  succeeded           │
     │        ▼                      │
     │      DRAINING ────────────────┘  (exec mode: the serving generation
     │        │   drains, then its root execs; the new image must listen)
     └──► any of BEFORE, DRAINING, LISTENING
    every phase but DONE ──► FAILED

NEW: requested, nothing started.  BEFORE: a --before-reload command runs
(no deadline).  DRAINING (exec mode only): the serving generation has
stopped accepting and finishes its connections; no deadline either, the
drain timeout ends it.  With --drain-signal its root is followed meanwhile
(``follow``): the server exits by itself once drained, and that exit becomes
the exec; ``exit_deadline`` (--kill-timeout after nothing is in flight) ends
the wait for an exit that does not come.  LISTENING: the new generation must listen on every
address in ``target`` (with --multi N, every copy) before ``deadline``.
CONFIRMING: it did; the --ready policy (a delay, READY=1, an HTTP probe) is
awaited until the same deadline (the default policy, listen, is met at once).
DONE and FAILED are final.

Every outcome goes through one ``Reloader.finish`` (hupt/reload.py).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hupt.address import Address
from hupt.generations import Generation

if TYPE_CHECKING:
    from hupt.command import Change
    from hupt.control import Peer
    from hupt.fleet import PendingExec
    from hupt.hooks import Hook
    from hupt.launch import Launch
    from hupt.readiness import ReadinessCheck


class Phase(enum.Enum):
    NEW = "new"
    BEFORE = "before"
    DRAINING = "draining"
    LISTENING = "listening"
    CONFIRMING = "confirming"
    DONE = "done"
    FAILED = "failed"


ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset({Phase.BEFORE, Phase.DRAINING, Phase.LISTENING, Phase.FAILED}),
    Phase.BEFORE: frozenset({Phase.DRAINING, Phase.LISTENING, Phase.FAILED}),
    Phase.DRAINING: frozenset({Phase.LISTENING, Phase.FAILED}),
    Phase.LISTENING: frozenset({Phase.CONFIRMING, Phase.FAILED}),
    Phase.CONFIRMING: frozenset({Phase.DONE, Phase.FAILED}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
}


class TransitionRefused(RuntimeError):
    """A phase change the table does not allow: a bug in hupt."""


class Waiter:
    """Someone waiting for a reload's outcome (a control client, or hupt's own log)."""

    def progress(self, message: str) -> None:
        pass

    def served(self, message: str) -> None:
        """The reload succeeded, its outcome is not told yet (--wait-old waits on)."""
        self.progress(message)

    def add_details(self, details: dict[str, Any]) -> None:
        """More about the outcome, given before ``done``: the failed generation's last
        lines on stderr, the old generations' drain figures (--wait-old)."""

    def done(self, ok: bool, reason: str) -> None:
        pass


class PeerWaiter(Waiter):
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.details: dict[str, Any] = {}

    def progress(self, message: str) -> None:
        self.peer.send({"event": "progress", "message": message})

    def served(self, message: str) -> None:
        self.peer.send({"event": "progress", "message": message, "served": True})

    def add_details(self, details: dict[str, Any]) -> None:
        self.details.update(details)

    def done(self, ok: bool, reason: str) -> None:
        self.peer.send({**self.details, "event": "result", "ok": ok, "reason": reason})
        self.peer.finish()


@dataclass
class Upgrade:
    started_at: float
    waiters: list[Waiter]
    revive: bool = False  # bringing a dead server back: no reload to the service manager
    fresh: bool = False  # exec mode: the command started afresh after the new image failed
    # Exec mode: the new image failed and its command never served (hupt attach):
    # nothing is started again until an operator reloads; the sockets stay held.
    awaiting_command: bool = False
    # hupt reload --env/--unset-env/-- ARGV: kept as the command only if this succeeds.
    change: Change | None = None
    launch: Launch | None = None  # what the new generation runs (set when it is started)
    phase: Phase = Phase.NEW
    deadline: float = math.inf  # LISTENING and CONFIRMING end here
    target: set[Address] = field(default_factory=set)  # what the new generation must take
    gen: Generation | None = None  # the new generation (STARTING)
    replacing: Generation | None = None  # DRAINING: the generation whose root will exec
    hook: Hook | None = None  # BEFORE: the --before-reload command
    check: ReadinessCheck | None = None  # CONFIRMING: the --ready policy
    paused_old: Generation | None = None  # --ready http: paused while probed, may resume
    # DRAINING, exec mode with --drain-signal: the image the root's exit becomes,
    # and when to stop waiting for that exit once nothing is in flight.
    follow: PendingExec | None = None
    exit_deadline: float = math.inf
    follow_polled_at: float = -math.inf
    # More for the waiters than the reason: the failed generation's stderr tail.
    details: dict[str, Any] = field(default_factory=dict)

    def to(self, phase: Phase) -> None:
        if phase not in ALLOWED[self.phase]:
            raise TransitionRefused(f"upgrade: {self.phase.value} -> {phase.value}")
        self.phase = phase

    @property
    def over(self) -> bool:
        return self.phase in (Phase.DONE, Phase.FAILED)

    @property
    def timed(self) -> bool:
        """Whether ``deadline`` counts now."""
        return self.phase in (Phase.LISTENING, Phase.CONFIRMING)

    def tell(self, message: str) -> None:
        for w in self.waiters:
            w.progress(message)

    def __str__(self) -> str:
        return str(self.gen or self.replacing or "a reload")


@dataclass
class ReloadRecord:
    at: float
    duration_ms: float
    ok: bool
    reason: str
    generation: int | None
