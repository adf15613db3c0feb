"""The supervisor: one single-threaded event loop that owns every generation.

Everything arrives as an event on one selector: a generation's notify fd
(bind/listen/unlink to answer), the signal wakeup fd (SIGHUP = reload,
SIGTERM/SIGINT = stop, SIGCHLD = something exited), the control socket and
its clients.  Timers (ready timeouts, drain polls, kill grace) are deadlines
checked after each wake-up.  There are no threads, so fork() in spawn is safe
and no state needs a lock.

The upgrade state machine follows one invariant: at most one generation is
STARTING.  A reload request while one is starting waits for the same outcome;
a reload while older generations still drain is fine (they drain on).

    request ─► spawn N+1 (STARTING) ─► listened on all of N's addresses
                 │                          │
                 │ exit / timeout           ▼
                 ▼                    N+1 SERVING, N paused + DRAINING
            N+1 FAILED, N serves on   (retired at 0 in flight or timeout)

In exec mode (``hupt run --exec``, ``hupt attach``) the server keeps its PID,
so the two generations cannot overlap; a reload is one upgrade in phases:

    request ─► N paused + DRAINING ─► 0 in flight / drain timeout ─► exec N's root
                                                                     │
          exec failed: N resumed, SERVING again ◄────────────────────┤
                                                                     ▼
                        N+1 (same pid) STARTING ─► listened on all ─► SERVING
                                                 │
                       exit / timeout: the command started afresh (fork-mode
                       spawn, the sockets still held) and the reload fails

While N drains the upgrade has no starting generation yet; a reload request
then joins it as usual.  N's other processes (the workers of a pre-fork
server) are drained with it and retired once its root has execed.

An upgrade goes through phases: "before" (a --before-reload command runs;
its failure aborts), "listening" (the new generation must listen on every
held address, with --multi N every copy), "confirming" (the --ready policy:
a delay, an sd_notify READY=1, or HTTP probes while the old generation is
paused; a probe that never succeeds rolls the old generation back in, its
listeners and epoll registrations restored).  Then the new generation serves,
the old one drains, and an --after-reload command may run before the
waiters hear the outcome.  --revive starts a generation through the same
path when the serving one died, with the addresses it held as the target.
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from hupt import log
from hupt.address import Address
from hupt.control import ControlServer, Message, Peer, runtime_dir
from hupt.errors import HuptError
from hupt.generations import Generation, State
from hupt.hooks import Hook
from hupt.readiness import HttpProbe, Policy, probe_target
from hupt.sdnotify import Listener, Notifier
from hupt.system import System
from hupt.watch import Watcher

DRAIN_POLL = 0.1
# Membership is a /proc scan (~14 us per process on the host). SIGCHLD, the
# attached roots' pidfds and the reaper report exits as they happen, so in
# steady state the scan only catches processes a generation forked; while
# anything is in motion (a reload, a drain, a stop, a revive) it runs each second
# and at the start of a reload, so the processes paused are the current ones.
MEMBERS_POLL = 1.0
MEMBERS_IDLE_POLL = 10.0
PROBE_INTERVAL = 0.2
HISTORY = 20
REVIVE_MAX_BACKOFF = 30.0
COPIES_SETTLE = 0.3
KEEP_EXITED = 10


def servers_env() -> dict[str, str]:
    """hupt's environment minus what is hupt's alone: the service manager's
    NOTIFY_SOCKET (hupt answers to systemd; a generation that wrote to it would
    report READY for hupt)."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return env


@dataclass
class Options:
    argv: list[str]
    # The servers' starting environment (hupt attach: the attached server's own).
    env: dict[str, str] = field(default_factory=servers_env)
    ready_timeout: float = 30.0
    drain_timeout: float = 60.0
    kill_timeout: float = 10.0
    stop_signal: int = signal.SIGTERM
    # Exec mode: a reload makes the server execve its program again in place.
    exec_mode: bool = False
    cwd: str | None = None  # where the command starts and is looked up (None: hupt's)
    program: str | None = None  # the file to execve (None: argv[0], looked up on PATH)
    ready: Policy = field(default_factory=lambda: Policy("listen"))
    revive: bool = False
    pidfile: str | None = None
    unlink: list[str] = field(default_factory=list)
    watch: list[str] = field(default_factory=list)
    before_reload: str | None = None
    after_reload: str | None = None
    close_idle_ms: int | None = None
    # --multi: copies of each generation sharing the held sockets (one accept queue).
    multi: int = 1
    # hupt attach: TERM/INT detach hupt (the server it did not start runs on)
    # instead of stopping the server; confirm_detach asks on the terminal first.
    detach_on_stop: bool = False
    confirm_detach: bool = False


class Waiter:
    """Someone waiting for a reload's outcome (a control client, or hupt's own log)."""

    def progress(self, message: str) -> None:
        pass

    def done(self, ok: bool, reason: str) -> None:
        pass


class PeerWaiter(Waiter):
    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def progress(self, message: str) -> None:
        self.peer.send({"event": "progress", "message": message})

    def done(self, ok: bool, reason: str) -> None:
        self.peer.send({"event": "result", "ok": ok, "reason": reason})
        self.peer.finish()


@dataclass
class Upgrade:
    """The one reload in progress: before-hook -> listening -> confirming (policy) -> done.

    Exec mode: ``replacing`` drains and execs first; ``gen`` is its new image.
    """

    started_at: float
    deadline: float
    waiters: list[Waiter]
    target: set[Address] = field(default_factory=set)
    gen: Generation | None = None
    phase: str = "before"
    hook: Hook | None = None
    confirm_at: float | None = None  # --ready delay
    probe: HttpProbe | None = None  # --ready http
    next_probe: float = 0.0
    last_probe: str = ""
    paused_old: Generation | None = None  # old generation paused while probing
    revive: bool = False
    replacing: Generation | None = None  # exec mode: the generation whose root will exec
    fresh: bool = False  # exec mode: the command started afresh after the exec'd image failed

    def tell(self, message: str) -> None:
        for w in self.waiters:
            w.progress(message)


@dataclass
class Announcing:
    """Generation 1 serves from its first listen(), but the service manager
    hears READY=1 only once the --ready policy is met: readiness, not liveness.
    Nothing is rolled back here (there is nothing to roll back to); a policy
    still unmet after the ready timeout is logged once and awaited on."""

    gen: Generation
    since: float
    at: float | None = None  # --ready delay: when it is met
    probe: HttpProbe | None = None  # --ready http: the probe in flight
    next_probe: float | None = None
    last_probe: str = ""
    warned: bool = False


@dataclass
class ReloadRecord:
    at: float
    duration_ms: float
    ok: bool
    reason: str
    generation: int | None


