"""The fleet: every generation hupt knows, and what happens to them.

A generation is started (``spawn``), taken over (``adopt``), or is a new
image exec'd into an older generation's root (``exec_in_place``).  Each has
one record (``hupt.generations.Generation``): its processes, addresses,
state, and what hupt watches it by, which an exec in place hands on to the
next image's record.

Which processes belong to a generation is found by a membership scan of
/proc, followed by a reap of hupt's exited children.  A scan is a query: it
records facts (pids, exit statuses, a generation EXITED) and collects what
happened as events, which are handed on (``on_events``) only once the scan
is over and the handler or tick that asked has returned.  So code that asks
"who is in this generation now?" never finds, half-way through, that the
answer failed an upgrade, stopped hupt or closed the fd it was reading.

Membership is a /proc scan (~14 us per process on the host).  SIGCHLD, the
attached roots' pidfds and the reaper report exits as they happen, so in
steady state the scan only catches processes a generation forked; while
anything is in motion (a reload, a drain, a stop, a revive) it runs each
second and at the start of a reload, so the processes paused are the
current ones.

How they stop (pause, drain, retire) is hupt/draining.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hupt import log
from hupt.address import Address
from hupt.errors import HuptError
from hupt.generations import Generation, State
from hupt.launch import (
    Launch,
    Started,
    generation_env,
    launch_of,
    spawn_process,
    start_generation,
    unlink_files,
)
from hupt.loop import Loop
from hupt.system import Followed, FollowResult, System

if TYPE_CHECKING:
    from hupt.command import Change
    from hupt.options import Options
    from hupt.output import Output
    from hupt.sdnotify import Listener

MEMBERS_POLL = 1.0
# A generation started outside a reload (the first, a revived one) has bound its
# datagram sockets after this long: later binds of new addresses are a client's.
DATAGRAM_STARTUP = 10.0
MEMBERS_IDLE_POLL = 10.0
KEEP_EXITED = 10
# A scan that keeps reaping (children dying as fast as it looks) gives up
# after this many rounds and looks again a moment later.
SCAN_ROUNDS = 4
SCAN_RETRY = 0.1
# A drain still going after this long says what holds it, once.


@dataclass
class PendingExec:
    """The image an exec in place is about to start: its number and environment."""

    number: int
    path: str
    env: dict[str, str]
    ready: Listener | None  # --ready notify: the NOTIFY_SOCKET it will be given
    launch: Launch  # what it runs


@dataclass(frozen=True)
class Exited:
    """The generation's last process is gone (``prev``: its state until then)."""

    gen: Generation
    prev: State


@dataclass(frozen=True)
class CopyExited:
    """One of a --multi generation's copies (hupt's child) exited."""

    gen: Generation
    pid: int
    status: int


@dataclass(frozen=True)
class ChildExited:
    """A child of hupt's exited (a hook, say): every reaped pid is reported."""

    pid: int
    status: int


@dataclass(frozen=True)
class Drained:
    """A draining generation has nothing left in flight, or its drain timed out."""

    gen: Generation
    why: str
    timed_out: bool


@dataclass(frozen=True)
class DrainSlow:
    """A drain has lasted long (hupt/draining.py): ``message`` says what holds it."""

    gen: Generation
    message: str


Event = Exited | CopyExited | ChildExited | Drained | DrainSlow


