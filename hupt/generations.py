"""Generations: one run of the server command and every process it made.

A generation is the spawned child plus all its descendants, including those
that daemonize (hupt is a child subreaper, so orphans come back to it and are
told apart by the HUPT_GEN marker in their environment).

Lifecycle (the only transitions; anything else is a bug and raises)::

    STARTING --listened on all held addresses--> SERVING
    STARTING --exit / ready timeout------------> FAILED --> DRAINING (if alive)
    SERVING  --a newer generation is ready----> DRAINING
    SERVING  --hupt stops---------------------> DRAINING
    DRAINING --0 in flight or drain timeout---> RETIRING (stop signal sent)
    any      --last process gone--------------> EXITED

Exec mode (``hupt run --exec``, ``hupt attach``) keeps the server's PID: a
reload drains generation N, then makes its root process execve the program
again, and the new image is generation N+1 with the same root pid (N's
``replaced_by``).  N keeps only the other processes it had (old workers, which
are retired) and is EXITED when they are gone, at once if there were none.
Two more transitions serve it::

    DRAINING --the exec failed, listeners resumed--> SERVING
    DRAINING --its root execed, nothing else left--> EXITED

Invariant (as in tableflip): at most one generation is STARTING.
"""

from __future__ import annotations

import enum
import math
import signal
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hupt.address import Address

if TYPE_CHECKING:
    from hupt.sdnotify import Listener


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    FAILED = "failed"
    DRAINING = "draining"
    RETIRING = "retiring"
    EXITED = "exited"


_ALLOWED: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.SERVING, State.FAILED, State.EXITED}),
    State.SERVING: frozenset({State.DRAINING, State.RETIRING, State.EXITED}),
    State.FAILED: frozenset({State.DRAINING, State.RETIRING, State.EXITED}),
    State.DRAINING: frozenset({State.RETIRING, State.EXITED, State.SERVING}),
    State.RETIRING: frozenset({State.EXITED}),
    State.EXITED: frozenset(),
}


@dataclass
class Generation:
    number: int
    pid: int
    started_at: float
    state: State = State.STARTING
    # Every live process of the generation (the root included while it lives).
    pids: set[int] = field(default_factory=set)
    # Addresses this generation listened on (handed over or new).
    listened: set[Address] = field(default_factory=set)
    # How many listen() calls it made per address: with --multi N every copy listens.
    listens: Counter[Address] = field(default_factory=Counter)
    # Its start-up is over (System.end_startup): new datagram addresses go unheld.
    startup_over: bool = False
    # The processes hupt started for it (--multi: one per copy); ``pid`` is the first.
    copies: list[int] = field(default_factory=list)
    ready_at: float | None = None
    drain_deadline: float | None = None
    drain_started_at: float | None = None  # when it last started DRAINING
    # What holds its drain was said once (a slow drain names its connections).
    drain_reported: bool = False
    # --drain-signal: the signal it was sent as it started draining, and to whom.
    drain_signal: int | None = None
    drain_signaled: set[int] = field(default_factory=set)
    drain_polled_at: float = -math.inf  # its connections last counted (DRAINING)
    # Its open connections (socket inodes) and when a drain poll first saw each:
    # the oldest says how long a client has held the drain (at least).
    connections_seen: dict[int, float] = field(default_factory=dict)
    kill_at: float | None = None
    # How its last drain ended (hupt reload --wait-old reports it): when, how
    # (DRAIN_ENDS), and how many connections were still open then.
    drain_ended_at: float | None = None
    drain_end: str | None = None
    drain_end_open: int | None = None
    killed: bool = False  # SIGKILLed: --kill-timeout expired, or hupt stop --now
    exited_at: float | None = None
    exit_status: int | None = None  # of the root process, as os.waitstatus_to_exitcode
    # Whether hupt asked it to go (drained/stopped) rather than it dying on its own.
    retired_by_hupt: bool = False
    # Exec mode: the generation whose image replaced this one's in the root process.
    replaced_by: int | None = None
    # Exec mode: the root's other processes when it exec'd the next image, which
    # does not know them (they are reaped through the root once they exit).
    left_behind: set[int] = field(default_factory=set)
    # Processes made to stop accepting (DRAINING); members found later are added.
    paused: set[int] = field(default_factory=set)
    # Those of them paused to serve again (exec mode: the root, which execs).
    lives_on: set[int] = field(default_factory=set)
    # What hupt watches it by: the notify fd (bind/listen to answer) and, for an
    # attached root that is not hupt's child, a pidfd.  An exec in place hands
    # both to the next image's record.
    notify_fd: int | None = None
    exit_fd: int | None = None
    # The environment it was started or exec'd with, and with --ready notify
    # the NOTIFY_SOCKET hupt gave it and whether READY=1 came from it.
    env: dict[str, str] | None = None
    ready_socket: Listener | None = None
    sent_ready: bool = False
    # The command it runs (hupt reload -- ARGV changes it for later generations):
    # argv, the file exec'd when argv[0] does not name it, where it started.
    argv: list[str] = field(default_factory=list)
    program: str | None = None
    cwd: str | None = None

    def to(self, state: State) -> None:
        if state is self.state:
            return
        if state not in _ALLOWED[self.state]:
            raise RuntimeError(f"generation {self.number}: {self.state.value} -> {state.value}")
        self.state = state

    @property
    def alive(self) -> bool:
        return self.state is not State.EXITED

    def drain_over(self, now: float, how: str, still_open: int | None) -> None:
        """Its drain ends now, ``how`` (one of DRAIN_ENDS); the first word counts."""
        if self.drain_started_at is not None and self.drain_ended_at is None:
            self.drain_ended_at, self.drain_end, self.drain_end_open = now, how, still_open

    def exited(self, now: float) -> None:
        """Its last process is gone (or its root runs a newer image)."""
        self.to(State.EXITED)
        self.exited_at = now
        if self.drain_started_at is not None:
            self.drain_over(now, "exited", len(self.connections_seen))

    def __str__(self) -> str:
        return f"generation {self.number} (pid {self.pid})"


# How a drain ends: nothing left in flight, --drain-timeout, SIGUSR2 or `hupt
# stop --now`, or the generation exited by itself (--drain-signal, a crash, an
# exit that became an exec) before hupt saw it drained.
DRAIN_ENDS = {"drained": "no connections in flight",
              "timeout": "the drain timeout",
              "request": "a request to end every drain (SIGUSR2, hupt stop --now)",
              "exited": "its own exit"}


def describe(code: int | None) -> str:
    """An exit status (as the reaper reports it: -N for signal N) as a person reads it."""
    if code is None:
        return "status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
