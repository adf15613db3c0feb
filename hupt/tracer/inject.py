"""Facts about making another process run syscalls for us (ptrace injection).

``with Tracee.seize(pid) as t:`` stops every thread of ``pid``; inside the
block ``t.syscall(SYS.x, ...)`` runs one syscall in one of its threads and
returns the result; on leaving the block every thread gets its registers and
signal mask back and runs on, untraced.  If the block raises (anything,
KeyboardInterrupt included), every change registered with ``on_rollback`` is
undone first, newest first.  The same ideas as reptyr and CRIU's parasite
code, but nothing is written into the target's code: the syscall instruction
that is executed already exists in the target.

What the kernel makes us do, and why:

- Every thread is seized and interrupted, not just the one that injects.  A
  thread blocked in accept() holds the old listening file and keeps taking
  connections after the fd is swapped; interrupted, it restarts the syscall
  after we leave and looks the fd up again.  Threads appear while we seize
  (a clone in progress completes before its parent stops), so the thread list
  is read again until a round finds no new thread; once all known threads are
  stopped no new one can appear.
- The registers seen at the interrupt stop of a thread that was inside a
  syscall hold the kernel's restart code in rax (-512 ERESTARTSYS, -513,
  -514 ERESTARTNOHAND, -516 ERESTART_RESTARTBLOCK; epoll_wait shows -4 EINTR)
  and rip just past the ``syscall``.  The kernel turns the code into a restart
  (or into EINTR for a signal handler without SA_RESTART) in
  arch_do_signal_or_restart(), on the thread's way out of a signal check.
  Every thread here leaves its last stop through one: a single step ends in
  a SIGTRAP signal-delivery-stop, and PTRACE_DETACH marks the thread
  signal-pending.  So the saved registers are written back exactly and the
  kernel decides.  Measured on 6.18: the same write-back followed by
  PTRACE_CONT from a syscall-exit-stop skips that check and leaks
  "OSError: [Errno 512]" into Python; detaching does not.  Restarting by
  hand the CRIU way (rax = orig_rax, rip -= 2) hides the restart code from a
  signal delivered at that moment: a Python handler (no SA_RESTART) then only
  ran once the restarted accept() returned, i.e. at the next connection.
- Injected: rax = number, arguments in rdi rsi rdx r10 r8 r9, orig_rax = -1
  (so that the kernel applies no restart logic to our registers), rip = a
  ``0f 05`` already in the address space: the vDSO has several (static Go
  binaries too; [vsyscall] is not executable); otherwise the two bytes before
  rip of a thread stopped inside a syscall.  One PTRACE_SINGLESTEP runs it;
  the result is in rax, -4095..-1 being -errno.  rcx and r11 are clobbered,
  hence the full register restore.
- Signals: while the injecting thread runs, any pending signal would stop it
  in a signal-delivery-stop (kernel-facts counted 91 SIGURG stops in one run
  on a Go server; an idle or lightly loaded one here sent none).  Its
  mask is set to block everything but SIGTRAP (the single-step trap) with
  PTRACE_SETSIGMASK, and put back before detaching; blocked signals simply
  stay pending.  A signal dequeued anyway (SIGSTOP cannot be blocked, and
  some arrive before the mask is set) is suppressed and sent again with
  tgkill after detaching: the thread still gets it, but its siginfo names
  hupt as the sender.
- A thread inside ppoll, pselect6, epoll_pwait with a mask or rt_sigsuspend
  runs with a temporary mask (SigBlk in /proc shows it) that the kernel swaps
  back on return.  PTRACE_GETSIGMASK returns the real mask in that case and
  PTRACE_SETSIGMASK installs its argument as the real mask and drops the
  pending swap, so the save/restore round trip keeps the program's mask;
  the restarted syscall installs its temporary mask again (measured with
  inject_targets/ppoll_waiter.py).
- Only the injecting thread's mask matters: the others stay stopped, and a
  process-directed signal is never routed to a stopped thread.
- Nothing may be left stopped or traced.  SIGINT, SIGTERM, SIGHUP and SIGQUIT
  are blocked in hupt for the duration of a session (milliseconds): dying
  mid-injection would resume the target with injected registers.  Every
  release step is attempted for every thread even when earlier ones fail.
- A thread that dies while seized must be reaped by us (waitpid on a TID),
  except the leader when hupt is also its parent: that exit status belongs to
  the supervisor's own reaping.
- ``/proc/PID/mem`` (``procfs.Memory``) is the way to read and write the
  target's memory: python-ptrace's word-by-word writes are quadratic.
- An injected execve (``Tracee.execve``) is singled out: the other threads
  are detached first, because execve kills them and waits for their death,
  which for a traced thread waits for its tracer; success is reported as a
  PTRACE_EVENT_EXEC stop (PTRACE_O_TRACEEXEC), not as the single-step trap,
  after which the old registers, scratch mappings and undo entries mean
  nothing.  execve keeps the blocked mask, so the leader's is still restored.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

from hupt.errors import AccessDenied, HuptError, InjectionError, KernelError, NoSuchProcess
from hupt.tracer import libc, procfs
from hupt.tracer import ptrace as pt
from hupt.tracer.abi import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    PTRACE_EVENT_EXEC,
    PTRACE_O_TRACEEXEC,
    SYS,
    SYSCALL_INSN,
)
from hupt.tracer.ptrace import Regs, StopKind, signed
from hupt.tracer.seccomp import INJECTION_COOKIE

PAGE = 4096
MAX_ERRNO = 4095
_DEFERRED_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})
# Everything but SIGTRAP; the kernel silently keeps SIGKILL and SIGSTOP deliverable.
_INJECTION_MASK = pt.U64 & ~pt.sigbit(signal.SIGTRAP)
# Single steps allowed for one injected syscall (each non-ours signal costs one).
_MAX_STEPS = 64


# --- pure register logic (unit-tested) ----------------------------------------------


def syscall_regs(saved: Regs, insn: int, nr: int, args: tuple[int, ...]) -> Regs:
    """Registers that make the thread execute syscall ``nr(*args)`` at ``insn``."""
    if len(args) > 6:
        raise ValueError(f"a syscall takes at most 6 arguments, not {len(args)}")
    # An unused sixth argument carries the cookie that lets hupt's own bind/listen
    # through the generation's notify filter (see seccomp.INJECTION_COOKIE).
    padded = (*args, 0, 0, 0, 0, 0, 0)[:5] + ((args[5],) if len(args) == 6 else (INJECTION_COOKIE,))
    return saved.replace(
        rax=nr, orig_rax=-1, rip=insn,
        rdi=padded[0], rsi=padded[1], rdx=padded[2], r10=padded[3], r8=padded[4], r9=padded[5],
    )


def syscall_result(rax: int) -> int:
    """The syscall's return value: negative is -errno (-4095..-1), anything else is a value."""
    value = signed(rax)
    return value if -MAX_ERRNO <= value < 0 else rax


# --- states --------------------------------------------------------------------------


class State(Enum):
    NEW = "new"  # nothing touched
    SEIZING = "seizing"  # threads are being seized and stopped
    STOPPED = "stopped"  # every thread stopped and saved: injection allowed
    INJECTING = "injecting"  # one thread runs an injected syscall
    ROLLING_BACK = "rolling back"  # undoing registered changes (injection allowed)
    REPLACED = "replaced"  # an injected execve succeeded: the old image is gone, only release
    RELEASING = "releasing"  # registers and masks restored, threads detached
    RELEASED = "released"  # nothing of ours left in the process


_ALLOWED: dict[State, frozenset[State]] = {
    State.NEW: frozenset({State.SEIZING}),
    State.SEIZING: frozenset({State.STOPPED, State.RELEASING}),
    State.STOPPED: frozenset({State.INJECTING, State.ROLLING_BACK, State.RELEASING}),
    # back to where the injection started, or straight to release if the thread was lost
    State.INJECTING: frozenset({State.STOPPED, State.ROLLING_BACK, State.REPLACED,
                                State.RELEASING}),
    State.REPLACED: frozenset({State.RELEASING}),
    State.ROLLING_BACK: frozenset({State.INJECTING, State.RELEASING}),
    State.RELEASING: frozenset({State.RELEASED}),
    State.RELEASED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A Tracee was used out of order (a bug in hupt, not a kernel error)."""


class Lifecycle:
    """The explicit state of one tracing session; every move is checked against _ALLOWED."""

    def __init__(self) -> None:
        self.state = State.NEW
        self._origin: State | None = None

    def advance(self, to: State) -> None:
        if to not in _ALLOWED[self.state]:
            raise IllegalTransition(f"tracee cannot go from {self.state.value} to {to.value}")
        self.state = to

    def begin_injection(self) -> None:
        if self.state not in (State.STOPPED, State.ROLLING_BACK):
            raise IllegalTransition(f"cannot inject a syscall while {self.state.value}")
        self._origin = self.state
        self.advance(State.INJECTING)

    def end_injection(self) -> None:
        """The injecting thread is stopped again: back to the state the injection began in."""
        if self.state is not State.INJECTING or self._origin is None:
            raise IllegalTransition(f"no injection in progress ({self.state.value})")
        origin, self._origin = self._origin, None
        self.advance(origin)

    def image_replaced(self) -> None:
        """The injected syscall was a successful execve (begun from STOPPED, not a rollback)."""
        if self.state is not State.INJECTING or self._origin is not State.STOPPED:
            raise IllegalTransition(f"no execve can succeed while {self.state.value}")
        self._origin = None
        self.advance(State.REPLACED)


# --- threads -------------------------------------------------------------------------


@dataclass
class _Thread:
    tid: int
    stopped: bool = False  # in a ptrace stop we observed
    running: bool = False  # resumed by us, stop not yet observed
    gone: bool = False  # exited (and reaped, unless it is a leader we must not reap)
    detached: bool = False  # released by us (before the end of the session for an execve)
    saved: Regs | None = None
    regs_dirty: bool = False
    saved_mask: int | None = None  # set iff we changed its mask


class Tracee:
    """Every thread of one process, stopped for the duration of a ``with`` block."""

    def __init__(self, pid: int, *, timeout: float = 5.0, options: int = 0) -> None:
        self.pid = pid
        self.timeout = timeout
        self._options = options
        self._life = Lifecycle()
        self._threads: dict[int, _Thread] = {}
        self._swallowed: list[tuple[int, int]] = []  # (tid, signal) to send again at the end
        self._undo: list[tuple[str, Callable[[], object]]] = []
        self._mem: procfs.Memory | None = None
        self._insn: int | None = None
        self._injector: int | None = None
        self._our_child = False
        self._outer_mask: set[int | signal.Signals] | None = None

    @classmethod
    def seize(cls, pid: int, *, timeout: float = 5.0, options: int = 0) -> Tracee:
        """A session on ``pid``; threads are seized when the ``with`` block is entered."""
        return cls(pid, timeout=timeout, options=options)

    @property
    def state(self) -> State:
        return self._life.state

    @property
    def threads(self) -> list[int]:
        """The TIDs stopped in this session (not those that exited or were let go early)."""
        return [t.tid for t in self._threads.values() if not t.gone and not t.detached]

    # --- session ---------------------------------------------------------------------

    def __enter__(self) -> Tracee:
        self._outer_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
        try:
            self._seize_all()
        except BaseException as e:
            self._finish(e)
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._finish(ev)

    def _finish(self, cause: BaseException | None) -> None:
        """Roll back if ``cause``, release, and let deferred signals in.

        A release failure is raised when the block succeeded and attached to
        ``cause`` as a note otherwise, so that the original error stays the one
        reported.
        """
        try:
            if cause is not None and self.state is State.STOPPED:
                self._rollback(cause)
        finally:
            try:
                self._release()
            except BaseException as e:
                if cause is None:
                    raise
                cause.add_note(f"release: {e!r}")
            finally:
                if self._outer_mask is not None:
                    mask, self._outer_mask = self._outer_mask, None
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _seize_all(self) -> None:
        self._life.advance(State.SEIZING)
        self._our_child = procfs.ppid_of(self.pid) == os.getpid()
        # A thread found dead is not tried again: a zombie stays listed in /proc/PID/task
        # (a root that exited while it drained, waiting for us to reap it).
        dead: set[int] = set()
        while True:
            fresh = [t for t in procfs.threads(self.pid)
                     if t not in self._threads and t not in dead]
            if not fresh:
                break
            seized = [th for tid in fresh if (th := self._seize_one(tid)) is not None]
            dead.update(set(fresh) - set(self._threads))
            for th in seized:
                self._await_stop(th)
        if not self.threads:
            raise NoSuchProcess(errno.ESRCH, "seize", f"process {self.pid} has no live thread")
        for th in self._threads.values():
            if not th.gone:
                th.saved = pt.getregs(th.tid)
        # A zombie leader has no memory map any more: look through a live thread.
        self._mem = procfs.Memory(self.threads[0])
        self._life.advance(State.STOPPED)

    def _seize_one(self, tid: int) -> _Thread | None:
        try:
            pt.seize(tid, self._options)
        except NoSuchProcess:
            return None  # exited since the listing
        except AccessDenied:
            if _is_dead(tid):
                return None  # a zombie leader whose other threads live on
            raise
        th = self._threads[tid] = _Thread(tid, running=True)
        with suppress(NoSuchProcess):  # dying: _await_stop collects its exit
            pt.interrupt(tid)
        return th

    def _await_stop(self, th: _Thread) -> None:
        """Wait until ``th`` is in a stop we can work from; swallow signals on the way."""
        while True:
            stop = pt.waitstop(th.tid, self.timeout, reap_exit=self._may_reap(th.tid))
            if stop.kind is StopKind.EXITED:
                th.running, th.gone = False, True
                return
            if stop.kind is StopKind.SIGNAL:
                # Dequeued before our interrupt: suppress it now, send it again at the end.
                self._swallowed.append((th.tid, stop.sig))
                pt.cont(th.tid, 0)
                continue
            th.running, th.stopped = False, True
            return

    def _may_reap(self, tid: int) -> bool:
        return tid != self.pid or not self._our_child

    # --- injection -------------------------------------------------------------------

    def syscall(self, nr: SYS, *args: int, tid: int | None = None, op: str | None = None) -> int:
        """Run syscall ``nr(*args)`` in thread ``tid`` (default: the leader) and return its result.

        A negative result raises InjectionError(op, errno).  Arguments are
        plain ints; negative ones (-1 for "no fd") are passed as the kernel
        expects them.
        """
        if nr is SYS.execve:
            raise ValueError("inject execve with Tracee.execve")
        if self.state not in (State.STOPPED, State.ROLLING_BACK):
            raise IllegalTransition(f"cannot inject a syscall while {self.state.value}")
        th = self._pick_injector() if tid is None else self._threads.get(tid)
        if th is None or th.detached:
            raise ValueError(f"thread {tid} is not stopped in this session")
        result = self._inject(th, int(nr), args, exec_ok=False)
        assert result is not None
        if -MAX_ERRNO <= result < 0:
            raise InjectionError(op or nr.name, -result)
        return result

    def execve(self, path: int, argv: int, envp: int) -> None:
        """Make the leader execve(path, argv, envp) (addresses in the tracee).

        Needs PTRACE_O_TRACEEXEC in ``options``.  Every other thread is let go
        first: execve waits for them to die, and a traced thread's death waits
        for its tracer.  On success the session is REPLACED: registered
        changes are not undone (they belonged to the old image), and leaving
        the block restores the leader's signal mask (execve keeps it) and lets
        the new program run.  On failure InjectionError; the session goes on
        with the leader only.
        """
        if not self._options & PTRACE_O_TRACEEXEC:
            raise ValueError("execve needs a session seized with PTRACE_O_TRACEEXEC")
        if self.state is not State.STOPPED:
            raise IllegalTransition(f"cannot execve while {self.state.value}")
        leader = self._threads.get(self.pid)
        if leader is None or leader.gone or not leader.stopped:
            raise NoSuchProcess(errno.ESRCH, "execve", f"the leader of {self.pid} is gone")
        self._injector = leader.tid
        for th in self._threads.values():
            if th is not leader:
                self._release_thread(th)
        result = self._inject(leader, SYS.execve, (path, argv, envp), exec_ok=True)
        if result is not None and -MAX_ERRNO <= result < 0:
            raise InjectionError("execve", -result)

    def _inject(self, th: _Thread, nr: int, args: tuple[int, ...], *, exec_ok: bool) -> int | None:
        """Run one syscall in ``th``; None if it was an execve that replaced the image."""
        self._life.begin_injection()
        try:
            result = self._run(th, nr, args, exec_ok=exec_ok)
        except BaseException:
            if th.running and not th.gone:
                self._resync(th)
            if not th.running and not th.gone:
                self._life.end_injection()  # the thread is in a known state again
            raise
        if result is not None:
            self._life.end_injection()
            return result
        th.regs_dirty = False  # they are the new program's now
        self._undo.clear()
        if self._mem is not None:
            self._mem.close()  # the old address space is gone
            self._mem = None
        self._life.image_replaced()
        return None

    def _pick_injector(self) -> _Thread:
        if self._injector is not None:
            return self._threads[self._injector]
        live = [th for th in self._threads.values() if th.stopped and not th.gone]
        if not live:
            raise NoSuchProcess(errno.ESRCH, "inject", f"process {self.pid} has no stopped thread")
        chosen = min(live, key=lambda th: th.tid != self.pid)  # the leader if it lives
        self._injector = chosen.tid
        return chosen

    def _prepare(self, th: _Thread) -> None:
        """Block every signal but SIGTRAP in the injecting thread (once per session)."""
        if th.saved_mask is None:
            mask = pt.getsigmask(th.tid)
            pt.setsigmask(th.tid, _INJECTION_MASK)
            th.saved_mask = mask

    def _run(self, th: _Thread, nr: int, args: tuple[int, ...], *, exec_ok: bool) -> int | None:
        if th.gone or not th.stopped or th.saved is None:
            raise NoSuchProcess(errno.ESRCH, "inject", f"thread {th.tid} is not stopped")
        self._prepare(th)
        insn = self._syscall_insn()
        th.regs_dirty = True
        pt.setregs(th.tid, syscall_regs(th.saved, insn, nr, args))
        for _ in range(_MAX_STEPS):
            pt.singlestep(th.tid)
            th.running = True
            stop = pt.waitstop(th.tid, self.timeout, reap_exit=self._may_reap(th.tid))
            th.running = False
            if stop.kind is StopKind.EXITED:
                th.gone = True
                raise NoSuchProcess(errno.ESRCH, "inject", f"thread {th.tid} exited")
            if exec_ok and stop.kind is StopKind.EVENT and stop.event == PTRACE_EVENT_EXEC:
                return None
            now = pt.getregs(th.tid)
            done = now.rip == insn + len(SYSCALL_INSN)
            if stop.kind is StopKind.SIGNAL and not (done and stop.sig == signal.SIGTRAP):
                self._swallowed.append((th.tid, stop.sig))
            if done:
                return syscall_result(now.rax)
            if now.rip != insn:
                raise KernelError(errno.EFAULT, "inject",
                                  f"thread {th.tid} left the syscall at {now.rip:#x}")
        raise KernelError(errno.EAGAIN, "inject",
                          f"thread {th.tid}: {_MAX_STEPS} steps without running the syscall")

    def _resync(self, th: _Thread) -> None:
        """After an interrupted step: wait for the thread's stop so that it can be restored."""
        try:
            stop = pt.waitstop(th.tid, self.timeout, reap_exit=self._may_reap(th.tid))
        except HuptError:
            return
        th.running = False
        if stop.kind is StopKind.EXITED:
            th.gone = True
        elif stop.kind is StopKind.SIGNAL and stop.sig != signal.SIGTRAP:
            self._swallowed.append((th.tid, stop.sig))

    def _syscall_insn(self) -> int:
        if self._insn is None:
            self._insn = self._find_syscall_insn()
        return self._insn

    def _find_syscall_insn(self) -> int:
        vdso = _vdso_range(self._memory().pid)
        if vdso is not None:
            start, end = vdso
            at = self.read(start, end - start).find(SYSCALL_INSN)
            if at >= 0:
                return start + at
        for th in self._threads.values():
            if th.saved is not None and not th.gone and signed(th.saved.orig_rax) >= 0:
                addr = th.saved.rip - len(SYSCALL_INSN)
                if self.read(addr, len(SYSCALL_INSN)) == SYSCALL_INSN:
                    return addr
        raise KernelError(errno.ENOEXEC, "inject",
                          f"no syscall instruction found in process {self.pid}")

    # --- memory and changes ----------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        return self._memory().read(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        """Write into the tracee's memory (a scratch page: the caller owns what it overwrites)."""
        self._memory().write(addr, data)

    def _memory(self) -> procfs.Memory:
        if self._mem is None:
            raise IllegalTransition(f"no memory access while {self.state.value}")
        return self._mem

    @contextmanager
    def scratch(self, size: int) -> Iterator[int]:
        """An anonymous read-write mapping in the tracee for the block; yields its address."""
        length = max(PAGE, -(-size // PAGE) * PAGE)
        addr = self.syscall(SYS.mmap, 0, length, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, op="mmap scratch")
        with self._undone_after(lambda: self.syscall(SYS.munmap, addr, length, op="munmap")):
            yield addr

    @contextmanager
    def temporary_fd(self, nr: SYS, *args: int, op: str | None = None) -> Iterator[int]:
        """An fd made in the tracee by syscall ``nr(*args)``, closed at the end of the block."""
        fd = self.syscall(nr, *args, op=op)
        with self._undone_after(lambda: self.syscall(SYS.close, fd, op=f"close temporary {fd}")):
            yield fd

    @contextmanager
    def _undone_after(self, undo: Callable[[], object]) -> Iterator[None]:
        """Run ``undo`` when the block ends, if the tracee is still usable.

        After a failure a failing ``undo`` is noted on the original error.
        After a successful execve there is nothing left to undo.
        """
        try:
            yield
        except BaseException as e:
            if self.state in (State.STOPPED, State.ROLLING_BACK):
                try:
                    undo()
                except HuptError as failed:
                    e.add_note(f"cleanup: {failed}")
            raise
        if self.state is not State.REPLACED:
            undo()

    def commit(self) -> None:
        """Make every change so far final: a later failure in the block no longer undoes them."""
        if self.state is not State.STOPPED:
            raise IllegalTransition(f"cannot commit while {self.state.value}")
        self._undo.clear()

    def on_rollback(self, what: str, undo: Callable[[], object]) -> None:
        """Register how to undo a change just made; run (newest first) only if the block fails."""
        if self.state is not State.STOPPED:
            raise IllegalTransition(f"cannot register a change while {self.state.value}")
        self._undo.append((what, undo))

    def _rollback(self, cause: BaseException) -> None:
        self._life.advance(State.ROLLING_BACK)
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except HuptError as e:
                cause.add_note(f"rollback: undoing {what} failed: {e}")
                if self.state is not State.ROLLING_BACK:
                    cause.add_note("rollback: the tracee was lost; later changes stay in place")
                    return

    # --- release ---------------------------------------------------------------------

    def _release(self) -> None:
        if self.state is State.RELEASED:
            return
        self._life.advance(State.RELEASING)
        failures: list[BaseException] = []
        for th in self._threads.values():
            try:
                self._release_thread(th)
            except BaseException as e:  # keep releasing the other threads, report after
                failures.append(e)
        for tid, sig in self._swallowed:
            try:
                libc.syscall(SYS.tgkill, self.pid, tid, sig, op="tgkill")
            except NoSuchProcess:
                pass
            except BaseException as e:
                failures.append(e)
        self._swallowed.clear()
        if self._mem is not None:
            self._mem.close()
            self._mem = None
        self._life.advance(State.RELEASED)
        if failures:
            raise failures[0]

    def _release_thread(self, th: _Thread) -> None:
        if th.detached:
            return
        if not th.gone and th.running and th.stopped:
            self._resync(th)  # interrupted mid-step: its registers are still ours to restore
        elif not th.gone and not th.stopped:
            self._await_stop(th)  # seized, interrupt pending: registers untouched
        if th.gone:
            return
        if th.running:
            raise KernelError(errno.ETIMEDOUT, "release",
                              f"thread {th.tid} did not stop; it stays traced until hupt exits")
        try:
            if th.regs_dirty and th.saved is not None:
                pt.setregs(th.tid, th.saved)
                th.regs_dirty = False
            if th.saved_mask is not None:
                pt.setsigmask(th.tid, th.saved_mask)
                th.saved_mask = None
            pt.detach(th.tid)
            th.stopped, th.detached = False, True
        except NoSuchProcess:
            self._collect_exit(th)

    def _collect_exit(self, th: _Thread) -> None:
        """The thread died while seized: wait for its exit so that it is released."""
        th.gone = True
        try:
            while pt.waitstop(th.tid, self.timeout,
                              reap_exit=self._may_reap(th.tid)).kind is not StopKind.EXITED:
                pass
        except HuptError:
            pass


# --- helpers -----------------------------------------------------------------------------


def _is_dead(tid: int) -> bool:
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            state = procfs.parse_stat(f.read()).state
    except (OSError, ValueError):
        return True
    return state in ("Z", "X", "x")


def _vdso_range(pid: int) -> tuple[int, int] | None:
    """Start and end of the [vdso] mapping of ``pid``, if it has one."""
    with procfs.proc_errors("read maps", pid), open(f"/proc/{pid}/maps", "rb") as f:
        maps = f.read()
    for line in maps.splitlines():
        if line.endswith(b"[vdso]"):
            start, _, end = line.split(None, 1)[0].partition(b"-")
            return int(start, 16), int(end, 16)
    return None
