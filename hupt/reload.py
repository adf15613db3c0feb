"""Reloads: the upgrade state machine (hupt/upgrade.py) driven step by step.

Fork mode (the default)::

    request ─► [--before-reload] ─► spawn N+1 (STARTING) ─► listened on all of
    N's addresses ─► --ready policy met ─► N+1 SERVING, N paused + DRAINING
                                  │
          exit / ready timeout ───┴─► N+1 FAILED (drained), N serves on

Exec mode (``hupt run --exec``, ``hupt attach``) keeps the server's PID, so
the two generations cannot overlap::

    request ─► N paused + DRAINING ─► 0 in flight / drain timeout ─► exec N's root
                                                                      │
          exec failed: N resumed, SERVING again ◄─────────────────────┤
                                                                      ▼
                   N+1 (same pid) STARTING ─► listened on all, --ready met ─► SERVING
                                  │
          exit / timeout: the command started afresh (a fork-mode spawn,
          the sockets still held) and the reload fails

--ready http probes the shared socket, so the old generation is paused
while the new one is probed; if no probe succeeds before the ready timeout
it is rolled back (accepts again, its epoll registrations restored).
--revive brings a dead server back through the same path, with the
addresses it held as the target.

Every outcome goes through ``finish``: the upgrade's resources released,
its phase final, the history, the service manager, the waiters, and the
supervisor's reaction (``on_over``: revive, stop, release sockets).
"""

from __future__ import annotations

import functools
import math
import os
import shlex
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from hupt import log
from hupt.address import Address
from hupt.draining import Draining, signal_name
from hupt.errors import HuptError
from hupt.fleet import Fleet, PendingExec
from hupt.generations import Generation, State
from hupt.hooks import Hook, HookRunner
from hupt.loop import Loop
from hupt.metrics import ReloadStats
from hupt.readiness import ReadinessCheck
from hupt.system import Followed, FollowResult
from hupt.upgrade import Phase, ReloadRecord, Upgrade, Waiter

if TYPE_CHECKING:
    from hupt.announce import Announcer
    from hupt.command import Change
    from hupt.options import Options

HISTORY = 20
FOLLOW_POLL = 0.2


