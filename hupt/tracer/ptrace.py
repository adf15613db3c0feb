"""Facts about ptrace, the one door into a running process, as hupt opens it.

This is the only module that imports python-ptrace.  Everything above it sees
plain integers, a frozen ``Regs`` record and the ``Stop`` classification, and
every failure arrives as a ``hupt.errors`` exception (ESRCH -> NoSuchProcess,
EPERM -> AccessDenied).

Why it is built this way:

- python-ptrace has no helper for PTRACE_SEIZE, PTRACE_INTERRUPT,
  PTRACE_GETSIGMASK or PTRACE_SETSIGMASK, and its process objects raise on a
  PTRACE_EVENT_STOP.  Its raw ``ptrace.binding.func.ptrace(req, pid, addr,
  data)`` accepts any request number, so only that and the getregs/setregs
  helpers are used.  ``PtraceProcess`` objects are never created: their
  ``__del__`` detaches, so a collected object resumes a thread mid-injection
  with injected registers.
- SEIZE, unlike ATTACH, neither stops the thread nor sends it a SIGSTOP that
  would later have to be swallowed; PTRACE_INTERRUPT then stops it and the
  stop is reported as PTRACE_EVENT_STOP with SIGTRAP.  Under SEIZE a
  group-stop (SIGSTOP, SIGTSTP...) is also reported as PTRACE_EVENT_STOP, with
  the stopping signal as WSTOPSIG, which is how the two are told apart.
- Wait statuses of threads other than the leader are only visible with
  ``__WALL``.  Waits here poll with WNOHANG and a deadline: a thread stuck in
  uninterruptible sleep must not hang the supervisor, and SIGCHLD cannot be
  consumed for waking up because it belongs to the supervisor's child reaping.
- A tracer that is also the real parent (hupt spawned the generation) would
  reap the leader's exit status with waitpid, stealing it from the
  supervisor's own reaping.  ``waitstop`` therefore peeks with
  ``waitid(WNOWAIT)`` first and leaves an exited leader unreaped when asked;
  an exited non-leader thread is reaped, since only its tracer can release it.
- PTRACE_GETSIGMASK/SETSIGMASK take the mask size (8 on x86_64) as ``addr``.
  For a thread inside ppoll/pselect6/epoll_pwait/sigsuspend, GETSIGMASK
  returns the mask the kernel will restore (not the temporary one /proc
  shows) and SETSIGMASK replaces that one and cancels the pending restore:
  a get/set round trip is exact.
- Registers are x86_64 ``user_regs_struct`` values as the kernel stores them:
  unsigned 64-bit.  ``signed`` gives the view syscall results need.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import signal
import time
from dataclasses import dataclass
from enum import Enum

from ptrace import PtraceError
from ptrace.binding import func as _pt

from hupt.errors import KernelError, from_errno
from hupt.tracer.abi import (
    PTRACE_EVENT_STOP,
    PTRACE_GET_SYSCALL_INFO,
    PTRACE_GETSIGMASK,
    PTRACE_INTERRUPT,
    PTRACE_LISTEN,
    PTRACE_SEIZE,
    PTRACE_SETSIGMASK,
    PTRACE_SYSCALL_INFO,
    PTRACE_SYSCALL_INFO_ENTRY,
    PTRACE_SYSCALL_INFO_EXIT,
    WALL,
)

U64 = (1 << 64) - 1
SIGSET_SIZE = 8

_GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_SYSCALL_TRAP = signal.SIGTRAP | 0x80  # PTRACE_O_TRACESYSGOOD marks syscall-stops


def signed(value: int) -> int:
    """The two's-complement reading of a 64-bit register value."""
    value &= U64
    return value - (1 << 64) if value >> 63 else value


def unsigned(value: int) -> int:
    """A Python int (possibly negative) as the 64-bit register value the kernel wants."""
    return value & U64


@dataclass(frozen=True)
class Regs:
    """x86_64 ``struct user_regs_struct`` (arch/x86/include/asm/user_64.h), unsigned values."""

    r15: int = 0
    r14: int = 0
    r13: int = 0
    r12: int = 0
    rbp: int = 0
    rbx: int = 0
    r11: int = 0
    r10: int = 0
    r9: int = 0
    r8: int = 0
    rax: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    orig_rax: int = 0
    rip: int = 0
    cs: int = 0
    eflags: int = 0
    rsp: int = 0
    ss: int = 0
    fs_base: int = 0
    gs_base: int = 0
    ds: int = 0
    es: int = 0
    fs: int = 0
    gs: int = 0

    def replace(self, **changes: int) -> Regs:
        return dataclasses.replace(self, **{k: unsigned(v) for k, v in changes.items()})


_REG_NAMES = tuple(f.name for f in dataclasses.fields(Regs))
if tuple(_pt.REGISTER_NAMES) != _REG_NAMES:  # pragma: no cover - another architecture
    raise ImportError(f"unexpected user_regs_struct layout: {_pt.REGISTER_NAMES}")


class StopKind(Enum):
    """What a wait status says about a traced thread."""

    INTERRUPT = "interrupt"  # PTRACE_EVENT_STOP with SIGTRAP: our PTRACE_INTERRUPT took effect
    GROUP = "group-stop"  # PTRACE_EVENT_STOP with a stopping signal: SIGSTOP & co.
    EVENT = "event"  # another PTRACE_EVENT_* (exec, clone...); ``event`` says which
    SIGNAL = "signal-delivery"  # ``sig`` is about to be delivered unless suppressed
    SYSCALL = "syscall"  # syscall-enter or -exit stop (PTRACE_SYSCALL, TRACESYSGOOD)
    EXITED = "exited"  # the thread is gone


@dataclass(frozen=True)
class Stop:
    tid: int
    kind: StopKind
    sig: int = 0  # WSTOPSIG, or the signal that killed the thread
    event: int = 0  # PTRACE_EVENT_* for EVENT/INTERRUPT/GROUP stops
    exit_status: int | None = None  # the raw wait status of an exited thread, if reaped


def classify(tid: int, status: int) -> Stop:
    """Classify a waitpid status of a thread attached with PTRACE_SEIZE (see ptrace(2))."""
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        return Stop(tid, StopKind.EXITED, sig=sig, exit_status=status)
    if not os.WIFSTOPPED(status):
        raise ValueError(f"unexpected wait status {status:#x} for thread {tid}")
    sig = os.WSTOPSIG(status)
    event = status >> 16
    if event == PTRACE_EVENT_STOP:
        kind = StopKind.GROUP if sig in _GROUP_STOP_SIGNALS else StopKind.INTERRUPT
        return Stop(tid, kind, sig=sig, event=event)
    if event:
        return Stop(tid, StopKind.EVENT, sig=sig, event=event)
    if sig == _SYSCALL_TRAP:
        return Stop(tid, StopKind.SYSCALL, sig=signal.SIGTRAP)
    return Stop(tid, StopKind.SIGNAL, sig=sig)


# --- raw requests ---------------------------------------------------------------


def _request(op: str, req: int, tid: int, addr: int = 0, data: int = 0) -> int:
    try:
        return int(_pt.ptrace(req, tid, addr, data))
    except PtraceError as e:
        raise from_errno(e.errno or errno.EIO, op, f"thread {tid}") from e


def seize(tid: int, options: int = 0) -> None:
    """Become the tracer of ``tid`` without stopping it."""
    _request("PTRACE_SEIZE", PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    """Ask a seized thread to stop; the stop is reported as StopKind.INTERRUPT."""
    _request("PTRACE_INTERRUPT", PTRACE_INTERRUPT, tid)


def cont(tid: int, sig: int = 0) -> None:
    """Resume a stopped thread, delivering ``sig`` (0: suppress the pending one)."""
    _request("PTRACE_CONT", _pt.PTRACE_CONT, tid, 0, sig)


def syscall(tid: int, sig: int = 0) -> None:
    """Resume until the next syscall-enter or -exit stop."""
    _request("PTRACE_SYSCALL", _pt.PTRACE_SYSCALL, tid, 0, sig)


def singlestep(tid: int, sig: int = 0) -> None:
    """Resume for one instruction; a SIGTRAP signal-delivery-stop follows it."""
    _request("PTRACE_SINGLESTEP", _pt.PTRACE_SINGLESTEP, tid, 0, sig)


def listen(tid: int) -> None:
    """Leave a thread in its group-stop (SIGSTOP & co.) but let SIGCONT wake it."""
    _request("PTRACE_LISTEN", PTRACE_LISTEN, tid)


@dataclass(frozen=True)
class SyscallInfo:
    """What a syscall-stop is about (PTRACE_GET_SYSCALL_INFO)."""

    entry: bool  # syscall-enter-stop (else syscall-exit-stop)
    nr: int  # the syscall number (entry only; -1 at an exit)
    args: tuple[int, ...]  # its six arguments (entry only)
    rval: int  # the return value (exit only; -errno on failure)


def syscall_info(tid: int) -> SyscallInfo:
    """Which syscall a thread in a syscall-stop is entering or leaving."""
    buf = ctypes.create_string_buffer(PTRACE_SYSCALL_INFO.size)
    _request("PTRACE_GET_SYSCALL_INFO", PTRACE_GET_SYSCALL_INFO, tid,
             PTRACE_SYSCALL_INFO.size, ctypes.addressof(buf))
    op, _arch, _ip, _sp, *rest = PTRACE_SYSCALL_INFO.unpack(buf.raw)
    if op == PTRACE_SYSCALL_INFO_ENTRY:
        return SyscallInfo(True, rest[0], tuple(rest[1:7]), 0)
    if op == PTRACE_SYSCALL_INFO_EXIT:
        return SyscallInfo(False, -1, (), signed(rest[0]))
    raise KernelError(errno.EINVAL, "PTRACE_GET_SYSCALL_INFO",
                      f"thread {tid} is not in a syscall-stop (op {op})")


def detach(tid: int, sig: int = 0) -> None:
    """Stop tracing a stopped thread and let it run (into a group-stop if one is in effect)."""
    _request("PTRACE_DETACH", _pt.PTRACE_DETACH, tid, 0, sig)


def geteventmsg(tid: int) -> int:
    """The message of the last PTRACE_EVENT stop (an exec's former TID, a clone's new TID)."""
    msg = ctypes.c_ulong()
    _request("PTRACE_GETEVENTMSG", _pt.PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg))
    return int(msg.value)


def getregs(tid: int) -> Regs:
    try:
        raw_regs = _pt.ptrace_getregs(tid)
    except PtraceError as e:
        raise from_errno(e.errno or errno.EIO, "PTRACE_GETREGS", f"thread {tid}") from e
    return Regs(**{name: int(getattr(raw_regs, name)) for name in _REG_NAMES})


def setregs(tid: int, regs: Regs) -> None:
    raw_regs = _pt.ptrace_registers_t()
    for name in _REG_NAMES:
        setattr(raw_regs, name, getattr(regs, name))
    try:
        _pt.ptrace_setregs(tid, raw_regs)
    except PtraceError as e:
        raise from_errno(e.errno or errno.EIO, "PTRACE_SETREGS", f"thread {tid}") from e


def getsigmask(tid: int) -> int:
    """The thread's blocked-signal mask (bit ``sig - 1`` set = blocked)."""
    mask = ctypes.c_uint64()
    _request("PTRACE_GETSIGMASK", PTRACE_GETSIGMASK, tid, SIGSET_SIZE, ctypes.addressof(mask))
    return int(mask.value)


def setsigmask(tid: int, mask: int) -> None:
    """Replace the blocked mask (the kernel keeps SIGKILL and SIGSTOP deliverable)."""
    buf = ctypes.c_uint64(mask & U64)
    _request("PTRACE_SETSIGMASK", PTRACE_SETSIGMASK, tid, SIGSET_SIZE, ctypes.addressof(buf))


def sigbit(sig: int) -> int:
    return 1 << (sig - 1)


# --- waiting --------------------------------------------------------------------

# Backoff between WNOHANG polls: a thread stops within microseconds of being
# asked, so the first polls only yield the CPU; later ones sleep.
_SPIN_POLLS = 50
_MAX_SLEEP = 0.002


def _peek_exited(tid: int) -> bool:
    """Whether ``tid`` has exited, without reaping it."""
    try:
        res = os.waitid(os.P_PID, tid, os.WEXITED | os.WNOHANG | os.WNOWAIT | WALL)
    except ChildProcessError:
        return False
    return res is not None and res.si_code in (os.CLD_EXITED, os.CLD_KILLED, os.CLD_DUMPED)


def poll_stop(tid: int, *, reap_exit: bool = True) -> Stop | None:
    """The next stop (or the exit) of traced thread ``tid`` if one is pending, else None.

    ``reap_exit`` as for ``waitstop``.
    """
    if not reap_exit and _peek_exited(tid):
        return Stop(tid, StopKind.EXITED)
    try:
        got, status = os.waitpid(tid, os.WNOHANG | WALL)
    except ChildProcessError:
        return Stop(tid, StopKind.EXITED)
    return classify(tid, status) if got == tid else None


def waitstop(tid: int, timeout: float, *, reap_exit: bool = True) -> Stop:
    """Wait up to ``timeout`` seconds for the next stop (or the exit) of traced thread ``tid``.

    With ``reap_exit=False`` an exit is reported but left for the real parent
    to reap (``exit_status`` is then None).  A thread nobody can wait for any
    more (already reaped) is reported as exited.  Raises KernelError(ETIMEDOUT).
    """
    deadline = time.monotonic() + timeout
    polls = 0
    delay = 1e-5
    while True:
        stop = poll_stop(tid, reap_exit=reap_exit)
        if stop is not None:
            return stop
        if time.monotonic() >= deadline:
            raise KernelError(errno.ETIMEDOUT, "waitpid",
                              f"thread {tid} did not stop in {timeout}s")
        polls += 1
        if polls < _SPIN_POLLS:
            os.sched_yield()
        else:
            time.sleep(delay)
            delay = min(delay * 2, _MAX_SLEEP)