class Supervisor:
    def __init__(self, system: System, options: Options, *, control: bool = True,
                 notifier: Notifier | None = None) -> None:
        self.sys = system
        self.opts = options
        self.gens: list[Generation] = []
        self.current: Generation | None = None
        self.upgrade: Upgrade | None = None
        self.stopping = False
        self.exit_code: int | None = None
        self.history: list[ReloadRecord] = []
        self.started_at = time.time()
        self._sel = selectors.DefaultSelector()
        self._fds: dict[int, int] = {}  # generation -> watched fd
        self._exit_fds: dict[int, int] = {}  # attached generation -> pidfd of its root
        self._aliases: set[int] = set()  # attached server pids the control socket answers for
        self._signals: list[int] = []
        self._control_enabled = control
        self._control: ControlServer | None = None
        self._peers: dict[int, Peer] = {}
        # A scan is due at _next_members (0: at once, after SIGCHLD or a reap) or
        # one poll interval after the last one, whichever comes first.
        self._next_members = 0.0
        self._last_scan = -math.inf
        self._interrupts = 0
        self._stop_waiters: list[Waiter] = []
        self._notifier = notifier or Notifier({})
        self._announced_ready = False
        self._announcing: Announcing | None = None
        self._ready_notices: dict[int, Listener] = {}  # generation -> its NOTIFY_SOCKET
        self._notified_ready: set[int] = set()
        self._hooks: list[Hook] = []
        # --after-reload hook pid -> the reload's waiters and its success message:
        # they are answered once the hook is done (its failure is reported, not fatal).
        self._after: dict[int, tuple[list[Waiter], str]] = {}
        self._watcher = Watcher(options.watch, system.now()) if options.watch else None
        # Addresses the last serving generation listened on: what a revived one must take.
        self._serving: set[Address] = set()
        self._revive_at: float | None = None
        self._copies_at: float | None = None
        self._gen_env: dict[int, dict[str, str]] = {}
        self._revive_backoff = 0.5
        self._last_copy_exit = -math.inf
        self._asking: int | None = None  # the terminal fd a detach question waits on
        self._detach_wanted = False  # asked during a reload: detach when it has ended
        self.detached = False

    # -- public entry points ---------------------------------------------
    def start(self) -> None:
        """Start generation 1 (raises HuptError if it cannot start)."""
        if self.opts.pidfile:
            with open(self.opts.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        gen = self._spawn()
        gen.to(State.SERVING)
        gen.ready_at = self.sys.now()
        self.current = gen

    def adopt(self, pid: int) -> Generation:
        """Take over running server ``pid`` as the serving generation (hupt attach)."""
        number = self._next_number()
        got = self.sys.attach(number, pid)
        now = self.sys.now()
        gen = Generation(number, pid, now, pids={pid}, listened=set(got.listened))
        gen.to(State.SERVING)
        gen.ready_at = now
        self.gens.append(gen)
        self._fds[number] = got.notify_fd
        self._sel.register(got.notify_fd, selectors.EVENT_READ, ("notify", gen))
        self._exit_fds[number] = got.exit_fd
        self._sel.register(got.exit_fd, selectors.EVENT_READ, ("exit", gen))
        self._aliases.add(pid)
        self.current = gen
        for p in got.problems:
            log.warn(f"{gen}: left unfiltered: {p}")
        log.ok(f"attached to pid {pid} as {gen}, holding {_fmt(gen.listened)}")
        return gen

    def request_reload(self, waiter: Waiter | None = None, *, revive: bool = False) -> None:
        w = waiter or Waiter()
        if self.upgrade is None:
            # The generation to pause later: its processes as they are now (in
            # steady state the last scan may be seconds old).  This may find it
            # gone, and hupt stopping: hence first.
            self._refresh_members()
        if self.stopping:
            w.done(False, "hupt is stopping")
            return
        if self.upgrade is not None:
            what = self.upgrade.gen or self.upgrade.replacing or "a reload"
            w.progress(f"joining the reload already in progress ({what})")
            self.upgrade.waiters.append(w)
            return
        now = self.sys.now()
        up = self.upgrade = Upgrade(now, now + self.opts.ready_timeout, [w], revive=revive)
        if not revive:  # bringing a crashed server back is no reload to the manager
            self._notifier.reloading("reloading")
        if self.opts.before_reload and not revive:
            hook = up.hook = self._run_hook("before-reload", self.opts.before_reload)
            up.tell(f"running --before-reload: {self.opts.before_reload}")
            log.info(f"running --before-reload (pid {hook.pid})")
            return
        self._launch()

    def request_stop(self, *, now: bool = False, waiter: Waiter | None = None) -> None:
        if waiter is not None:
            self._stop_waiters.append(waiter)
        if now:
            log.warn("stopping now: killing every generation")
            for g in self.gens:
                if g.alive:
                    g.retired_by_hupt = True
                    self.sys.signal(g.pids, signal.SIGKILL)
            self.stopping = True
            return
        if self.stopping:
            return
        self.stopping = True
        self._notifier.stopping("stopping: draining")
        log.info("stopping: no more accepts, draining in-flight connections")
        if self.upgrade is not None:
            self._fail_upgrade("hupt is stopping")
        self._revive_at = None
        self._drop_announcing()  # no READY=1 after STOPPING=1
        for g in self.gens:
            if g.state is State.SERVING:
                self._drain(g)
        # Nobody accepts any more: new clients are refused, not queued until hupt exits.
        self.sys.listeners.refuse_new()

    # -- the loop --------------------------------------------------------
    def run(self) -> int:
        """Run until every generation has exited; return hupt's exit status."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR2)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        # hupt attach blocks them while it takes the server over (a default
        # SIGTERM then would leave the server with a filter nobody answers);
        # those that came meanwhile are delivered now, to the handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        self._sel.register(rfd, selectors.EVENT_READ, ("signal", rfd))
        try:
            if self._control_enabled:
                self._control = ControlServer()
                self._sel.register(self._control.fileno(), selectors.EVENT_READ, ("control", None))
                for pid in self._aliases:
                    self._control.alias(pid)
            if self.current is None:
                self.start()
            while True:
                self._step(rfd)
                if self.detached or (all(not g.alive for g in self.gens)
                                     and self._revive_at is None):
                    break
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(rfd)
            os.close(wfd)
            code = self.exit_code if self.exit_code is not None else 0
            for w in self._stop_waiters:  # before their connections are closed below
                w.done(True, f"stopped (exit status {code})")
            if self._control is not None:
                self._control.close()
            for p in list(self._peers.values()):  # closing unregisters them
                p.close()
            for listener in self._ready_notices.values():
                listener.close()
            for hook in self._hooks:
                hook.kill()
                hook.close()
            self.sys.listeners.close_all()
            if self.opts.pidfile:
                with contextlib.suppress(OSError):
                    os.unlink(self.opts.pidfile)
        return self.exit_code if self.exit_code is not None else 0

    def _step(self, rfd: int) -> None:
        for key, mask in self._sel.select(self._timeout()):
            kind, arg = key.data
            try:
                self._dispatch(kind, arg, mask, rfd)
            except Exception:
                self._internal_error(f"handling {kind}")
        try:
            self._handle_signals()
            self.tick()
        except Exception:
            self._internal_error("on a timer or signal")

    def _internal_error(self, where: str) -> None:
        """A bug in hupt must not take the supervisor down: its death would leave
        every server process with a filter nobody answers (bind/listen -> ENOSYS)."""
        log.error(f"internal error {where} (a bug in hupt; please report it):\n"
                  + traceback.format_exc().rstrip())

    def _dispatch(self, kind: str, arg: Any, mask: int, rfd: int) -> None:
        if kind == "signal":
            _drain_pipe(rfd)
        elif kind == "notify":
            self.on_notify(arg)
        elif kind == "exit":
            self._on_exit(arg)
        elif kind == "control":
            self._on_control()
        elif kind == "peer":
            self._on_peer(arg, mask)
        elif kind == "hook":
            self._on_hook_output(arg)
        elif kind == "sdnotify":
            self._on_ready_notice(arg)
        elif kind == "probe":
            self._on_probe(arg)
        elif kind == "answer":
            self._on_answer(arg)

    def _timeout(self) -> float:
        now = self.sys.now()
        deadlines = [self._members_due()]
        up = self.upgrade
        if up is not None:
            if up.phase != "before":  # a --before-reload hook has no deadline (tick)
                deadlines.append(up.deadline)
            if up.confirm_at is not None:
                deadlines.append(up.confirm_at)
            if up.phase == "confirming" and up.probe is None and self.opts.ready.kind == "http":
                deadlines.append(up.next_probe)
        for g in self.gens:
            if g.state is State.DRAINING:
                deadlines.append(now + DRAIN_POLL)
            if g.kill_at is not None and g.state is State.RETIRING:
                deadlines.append(g.kill_at)
        if self._watcher is not None:
            deadlines.append(self._watcher.deadline())
        if self._revive_at is not None:
            deadlines.append(self._revive_at)
        if self._copies_at is not None:
            deadlines.append(self._copies_at)
        a = self._announcing
        if a is not None and self.upgrade is None:  # _first_tick waits for the reload
            if not a.warned:
                deadlines.append(a.since + self.opts.ready_timeout)
            deadlines += [t for t in (a.at, a.next_probe) if t is not None]
        return max(0.0, min(deadlines) - now)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals and not self.detached:
            s = self._signals.pop(0)
            if s == signal.SIGHUP:
                log.info("SIGHUP: reloading")
                self.request_reload()
            elif s in (signal.SIGTERM, signal.SIGINT):
                if s == signal.SIGINT:
                    self._interrupts += 1
                if self.opts.detach_on_stop:
                    self._stop_attached()
                else:
                    self.request_stop(now=self._interrupts >= 2)
            elif s == signal.SIGUSR2:
                self._end_draining()
            elif s == signal.SIGCHLD:
                self._next_members = 0.0

    # -- detaching (hupt attach) ----------------------------------------------
    # A server hupt attached to was started by someone else: stopping hupt
    # attach leaves it running rather than taking it down (`hupt stop` does
    # that).  What it loses is irreversible -- the filter stays, and with
    # nobody reading its notify fd the kernel fails the filtered calls with
    # ENOSYS -- so a person at the terminal confirms first.
    def _stop_attached(self) -> None:
        if self._asking is not None or not self.opts.confirm_detach:
            self.request_detach()  # a second signal while asking: at once
            return
        fd = log.prompt_fd()
        if fd is None:  # no terminal to ask on (a background job, a closed tty)
            self.request_detach()
            return
        self._asking = fd
        self._sel.register(fd, selectors.EVENT_READ, ("answer", fd))
        pids = ", ".join(str(p) for p in self._served_pids()) or "the server"
        log.prompt(f"hupt attach was asked to stop. Detaching leaves pid {pids} running "
                   f"without hupt; from then on its {filtered_calls(self._serving_addresses())}"
                   f" calls fail (ENOSYS), as the filter cannot be removed. To stop the server "
                   f"instead: hupt stop {os.getpid()}.\nDetach? [y/N] ")

    def _on_answer(self, fd: int) -> None:
        try:
            answer = os.read(fd, 1024)
        except OSError:
            answer = b""
        self._drop_question()
        self._interrupts = 0
        if answer.strip().lower() in (b"y", b"yes"):
            self.request_detach()
        else:
            log.info("not detaching: still supervising")

    def _drop_question(self) -> None:
        if self._asking is not None:
            self._sel.unregister(self._asking)
            self._asking = None

    def request_detach(self) -> None:
        """Let the server run on without hupt (once a reload in progress has ended)."""
        self._drop_question()
        if self.upgrade is not None:
            if not self._detach_wanted:
                log.info("detaching once the reload in progress has ended")
            self._detach_wanted = True
            return
        self._detach()

    def _detach(self) -> None:
        self._detach_wanted = False
        pids = self._served_pids()
        calls = filtered_calls(self._serving_addresses())
        for g in self.gens:
            if g.alive:
                self._unwatch(g)
        self.detached = True
        self._notifier.stopping("detached")
        log.warn(f"detached: pid {', '.join(map(str, pids)) or '(none)'} runs on without hupt; "
                 f"its {calls} calls fail (ENOSYS) from now on")

    def _served_pids(self) -> list[int]:
        return sorted(p for g in self.gens if g.alive for p in g.pids)

    def _serving_addresses(self) -> set[Address]:
        return {a for g in self.gens if g.alive for a in g.listened}

    # -- generations -----------------------------------------------------
    def _next_number(self) -> int:
        return self.gens[-1].number + 1 if self.gens else 1

    def _forget(self, gen: Generation) -> None:
        """``gen`` has exited (or its root runs a newer image): drop what was kept for it."""
        self._gen_env.pop(gen.number, None)
        self._drop_ready_notice(gen.number)
        self._forget_exited()

    def _forget_exited(self) -> None:
        """Keep the last few exited generations (the reload history names them,
        an exec'd image's predecessor is looked up), not every one since start:
        a server reloaded every minute for a year would otherwise keep 500,000."""
        exited = [g for g in self.gens if g.state is State.EXITED]
        drop = {g.number for g in exited[:-KEEP_EXITED]}
        if drop:
            self.gens = [g for g in self.gens if g.number not in drop]
            self._notified_ready -= drop

    def _env(self, number: int) -> dict[str, str]:
        """Generation ``number``'s environment, spawned or exec'd: the servers'
        one, with --ready notify a NOTIFY_SOCKET of hupt's own."""
        env = dict(self.opts.env)
        if self.opts.ready.kind == "notify":
            listener = Listener(runtime_dir(), f"{os.getpid()}.{number}.notify")
            self._ready_notices[number] = listener
            self._sel.register(listener.fileno(), selectors.EVENT_READ, ("sdnotify", number))
            env["NOTIFY_SOCKET"] = listener.path
        return env

    def _unlink_files(self) -> None:
        """--unlink: what a generation must not find when it starts (a stale pidfile)."""
        for path in self.opts.unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _spawn(self, copies: int = 1) -> Generation:
        number = self._next_number()
        self._unlink_files()
        self._gen_env[number] = self._env(number)
        try:
            pid, fd = self._start_copy(number)
        except HuptError:
            self._drop_ready_notice(number)
            raise
        gen = Generation(number, pid, self.sys.now(), pids={pid}, copies=[pid])
        self.gens.append(gen)
        self._fds[number] = fd
        self._sel.register(fd, selectors.EVENT_READ, ("notify", gen))
        log.debug(f"spawned {gen}")
        self._more_copies(gen, copies - 1)
        return gen

    def _start_copy(self, number: int) -> tuple[int, int]:
        argv = self.opts.argv
        if self.opts.program is not None:  # argv[0] does not name it (attach)
            argv = [self.opts.program, *argv[1:]]
        return self.sys.spawn(number, argv, self._gen_env[number], self.opts.cwd)

    def _more_copies(self, gen: Generation, n: int) -> None:
        """Start ``n`` more copies of ``gen``: their binds get its held sockets."""
        for _ in range(n):
            try:
                pid, _fd = self._start_copy(gen.number)  # same notify group, same fd
            except HuptError as e:
                log.error(f"{gen}: starting a copy: {e}")
                return
            gen.copies.append(pid)
            gen.pids.add(pid)
            log.debug(f"{gen}: copy {len(gen.copies)} is pid {pid}")

    def _launch(self) -> None:
        """Start the new generation of the reload in progress."""
        up = self.upgrade
        assert up is not None
        if self.opts.exec_mode and self.current is not None:
            self._begin_exec(self.current)
            return
        try:
            gen = self._spawn(self.opts.multi)
        except HuptError as e:
            self._fail_upgrade(str(e))
            return
        now = self.sys.now()
        up.gen, up.phase = gen, "listening"
        up.deadline = now + self.opts.ready_timeout
        up.target = set(self.current.listened) if self.current is not None else set(self._serving)
        msg = f"started {gen}" + (f", waiting for it to listen on {_fmt(up.target)}"
                                  if up.target else "")
        log.info(msg)
        up.tell(msg)
        self._check_ready(gen)

    def on_notify(self, gen: Generation) -> None:
        got = self.sys.service(gen.number)
        up = self.upgrade
        for addr in got.listened:
            gen.listens[addr] += 1
            if addr not in gen.listened:
                gen.listened.add(addr)
                log.debug(f"{gen} listens on {addr}")
                if up is not None and up.gen is gen and addr in up.target:
                    taken = len(up.target & gen.listened)
                    up.tell(f"{gen} listens on {addr}, the held socket "
                            f"({taken}/{len(up.target)})")
        if got.listened and gen is self.current and len(gen.copies) < self.opts.multi:
            # The first generation's other copies start once the first one has
            # listened (and settled): their binds are then handoffs, not EADDRINUSE.
            self._copies_at = self.sys.now() + COPIES_SETTLE
        if got.listened:
            if gen is self.current:
                self._serving = set(gen.listened)  # what a revived one must take
                if not self._announced_ready and self._announcing is None:
                    self._announce_when_ready(gen)
            self._check_ready(gen)
        if got.hung_up:
            self._unwatch(gen)
            self._next_members = 0.0

    def _on_exit(self, gen: Generation) -> None:
        """An attached root's pidfd became readable: it exited (it stays readable)."""
        fd = self._exit_fds.pop(gen.number, None)
        if fd is not None:
            self._sel.unregister(fd)
        self._next_members = 0.0

    def _unwatch(self, gen: Generation) -> None:
        efd = self._exit_fds.pop(gen.number, None)
        if efd is not None:
            self._sel.unregister(efd)
        fd = self._fds.pop(gen.number, None)
        if fd is not None:
            self._sel.unregister(fd)
        if fd is not None or efd is not None:
            self.sys.forget(gen.number)
        self._drop_ready_notice(gen.number)

    def _drop_ready_notice(self, number: int) -> None:
        listener = self._ready_notices.pop(number, None)
        if listener is not None:
            self._sel.unregister(listener.fileno())
            listener.close()

    def _move_watch(self, old: Generation, new: Generation) -> None:
        """``new`` took over ``old``'s root process: its notify fd and pidfd follow."""
        for table, kind in ((self._fds, "notify"), (self._exit_fds, "exit")):
            fd = table.pop(old.number, None)
            if fd is not None:
                table[new.number] = fd
                self._sel.modify(fd, selectors.EVENT_READ, (kind, new))

    def _check_ready(self, gen: Generation) -> None:
        """Has the starting generation listened on everything?  Then apply --ready."""
        up = self.upgrade
        if up is None or up.gen is not gen or gen.state is not State.STARTING:
            return
        if up.phase != "listening":
            return
        if up.target and not up.target <= gen.listened:
            return
        if not up.target and not gen.listened and self.current is not None:
            return
        if any(gen.listens[a] < len(gen.copies) for a in up.target):
            return  # --multi: every copy listens
        policy = self.opts.ready
        if policy.kind == "listen":
            self._promote()
            return
        up.phase = "confirming"
        if policy.kind == "delay":
            up.confirm_at = self.sys.now() + policy.delay
            up.tell(f"{gen} listened; waiting {policy.delay:g} s (--ready {policy})")
        elif policy.kind == "notify":
            up.tell(f"{gen} listened; waiting for READY=1 (--ready notify)")
            if gen.number in self._notified_ready:
                self._promote()
        elif policy.kind == "http":
            # Probes reach the shared socket: only the new generation may answer them.
            old = self.current
            if old is not None and old.state is State.SERVING:
                # It may accept again (a rollback): paused as one that lives on,
                # sealed as a retiring one only once the probe has succeeded.
                self._pause(old, old.pids, old.pids)
                up.paused_old = old
            up.next_probe = self.sys.now()
            up.tell(f"{gen} listened; {old or 'no generation'} paused, probing {policy}")

    # -- generation 1's readiness (READY=1 to the service manager) ----------
    def _announce_when_ready(self, gen: Generation) -> None:
        """``gen`` (the first generation) listened: apply --ready before READY=1."""
        policy, now = self.opts.ready, self.sys.now()
        a = self._announcing = Announcing(gen, now)
        if policy.kind == "listen" or (policy.kind == "notify"
                                       and gen.number in self._notified_ready):
            self._announce(gen, "")
        elif policy.kind == "delay":
            a.at = now + policy.delay
        elif policy.kind == "http":
            a.next_probe = now
        else:
            log.info(f"{gen} listened; waiting for READY=1 (--ready notify)")

    def _announce(self, gen: Generation, how: str) -> None:
        self._drop_announcing()
        self._announced_ready = True
        if how:
            log.ok(f"{gen} is ready ({how})")
        self._notifier.ready(f"serving: {gen}")

    def _drop_announcing(self) -> None:
        a, self._announcing = self._announcing, None
        if a is not None and a.probe is not None:
            self._drop_probe(a.probe)

    def _first_tick(self, now: float) -> None:
        a = self._announcing
        if a is None:
            return
        if a.gen is not self.current or not a.gen.alive or self.stopping:
            self._drop_announcing()  # a reload or a revive announces instead
            return
        if self.upgrade is not None:
            # The manager hears RELOADING=1 ... READY=1 of the reload; if it
            # fails, generation 1's own readiness is awaited again after it.
            return
        if (self.opts.ready.kind == "notify" and a.gen.number in self._notified_ready):
            self._announce(a.gen, "it sent READY=1")
            return
        if a.at is not None and now >= a.at:
            self._announce(a.gen, f"--ready {self.opts.ready}")
            return
        if a.next_probe is not None and a.probe is None and now >= a.next_probe:
            target = probe_target(self.opts.ready, a.gen.listened)
            if target is None:
                a.last_probe, a.next_probe = "no held address to probe", now + PROBE_INTERVAL
            else:
                a.probe, a.next_probe = HttpProbe(target, self.opts.ready.path), None
                if a.probe.outcome is None:
                    self._sel.register(a.probe.fileno(), selectors.EVENT_WRITE,
                                       ("probe", a.probe))
                else:
                    self._first_probe_done(a, a.probe)
        if not a.warned and now - a.since >= self.opts.ready_timeout:
            a.warned = True
            why = f" (last probe: {a.last_probe})" if a.last_probe else ""
            log.warn(f"{a.gen} serves but is not ready after {self.opts.ready_timeout:g} s: "
                     f"--ready {self.opts.ready} not satisfied{why}; READY=1 waits for it")

    def _first_probe_done(self, a: Announcing, probe: HttpProbe) -> None:
        a.probe, a.last_probe = None, probe.detail
        # During a reload the probe may have reached the new generation: not a verdict.
        if probe.outcome and self.upgrade is None and not self.stopping:
            self._announce(a.gen, f"ready probe answered: {probe.detail}")
        else:
            a.next_probe = self.sys.now() + PROBE_INTERVAL

    def _drop_probe(self, probe: HttpProbe) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(probe.fileno())
        probe.close()

    def _on_ready_notice(self, number: int) -> None:
        listener = self._ready_notices.get(number)
        if listener is None:
            return
        gen = next((g for g in self.gens if g.number == number), None)
        if gen is None:
            return
        self._refresh_members()
        if listener.ready_from(gen.pids | {gen.pid}):
            self._notified_ready.add(number)
            log.debug(f"{gen} sent READY=1")
            a = self._announcing
            if a is not None and a.gen is gen and self.upgrade is None and not self.stopping:
                self._announce(gen, "it sent READY=1")
            up = self.upgrade
            if up is not None and up.gen is gen and up.phase == "confirming":
                self._promote()

    def _start_probe(self) -> None:
        up = self.upgrade
        assert up is not None and up.gen is not None
        target = probe_target(self.opts.ready, up.gen.listened)
        if target is None:
            up.last_probe = "no held address to probe"
            up.next_probe = self.sys.now() + PROBE_INTERVAL
            return
        up.probe = HttpProbe(target, self.opts.ready.path)
        if up.probe.outcome is not None:
            self._probe_done()
            return
        self._sel.register(up.probe.fileno(), selectors.EVENT_WRITE, ("probe", up.probe))

    def _on_probe(self, probe: HttpProbe) -> None:
        writing, fd = probe.writing, probe.fileno()
        probe.step()
        up = self.upgrade
        if probe.outcome is not None:
            # Unregister by the number it had: the probe closed its socket already,
            # and the number may be reused by the next accept.
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)
            if up is not None and up.probe is probe:
                self._probe_done()
            elif self._announcing is not None and self._announcing.probe is probe:
                self._first_probe_done(self._announcing, probe)
        elif writing and not probe.writing:
            self._sel.modify(probe.fileno(), selectors.EVENT_READ, ("probe", probe))

    def _probe_done(self) -> None:
        up = self.upgrade
        assert up is not None and up.probe is not None
        probe, up.probe = up.probe, None
        up.last_probe = probe.detail
        if probe.outcome:
            up.tell(f"ready probe answered: {probe.detail}")
            self._promote()
        else:
            up.next_probe = self.sys.now() + PROBE_INTERVAL

    def _promote(self) -> None:
        """The starting generation is ready: it serves, the old one drains."""
        up = self.upgrade
        assert up is not None and up.gen is not None
        gen = up.gen
        now = self.sys.now()
        gen.to(State.SERVING)
        gen.ready_at = now
        self.upgrade = None
        old, self.current = self.current, gen
        self._serving = set(gen.listened)
        msg = f"{gen} is ready in {(now - gen.started_at) * 1000:.0f} ms"
        log.ok(msg)
        up.tell(msg)
        if old is not None and old.state is State.SERVING:
            if up.paused_old is old:
                for p in self.sys.seal(old.number, old.paused):
                    log.warn(f"{old}: {p}")
                self._start_draining(old)
            else:
                self._drain(old)
            n = self.sys.in_flight(old.pids, old.listened)
            up.tell(f"{old} stopped accepting; draining {'?' if n is None else n} in flight")
        self._record(up, True, msg)
        self._announce(gen, "")
        self._release_unused()
        if self.opts.after_reload and not up.revive:
            hook = self._run_hook("after-reload", self.opts.after_reload)
            self._after[hook.pid] = (up.waiters, msg)
            up.tell(f"running --after-reload: {self.opts.after_reload}")
            return
        for w in up.waiters:
            w.done(True, msg)

    def _fail_upgrade(self, reason: str) -> None:
        up = self.upgrade
        assert up is not None
        self.upgrade = None
        gen = up.gen
        if up.probe is not None:
            self._drop_probe(up.probe)
        if up.hook is not None and up.hook.status is None:
            up.hook.kill()
        if up.paused_old is not None and up.paused_old.state is State.SERVING:
            # Roll back: the old generation accepts again, exactly as it did.
            for p in self.sys.resume(up.paused_old.number):
                log.warn(f"{up.paused_old}: resuming: {p}")
            up.paused_old.paused = set()
            up.tell(f"rolled back: {up.paused_old} accepts again")
        log.error(f"reload failed: {reason}; {self.current or 'no generation'} keeps serving")
        if gen is not None and gen.state is State.STARTING:
            gen.to(State.FAILED)
            if gen.alive and gen.pids:
                self._drain(gen)
        self._record(up, False, reason)
        if not self.stopping and not up.revive:  # STOPPING=1 was said already
            self._notifier.ready(f"reload failed: {reason}")
        for w in up.waiters:
            w.done(False, reason)
        if up.revive and self.current is None and not self.stopping:
            self._schedule_revive()
        elif self.current is None and not self.stopping and self._revive_at is None:
            self.request_stop()  # nothing serves any more

    def _record(self, up: Upgrade, ok: bool, reason: str) -> None:
        self.history.append(ReloadRecord(
            time.time(), (self.sys.now() - up.started_at) * 1000, ok, reason,
            up.gen.number if up.gen is not None else None))
        del self.history[:-HISTORY]

    # -- exec mode -------------------------------------------------------
    def _program(self) -> str:
        o = self.opts
        return self.sys.find_program(o.argv, o.env, o.cwd, o.program)

    def _begin_exec(self, old: Generation) -> None:
        up = self.upgrade
        assert up is not None
        # Every process must be paused: workers forked since the last scan too.
        self._refresh_members()
        if old.state is not State.SERVING:
            self._fail_upgrade(f"{old} is {old.state.value}, not serving")
            return
        if not self.sys.alive({old.pid}):
            self._fail_upgrade(f"exec mode reloads the process hupt started, pid {old.pid}, "
                               "which has exited (did the server daemonize?)")
            return
        try:
            path = self._program()
        except HuptError as e:
            self._fail_upgrade(f"cannot exec: {e}")
            return
        up.replacing, up.target, up.deadline = old, set(old.listened), math.inf
        up.phase = "listening"
        self._drain(old, lives_on={old.pid})
        msg = f"{old} stopped accepting; draining it before it execs {path}"
        log.info(msg)
        up.tell(msg)
        # Connections queue from now on: exec at once if nothing is in flight.
        if self.sys.in_flight(old.pids, old.listened) == 0:
            self._exec(old)

    def _exec(self, old: Generation) -> None:
        """``old`` is drained: make its root execve the program again."""
        up = self.upgrade
        assert up is not None and up.replacing is old
        number = self._next_number()
        self._unlink_files()
        env = self._gen_env[number] = self._env(number)
        try:
            path = self._program()
            self.sys.exec_in_place(old.number, number, old.pid, path, self.opts.argv, env)
        except HuptError as e:
            self._drop_ready_notice(number)
            del self._gen_env[number]
            self._exec_failed(old, f"{old} could not exec the program: {e}")
            return
        now = self.sys.now()
        gen = Generation(number, old.pid, now, pids={old.pid})
        self.gens.append(gen)
        self._move_watch(old, gen)
        old.replaced_by = number
        old.pids.discard(old.pid)
        up.gen, up.replacing = gen, None
        up.deadline = now + self.opts.ready_timeout
        if self.current is old:
            self.current = None  # until the new image is ready
        msg = (f"pid {old.pid} execed {path}: {gen}"
               + (f", waiting for it to listen on {_fmt(up.target)}" if up.target else ""))
        log.info(msg)
        for w in up.waiters:
            w.progress(msg)
        if old.pids:
            self._retire(old, f"its root process runs {gen}; retiring its other processes")
        else:
            old.to(State.EXITED)
            self._forget(old)
        self._check_ready(gen)

    def _exec_failed(self, old: Generation, reason: str) -> None:
        up = self.upgrade
        assert up is not None
        self.upgrade = None
        for p in self.sys.resume(old.number):
            log.warn(f"{old}: could not accept again: {p}")
        old.paused = set()
        old.to(State.SERVING)
        old.drain_deadline = None
        log.error(f"reload failed: {reason}; {old} accepts again")
        self._record(up, False, reason)
        if not self.stopping:  # the manager waits for the end of its RELOADING=1
            self._notifier.ready(f"reload failed: {reason}")
        for w in up.waiters:
            w.done(False, reason)

    def _start_afresh(self, reason: str) -> None:
        """The exec'd image failed: start the command as a new process, the sockets still held."""
        up = self.upgrade
        assert up is not None and up.gen is not None
        failed = up.gen
        if failed.state is State.STARTING:
            failed.to(State.FAILED)
            if failed.pids:
                self._drain(failed)
        try:
            fresh = self._spawn()
        except HuptError as e:
            self._fail_upgrade(f"{reason}; starting the command afresh failed: {e}")
            return
        now = self.sys.now()
        self.upgrade = Upgrade(now, now + self.opts.ready_timeout, [], target=up.target,
                               gen=fresh, phase="listening", fresh=True)
        msg = f"{reason}; started the command afresh as {fresh}"
        log.error(f"reload failed: {msg}")
        self._record(up, False, msg)
        for w in up.waiters:
            w.done(False, msg)

    def _drain(self, gen: Generation, lives_on: set[int] | None = None) -> None:
        """Stop ``gen`` accepting and let its in-flight connections finish."""
        self._pause(gen, gen.pids, lives_on or set())
        self._start_draining(gen)

    def _start_draining(self, gen: Generation) -> None:
        gen.to(State.DRAINING)
        gen.drain_deadline = self.sys.now() + self.opts.drain_timeout

    def _pause(self, gen: Generation, pids: set[int], lives_on: set[int]) -> None:
        for p in self.sys.pause(gen.number, pids, lives_on):
            log.warn(f"{gen}: could not stop accepting: {p}")
        gen.paused |= pids

    def _retire(self, gen: Generation, why: str) -> None:
        log.info(f"retiring {gen}: {why}")
        gen.to(State.RETIRING)
        gen.retired_by_hupt = True
        self.sys.signal(gen.pids, self.opts.stop_signal)
        gen.kill_at = self.sys.now() + self.opts.kill_timeout

    def _end_draining(self) -> None:
        for g in list(self.gens):
            if g.state is not State.DRAINING:
                continue
            up = self.upgrade
            if up is not None and up.replacing is g:
                # Exec mode: its drain ends by the exec it waits for, not by its end.
                log.warn(f"{g}: draining ended on request: execing now")
                self._exec(g)
            else:
                self._retire(g, "draining ended on request")

    # -- hooks -----------------------------------------------------------
    def _run_hook(self, name: str, command: str) -> Hook:
        hook = Hook(name, command)
        env = dict(self.opts.env)
        env["HUPT_PID"] = str(os.getpid())
        if self.current is not None:
            env["HUPT_GENERATION"] = str(self.current.number)
        hook.start(env)
        self._hooks.append(hook)
        self._sel.register(hook.fd, selectors.EVENT_READ, ("hook", hook))
        return hook

    def _on_hook_output(self, hook: Hook) -> None:
        if not hook.read():
            self._sel.unregister(hook.fd)
            hook.close()
            self._hook_maybe_done(hook)

    def _hook_maybe_done(self, hook: Hook) -> None:
        if hook.status is None or hook.fd >= 0:
            return  # wait for both its exit and the end of its output
        self._hooks.remove(hook)
        up = self.upgrade
        if hook.name == "before-reload":
            if up is None or up.hook is not hook:
                return  # the reload was abandoned meanwhile
            if hook.status == 0:
                up.tell("--before-reload succeeded")
                self._launch()
            else:
                self._fail_upgrade(hook.reason())
            return
        waiters, reason = self._after.pop(hook.pid, ([], ""))
        if hook.status != 0:
            log.warn(hook.reason())
            for w in waiters:
                w.progress(hook.reason())
            reason += f"; {hook.reason()}"
        for w in waiters:
            w.done(True, reason)

    # -- timers ------------------------------------------------------------
    def tick(self) -> None:
        if self.detached:  # nothing is ours to watch any more; run() returns
            return
        now = self.sys.now()
        if now >= self._members_due():
            self._refresh_members()
        self._first_tick(now)
        up = self.upgrade
        if up is not None and up.phase == "confirming":
            if up.confirm_at is not None and now >= up.confirm_at:
                up.confirm_at = None
                self._promote()
            elif self.opts.ready.kind == "http" and up.probe is None and now >= up.next_probe:
                self._start_probe()
        up = self.upgrade
        if (up is not None and now >= up.deadline and up.phase != "before"
                and up.replacing is None):
            missing = up.target - (up.gen.listened if up.gen else set())
            why = f"{up.gen} was not ready after {self.opts.ready_timeout:g} s"
            if missing:
                why += f": it did not listen on {_fmt(missing)}"
            elif up.phase == "confirming":
                why += f": --ready {self.opts.ready} not satisfied"
                if up.last_probe:
                    why += f" (last probe: {up.last_probe})"
            if (self.opts.exec_mode and not up.fresh and up.gen is not None
                    and self._was_execed(up.gen)):
                self._start_afresh(why)
            else:
                self._fail_upgrade(why)
        if self._watcher is not None and self._watcher.poll(now):
            shown = ", ".join(self._watcher.changed[:3])
            log.info(f"files changed ({shown}): reloading")
            self.request_reload()
        if self._copies_at is not None and now >= self._copies_at:
            self._copies_at = None
            cur = self.current
            if cur is not None and cur.state is State.SERVING and not self.stopping:
                self._more_copies(cur, self.opts.multi - len(cur.copies))
        if self._detach_wanted and self.upgrade is None:
            self._detach()
        if self._revive_at is not None and now >= self._revive_at and not self.stopping:
            self._revive_at = None
            log.info("reviving the server")
            self.request_reload(revive=True)
        for g in list(self.gens):
            if g.state is State.DRAINING:
                execs = self.upgrade is not None and self.upgrade.replacing is g
                # A process forked just before the pause (or by one not yet
                # paused) shows up in a later scan: it stops accepting too.
                late = g.pids - g.paused
                if late:
                    self._pause(g, late, {g.pid} & late if execs else set())
                if self.opts.close_idle_ms is not None:
                    closed = self.sys.close_idle(g.pids, g.listened, self.opts.close_idle_ms)
                    if closed:
                        log.debug(f"{g}: closed {closed} idle connection(s)")
                # Uncounted (the tables could not be read) is not drained: the
                # drain timeout still ends it.
                n = self.sys.in_flight(g.pids, g.listened)
                if n == 0:
                    if execs:
                        self._exec(g)
                    else:
                        self._retire(g, "no connections in flight")
                elif g.drain_deadline is not None and now >= g.drain_deadline:
                    why = f"drain timeout with {'?' if n is None else n} connection(s) still open"
                    if execs:
                        log.warn(f"{g}: {why}: execing anyway")
                        self._exec(g)
                    else:
                        self._retire(g, why)
            elif g.state is State.RETIRING and g.kill_at is not None and now >= g.kill_at:
                log.warn(f"{g} still running {self.opts.kill_timeout:g} s after the stop signal:"
                         " SIGKILL")
                self.sys.signal(g.pids, signal.SIGKILL)
                g.kill_at = None

    def _members_due(self) -> float:
        interval = MEMBERS_POLL if self._in_motion() else MEMBERS_IDLE_POLL
        return min(self._next_members, self._last_scan + interval)

    def _in_motion(self) -> bool:
        """Whether anything but serving generations exists (membership then polled often)."""
        return (self.upgrade is not None or self.stopping or self._revive_at is not None
                or self._copies_at is not None
                or any(g.alive and g.state is not State.SERVING for g in self.gens))

    def _was_execed(self, gen: Generation) -> bool:
        """Whether ``gen`` is an image exec'd into an older generation's root."""
        return any(g.replaced_by == gen.number for g in self.gens)

    def _refresh_members(self) -> None:
        self._last_scan, self._next_members = self.sys.now(), math.inf
        live = [g for g in self.gens if g.alive]
        members = self.sys.members({g.number: g.pid for g in live if g.replaced_by is None})
        # Zombies count as members until reaped (a multi-threaded process shows a
        # zombie leader while its other threads still run), so reap after the scan
        # and look again at once when something was reaped.
        for pid, status in self.sys.reap():
            self._next_members = 0.0
            for g in self.gens:
                # The generation ends as its last process does: its root, or a
                # daemon of a root that exited 0 as it daemonized (hupt, a
                # subreaper, reaps both).
                if ((g.pid == pid and g.replaced_by is None)
                        or pid in g.pids or pid in members.get(g.number, ())):
                    g.exit_status = status
                if pid in g.copies and g.alive:
                    self._copy_exited(g, pid, status)
            for hook in list(self._hooks):
                if hook.pid == pid:
                    hook.status = status
                    self._hook_maybe_done(hook)
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
                self._exited(g)

    def _exited(self, gen: Generation) -> None:
        prev = gen.state
        gen.to(State.EXITED)
        gen.kill_at = gen.drain_deadline = None
        self._unwatch(gen)
        self._forget(gen)
        status = gen.exit_status
        desc = _status(status)
        up = self.upgrade
        if prev is State.STARTING and up is not None and up.gen is gen:
            if self.current is None:  # the last to die says how the server ended
                self.exit_code = _exit_code(status, gen.retired_by_hupt)
            reason = f"{gen} exited ({desc}) before it was ready"
            if self.opts.exec_mode and not up.fresh and self._was_execed(gen):
                self._start_afresh(reason)
            else:
                self._fail_upgrade(reason)
        elif gen.retired_by_hupt or prev in (State.FAILED,):
            log.info(f"{gen} exited ({desc})")
        else:
            log.error(f"{gen} exited on its own ({desc})")
        if gen is self.current:
            self.exit_code = _exit_code(status, gen.retired_by_hupt)
            self.current = None
            if self.opts.revive and not gen.retired_by_hupt and not self.stopping:
                lived = self.sys.now() - (gen.ready_at or gen.started_at)
                if lived > 10.0:
                    self._revive_backoff = 0.5
                self._schedule_revive()
            elif not self.stopping and self.upgrade is None:
                self.request_stop()
        if gen.pid in self._aliases and not any(
                g.alive and g.pid == gen.pid for g in self.gens):
            self._aliases.discard(gen.pid)
            if self._control is not None:
                self._control.unalias(gen.pid)
        self._release_unused()

    def _copy_exited(self, gen: Generation, pid: int, status: int) -> None:
        """One of --multi's copies died while the others run on.

        The serving generation is then short of a copy; with --revive it gets
        one again (the same backoff as a whole generation), else it serves on
        with fewer.  Only a crash counts (a signal or a non-zero status): a
        copy that exits 0 may have daemonized, its server living on below
        hupt.  A generation being replaced or stopped is left alone: its
        copies are meant to go.  When the last copy goes the generation has
        exited, which _exited handles.
        """
        if (self.opts.multi == 1 or status == 0 or gen is not self.current
                or gen.state is not State.SERVING or self.stopping or gen.retired_by_hupt):
            return
        others = [c for c in gen.copies if c != pid]
        if not self.sys.alive(others):
            return
        gen.copies = others
        now = self.sys.now()
        log.error(f"{gen}: copy pid {pid} exited on its own ({_status(status)}); "
                  f"{len(gen.copies)} of {self.opts.multi} copies serve")
        if not self.opts.revive:
            return
        if now - self._last_copy_exit > 10.0:
            self._revive_backoff = 0.5
        self._last_copy_exit = now
        self._copies_at = now + self._revive_backoff
        log.warn(f"--revive: starting a copy again in {self._revive_backoff:g} s")
        self._revive_backoff = min(self._revive_backoff * 2, REVIVE_MAX_BACKOFF)

    def _schedule_revive(self) -> None:
        self._revive_at = self.sys.now() + self._revive_backoff
        log.warn(f"--revive: starting it again in {self._revive_backoff:g} s; "
                 "the sockets stay held, clients queue")
        self._revive_backoff = min(self._revive_backoff * 2, REVIVE_MAX_BACKOFF)

    def _release_unused(self) -> None:
        if self.upgrade is not None or self._revive_at is not None:
            return  # a starting generation may still bind anything held
        used: set[Address] = set()
        for g in self.gens:
            if g.alive:
                used |= g.listened
        if self.current is None and self.opts.revive and not self.stopping:
            return
        for a in self.sys.listeners.keep_only(used):
            log.info(f"released {a}: no generation listens on it")

    # -- status ------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = self.sys.now()
        gens = []
        for g in self.gens:
            if not g.alive:
                continue
            counted = g.state in (State.SERVING, State.DRAINING, State.RETIRING, State.FAILED)
            gens.append({
                "number": g.number, "pid": g.pid, "pids": sorted(g.pids),
                "state": g.state.value, "age_s": round(now - g.started_at, 3),
                "ready_ms": (round((g.ready_at - g.started_at) * 1000, 1)
                             if g.ready_at is not None else None),
                "in_flight": self.sys.in_flight(g.pids, g.listened) if counted else None,
                "listening": sorted(str(a) for a in g.listened)})
        state = "stopping" if self.stopping else ("reloading" if self.upgrade else "running")
        return {
            "hupt_pid": os.getpid(), "command": self.opts.argv,
            "mode": "exec" if self.opts.exec_mode else "fork",
            "state": state, "uptime_s": round(time.time() - self.started_at, 3),
            "generations": gens, "listeners": self.sys.listener_stats(),
            "reloads": [{"at": r.at, "duration_ms": round(r.duration_ms, 1), "ok": r.ok,
                         "reason": r.reason, "generation": r.generation}
                        for r in self.history]}

    # -- control socket --------------------------------------------------
    def _on_control(self) -> None:
        assert self._control is not None
        while (conn := self._control.accept()) is not None:
            peer = Peer(conn, self._on_message, self._sync_peer)
            self._peers[peer.fileno()] = peer
            self._sel.register(peer.fileno(), selectors.EVENT_READ, ("peer", peer))

    def _on_peer(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            peer.readable()
        if mask & selectors.EVENT_WRITE and not peer.closed:
            peer.flush()

    def _sync_peer(self, peer: Peer) -> None:
        fd = peer.fileno()
        if self._peers.get(fd) is not peer:
            return
        if peer.closed:
            del self._peers[fd]
            self._sel.unregister(fd)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.wants_write else 0)
        self._sel.modify(fd, events, ("peer", peer))

    def _on_message(self, peer: Peer, msg: Message) -> None:
        cmd = msg.get("cmd")
        if cmd == "reload":
            self.request_reload(PeerWaiter(peer))
        elif cmd == "stop":
            peer.send({"event": "progress", "message": "stopping"})
            # Stop first: a reload in progress is abandoned, so ending the drains
            # retires everyone (an exec-mode drain would otherwise exec anew).
            self.request_stop(now=False, waiter=PeerWaiter(peer))
            if msg.get("now"):
                self._end_draining()
        elif cmd == "status":
            self._refresh_members()  # what is there now, not at the last scan
            peer.send({"event": "result", "ok": True, "reason": "status",
                       "status": self.status()})
            peer.finish()
        elif cmd == "ping":
            self._refresh_members()
            peer.send({"event": "result", "ok": True, "reason": "pong",
                       "generations": [_gen_info(g) for g in self.gens if g.alive]})
            peer.finish()
        else:
            peer.send({"event": "result", "ok": False, "reason": f"unknown command {cmd!r}"})
            peer.finish()


def filtered_calls(addresses: set[Address]) -> str:
    """The calls an attached server's filter hands to hupt (unlink too once it holds a
    unix path, as LinuxSystem.attach installs it)."""
    if any(a.is_unix for a in addresses):
        return "bind(), listen() and unlink()"
    return "bind() and listen()"


def _gen_info(g: Generation) -> dict[str, Any]:
    return {"number": g.number, "pid": g.pid, "pids": sorted(g.pids), "state": g.state.value,
            "listening": sorted(str(a) for a in g.listened)}


def _fmt(addresses: set[Address]) -> str:
    return ", ".join(sorted(str(a) for a in addresses))


def _status(code: int | None) -> str:
    if code is None:
        return "status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _exit_code(status: int | None, retired_by_hupt: bool) -> int:
    """hupt's exit status for the last serving generation's ``status``.

    A server that died of the stop signal hupt sent it stopped as asked: 0.
    Otherwise its own code, or 128+N for a signal, as a shell reports it.
    An attached server is not hupt's child and its status is unknown: 0 if
    hupt stopped it, 1 if it exited on its own.
    """
    if status is None:
        return 0 if retired_by_hupt else 1
    if status < 0:
        return 0 if retired_by_hupt else 128 - status
    return status


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass

