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
"""

from __future__ import annotations

import os
import selectors
import signal
from dataclasses import dataclass, field
from typing import Any

from hupt import log
from hupt.address import Address
from hupt.control import ControlServer, Message, Peer
from hupt.errors import HuptError
from hupt.generations import Generation, State
from hupt.system import System

DRAIN_POLL = 0.1
MEMBERS_POLL = 1.0


@dataclass
class Options:
    argv: list[str]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    ready_timeout: float = 30.0
    drain_timeout: float = 60.0
    kill_timeout: float = 10.0
    stop_signal: int = signal.SIGTERM


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
    gen: Generation
    deadline: float
    target: set[Address]
    waiters: list[Waiter]


class Supervisor:
    def __init__(self, system: System, options: Options, *, control: bool = True) -> None:
        self.sys = system
        self.opts = options
        self.gens: list[Generation] = []
        self.current: Generation | None = None
        self.upgrade: Upgrade | None = None
        self.stopping = False
        self.exit_code: int | None = None
        self._sel = selectors.DefaultSelector()
        self._fds: dict[int, int] = {}  # generation -> watched fd
        self._signals: list[int] = []
        self._control_enabled = control
        self._control: ControlServer | None = None
        self._peers: dict[int, Peer] = {}
        self._next_members = 0.0
        self._interrupts = 0
        self._stop_waiters: list[Waiter] = []

    # -- public entry points ---------------------------------------------
    def start(self) -> None:
        """Start generation 1 (raises HuptError if it cannot start)."""
        gen = self._spawn()
        gen.to(State.SERVING)
        gen.ready_at = self.sys.now()
        self.current = gen

    def request_reload(self, waiter: Waiter | None = None) -> None:
        w = waiter or Waiter()
        if self.stopping:
            w.done(False, "hupt is stopping")
            return
        if self.upgrade is not None:
            w.progress(f"joining the reload already starting {self.upgrade.gen}")
            self.upgrade.waiters.append(w)
            return
        try:
            gen = self._spawn()
        except HuptError as e:
            log.error(f"reload failed: {e}")
            w.done(False, str(e))
            return
        target = set(self.current.listened) if self.current is not None else set()
        self.upgrade = Upgrade(gen, self.sys.now() + self.opts.ready_timeout, target, [w])
        msg = f"started {gen}" + (f", waiting for it to listen on {_fmt(target)}" if target else "")
        log.info(msg)
        w.progress(msg)
        self._check_ready(gen)

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
        log.info("stopping: no more accepts, draining in-flight connections")
        if self.upgrade is not None:
            self._fail_upgrade("hupt is stopping")
        for g in self.gens:
            if g.state is State.SERVING:
                self._drain(g)

    # -- the loop --------------------------------------------------------
    def run(self) -> int:
        """Run until every generation has exited; return hupt's exit status."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR2)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        self._sel.register(rfd, selectors.EVENT_READ, ("signal", rfd))
        try:
            if self._control_enabled:
                self._control = ControlServer()
                self._sel.register(self._control.fileno(), selectors.EVENT_READ, ("control", None))
            if self.current is None:
                self.start()
            while True:
                self._step(rfd)
                if all(not g.alive for g in self.gens):
                    break
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(rfd)
            os.close(wfd)
            if self._control is not None:
                self._control.close()
            for p in self._peers.values():
                p.close()
            self.sys.listeners.close_all()
        code = self.exit_code if self.exit_code is not None else 0
        for w in self._stop_waiters:
            w.done(True, f"stopped (exit status {code})")
        return code

    def _step(self, rfd: int) -> None:
        for key, mask in self._sel.select(self._timeout()):
            kind, arg = key.data
            if kind == "signal":
                _drain_pipe(rfd)
            elif kind == "notify":
                self.on_notify(arg)
            elif kind == "control":
                self._on_control()
            elif kind == "peer":
                self._on_peer(arg, mask)
        self._handle_signals()
        self.tick()

    def _timeout(self) -> float:
        now = self.sys.now()
        deadlines = [self._next_members]
        if self.upgrade is not None:
            deadlines.append(self.upgrade.deadline)
        for g in self.gens:
            if g.state is State.DRAINING:
                deadlines.append(now + DRAIN_POLL)
            if g.kill_at is not None:
                deadlines.append(g.kill_at)
        return max(0.0, min(deadlines) - now)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            s = self._signals.pop(0)
            if s == signal.SIGHUP:
                log.info("SIGHUP: reloading")
                self.request_reload()
            elif s in (signal.SIGTERM, signal.SIGINT):
                if s == signal.SIGINT:
                    self._interrupts += 1
                self.request_stop(now=self._interrupts >= 2)
            elif s == signal.SIGUSR2:
                self._end_draining()
            elif s == signal.SIGCHLD:
                self._next_members = 0.0

    # -- generations -----------------------------------------------------
    def _spawn(self) -> Generation:
        number = len(self.gens) + 1
        pid, fd = self.sys.spawn(number, self.opts.argv, self.opts.env)
        gen = Generation(number, pid, self.sys.now(), pids={pid})
        self.gens.append(gen)
        self._fds[number] = fd
        self._sel.register(fd, selectors.EVENT_READ, ("notify", gen))
        log.debug(f"spawned {gen}")
        return gen

    def on_notify(self, gen: Generation) -> None:
        got = self.sys.service(gen.number)
        for addr in got.listened:
            if addr not in gen.listened:
                gen.listened.add(addr)
                log.debug(f"{gen} listens on {addr}")
        if got.listened:
            self._check_ready(gen)
        if got.hung_up:
            self._unwatch(gen)
            self._next_members = 0.0

    def _unwatch(self, gen: Generation) -> None:
        fd = self._fds.pop(gen.number, None)
        if fd is not None:
            self._sel.unregister(fd)
            self.sys.forget(gen.number)

    def _check_ready(self, gen: Generation) -> None:
        up = self.upgrade
        if up is None or up.gen is not gen or gen.state is not State.STARTING:
            return
        if up.target and not up.target <= gen.listened:
            return
        if not up.target and not gen.listened and self.current is not None:
            return
        now = self.sys.now()
        gen.to(State.SERVING)
        gen.ready_at = now
        self.upgrade = None
        old, self.current = self.current, gen
        took = now - gen.started_at
        msg = f"{gen} is ready in {took * 1000:.0f} ms"
        log.ok(msg)
        for w in up.waiters:
            w.progress(msg)
        if old is not None and old.state is State.SERVING:
            self._drain(old)
            for w in up.waiters:
                w.progress(f"{old} stopped accepting; draining")
        for w in up.waiters:
            w.done(True, msg)
        self._release_unused()

    def _fail_upgrade(self, reason: str) -> None:
        up = self.upgrade
        assert up is not None
        self.upgrade = None
        gen = up.gen
        log.error(f"reload failed: {reason}; {self.current or 'no generation'} keeps serving")
        if gen.state is State.STARTING:
            gen.to(State.FAILED)
            if gen.alive and gen.pids:
                self._drain(gen)
        for w in up.waiters:
            w.done(False, reason)

    def _drain(self, gen: Generation) -> None:
        """Stop ``gen`` accepting and let its in-flight connections finish."""
        problems = self.sys.pause(gen.number, gen.pids)
        for p in problems:
            log.warn(f"{gen}: could not stop accepting: {p}")
        gen.to(State.DRAINING)
        gen.drain_deadline = self.sys.now() + self.opts.drain_timeout

    def _retire(self, gen: Generation, why: str) -> None:
        log.info(f"retiring {gen}: {why}")
        gen.to(State.RETIRING)
        gen.retired_by_hupt = True
        self.sys.signal(gen.pids, self.opts.stop_signal)
        gen.kill_at = self.sys.now() + self.opts.kill_timeout

    def _end_draining(self) -> None:
        for g in self.gens:
            if g.state is State.DRAINING:
                self._retire(g, "draining ended on request")

    def tick(self) -> None:
        now = self.sys.now()
        if now >= self._next_members:
            self._next_members = now + MEMBERS_POLL
            self._refresh_members()
        up = self.upgrade
        if up is not None and now >= up.deadline:
            missing = up.target - up.gen.listened
            self._fail_upgrade(
                f"{up.gen} was not ready after {self.opts.ready_timeout:g} s"
                + (f": it did not listen on {_fmt(missing)}" if missing else ""))
        for g in self.gens:
            if g.state is State.DRAINING:
                n = self.sys.in_flight(g.pids, g.listened)
                if n == 0:
                    self._retire(g, "no connections in flight")
                elif g.drain_deadline is not None and now >= g.drain_deadline:
                    self._retire(g, f"drain timeout with {n} connection(s) still open")
            elif g.state is State.RETIRING and g.kill_at is not None and now >= g.kill_at:
                log.warn(f"{g} still running {self.opts.kill_timeout:g} s after the stop signal:"
                         " SIGKILL")
                self.sys.signal(g.pids, signal.SIGKILL)
                g.kill_at = None

    def _refresh_members(self) -> None:
        live = [g for g in self.gens if g.alive]
        members = self.sys.members({g.number: g.pid for g in live})
        # Zombies count as members until reaped (a multi-threaded process shows a
        # zombie leader while its other threads still run), so reap after the scan
        # and look again at once when something was reaped.
        for pid, status in self.sys.reap():
            self._next_members = 0.0
            for g in self.gens:
                if g.pid == pid:
                    g.exit_status = status
        for g in live:
            g.pids = members.get(g.number, set())
            if not g.pids:
                self._exited(g)

    def _exited(self, gen: Generation) -> None:
        prev = gen.state
        gen.to(State.EXITED)
        self._unwatch(gen)
        status = gen.exit_status
        desc = _status(status)
        if prev is State.STARTING and self.upgrade is not None and self.upgrade.gen is gen:
            self._fail_upgrade(f"{gen} exited ({desc}) before it was ready")
        elif gen.retired_by_hupt or prev in (State.FAILED,):
            log.info(f"{gen} exited ({desc})")
        else:
            log.error(f"{gen} exited on its own ({desc})")
        if gen is self.current:
            self.exit_code = _exit_code(status, gen.retired_by_hupt)
            self.current = None
            if not self.stopping and self.upgrade is None:
                self.request_stop()
        self._release_unused()

    def _release_unused(self) -> None:
        if self.upgrade is not None:
            return  # the starting generation may still bind anything held
        used: set[Address] = set()
        for g in self.gens:
            if g.alive:
                used |= g.listened
        for a in self.sys.listeners.keep_only(used):
            log.info(f"released {a}: no generation listens on it")

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
            self.request_stop(now=bool(msg.get("now")), waiter=PeerWaiter(peer))
        elif cmd == "ping":
            peer.send({"event": "result", "ok": True, "reason": "pong",
                       "generations": [_gen_info(g) for g in self.gens if g.alive]})
            peer.finish()
        else:
            peer.send({"event": "result", "ok": False, "reason": f"unknown command {cmd!r}"})
            peer.finish()


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
    """
    if status is None:
        return 1
    if status < 0:
        return 0 if retired_by_hupt else 128 - status
    return status


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass

