"""The supervisor: where hupt's parts are put together, and what joins them.

The reload path, top to bottom (one file each)::

    signal / control request ─► supervisor.py ─► reload.py (the upgrade, upgrade.py)
        ─► fleet.py (generations: spawn, scan, drain) ─► system.py (the seam)
        ─► hupt/tracer/ (seccomp, notify, ptrace, pidfd, sock_diag)

Everything runs in one single-threaded loop (loop.py) over the notify fds,
pidfds, the signal pipe, the control socket (endpoint.py), hook output
(hooks.py), sd_notify sockets and ready probes (readiness.py).  Each part
with timers is ticked by the loop; what a part finds out about the others
(a generation gone, a drain over) comes back here as an event and is routed
to whoever must react: routing is this module's job, and only this
module's.  The other parts: announce.py (sd_notify to the service
manager), revive.py (--revive, --multi copies), detach.py (hupt attach
letting go), snapshot.py (hupt status), metrics.py (--metrics).

The invariant, checked by the loop after every step: at most one
generation is STARTING, and it is the upgrade's (hupt/upgrade.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from hupt import log
from hupt.announce import Announcer, ServiceManager
from hupt.detach import Detacher, filtered_calls
from hupt.draining import Draining
from hupt.endpoint import ControlEndpoint
from hupt.fleet import (
    KEEP_EXITED,
    ChildExited,
    CopyExited,
    Drained,
    DrainSlow,
    Event,
    Exited,
    Fleet,
)
from hupt.generations import Generation, State, describe
from hupt.hooks import HookRunner
from hupt.loop import Loop
from hupt.metrics import MetricsEndpoint, render
from hupt.options import Options, servers_env
from hupt.output import Output
from hupt.reload import Reloader, fmt
from hupt.revive import Reviver
from hupt.safefs import write_pidfile
from hupt.sdnotify import Notifier
from hupt.snapshot import deploy_fields, generation, snapshot
from hupt.system import System, procname
from hupt.upgrade import ReloadRecord, Upgrade, Waiter
from hupt.waitold import WaitOld
from hupt.watch import Watcher

if TYPE_CHECKING:
    from hupt.command import Change
    from hupt.launch import First

__all__ = ["FORWARDED", "KEEP_EXITED", "Options", "Supervisor", "Waiter", "filtered_calls",
           "servers_env"]

# Signals hupt does not use, forwarded to the serving generation instead of
# killing hupt (their default action): USR1 (log reopening), QUIT (nginx's
# graceful stop), WINCH (nginx: stop the workers), ALRM, IO, PWR, STKFLT and
# the real-time ones.  Not forwarded: what hupt uses (HUP, TERM, INT, USR2,
# CHLD); KILL and STOP (cannot be caught); job control (TSTP, TTIN, TTOU,
# CONT: stopping hupt is the shell's business, and a terminal sends them to
# the server's process group itself); what the kernel raises for hupt's own
# doing (PIPE, which Python ignores, SEGV, BUS, FPE, ILL, TRAP, ABRT, SYS,
# XCPU, XFSZ, PROF, VTALRM, URG).
FORWARDED = tuple(
    [s for s in (signal.SIGUSR1, signal.SIGQUIT, signal.SIGWINCH, signal.SIGALRM, signal.SIGIO,
                 getattr(signal, "SIGPWR", None), getattr(signal, "SIGSTKFLT", None))
     if s is not None]
    + list(range(signal.SIGRTMIN, signal.SIGRTMAX + 1)))


class _FileWatch:
    """--watch as a loop timer: a debounced change reloads."""

    def __init__(self, watcher: Watcher, now: float, reload: Any) -> None:
        self._w = watcher
        self._reload = reload

    def deadline(self) -> float:
        return self._w.deadline()

    def tick(self, now: float) -> None:
        if self._w.poll(now):
            log.info(f"files changed ({', '.join(self._w.changed[:3])}): reloading")
            self._reload()


class Supervisor:
    def __init__(self, system: System, options: Options, *, control: bool = True,
                 notifier: ServiceManager | None = None, first: First | None = None,
                 output: Output | None = None) -> None:
        self.sys = system
        self.opts = options
        # hupt run: generation 1, started before this was built (hupt/launch.py).
        self._first = first
        self.stopping = False
        # Nothing serves and the command never has (hupt attach): hupt holds the
        # sockets until an operator reloads with the command, or stops it.
        self.awaiting_command = False
        self.exit_code: int | None = None
        self.started_at = time.time()
        self._control = control
        self._signals: list[int] = []
        self._interrupts = 0
        self._pidfile_written = False
        self._stop_waiters: list[Waiter] = []
        self._old_waiters: list[WaitOld] = []  # hupt reload --wait-old, once it succeeded
        loop = self.loop = Loop(system.now)
        # The generations' stdout and stderr through hupt (--prefix-output); hupt run
        # gives one with its output keeper (hupt/output.py).
        if output is None and any(options.prefix_output):
            output = Output(options.prefix_output)
        self.output = output
        if output is not None:
            output.bind(loop)
        self.fleet = Fleet(system, options, loop, on_notify=self.on_notify,
                           on_sent_ready=self._on_sent_ready, on_events=self._route,
                           in_motion=self._in_motion, output=output)
        self.announcer = Announcer(notifier or Notifier({}), options.ready, options.ready_timeout,
                                   loop, current=lambda: self.fleet.current,
                                   reloading=self._reloading, stopping=lambda: self.stopping)
        self.hooks = HookRunner(loop, self._hook_env)
        self.draining = Draining(self.fleet, options)
        self.reloader = Reloader(self.fleet, self.draining, options, loop, self.announcer,
                                 self.hooks, stopping=lambda: self.stopping,
                                 on_over=self._upgrade_over)
        self.reviver = Reviver(options, self.fleet, loop,
                               request_reload=lambda: self.request_reload(revive=True),
                               stopping=lambda: self.stopping)
        self.detacher = Detacher(self.fleet, self.announcer, loop,
                                 confirm=options.confirm_detach, reloading=self._reloading)
        self.endpoint = ControlEndpoint(loop, self)
        self.metrics = (MetricsEndpoint(loop, options.metrics, self.metrics_text)
                        if options.metrics is not None else None)
        loop.on_wake("signals", self._handle_signals)
        loop.add_timer("membership", self.fleet)
        loop.add_timer("drain", self.draining)
        loop.add_timer("reload", self.reloader)
        loop.add_timer("ready", self.announcer)
        loop.add_timer("revive", self.reviver)
        loop.add_timer("detach", self.detacher)
        if options.watch:
            loop.add_timer("watch", _FileWatch(Watcher(options.watch, system.now()),
                                               system.now(), self.request_reload))
        loop.add_check(self._invariant)

    # -- what the parts hold -------------------------------------------------------
    @property
    def gens(self) -> list[Generation]:
        return self.fleet.gens

    @property
    def current(self) -> Generation | None:
        return self.fleet.current

    @property
    def upgrade(self) -> Upgrade | None:
        return self.reloader.upgrade

    @property
    def history(self) -> list[ReloadRecord]:
        return self.reloader.history

    @property
    def detached(self) -> bool:
        return self.detacher.detached

    def _reloading(self) -> bool:
        return self.reloader.upgrade is not None

    def _in_motion(self) -> bool:
        """Whether anything but serving generations exists (membership then polled often)."""
        return (self.reloader.upgrade is not None or self.stopping or self.reviver.pending
                or self.reviver.copies_at is not None
                or any(g.alive and g.state is not State.SERVING for g in self.fleet.gens))

    def _invariant(self) -> str | None:
        starting = [g for g in self.fleet.gens if g.state is State.STARTING]
        up = self.reloader.upgrade
        if len(starting) > 1:
            return f"{len(starting)} generations are starting: {', '.join(map(str, starting))}"
        if starting and (up is None or up.gen is not starting[0]):
            return f"{starting[0]} is starting, but not as the upgrade's new generation"
        if up is not None and up.over:
            return f"the upgrade to {up} is {up.phase.value} but still in progress"
        cur = self.fleet.current
        if cur is not None and not cur.alive:
            return f"the serving generation {cur} has exited"
        return None

    # -- entry points --------------------------------------------------------------------
    def start(self) -> None:
        """Start generation 1 (raises HuptError if it cannot start), or take the one
        hupt run started already."""
        first, self._first = self._first, None
        if first is not None:
            self._pidfile_written = first.pidfile is not None
            gen = self.fleet.record(first.started)
        else:
            if self.opts.pidfile:
                write_pidfile(self.opts.pidfile, os.getpid())  # one line if it cannot be
                self._pidfile_written = True
            gen = self.fleet.spawn()
        gen.to(State.SERVING)
        gen.ready_at = self.sys.now()
        self.fleet.current = gen

    def adopt(self, pid: int) -> Generation:
        """Take over running server ``pid`` as the serving generation (hupt attach)."""
        gen, problems = self.fleet.adopt(pid)
        self.endpoint.alias(pid)
        for p in problems:
            log.warn(f"{gen}: left unfiltered: {p}")
        log.ok(f"attached to pid {pid} as {gen}, holding {fmt(gen.listened)}")
        return gen

    def settle(self) -> None:
        """Scan the generations now and react to what the scan found.  Only where
        nothing is half done: at the start of a request."""
        self.fleet.refresh()
        self.loop.run_later()

    def request_reload(self, waiter: Waiter | None = None, *, revive: bool = False,
                       change: Change | None = None, wait_old: bool = False) -> None:
        """Reload (``change``: with a changed command, kept if the reload succeeds;
        ``wait_old``: answered once the generations it replaces have exited)."""
        w = waiter or Waiter()
        if self.reloader.upgrade is None:
            # The generation to pause later: its processes as they are now (in
            # steady state the last scan may be seconds old).  This may find it
            # gone, and hupt stopping: hence first.
            self.settle()
        if wait_old:  # the outcome once the generations it replaces have exited
            w = WaitOld(w, self.fleet, self.loop.now(), self._wait_old)
        if self.stopping:
            w.done(False, "hupt is stopping")
            return
        self.awaiting_command = False  # this reload brings it, or fails and waits again
        self.reloader.request(w, revive=revive, change=change)

    def _wait_old(self, w: WaitOld) -> None:
        self._old_waiters.append(w)

    def request_stop(self, *, now: bool = False, waiter: Waiter | None = None) -> None:
        if waiter is not None:
            self._stop_waiters.append(waiter)
        if now:
            log.warn("stopping now: killing every generation")
            self.draining.kill_all()
            self.stopping = True
            return
        if self.stopping:
            return
        self.stopping = True
        self.announcer.stopping("stopping: draining")
        log.info("stopping: no more accepts, draining in-flight connections")
        self.reloader.stop()
        self.reviver.cancel()
        for g in self.fleet.gens:
            if g.state is State.SERVING:
                self.draining.drain(g)
        # Nobody accepts any more: new clients are refused, not queued until hupt exits.
        # Unless a process still holds a listener itself (its pause failed, or it got
        # the socket some other way): a shut-down listener makes its accept() fail
        # with EINVAL at once, for ever, and servers log that in a tight loop.
        holders = self.fleet.listener_holders()
        if holders:
            log.error("stopping: not refusing new connections: " + "; ".join(
                f"pid {pid} ({procname(pid)}) still holds {', '.join(map(str, addrs))}"
                for pid, addrs in sorted(holders.items()))
                + " (a shut-down listener would make its accept() fail in a loop); "
                "connections queue until they exit")
        else:
            self.fleet.refuse_new()

    def request_detach(self) -> None:
        self.detacher.request()

    def end_draining(self) -> None:
        """SIGUSR2, hupt stop --now: every drain ends now."""
        for g in list(self.fleet.gens):
            if g.state is not State.DRAINING:
                continue
            g.drain_over(self.sys.now(), "request", len(g.connections_seen))
            if self.reloader.replacing is g:
                # Exec mode: its drain ends by the exec it waits for, not by its end.
                log.warn(f"{g}: draining ended on request: execing now")
                self.reloader.exec(g)
            else:
                self.draining.retire(g, "draining ended on request")

    def status(self) -> dict[str, Any]:
        up = self.reloader.upgrade
        # down: nothing serves and the command is being started again (--revive,
        # or exec mode after a failed reload), whether waiting out the backoff or
        # trying, or waits for an operator to give it (an attached command failed).
        idle = up is None and self.fleet.current is None and bool(self.fleet.gens)
        state = ("stopping" if self.stopping
                 else "down" if self.reviver.pending or (up is not None and up.revive) or idle
                 else "reloading" if up is not None else "running")
        doc = snapshot(self.sys, self.fleet.gens, command=self.opts.argv,
                       exec_mode=self.opts.exec_mode, state=state,
                       uptime=time.time() - self.started_at, history=self.reloader.history)
        doc.update(deploy_fields(self.opts))
        return doc

    def generations(self) -> list[dict[str, Any]]:
        return [generation(g) for g in self.fleet.gens if g.alive]

    def metrics_text(self) -> str:
        """--metrics: the Prometheus text of what is there now (hupt/metrics.py)."""
        from hupt.control import version

        self.settle()
        doc = self.status()
        doc.update(name=self.endpoint.name, version=version(), started_at=self.started_at)
        return render(doc, self.reloader.stats)

    def open_metrics(self) -> None:
        """Serve --metrics (UsageError if its address is refused or taken); before
        anything starts, so that a bad address starts nothing."""
        if self.metrics is not None and not self.metrics.opened:
            self.metrics.open(self.opts.metrics_allow_remote)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        """Run until every generation has exited; return hupt's exit status."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR2,
                   *FORWARDED)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        # hupt attach blocks them while it takes the server over, hupt run while
        # generation 1 starts before the supervisor is built (a default SIGTERM
        # then would leave the server with a filter nobody answers); those that
        # came meanwhile are delivered now, to the handler.
        first = self._first
        if first is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, first.mask)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        self.loop.add(rfd, lambda mask: _drain_pipe(rfd))
        try:
            if self._control:
                self.endpoint.open(first.control if first is not None else None)
            self.open_metrics()
            if self.fleet.current is None:
                self.start()
            while True:
                self.step()
                if self.detached or (all(not g.alive for g in self.fleet.gens)
                                     and not self.reviver.pending
                                     and not (self.awaiting_command and not self.stopping)):
                    break
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            self.loop.remove(rfd)
            os.close(rfd)
            os.close(wfd)
            code = self.exit_code if self.exit_code is not None else 0
            for old in self._old_waiters:  # before their connections are closed below
                old.abandon("hupt detached" if self.detached else "hupt exited")
            self._old_waiters.clear()
            for w in self._stop_waiters:
                w.done(True, f"stopped (exit status {code})")
            self.endpoint.close()
            if self.metrics is not None:
                self.metrics.close()
            self.fleet.close()
            self.hooks.close()
            self.fleet.close_listeners()
            if self.opts.pidfile and self._pidfile_written:
                with contextlib.suppress(OSError):
                    os.unlink(self.opts.pidfile)
            if self.output is not None:  # last: what the generations wrote until the end
                self.output.close()
        return self.exit_code if self.exit_code is not None else 0

    def step(self) -> None:
        """Wait for the next event or deadline, and handle what is due."""
        self.loop.step()

    def tick(self) -> None:
        """Handle what is due now (the timers' half of a step)."""
        if not self.detached:  # nothing is ours to watch any more; run() returns
            self.loop.tick()

    # -- signals ------------------------------------------------------------------------------
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
                    self.detacher.stop_requested()
                else:
                    self.request_stop(now=self._interrupts >= 2)
            elif s == signal.SIGUSR2:
                self.end_draining()
            elif s == signal.SIGCHLD:
                # A storm of them while a root is followed: one handling does for all.
                self._signals = [x for x in self._signals if x != signal.SIGCHLD]
                # Also every ptrace stop of a root followed to its exit (exec mode).
                self.reloader.poll_follow()
                self.fleet.rescan_soon()
            elif s in FORWARDED:
                self._forward(s)

    def _forward(self, sig: int) -> None:
        """As if ``sig`` had been sent to the server's own PID: to the serving
        generation's main process (each copy's, with --multi)."""
        name = _signame(sig)
        sent = self._send(sig, every=False)
        if not sent:
            log.warn(f"{name}: no generation serves: not forwarded")
            return
        log.info(f"{name}: forwarded to {sent[0][0]}")

    def send_signal(self, sig: int, *,
                    every: bool = False) -> tuple[bool, str, list[dict[str, Any]]]:
        """``hupt signal``: ``sig`` to the serving generation's main process(es), as a
        forwarded signal goes (``every``: to each live generation's); (sent?, what was
        done, [{generation, pids}])."""
        name = _signame(sig)
        sent = self._send(sig, every=every)
        if not sent:
            what = "no generation is alive" if every else "no generation serves"
            log.warn(f"{name} (hupt signal): {what}: not sent")
            return False, f"{what}: {name} not sent", []
        done = "; ".join(str(g) if pids == [g.pid] else f"{g}: {_pids(pids)}"
                         for g, pids in sent)
        log.info(f"{name} (hupt signal): sent to {done}")
        return True, f"{name} sent to {done}", [
            {"generation": g.number, "state": g.state.value, "pids": pids} for g, pids in sent]

    def _send(self, sig: int, *, every: bool) -> list[tuple[Generation, list[int]]]:
        """``sig`` to the main processes of the serving generation (``every``: of every
        live one); each generation signalled, with the pids it was sent to.

        A generation's main processes: those hupt started (each --multi copy) while
        they live; a generation whose started process has gone (it daemonized) is
        signalled in every process it has.  An exec-mode generation whose root runs
        a newer image is not: that root is the newer one's.
        """
        cur = self.fleet.current
        if every:
            gens = [g for g in self.fleet.gens if g.alive and g.replaced_by is None]
        else:
            gens = [cur] if cur is not None and cur.alive else []
        out = []
        for g in gens:
            pids = [p for p in g.copies or [g.pid] if p in g.pids] or sorted(g.pids)
            if pids:
                self.sys.signal(pids, sig)
                out.append((g, pids))
        return out

    # -- what the parts report ------------------------------------------------------------
    def on_notify(self, gen: Generation) -> None:
        """``gen``'s notify fd is readable: answer its bind/listen calls."""
        listened, new, hung_up = self.fleet.service(gen)
        self.reloader.on_listened(gen, new)
        if listened:
            if gen is self.fleet.current:
                self.reviver.first_listened(gen)
                self.fleet.last_serving = set(gen.listened)  # what a revived one must take
                self.announcer.first_listened(gen)
            self.reloader.check_ready(gen)
        if hung_up:
            self.fleet.unwatch(gen)
            self.fleet.rescan_soon()

    def _on_sent_ready(self, gen: Generation) -> None:
        self.announcer.sent_ready(gen)
        self.reloader.on_sent_ready(gen)

    def _route(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Exited):
                self._exited(e.gen, e.prev)
            elif isinstance(e, CopyExited):
                self.reviver.copy_exited(e.gen, e.pid, e.status)
            elif isinstance(e, ChildExited):
                self.hooks.child_exited(e.pid, e.status)
            elif isinstance(e, DrainSlow):
                self._drain_slow(e.gen, e.message)
            elif (isinstance(e, Drained) and e.gen.state is State.DRAINING
                  and not self.reloader.drained(e.gen, e.why, e.timed_out)):
                self.draining.retire(e.gen, e.why)

    def _drain_slow(self, gen: Generation, message: str) -> None:
        """A drain is slow: whoever waits for it hears what holds it (the log has it)."""
        if gen.state is not State.DRAINING:
            return
        self.reloader.drain_slow(gen, message)  # exec mode: the reload waits for it
        for w in self._stop_waiters:
            w.progress(message)

    def _exited(self, gen: Generation, prev: State) -> None:
        self.fleet.bury(gen)
        if gen.replaced_by is not None and gen.left_behind:
            # Its workers are zombies under the image that replaced it, which
            # never forked them and may never reap them.
            for p in self.sys.reap_for(gen.pid, gen.left_behind):
                log.warn(f"{gen}: {p}")
        how = describe(gen.exit_status)
        up = self.reloader.upgrade
        if up is not None and up.replacing is gen:
            self.reloader.replacing_exited(gen, how)
        elif prev is State.STARTING and up is not None and up.gen is gen:
            if self.fleet.current is None:  # the last to die says how the server ended
                self.exit_code = _exit_code(gen.exit_status, gen.retired_by_hupt)
            self.reloader.gen_exited(gen, how)
        elif gen.replaced_by is not None:
            # Its root lives on as a newer image: only its other processes ended.
            log.info(f"{gen}: its last processes are gone (its root process runs "
                     f"generation {gen.replaced_by})")
        elif gen.retired_by_hupt or prev is State.FAILED:
            log.info(f"{gen} exited ({how})")
        else:
            log.error(f"{gen} exited on its own ({how})")
        if gen is self.fleet.current:
            self.exit_code = _exit_code(gen.exit_status, gen.retired_by_hupt)
            self.fleet.current = None
            if self.opts.revive and not gen.retired_by_hupt and not self.stopping:
                self.reviver.generation_died(gen)
            elif not self.stopping and self.reloader.upgrade is None and not self._fall_back(gen):
                self.request_stop()
        if gen.pid in self.endpoint.aliases and not any(
                g.alive and g.pid == gen.pid for g in self.fleet.gens):
            self.endpoint.unalias(gen.pid)
        self._release_unused()
        self._old_waiters = [w for w in self._old_waiters if not w.check()]

    def _fall_back(self, dead: Generation) -> bool:
        """The serving generation died on its own: a generation it replaced that
        still drains (paused, alive, once ready) accepts again, rather than
        nothing serving and hupt stopping."""
        for g in reversed(self.fleet.gens):
            if (g.state is State.DRAINING and g.ready_at is not None and g.pids
                    and self.reloader.replacing is not g):
                for p in self.draining.resume(g):
                    log.warn(f"{g}: resuming: {p}")
                g.to(State.SERVING)
                g.drain_deadline = None
                self.fleet.current = g
                self.fleet.last_serving = set(g.listened)
                self.exit_code = None
                log.warn(f"{dead} died while {g} was still draining: rolled back, {g} "
                         "accepts again")
                self.announcer.status(f"serving: {g} (rolled back: {dead} died)")
                return True
        return False

    def _upgrade_over(self, up: Upgrade, ok: bool) -> None:
        if self.reloader.upgrade is not None:
            return  # exec mode: the command started afresh; its own outcome decides
        if ok:
            self._release_unused()
            return
        if self.fleet.current is not None or self.stopping:
            return
        if up.awaiting_command or (self.opts.exec_mode and not self.fleet.command_served):
            self.awaiting_command = True
            self.announcer.status("down: the attached server's command failed; the sockets "
                                  "are held until hupt reload -- CMD ARGS gives it")
            return
        if up.revive or (self.opts.exec_mode and up.fresh):
            # Exec mode: the new image and the command started afresh both
            # failed.  The sockets stay held (clients queue) and the command is
            # tried again, as --revive does, until it serves or hupt is stopped.
            self.reviver.schedule()
            self.announcer.status(f"down: no generation serves ({up.gen or 'none'} failed); "
                                  "starting it again")
        elif not self.reviver.pending:
            self.request_stop()  # nothing serves any more

    def _release_unused(self) -> None:
        if self.reloader.upgrade is not None or self.reviver.pending:
            return  # a starting generation may still bind anything held
        if (self.fleet.current is None and (self.opts.revive or self.opts.exec_mode)
                and not self.stopping):
            return  # held for the generation a revive or a fresh start brings back
        self.fleet.release_unused()

    def _hook_env(self) -> dict[str, str]:
        env = dict(self.opts.env)
        env["HUPT_PID"] = str(os.getpid())
        if self.fleet.current is not None:
            env["HUPT_GENERATION"] = str(self.fleet.current.number)
        return env


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


def _pids(pids: list[int]) -> str:
    return ("pid " if len(pids) == 1 else "pids ") + ", ".join(map(str, pids))


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
