"""Facts about syscall-stops, and how a server's last ``exit_group`` becomes its ``execve``.

Exec mode keeps the server's PID: the new code must run in the process that
ran the old code.  A server given its graceful-stop signal (--drain-signal)
finishes its requests, closes its persistent connections at a request
boundary and exits.  ``ExitToExec`` follows every thread of the root process
through syscall-stops while it drains and, at the entry of its final
``exit_group``, makes that thread run ``execve`` instead: the same PID runs the
new program as soon as the old one is done, and its parent (systemd, a shell,
hupt) never sees an exit.  Tracing lasts the drain only; before it and after
it the server runs untraced (each syscall-stop costs the traced thread two
context switches to hupt and back: the traced server is much slower while it
lasts, see bench/).

What the kernel makes us do, and why:

- Syscall-stops only happen to a thread resumed with PTRACE_SYSCALL, and a
  thread can only be resumed from a ptrace-stop: every thread is seized,
  interrupted, and resumed with PTRACE_SYSCALL.  A thread interrupted inside a
  blocking syscall restarts it on the way out of its interrupt stop (the
  kernel's signal path, as for ``inject.Tracee``); the restart reaches
  syscall-entry again.
- Threads appear while the server drains (Go starts Ms, thread pools grow):
  PTRACE_O_TRACECLONE makes the kernel seize each new thread, which starts
  in a PTRACE_EVENT_STOP; its parent reports PTRACE_EVENT_CLONE with the new
  TID.  A thread exiting on its own (``exit``, not ``exit_group``) is reaped
  here with __WALL: only its tracer can release it.  Processes the server
  forks are not followed (no TRACEFORK): their exits are not what execs.
- Go calls ``exit_group`` from whichever thread runs ``os.Exit``, mostly not
  the leader.  execve from a non-leader thread is fine: the kernel kills the
  other threads and gives the execing thread the leader's TID; the tracer
  sees PTRACE_EVENT_EXEC reported under the process ID, not under the TID
  the thread had.
- execve waits (de_thread) until every other thread is dead, and a traced
  thread's death waits until its tracer reaps it.  A synchronous wait for
  the exec would deadlock; the exec is started and the loop goes on reaping
  what dies until PTRACE_EVENT_EXEC arrives.  Threads stopped in a
  syscall-stop that we hold (another ``exit_group``, any syscall once the
  exec started) are woken by the kernel's SIGKILL.
- Which stop is which: PTRACE_GET_SYSCALL_INFO says entry or exit and the
  syscall number, without guessing from rax (-ENOSYS at entry).  At a
  syscall-entry-stop, changing orig_rax and the argument registers makes the
  kernel run a different syscall (seccomp filters run after the entry-stop
  and judge the new one).  To run another syscall from the exit-stop, rip is
  moved back onto the ``syscall`` instruction just executed (rip - 2, always
  there) with rax = the number: the thread enters it again at once.  A
  syscall we run never returns a restart code, so the kernel never rewinds
  over us.
- Signals: while hupt only watches, every signal-delivery-stop is passed on
  (the server's own SIGURG, SIGCHLD, timers: its drain depends on them).
  Once the exit is caught, the execing thread blocks every signal
  (PTRACE_SETSIGMASK); a signal already pending then is checked: execve
  resets caught signals to their default action and keeps them pending, so a
  pending SIGTERM would kill the new image at once.  A pending request to end
  (TERM, INT, QUIT, HUP...) means someone wants the process gone: hupt lets
  the exit happen instead.  Signals of the old image's own machinery (SIGIO,
  timers, USR1/USR2, real-time ones: nginx's master had SIGIO pending at one
  exit in three) are discarded: setting an action to SIG_IGN drops a pending
  signal, and the default action is put back right after.  After the exec the mask is set
  to empty, the mask a freshly started program has.
- Group-stops (SIGSTOP to the server) are left in effect with PTRACE_LISTEN.
- File descriptors: node (libuv) marks fds 0-15 close-on-exec, stdio
  included; everything >= 3 is marked close-on-exec (the new image binds and
  is handed the held sockets through the seccomp filter), stdio is cleared.
- Memory for the exec strings: a fresh anonymous mapping (``mmap``), never
  the stack: Go runs on small heap-allocated goroutine stacks, and nginx
  overwrote its argv and environ in place, so what was recorded at start is
  what gets execed.
- Safety: PTRACE_SEIZE without PTRACE_O_EXITKILL.  If hupt dies at any
  moment, the kernel detaches every thread, and the server exits as it meant
  to.  A seccomp filter on ``exit_group`` would not give that: without its
  tracer or listener it fails the syscall with ENOSYS, forever, and a Go
  server whose ``os.Exit`` returned hangs serving nothing.
- A failed execve returns to its exit-stop with -errno: the thread is put
  back on its ``exit_group`` with the status it asked for, and exits.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from enum import Enum

from hupt.errors import AccessDenied, HuptError, KernelError, NoSuchProcess
from hupt.tracer import procfs
from hupt.tracer import ptrace as pt
from hupt.tracer.abi import (
    CLOSE_RANGE_CLOEXEC,
    CLOSE_RANGE_MAX_FD,
    F_SETFD,
    KERNEL_SIGACTION,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    PTRACE_EVENT_CLONE,
    PTRACE_EVENT_EXEC,
    PTRACE_O_TRACECLONE,
    PTRACE_O_TRACEEXEC,
    PTRACE_O_TRACESYSGOOD,
    SIG_DFL,
    SIG_IGN,
    SYS,
    SYSCALL_INSN,
)
from hupt.tracer.inject import MAX_ERRNO, PAGE, syscall_result
from hupt.tracer.ptrace import Regs, StopKind

OPTIONS = PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC
_ALL_SIGNALS = pt.U64
# Signals whose default action does not end the process: ignored, or stop/continue.
_HARMLESS = frozenset({signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,
                       signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
# Signals of the old image's own machinery (I/O readiness, timers, its own
# notifications): pending at its exit they meant nothing to the new image, and
# are discarded.  A pending request to end (TERM, INT, QUIT, HUP...) is not:
# someone wants the process gone, and the exit goes through instead.
_STALE = frozenset({signal.SIGIO, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF,
                    signal.SIGPIPE, signal.SIGUSR1, signal.SIGUSR2,
                    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1)})


class Phase(Enum):
    NEW = "new"
    WATCHING = "watching"  # every thread under syscall tracing, waiting for exit_group
    EXECING = "execing"  # execve started in one thread; the others die and are reaped
    EXITING = "exiting"  # the process exits after all (a failed exec, a pending signal)
    OVER = "over"  # nothing of ours left in the process


class Outcome(Enum):
    EXECED = "execed"  # the same PID runs the new program, untraced
    EXITED = "exited"  # the process is gone (it crashed, or exited without exit_group...)
    EXEC_FAILED = "exec failed"  # execve failed: the process exited with its own status
    RELEASED = "released"  # hupt let go (``release``): the server runs on untraced


@dataclass(frozen=True)
class Report:
    outcome: Outcome
    detail: str
    exec_errno: int = 0


@dataclass
class _Thread:
    tid: int
    stopped: bool = False  # in a ptrace-stop we saw and did not resume


@dataclass
class _Exec:
    """The thread that called exit_group, and what it needs to get back to it."""

    tid: int
    at_entry: Regs  # its registers at the exit_group syscall-entry-stop
    status: int
    mask: int
    started: float = 0.0
    notes: list[str] = field(default_factory=list)


class ExitToExec:
    """The root process of a draining generation, traced until its exit becomes an exec."""

    def __init__(self, pid: int, path: bytes, argv: Sequence[bytes], envp: Sequence[bytes], *,
                 cwd: bytes | None = None, timeout: float = 5.0) -> None:
        # Built now, so that a NUL byte is refused before anything is touched.
        from hupt.tracer.accepting import exec_image

        exec_image(0, path, argv, envp)
        if cwd is not None and b"\0" in cwd:
            raise ValueError("a directory cannot contain NUL bytes")
        self.pid = pid
        self._path, self._argv, self._envp = path, list(argv), list(envp)
        self._cwd = cwd  # entered (chdir) just before the execve: hupt run --chdir
        self.timeout = timeout
        self.phase = Phase.NEW
        self._threads: dict[int, _Thread] = {}
        self._our_child = False
        self._exec: _Exec | None = None
        self._report: Report | None = None
        self.stops = 0  # syscall-stops handled (the cost of the traced window)

    # --- arming -------------------------------------------------------------------------

    def arm(self) -> None:
        """Seize every thread and put it under syscall tracing (bounded by ``timeout``).

        On failure every thread seized so far is let go again and HuptError raised.
        """
        if self.phase is not Phase.NEW:
            raise RuntimeError(f"cannot arm while {self.phase.value}")
        self._our_child = procfs.ppid_of(self.pid) == os.getpid()
        self.phase = Phase.WATCHING
        # A thread found dead when seized is not tried again: a zombie (a root that
        # exited before it could be followed) stays listed in /proc/PID/task.
        dead: set[int] = set()
        try:
            while True:
                fresh = [t for t in procfs.threads(self.pid)
                         if t not in self._threads and t not in dead]
                if not fresh:
                    break
                for tid in fresh:
                    if not self._seize(tid):
                        dead.add(tid)
                for tid in fresh:
                    if tid in self._threads:
                        self._first_stop(self._threads[tid])
            if not self._threads:
                raise NoSuchProcess(errno.ESRCH, "seize", f"process {self.pid} has no thread")
        except BaseException:
            self.release()
            raise

    def _seize(self, tid: int) -> bool:
        """Seize ``tid``; False if it is gone (exited, or a zombie)."""
        try:
            pt.seize(tid, OPTIONS)
        except NoSuchProcess:
            return False
        except AccessDenied:
            if _is_dead(tid):
                return False
            if procfs.tracer_pid(tid) == os.getpid():
                # Cloned by a thread seized a moment ago: the kernel seized it for us,
                # and its parent's PTRACE_EVENT_CLONE is still to come.
                self._threads[tid] = _Thread(tid)
                return True
            raise
        self._threads[tid] = _Thread(tid)
        with suppress(NoSuchProcess):
            pt.interrupt(tid)
        return True

    def _first_stop(self, th: _Thread) -> None:
        """Wait for the interrupt stop of a freshly seized thread, then start tracing it."""
        deadline = time.monotonic() + self.timeout
        while True:
            stop = pt.waitstop(th.tid, max(0.0, deadline - time.monotonic()),
                               reap_exit=self._may_reap(th.tid))
            if stop.kind is StopKind.EXITED:
                del self._threads[th.tid]
                return
            th.stopped = True
            self._handle(th, stop)
            if not th.stopped or th.tid not in self._threads:
                return

    # --- the loop's side: non-blocking -------------------------------------------------------

    def pump(self) -> Report | None:
        """Handle every stop pending now; the final report once, when nothing is traced."""
        if self.over:
            report, self._report = self._report, None
            return report
        progress = True
        while progress and not self.over:
            progress = False
            # Held threads are polled too: the exec's SIGKILL turns their stop into an
            # exit that only we can reap, and the exec waits for that.
            for th in list(self._threads.values()):
                if th.tid not in self._threads or self.over:
                    continue
                try:
                    stop = pt.poll_stop(th.tid, reap_exit=self._may_reap(th.tid))
                except HuptError:
                    continue
                if stop is None:
                    continue
                progress = True
                if stop.kind is StopKind.EXITED:
                    del self._threads[th.tid]
                    continue
                th.stopped = True
                try:
                    self._handle(th, stop)
                except NoSuchProcess:
                    th.stopped = False  # dying: the next poll collects its exit
            if not self._threads and not self.over:
                during = " during its exec" if self.phase is Phase.EXECING else ""
                self._finish(self._report or Report(Outcome.EXITED,
                                                    f"process {self.pid} exited{during}"))
        if self.over:
            report, self._report = self._report, None
            return report
        return None

    @property
    def over(self) -> bool:
        return self.phase is Phase.OVER

    def _handle(self, th: _Thread, stop: pt.Stop) -> None:
        """One stop of a thread we trace: resume it, hold it, or turn its exit into an exec."""
        if self.phase is Phase.EXECING:
            if stop.kind is StopKind.EVENT and stop.event == PTRACE_EVENT_EXEC:
                self._execed(stop.tid)
                return
            if self._exec is not None and th.tid == self._exec.tid \
                    and stop.kind is StopKind.SYSCALL:
                self._exec_returned(th)
                return
            if stop.kind is StopKind.SIGNAL and self._exec is not None \
                    and th.tid == self._exec.tid:
                self._resume(th, stop.sig, syscalls=True)  # SIGKILL only: the mask blocks the rest
            return  # any other thread: held until the exec kills it
        if stop.kind is StopKind.SYSCALL and self.phase is Phase.WATCHING:
            self.stops += 1
            info = pt.syscall_info(th.tid)
            if info.entry and info.nr == SYS.exit_group:
                self._caught(th, int(info.args[0]))
                return
            self._resume(th)
        elif stop.kind is StopKind.SIGNAL:
            self._resume(th, stop.sig)  # the server's own signals go through
        elif stop.kind is StopKind.EVENT and stop.event == PTRACE_EVENT_CLONE:
            new = pt.geteventmsg(th.tid)
            self._resume(th)
            self._adopt(new)
        elif stop.kind is StopKind.EVENT and stop.event == PTRACE_EVENT_EXEC:
            # The server execed by itself: that image is not ours to follow.
            self._report = Report(Outcome.RELEASED, f"process {self.pid} execed by itself")
            self._release_all()
        elif stop.kind is StopKind.GROUP:
            with suppress(NoSuchProcess):
                pt.listen(th.tid)
            th.stopped = False
        else:  # an interrupt or other event stop: go on
            self._resume(th)

    def _resume(self, th: _Thread, sig: int = 0, *, syscalls: bool | None = None) -> None:
        trace = self.phase is Phase.WATCHING if syscalls is None else syscalls
        try:
            (pt.syscall if trace else pt.cont)(th.tid, sig)
            th.stopped = False
        except NoSuchProcess:
            th.stopped = False  # dying: its exit is collected by the next poll

    def _adopt(self, tid: int) -> None:
        """A thread the kernel seized for us at a clone (it starts in an event stop)."""
        if tid in self._threads:
            return
        try:
            same = procfs.tgid_of(tid) == self.pid
        except HuptError:
            same = True  # gone already; its exit is reaped below
        self._threads[tid] = _Thread(tid)
        if not same:  # a clone that is not a thread (no CLONE_THREAD, no SIGCHLD)
            with suppress(HuptError):
                pt.waitstop(tid, self.timeout)
                pt.detach(tid)
            del self._threads[tid]

    def _may_reap(self, tid: int) -> bool:
        # The leader's exit status belongs to its parent; hupt reaps its own children elsewhere.
        return tid != self.pid or not self._our_child

    # --- the exit, caught -----------------------------------------------------------------

    def _caught(self, th: _Thread, status: int) -> None:
        """``th`` is at the entry of exit_group(status): make it execve instead."""
        regs = pt.getregs(th.tid)
        mask = pt.getsigmask(th.tid)
        pt.setsigmask(th.tid, _ALL_SIGNALS)
        ex = self._exec = _Exec(th.tid, regs, status, mask, started=time.monotonic())
        pending = self._fatal_pending(th.tid)
        stale = pending & sum(pt.sigbit(s) for s in _STALE)
        if pending & ~stale:
            self._let_exit(th, f"{signal_names(pending & ~stale)} pending: an exec would "
                               "die of it")
            return
        try:
            self._prepare_exec(th, ex, stale)
        except HuptError as e:
            self._let_exit(th, f"preparing the exec failed: {e}")
            return
        # From now on every other thread is held at its next stop; the exec's
        # SIGKILL wakes it to die.
        self.phase = Phase.EXECING
        self._resume(th, syscalls=True)

    def _prepare_exec(self, th: _Thread, ex: _Exec, stale: int) -> None:
        """Run the syscalls before the execve in ``th``; leave it at the execve's entry."""
        from hupt.tracer.accepting import exec_image

        entry = ex.at_entry
        for fd in (0, 1, 2):
            self._run(th, entry, SYS.fcntl, fd, F_SETFD, 0)  # EBADF for a closed one is fine
        res = self._run(th, entry, SYS.close_range, 3, CLOSE_RANGE_MAX_FD, CLOSE_RANGE_CLOEXEC)
        if res < 0:
            raise KernelError(-res, "close_range(CLOSE_RANGE_CLOEXEC)", f"thread {th.tid}")
        size = len(exec_image(0, self._path, self._argv, self._envp)[0])
        cwd = self._cwd
        extra = 3 * KERNEL_SIGACTION.size + (len(cwd) + 1 if cwd is not None else 0)
        length = max(PAGE, -(-(size + 8 + extra) // PAGE) * PAGE)
        addr = self._run(th, entry, SYS.mmap, 0, length, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1 & pt.U64, 0)
        if -MAX_ERRNO <= pt.signed(addr) < 0:
            raise KernelError(-pt.signed(addr), "mmap", f"thread {th.tid}")
        blob, path_addr, argv_addr, envp_addr = exec_image(addr, self._path, self._argv,
                                                           self._envp)
        with procfs.Memory(th.tid) as mem:
            mem.write(addr, blob)
            if stale:
                self._discard(th, entry, mem, addr + -(-len(blob) // 8) * 8, stale)
            if cwd is not None:
                # No way back is needed: if the exec fails, the process exits as it meant to.
                at = addr + -(-len(blob) // 8) * 8 + 3 * KERNEL_SIGACTION.size
                mem.write(at, cwd + b"\0")
                res = self._run(th, entry, SYS.chdir, at)
                if res < 0:
                    raise KernelError(-res, f"chdir {os.fsdecode(cwd)}", f"thread {th.tid}")
        late = self._fatal_pending(th.tid)
        if late:
            raise KernelError(errno.EAGAIN, "exec", f"{signal_names(late)} pending")
        self._to_entry(th, entry)
        pt.setregs(th.tid, entry.replace(orig_rax=SYS.execve, rdi=path_addr, rsi=argv_addr,
                                         rdx=envp_addr))

    def _discard(self, th: _Thread, entry: Regs, mem: procfs.Memory, at: int,
                 signals: int) -> None:
        """Discard these pending signals: setting a signal's action to SIG_IGN drops it
        from every pending set (POSIX).  Then the default action again, unless it was
        ignored already (an ignored signal stays ignored across execve)."""
        ign, dfl, old = at, at + KERNEL_SIGACTION.size, at + 2 * KERNEL_SIGACTION.size
        mem.write(ign, KERNEL_SIGACTION.pack(SIG_IGN, 0, 0, 0))
        mem.write(dfl, KERNEL_SIGACTION.pack(SIG_DFL, 0, 0, 0))
        for sig in range(1, 65):
            if not signals & pt.sigbit(sig):
                continue
            res = self._run(th, entry, SYS.rt_sigaction, sig, ign, old, 8)
            if res < 0:
                raise KernelError(-res, f"rt_sigaction({sig}, SIG_IGN)", f"thread {th.tid}")
            if KERNEL_SIGACTION.unpack(mem.read(old, KERNEL_SIGACTION.size))[0] != SIG_IGN:
                self._run(th, entry, SYS.rt_sigaction, sig, dfl, 0, 8)

    def _run(self, th: _Thread, entry: Regs, nr: SYS, *args: int) -> int:
        """From a syscall-stop of ``th``, run ``nr(*args)``; it ends at that syscall's exit-stop."""
        self._to_entry(th, entry)
        a = (*args, 0, 0, 0, 0, 0, 0)[:6]
        pt.setregs(th.tid, entry.replace(orig_rax=nr, rdi=a[0], rsi=a[1], rdx=a[2], r10=a[3],
                                         r8=a[4], r9=a[5]))
        pt.syscall(th.tid)
        self._wait_syscall(th, entry=False)
        value = syscall_result(pt.getregs(th.tid).rax)
        return value

    def _to_entry(self, th: _Thread, entry: Regs) -> None:
        """Be at a syscall-entry-stop: from an exit-stop, enter ``getpid`` again at the same
        ``syscall`` instruction (the one the thread came in through)."""
        info = pt.syscall_info(th.tid)
        if info.entry:
            return
        pt.setregs(th.tid, entry.replace(rax=SYS.getpid, rip=entry.rip - len(SYSCALL_INSN)))
        pt.syscall(th.tid)
        self._wait_syscall(th, entry=True)

    def _wait_syscall(self, th: _Thread, *, entry: bool) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            stop = pt.waitstop(th.tid, max(0.0, deadline - time.monotonic()),
                               reap_exit=self._may_reap(th.tid))
            if stop.kind is StopKind.EXITED:
                self._threads.pop(th.tid, None)
                raise NoSuchProcess(errno.ESRCH, "exec", f"thread {th.tid} exited")
            if stop.kind is StopKind.SYSCALL:
                if pt.syscall_info(th.tid).entry == entry:
                    return
                raise KernelError(errno.EPROTO, "exec", f"thread {th.tid}: unexpected "
                                  f"syscall-{'exit' if entry else 'entry'}-stop")
            # Only SIGKILL and SIGSTOP get past the mask: hold nothing, go on.
            pt.syscall(th.tid, stop.sig if stop.kind is StopKind.SIGNAL else 0)

    def _fatal_pending(self, tid: int) -> int:
        """Pending signals (thread and process) that would kill a fresh image."""
        try:
            thread = procfs.status_fields(tid)
            proc = procfs.status_fields(self.pid)
        except HuptError:
            return 0
        pending = int(thread.get("SigPnd", "0"), 16) | int(proc.get("ShdPnd", "0"), 16)
        ignored = int(proc.get("SigIgn", "0"), 16)
        harmless = sum(pt.sigbit(s) for s in _HARMLESS)
        return pending & ~ignored & ~harmless

    def _let_exit(self, th: _Thread, why: str, err: int = 0) -> None:
        """Back to the exit_group the thread asked for, untouched; the process exits."""
        ex = self._exec
        assert ex is not None
        try:
            info = pt.syscall_info(th.tid)
            if info.entry:
                pt.setregs(th.tid, ex.at_entry)
            else:
                pt.setregs(th.tid, ex.at_entry.replace(rax=SYS.exit_group,
                                                       rip=ex.at_entry.rip - len(SYSCALL_INSN)))
            pt.setsigmask(th.tid, ex.mask)
        except HuptError as e:
            why += f" (restoring its exit: {e})"
        self.phase = Phase.EXITING
        self._report = Report(Outcome.EXEC_FAILED, why, err)
        self._release_all()

    def _exec_returned(self, th: _Thread) -> None:
        """The execve's exit-stop: it failed (success reports PTRACE_EVENT_EXEC instead)."""
        ex = self._exec
        assert ex is not None
        rval = pt.syscall_info(th.tid).rval
        if rval >= 0:  # cannot happen for execve; treat as a failure to be safe
            rval = -errno.EPROTO
        err = -rval
        self._let_exit(th, f"execve {os.fsdecode(self._path)} failed: {os.strerror(err)}", err)

    def _execed(self, tid: int) -> None:
        """PTRACE_EVENT_EXEC: the new program is loaded in ``self.pid``."""
        ex = self._exec
        assert ex is not None
        took = (time.monotonic() - ex.started) * 1000
        # Every other thread is dead now; the former TID is gone.
        for other in list(self._threads):
            if other != tid:
                del self._threads[other]
        self._threads.setdefault(tid, _Thread(tid, stopped=True)).stopped = True
        try:
            pt.setsigmask(tid, 0)
        except HuptError as e:
            ex.notes.append(f"clearing its signal mask: {e}")
        self._report = Report(Outcome.EXECED, f"execed {os.fsdecode(self._path)} in {took:.1f} ms"
                              + (f" ({'; '.join(ex.notes)})" if ex.notes else ""))
        self._release_all()

    # --- letting go -------------------------------------------------------------------------

    def release(self) -> None:
        """Stop tracing now: every thread runs on untraced (bounded by ``timeout``).

        A thread caught at its exit goes on exiting.  The final report says RELEASED
        unless something else ended the tracing first.
        """
        if self.phase is Phase.OVER:
            return
        if self._report is None:
            self._report = Report(Outcome.RELEASED, f"process {self.pid} released")
        if self.phase is Phase.EXECING:
            return  # the exec is under way in the kernel: only its end releases
        self._release_all()

    def _release_all(self) -> None:
        for th in list(self._threads.values()):
            if not th.stopped:
                with suppress(NoSuchProcess):
                    pt.interrupt(th.tid)
                self._stop_for_detach(th)
            if th.tid not in self._threads:
                continue
            try:
                pt.detach(th.tid)
            except NoSuchProcess:
                self._collect(th)
                continue
            del self._threads[th.tid]
        if not self._threads or self.phase is not Phase.EXITING:
            self._finish(self._report or Report(Outcome.RELEASED, "released"))

    def _stop_for_detach(self, th: _Thread) -> None:
        deadline = time.monotonic() + self.timeout
        while th.tid in self._threads:
            try:
                stop = pt.waitstop(th.tid, max(0.0, deadline - time.monotonic()),
                                   reap_exit=self._may_reap(th.tid))
            except KernelError:
                return  # it stays traced until hupt exits; detach will fail and say so
            if stop.kind is StopKind.EXITED:
                del self._threads[th.tid]
                return
            if stop.kind is StopKind.SIGNAL:
                # Deliver it as we let go.
                with suppress(NoSuchProcess):
                    pt.detach(th.tid, stop.sig)
                    del self._threads[th.tid]
                return
            th.stopped = True
            return

    def _collect(self, th: _Thread) -> None:
        with suppress(HuptError):
            while pt.waitstop(th.tid, self.timeout,
                              reap_exit=self._may_reap(th.tid)).kind is not StopKind.EXITED:
                pass
        self._threads.pop(th.tid, None)

    def _finish(self, report: Report) -> None:
        self._report = report
        self._threads.clear()
        self.phase = Phase.OVER


def signal_names(mask: int) -> str:
    names = []
    for sig in range(1, 65):
        if mask & pt.sigbit(sig):
            try:
                names.append(signal.Signals(sig).name)
            except ValueError:
                names.append(f"signal {sig}")
    return ", ".join(names)


def _is_dead(tid: int) -> bool:
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            return procfs.parse_stat(f.read()).state in ("Z", "X", "x")
    except (OSError, ValueError):
        return True