class Reloader:
    def __init__(self, fleet: Fleet, draining: Draining, options: Options, loop: Loop,
                 announcer: Announcer, hooks: HookRunner, *, stopping: Callable[[], bool],
                 on_over: Callable[[Upgrade, bool], None]) -> None:
        self.fleet = fleet
        self.draining = draining
        self.opts = options
        self.loop = loop
        self.announcer = announcer
        self.hooks = hooks
        self._stopping = stopping
        self._on_over = on_over
        self.upgrade: Upgrade | None = None
        self.history: list[ReloadRecord] = []
        self.stats = ReloadStats()  # every reload since hupt started (--metrics)

    @property
    def replacing(self) -> Generation | None:
        """Exec mode: the generation draining before its root execs."""
        return self.upgrade.replacing if self.upgrade is not None else None

    # -- requests --------------------------------------------------------------
    def request(self, waiter: Waiter, *, revive: bool = False,
                change: Change | None = None) -> None:
        """Reload; with ``change``, with a changed command (kept if the reload succeeds)."""
        if self.upgrade is not None:
            if change:
                waiter.done(False, f"a reload is in progress ({self.upgrade}): a changed "
                            "command needs a reload of its own; try again once it is over")
                return
            waiter.progress(f"joining the reload already in progress ({self.upgrade})")
            self.upgrade.waiters.append(waiter)
            return
        up = self.upgrade = Upgrade(self.loop.now(), [waiter], revive=revive,
                                    change=change or None)
        if up.change is not None:
            up.tell(f"changing the command: {up.change.describe()}")
        if not revive:  # bringing a crashed server back is no reload to the manager
            self.announcer.reloading()
        if self.opts.before_reload and not revive:
            up.to(Phase.BEFORE)
            up.hook = self.hooks.run("before-reload", self.opts.before_reload,
                                     functools.partial(self._before_done, up))
            up.tell(f"running --before-reload: {self.opts.before_reload}")
            log.info(f"running --before-reload (pid {up.hook.pid})")
            return
        self._launch(up)

    def stop(self) -> None:
        if self.upgrade is not None:
            self._fail(self.upgrade, "hupt is stopping")

    def _before_done(self, up: Upgrade, hook: Hook) -> None:
        if self.upgrade is not up or up.hook is not hook:
            return  # the reload was abandoned meanwhile
        if hook.status == 0:
            up.tell("--before-reload succeeded")
            self._launch(up)
        else:
            self._fail(up, hook.reason())

    def _launch(self, up: Upgrade) -> None:
        """Start the new generation (exec mode: drain the serving one first)."""
        cur = self.fleet.current
        if cur is not None:
            self.fleet.end_startup(cur)
        self.fleet.prune_datagrams()  # before the target is taken from what it listens on
        try:
            # The command now: the env file is read again, the change applied.
            up.launch = self.fleet.launch(up.change)
        except HuptError as e:
            self._fail(up, f"{e}; nothing was started")
            return
        if self.opts.exec_mode and cur is not None:
            self._begin_exec(up, cur)
            return
        try:
            gen = self.fleet.spawn(self.opts.multi, up.launch)
        except HuptError as e:
            self._fail(up, str(e))
            return
        up.to(Phase.LISTENING)
        up.gen = gen
        up.deadline = self.loop.now() + self.opts.ready_timeout
        up.target = set(cur.listened) if cur is not None else set(self.fleet.last_serving)
        msg = f"started {gen}" + (f", waiting for it to listen on {fmt(up.target)}"
                                  if up.target else "")
        log.info(msg)
        up.tell(msg)
        self.check_ready(gen)

    # -- the new generation listens, then meets --ready --------------------------------
    def on_listened(self, gen: Generation, new: list[Address]) -> None:
        up = self.upgrade
        if up is None or up.gen is not gen:
            return
        for addr in new:
            if addr in up.target:
                taken = len(up.target & gen.listened)
                up.tell(f"{gen} listens on {addr}, the held socket ({taken}/{len(up.target)})")

    def check_ready(self, gen: Generation) -> None:
        """Has the starting generation listened on everything?  Then apply --ready."""
        up = self.upgrade
        if (up is None or up.gen is not gen or gen.state is not State.STARTING
                or up.phase is not Phase.LISTENING):
            return
        if up.target and not up.target <= gen.listened:
            return
        if not up.target and not gen.listened and self.fleet.current is not None:
            return
        if any(gen.listens[a] < len(gen.copies) for a in up.target):
            return  # --multi: every copy listens
        policy = self.opts.ready
        up.to(Phase.CONFIRMING)
        if policy.kind == "http":
            # Probes reach the shared socket: only the new generation may answer them.
            old = self.fleet.current
            if old is not None and old.state is State.SERVING:
                # It may accept again (a rollback): paused as one that lives on,
                # sealed as a retiring one only once the probe has succeeded.
                self.draining.pause(old, old.pids, old.pids)
                up.paused_old = old
            up.tell(f"{gen} listened; {old or 'no generation'} paused, probing {policy}")
        elif policy.kind == "delay":
            up.tell(f"{gen} listened; waiting {policy.delay:g} s (--ready {policy})")
        elif policy.kind == "notify":
            up.tell(f"{gen} listened; waiting for READY=1 (--ready notify)")
        up.check = ReadinessCheck(policy, lambda: gen.listened, self.loop,
                                  on_met=functools.partial(self._confirmed, up))
        if gen.sent_ready:
            up.check.notified()
        if up.check.met is not None:
            self._confirmed(up, up.check.met)

    def on_sent_ready(self, gen: Generation) -> None:
        up = self.upgrade
        if up is not None and up.gen is gen and up.check is not None:
            up.check.notified()

    def _confirmed(self, up: Upgrade, how: str) -> None:
        if (self.upgrade is not up or up.phase is not Phase.CONFIRMING or up.gen is None
                or up.gen.state is not State.STARTING):
            return
        if self.opts.ready.kind == "http":
            up.tell(how)
        self._promote(up)

    # -- exec mode ----------------------------------------------------------------------
    def _begin_exec(self, up: Upgrade, old: Generation) -> None:
        # Every process must be paused: workers forked since the last scan too.
        self.fleet.refresh()
        if old.state is not State.SERVING:
            self._fail(up, f"{old} is {old.state.value}, not serving")
            return
        if not self.fleet.still_running({old.pid}):
            self._fail(up, f"exec mode reloads the process hupt started, pid {old.pid}, "
                       "which has exited (did the server daemonize?)")
            return
        assert up.launch is not None
        try:
            path = self.fleet.program(up.launch)
        except HuptError as e:
            self._fail(up, f"cannot exec: {e}")
            return
        up.to(Phase.DRAINING)
        up.replacing, up.target = old, set(old.listened)
        old.lives_on = {old.pid}
        problems = self.draining.pause(old, old.pids, old.lives_on)
        if problems:
            # It may still accept: an exec now would cut what it accepts meanwhile.
            for p in self.draining.resume(old):
                log.warn(f"{old}: resuming: {p}")
            old.lives_on = set()
            up.replacing = None
            self._fail(up, f"{old} could not stop accepting ({'; '.join(problems)}); "
                       "nothing was execed")
            return
        sig = self.opts.drain_signal
        if sig is not None:
            # Followed before its other processes get the drain signal: a master that
            # exits with its last worker (haproxy -W) would be gone before it is.
            try:
                up.follow = self.fleet.follow_exit(old, path, up.launch)
            except HuptError as e:
                log.warn(f"{old}: its exit cannot be followed ({e}); it drains without "
                         f"{signal_name(sig)} and execs once drained")
        self.draining.start_draining(old)
        if up.follow is not None:
            self.draining.signal_root(old)
            msg = (f"{old} stopped accepting; sent {signal_name(sig or 0)}: its exit "
                   f"becomes the exec of {path}")
        else:
            msg = f"{old} stopped accepting; draining it before it execs {path}"
        log.info(msg)
        up.tell(msg)
        # Connections queue from now on: exec at once if nothing is in flight
        # (unless the server is on its way out by itself).
        if up.follow is None and self.draining.drained_now(old):
            self.exec(old)

    def exec(self, old: Generation) -> None:
        """``old`` is drained (or must go now): make its root execve the program again."""
        up = self.upgrade
        assert up is not None and up.replacing is old
        if up.follow is not None:
            # Its exit is followed: let go of it first (an exec already under way
            # in the kernel finishes instead, and is the outcome).
            pending, up.follow = up.follow, None
            got = self.fleet.exit_followed(old, pending, let_go=True)
            if got is None or got.outcome is not Followed.RELEASED:
                up.follow, up.exit_deadline = pending, math.inf
                if got is not None:
                    self._followed(up, old, pending, got)
                return
        assert up.launch is not None  # set before anything was paused
        try:
            path = self.fleet.program(up.launch)
            gen = self.fleet.exec_in_place(old, path, up.launch)
        except HuptError as e:
            self._exec_failed(up, old, f"{old} could not exec the program: {e}")
            return
        self._execed(up, old, gen, path)

    def _execed(self, up: Upgrade, old: Generation, gen: Generation, path: str) -> None:
        """``old``'s root runs ``path`` as ``gen``: wait for it to listen and be ready."""
        up.to(Phase.LISTENING)
        up.gen, up.replacing = gen, None
        up.deadline = self.loop.now() + self.opts.ready_timeout
        if self.fleet.current is old:
            self.fleet.current = None  # until the new image is ready
        msg = (f"pid {old.pid} execed {path}: {gen}"
               + (f", waiting for it to listen on {fmt(up.target)}" if up.target else ""))
        log.info(msg)
        up.tell(msg)
        old.drain_over(self.loop.now(), "exited", len(old.connections_seen))
        if old.pids:
            self.draining.retire(old, f"its root process runs {gen}; retiring its other processes")
        else:
            old.exited(self.loop.now())
            self.fleet.bury(old)
        self.check_ready(gen)

    def drained(self, gen: Generation, why: str, timed_out: bool) -> bool:
        """A drain ended: True if it was the drain before an exec (which happens now)."""
        up = self.upgrade
        if up is None or up.replacing is not gen:
            return False
        if up.follow is not None and not timed_out:
            # Nothing in flight: the server exits any moment now, by itself.
            if up.exit_deadline == math.inf:
                up.exit_deadline = self.loop.now() + self.opts.kill_timeout
            return True
        if timed_out:
            log.warn(f"{gen}: {why}: execing anyway")
        self.exec(gen)
        return True

    def poll_follow(self) -> None:
        """A followed root may have stopped (SIGCHLD, or the poll timer): handle it."""
        up = self.upgrade
        if up is None or up.follow is None or up.replacing is None:
            return
        got = self.fleet.exit_followed(up.replacing, up.follow)
        if got is not None:
            self._followed(up, up.replacing, up.follow, got)

    def _followed(self, up: Upgrade, old: Generation, pending: PendingExec,
                  got: FollowResult) -> None:
        up.follow = None
        up.exit_deadline = math.inf
        if got.outcome is Followed.EXECED:
            gen = self.fleet.execed(old, pending)
            up.tell(f"{old} finished draining and exited: {got.detail}")
            self._execed(up, old, gen, pending.path)
        elif got.outcome is Followed.RELEASED:
            log.warn(f"{old}: {got.detail}; execing it")
            self.exec(old)
        else:
            # The root exits after all: the sockets stay held, the command starts afresh.
            if self.fleet.current is old:
                self.fleet.current = None
            self._start_afresh(up, f"{old} could not exec at its exit: {got.detail}")

    def replacing_exited(self, gen: Generation, how: str) -> None:
        """The generation draining before its exec exited without exec'ing."""
        up = self.upgrade
        if up is None or up.replacing is not gen:
            return
        if up.follow is not None:
            self.poll_follow()
            if self.upgrade is not up or up.replacing is not gen:
                return  # the follow's outcome was handled
            self.fleet.exit_followed(gen, up.follow, let_go=True)
            up.follow = None
        if self.fleet.current is gen:
            self.fleet.current = None
        reason = f"{gen} exited ({how}) before its exec"
        sig = self.opts.drain_signal
        if sig is not None and how == f"killed by {signal_name(sig)}":
            # Death by a signal is no exit_group: nothing to turn into the exec.
            reason += (f"; it died of its --drain-signal {signal_name(sig)} (raised again "
                       "after its graceful stop, as uvicorn does): run it in exec mode "
                       "without --drain-signal")
        self._start_afresh(up, reason)

    def drain_slow(self, gen: Generation, message: str) -> None:
        """Exec mode: the drain the reload waits for is slow; its waiters hear why."""
        up = self.upgrade
        if up is not None and up.replacing is gen:
            up.tell(message)

    def _exec_failed(self, up: Upgrade, old: Generation, reason: str) -> None:
        for p in self.draining.resume(old):
            log.warn(f"{old}: could not accept again: {p}")
        old.to(State.SERVING)
        old.drain_deadline = None
        log.error(f"reload failed: {reason}; {old} accepts again")
        self.finish(up, False, reason)

    def _start_afresh(self, up: Upgrade, reason: str) -> None:
        """The exec'd image failed, or the root exited instead of exec'ing: start
        the command as a new process, the sockets still held."""
        failed = up.gen
        up.replacing = None
        if failed is not None and failed.state is State.STARTING:
            failed.to(State.FAILED)
            if failed.pids:
                self.draining.drain(failed)
        if not self.fleet.command_served:
            # Attached with a command line that never served: starting it again
            # would fail the same way.  The sockets stay held (clients queue)
            # until an operator gives the command (hupt reload -- CMD ARGS).
            up.awaiting_command = True
            self._fail(up, f"{reason}; not started again: `{shlex.join(self.opts.argv)}` "
                       "has never served under hupt (recorded at attach); the sockets "
                       "stay held: give the server's command with hupt reload "
                       f"{os.getpid()} -- CMD ARGS...")
            return
        try:
            fresh = self.fleet.spawn()
        except HuptError as e:
            up.fresh = True  # a failed fresh start: the sockets stay held, it is tried again
            self._fail(up, f"{reason}; starting the command afresh failed: {e}")
            return
        now = self.loop.now()
        nxt = Upgrade(now, [], fresh=True, target=set(up.target), gen=fresh)
        nxt.to(Phase.LISTENING)
        nxt.deadline = now + self.opts.ready_timeout
        msg = f"{reason}; started the command afresh as {fresh}"
        log.error(f"reload failed: {msg}")
        self.upgrade = nxt
        # The manager hears READY=1 when the fresh one is ready (or fails).
        self.finish(up, False, msg, tell_manager=False)

    # -- the end -----------------------------------------------------------------------------
    def gen_exited(self, gen: Generation, how: str) -> None:
        """The upgrade's new generation exited before it was ready."""
        up = self.upgrade
        if up is None or up.gen is not gen:
            return
        reason = f"{gen} exited ({how}) before it was ready"
        self._stderr_tail(up, gen)
        if self.opts.exec_mode and not up.fresh and self.fleet.was_execed(gen):
            self._start_afresh(up, reason)
        else:
            self._fail(up, reason)

    def _promote(self, up: Upgrade) -> None:
        """The starting generation is ready: it serves, the old one drains."""
        gen = up.gen
        assert gen is not None
        now = self.loop.now()
        gen.to(State.SERVING)
        gen.ready_at = now
        self.fleet.end_startup(gen)
        old, self.fleet.current = self.fleet.current, gen
        self.fleet.last_serving = set(gen.listened)
        self.fleet.command_served = True  # the command (with a change: kept) serves
        msg = f"{gen} is ready in {(now - gen.started_at) * 1000:.0f} ms"
        log.ok(msg)
        up.tell(msg)
        if old is not None and old.state is State.SERVING:
            if up.paused_old is old:
                self.draining.seal(old)
                self.draining.start_draining(old)
            else:
                self.draining.drain(old)
            n = self.draining.in_flight(old)
            up.tell(f"{old} stopped accepting; draining {'?' if n is None else n} in flight")
        self.finish(up, True, msg)

    def _fail(self, up: Upgrade, reason: str) -> None:
        self._release(up)
        old = up.paused_old
        if old is not None and old.state is State.SERVING:
            # Roll back: the old generation accepts again, exactly as it did.
            for p in self.draining.resume(old):
                log.warn(f"{old}: resuming: {p}")
            up.tell(f"rolled back: {old} accepts again")
        log.error(f"reload failed: {reason}; {self.fleet.current or 'no generation'} "
                  "keeps serving")
        gen = up.gen
        if gen is not None and gen.state is State.STARTING:
            gen.to(State.FAILED)
            if gen.alive and gen.pids:
                self.draining.drain(gen)
        self.finish(up, False, reason)

    def _release(self, up: Upgrade) -> None:
        if up.follow is not None and up.replacing is not None:
            # hupt stops (or the reload is abandoned): the server exits as it meant to.
            self.fleet.exit_followed(up.replacing, up.follow, let_go=True)
            up.follow = None
        if up.check is not None:
            up.check.close()
        if up.hook is not None and up.hook.status is None:
            up.hook.kill()

    def finish(self, up: Upgrade, ok: bool, reason: str, *, tell_manager: bool = True) -> None:
        """Every outcome of an upgrade ends here."""
        self._release(up)
        reason = self._settle_change(up, ok, reason)
        up.to(Phase.DONE if ok else Phase.FAILED)
        if self.upgrade is up:
            self.upgrade = None
        took, at = self.loop.now() - up.started_at, time.time()
        self.history.append(ReloadRecord(at, took * 1000, ok, reason,
                                         up.gen.number if up.gen is not None else None))
        del self.history[:-HISTORY]
        self.stats.record(ok, took, at, revive=up.revive)
        if ok:
            assert up.gen is not None
            self.announcer.serving(up.gen)
        elif tell_manager and not self._stopping() and not up.revive:
            # The manager waits for the end of its RELOADING=1 (STOPPING=1 was said already).
            self.announcer.reload_failed(reason)
        self._on_over(up, ok)
        if up.details:
            for w in up.waiters:
                w.add_details(up.details)
        if ok and self.opts.after_reload and not up.revive:
            self.hooks.run("after-reload", self.opts.after_reload,
                           functools.partial(self._after_done, up.waiters, reason))
            up.tell(f"running --after-reload: {self.opts.after_reload}")
            return
        for w in up.waiters:
            w.done(ok, reason)

    def _settle_change(self, up: Upgrade, ok: bool, reason: str) -> str:
        """A changed command is the command from now on if the reload succeeded;
        otherwise it is dropped, and the reason says so."""
        change, up.change = up.change, None
        if change is None:
            return reason
        if ok:
            self.fleet.commit(change)
            return f"{reason}; the command is changed ({change.describe()})"
        log.warn(f"the command change ({change.describe()}) is not kept: the reload failed")
        return f"{reason}; the command is unchanged"

    def _after_done(self, waiters: list[Waiter], reason: str, hook: Hook) -> None:
        if hook.status != 0:  # reported, not fatal: the new generation serves
            log.warn(hook.reason())
            for w in waiters:
                w.progress(hook.reason())
            reason += f"; {hook.reason()}"
        for w in waiters:
            w.done(True, reason)

    # -- timers ------------------------------------------------------------------------------
    def deadline(self) -> float:
        up = self.upgrade
        if up is None:
            return float("inf")
        out = up.deadline if up.timed else float("inf")
        if up.follow is not None:  # SIGCHLD says when it stops; the poll is a safety net
            out = min(out, up.exit_deadline, up.follow_polled_at + FOLLOW_POLL)
        if up.phase is Phase.CONFIRMING and up.check is not None:
            out = min(out, up.check.deadline())
        return out

    def tick(self, now: float) -> None:
        up = self.upgrade
        if up is not None and up.follow is not None and up.replacing is not None:
            old = up.replacing
            up.follow_polled_at = now
            self.poll_follow()
            if up.follow is not None and now >= up.exit_deadline:
                log.warn(f"{old} drained but did not exit {self.opts.kill_timeout:g} s later: "
                         "execing it")
                self.exec(old)
        up = self.upgrade
        if up is not None and up.phase is Phase.CONFIRMING and up.check is not None:
            up.check.tick(now)  # may promote
        up = self.upgrade
        if up is None or not up.timed or now < up.deadline:
            return
        missing = up.target - (up.gen.listened if up.gen else set())
        why = f"{up.gen} was not ready after {self.opts.ready_timeout:g} s"
        if missing:
            why += f": it did not listen on {fmt(missing)}"
        elif up.phase is Phase.CONFIRMING:
            why += f": --ready {self.opts.ready} not satisfied"
            if up.check is not None and up.check.last_probe:
                why += f" (last probe: {up.check.last_probe})"
        if up.gen is not None:
            self._stderr_tail(up, up.gen)
        if (self.opts.exec_mode and not up.fresh and up.gen is not None
                and self.fleet.was_execed(up.gen)):
            self._start_afresh(up, why)
        else:
            self._fail(up, why)

    def _stderr_tail(self, up: Upgrade, gen: Generation) -> None:
        """The reload fails because of ``gen``: its waiters get its last lines on stderr."""
        lines = self.fleet.stderr_tail(gen)
        if lines is not None:
            up.details["stderr"] = {"generation": gen.number, "pid": gen.pid, "lines": lines}


def fmt(addresses: Iterable[Address]) -> str:
    return ", ".join(sorted(str(a) for a in addresses))