class Fleet:
    def __init__(self, system: System, options: Options, loop: Loop, *,
                 on_notify: Callable[[Generation], None],
                 on_sent_ready: Callable[[Generation], None],
                 on_events: Callable[[list[Event]], None],
                 in_motion: Callable[[], bool], output: Output | None = None) -> None:
        self.sys = system
        self.opts = options
        self.loop = loop
        # The generations' stdout and stderr, when they go through hupt (hupt/output.py).
        self.output = output
        self._on_notify = on_notify
        self._on_sent_ready = on_sent_ready
        self._on_events = on_events
        self._in_motion = in_motion
        self.gens: list[Generation] = []
        self.current: Generation | None = None
        # Addresses the last serving generation listened on: what a revived one must take.
        self.last_serving: set[Address] = set()
        # A scan is due at _next_scan (0: at once, after SIGCHLD or an exit) or
        # one poll interval after the last one, whichever comes first.
        self._next_scan = 0.0
        self._last_scan = -math.inf
        self.detached = False  # hupt attach let go: nothing is ours to watch
        # Whether the command has served under hupt.  Not yet after hupt attach:
        # the recorded command line may be a title or lack the server's options,
        # and a command that failed without ever serving is not started again
        # on hupt's own initiative (only when an operator reloads).
        self.command_served = True

    # -- lookups --------------------------------------------------------------
    def next_number(self) -> int:
        return self.gens[-1].number + 1 if self.gens else 1

    def alive(self) -> list[Generation]:
        return [g for g in self.gens if g.alive]

    def was_execed(self, gen: Generation) -> bool:
        """Whether ``gen`` is an image exec'd into an older generation's root."""
        return any(g.replaced_by == gen.number for g in self.gens)

    def served_pids(self) -> list[int]:
        return sorted(p for g in self.gens if g.alive for p in g.pids)

    def served_addresses(self) -> set[Address]:
        return {a for g in self.gens if g.alive for a in g.listened}

    def still_running(self, pids: Iterable[int]) -> set[int]:
        return self.sys.alive(pids)

    def program(self, launch: Launch | None = None) -> str:
        """The file an exec runs now (raises HuptError if there is none)."""
        la = launch or self.launch()
        return self.sys.find_program(la.argv, la.env, la.cwd, la.program)

    # -- the command --------------------------------------------------------------
    def launch(self, change: Change | None = None) -> Launch:
        """What a generation started now runs: the command, ``change`` applied, the
        env file read again (raises HuptError in one line if it cannot be used)."""
        return launch_of(self.opts, change)

    def commit(self, change: Change) -> None:
        """A reload with ``change`` succeeded: it is the command from now on."""
        o = self.opts
        if change.argv is not None:
            o.argv, o.program = list(change.argv), None
        o.env_changes = change.changes(o.env_changes)
        log.info(f"the command is now: {' '.join(o.argv)}"
                 + (f" ({change.describe(argv=False)})" if change.env or change.unset else ""))

    # -- new generations --------------------------------------------------------
    def spawn(self, copies: int = 1, launch: Launch | None = None) -> Generation:
        """Start the command as a new generation (raises HuptError if it cannot start)."""
        started = start_generation(self.sys, self.opts, self.next_number(),
                                   launch or self.launch(), self.output)
        return self.record(started, copies)

    def record(self, started: Started, copies: int = 1) -> Generation:
        """A generation just spawned (by ``spawn``, or by hupt run before the
        supervisor existed) is watched, and its other copies are started."""
        pid, la = started.pid, started.launch
        number, fd = started.number, started.fd
        gen = Generation(number, pid, self.sys.now(), pids={pid}, copies=[pid],
                         env=started.env, ready_socket=started.ready, argv=list(la.argv),
                         program=la.program, cwd=la.cwd)
        self.gens.append(gen)
        self._watch(gen, fd, None)
        log.debug(f"spawned {gen}")
        self.start_copies(gen, copies - 1)
        return gen

    def start_copies(self, gen: Generation, n: int) -> None:
        """Start ``n`` more copies of ``gen``: their binds get its held sockets."""
        for _ in range(n):
            try:
                # The generation's own command (the current one may have changed since).
                pid, _fd = self._start_copy(gen.number, gen.env or {}, gen.argv, gen.program,
                                            gen.cwd)  # same notify group
            except HuptError as e:
                log.error(f"{gen}: starting a copy: {e}")
                return
            gen.copies.append(pid)
            gen.pids.add(pid)
            log.debug(f"{gen}: copy {len(gen.copies)} is pid {pid}")

    def adopt(self, pid: int) -> tuple[Generation, list[str]]:
        """Take over running server ``pid`` as the serving generation (hupt attach)."""
        number = self.next_number()
        got = self.sys.attach(number, pid)
        self.command_served = False
        now = self.sys.now()
        gen = Generation(number, pid, now, pids={pid}, listened=set(got.listened),
                         env=dict(self.opts.env), argv=list(self.opts.argv))
        gen.to(State.SERVING)
        gen.ready_at = now
        self.gens.append(gen)
        self._watch(gen, got.notify_fd, got.exit_fd)
        self.current = gen
        # It listened before hupt came: what a generation started while none
        # serves must take (else that one counts as ready at once, the held
        # sockets are released, and the clients queued on them reset).
        self.last_serving = set(gen.listened)
        return gen, got.problems

    def exec_in_place(self, old: Generation, path: str, launch: Launch) -> Generation:
        """Make ``old``'s root execve ``path`` with ``launch``'s argv and environment (in
        its --chdir); the new image is a new generation with the same root pid, which
        takes over ``old``'s watch (raises HuptError)."""
        return self._image(old, self._next_image(path, launch, functools.partial(
            self.sys.exec_in_place, old.number, pid=old.pid, path=path, argv=launch.argv,
            cwd=launch.chdir)))

    def follow_exit(self, old: Generation, path: str, launch: Launch) -> PendingExec:
        """Exec mode with --drain-signal: ``old``'s root is followed until its exit,
        which becomes the exec of ``path`` with ``launch`` (raises HuptError if it
        cannot be)."""
        return self._next_image(path, launch, functools.partial(
            self.sys.follow_exit, old.number, pid=old.pid, path=path, argv=launch.argv,
            cwd=launch.chdir))

    def _next_image(self, path: str, launch: Launch,
                    start: Callable[..., None]) -> PendingExec:
        """The next number and environment for an image exec'd into a root, given to
        ``start(new_number=, env=)`` (its NOTIFY_SOCKET closed again if that raises)."""
        number = self.next_number()
        unlink_files(self.opts)
        env, ready = generation_env(self.opts, number, launch.env)
        try:
            start(new_number=number, env=env)
        except HuptError:
            if ready is not None:
                ready.close()
            raise
        return PendingExec(number, path, env, ready, launch)

    def exit_followed(self, old: Generation, pending: PendingExec,
                      *, let_go: bool = False) -> FollowResult | None:
        """What ``old``'s followed root did (``let_go``: stop following it now)."""
        got = (self.sys.unfollow if let_go else self.sys.exit_followed)(old.number)
        if got is not None and got.outcome is not Followed.EXECED and pending.ready is not None:
            pending.ready.close()
            pending.ready = None
        return got

    def execed(self, old: Generation, pending: PendingExec) -> Generation:
        """``old``'s root exited into the exec: the new image is a generation."""
        return self._image(old, pending)

    def _image(self, old: Generation, pending: PendingExec) -> Generation:
        number, env, ready = pending.number, pending.env, pending.ready
        la = pending.launch
        gen = Generation(number, old.pid, self.sys.now(), pids={old.pid}, env=env,
                         ready_socket=ready, argv=list(la.argv), program=la.program,
                         cwd=la.cwd)
        self.gens.append(gen)
        self._watch(gen, old.notify_fd, old.exit_fd)
        old.notify_fd = old.exit_fd = None
        if self.output is not None:  # the root's stdout and stderr: the new image's now
            self.output.relabel(old.number, number)
        self._drop_ready_socket(old)
        old.env = None
        old.replaced_by = number
        old.pids.discard(old.pid)
        old.left_behind = set(old.pids)
        return gen

    def _start_copy(self, number: int, env: dict[str, str], argv: list[str],
                    program: str | None, cwd: str | None) -> tuple[int, int]:
        if program is not None:  # argv[0] does not name it (attach)
            argv = [program, *argv[1:]]
        return spawn_process(self.sys, number, argv, env, cwd, self.output)

    def stderr_tail(self, gen: Generation) -> list[str] | None:
        """The last lines ``gen`` wrote to stderr (None: they do not go through hupt)."""
        return self.output.tail(gen.number) if self.output is not None else None

    # -- watching -------------------------------------------------------------------
    def _watch(self, gen: Generation, notify_fd: int | None, exit_fd: int | None) -> None:
        gen.notify_fd, gen.exit_fd = notify_fd, exit_fd
        for fd, handler in ((notify_fd, self._notify), (exit_fd, self._on_exit)):
            if fd is not None:
                self.loop.remove(fd)  # an exec in place: the same fd, a new record
                self.loop.add(fd, functools.partial(handler, gen))
        if gen.ready_socket is not None:
            self.loop.add(gen.ready_socket.fileno(), functools.partial(self._ready, gen))

    def _notify(self, gen: Generation, mask: int) -> None:
        self._on_notify(gen)

    def _on_exit(self, gen: Generation, mask: int) -> None:
        """An attached root's pidfd became readable: it exited (it stays readable)."""
        if gen.exit_fd is not None:
            # Not watched any more (it stays readable); the system closes it
            # when the generation is forgotten.
            self.loop.remove(gen.exit_fd)
        self.rescan_soon()

    def _ready(self, gen: Generation, mask: int) -> None:
        listener = gen.ready_socket
        if listener is None:
            return
        self.refresh()  # its processes now: a worker forked since may be the one that says it
        if listener.ready_from(gen.pids | {gen.pid}):
            gen.sent_ready = True
            log.debug(f"{gen} sent READY=1")
            self._on_sent_ready(gen)

    def service(self, gen: Generation) -> tuple[list[Address], list[Address], bool]:
        """Answer ``gen``'s filtered calls: (addresses it listened on, those new to it,
        whether no process uses its filter any more)."""
        got = self.sys.service(gen.number)
        new: list[Address] = []
        for addr in got.listened:
            gen.listens[addr] += 1
            if addr not in gen.listened:
                gen.listened.add(addr)
                new.append(addr)
                log.debug(f"{gen} listens on {addr}")
        return got.listened, new, got.hung_up

    def unwatch(self, gen: Generation) -> None:
        watched = False
        for fd in (gen.notify_fd, gen.exit_fd):
            if fd is not None:
                self.loop.remove(fd)
                watched = True
        gen.notify_fd = gen.exit_fd = None
        if watched:
            self.sys.forget(gen.number)
        self._drop_ready_socket(gen)

    def _drop_ready_socket(self, gen: Generation) -> None:
        listener, gen.ready_socket = gen.ready_socket, None
        if listener is not None:
            self.loop.remove(listener.fileno())
            listener.close()

    def bury(self, gen: Generation) -> None:
        """``gen`` has exited: drop what was kept for it, and keep the last few only."""
        self.unwatch(gen)
        gen.env = None
        # The reload history names them, an exec'd image's predecessor is looked
        # up; but a server reloaded every minute for a year would keep 500,000.
        exited = [g for g in self.gens if g.state is State.EXITED]
        drop = {id(g) for g in exited[:-KEEP_EXITED]}
        if drop:
            self.gens = [g for g in self.gens if id(g) not in drop]

    def close(self) -> None:
        for g in self.gens:
            self._drop_ready_socket(g)
        self.sys.close_tracking()

    # -- the held sockets ------------------------------------------------------------------
    def release_unused(self) -> None:
        """Close the held sockets no live generation listens on."""
        for a in self.sys.release_except(self.served_addresses()):
            log.info(f"released {a}: no generation listens on it")

    def refuse_new(self) -> None:
        self.sys.refuse_new()

    def listener_holders(self) -> dict[int, list[Address]]:
        return self.sys.listener_holders()

    def close_listeners(self) -> None:
        self.sys.close_listeners()

    # -- membership --------------------------------------------------------------------------
    def rescan_soon(self) -> None:
        """Something exited (SIGCHLD, a pidfd, a hung-up filter): scan at the next tick."""
        self._next_scan = 0.0

    def _scan_due(self) -> float:
        interval = MEMBERS_POLL if self._in_motion() else MEMBERS_IDLE_POLL
        return min(self._next_scan, self._last_scan + interval)

    def refresh(self) -> None:
        """Scan: every live generation's processes now.  What it finds is routed
        once the caller has returned (``Loop.later``), never from inside."""
        now = self.sys.now()
        self._last_scan, self._next_scan = now, math.inf
        events: list[Event] = []
        # Zombies count as members until reaped (a multi-threaded process shows
        # a zombie leader while its other threads still run): reap after each
        # scan, and scan again while that reaped something.
        for _ in range(SCAN_ROUNDS):
            live = self.alive()
            members = self.sys.members({g.number: g.pid for g in live if g.replaced_by is None})
            reaped = self.sys.reap()
            for pid, status in reaped:
                self._reaped(pid, status, members, events)
            if not reaped:
                break
        else:
            self._next_scan = now + SCAN_RETRY
        # An exec-mode generation whose root runs a newer image keeps only its
        # other processes; they are still in the tree below that root.
        leftovers: set[int] = set()
        for g in live:
            if g.replaced_by is not None:
                g.pids = self.sys.alive(g.pids)
                leftovers |= g.pids
        for g in live:
            if g.replaced_by is None:
                g.pids = members.get(g.number, set()) - leftovers
            if not g.pids:
                prev = g.state
                g.exited(now)
                g.kill_at = g.drain_deadline = None
                events.append(Exited(g, prev))
            elif g.state is State.SERVING and now - g.started_at >= DATAGRAM_STARTUP:
                self.end_startup(g)
        if not self._in_motion():
            self.prune_datagrams()
        self.emit(events)

    def end_startup(self, gen: Generation) -> None:
        if not gen.startup_over:
            gen.startup_over = True
            self.sys.end_startup(gen.number)

    def prune_datagrams(self) -> list[Address]:
        """Release the held datagram sockets no live process has open any more (a
        query port held at start-up and closed since): the next generation is not
        to wait for their bind."""
        live = [g for g in self.gens if g.alive]
        gone = self.sys.release_abandoned({p for g in live for p in g.pids})
        if gone:
            for g in live:
                g.listened.difference_update(gone)
            self.last_serving.difference_update(gone)
            log.debug(f"released {', '.join(map(str, gone))}: no process has them open any more")
        return gone

    def _reaped(self, pid: int, status: int, members: dict[int, set[int]],
                events: list[Event]) -> None:
        for g in self.gens:
            # The generation ends as its last process does: its root, or a
            # daemon of a root that exited 0 as it daemonized (hupt, a
            # subreaper, reaps both).
            if ((g.pid == pid and g.replaced_by is None)
                    or pid in g.pids or pid in members.get(g.number, ())):
                g.exit_status = status
            if (self.opts.exec_mode and g.pid == pid and g.replaced_by is None and status == 0
                    and not g.retired_by_hupt and g.state in (State.STARTING, State.SERVING)
                    and (left := members.get(g.number, set()) - {pid})):
                # Said now, not only when the first reload fails: the operator who
                # just started it is the one who can change the server's config.
                log.warn(f"{g}: its process {pid} exited 0 and left {len(left)} other "
                         f"process(es) running (did the server daemonize?): exec mode "
                         "reloads the process hupt started in place, so reloads will "
                         "fail; run the server in the foreground or drop --exec")
            if pid in g.copies and g.alive:
                events.append(CopyExited(g, pid, status))
        events.append(ChildExited(pid, status))

    def emit(self, events: list[Event]) -> None:
        if events:
            self.loop.later(functools.partial(self._on_events, events))

    # -- timers --------------------------------------------------------------------------------
    def deadline(self) -> float:
        return math.inf if self.detached else self._scan_due()

    def tick(self, now: float) -> None:
        if not self.detached and now >= self._scan_due():
            self.refresh()
