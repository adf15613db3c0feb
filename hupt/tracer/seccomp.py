"""Facts about the seccomp filter hupt puts on every server generation.

The filter exists to route a handful of syscalls (bind, listen, and
unlink/unlinkat while unix sockets are held) to hupt as user notifications;
it is not a sandbox.  What shapes it:

* seccomp_data.nr means nothing without seccomp_data.arch: a 64-bit process
  can make i386 syscalls with ``int 0x80`` (IA32 emulation is on in stock
  kernels), where 361 is bind, 102 is socketcall and 10 is unlink.  The arch
  is checked first.
* x32 calls come with the x86_64 arch and bit 30 set in nr.  They are
  refused with ENOSYS, which is what a kernel without x32 support answers.
* i386 calls of the guarded syscalls, direct or through socketcall(BIND or
  LISTEN), get ENOSYS.  Letting them through would bypass the handoff: a
  32-bit helper could unlink a held unix socket path (most requests then
  fail) or bind past hupt's back.  Notifying them would hand the supervisor
  i386 numbers and 32-bit argument layouts to decode.  Failing them loudly
  keeps every server that hupt can serve correct; every other i386 syscall
  is allowed, so a 32-bit program that does not listen still runs.  No other
  arch reaches an x86_64 kernel; the filter kills the process if one does.
* The filter is installed by the process itself (seccomp(2) has no pid
  argument): hupt forks, installs, then execs the server.  It survives
  execve and fork and cannot be removed, and if the notify fd is closed
  every notified syscall fails with ENOSYS for the rest of the process's
  life: keep the notified set minimal.
* FLAG_NEW_LISTENER makes seccomp() return the notify fd (O_CLOEXEC).
  FLAG_WAIT_KILLABLE_RECV (5.19+) makes a notification that hupt has
  received interruptible only by fatal signals: without it, a signal
  withdraws the notification and the syscall fails with EINTR unless the
  handler has SA_RESTART.  Older kernels refuse the flag with EINVAL; hupt
  then installs without it and relies on idempotent answers.
* FLAG_TSYNC with FLAG_NEW_LISTENER is refused unless FLAG_TSYNC_ESRCH is
  also set (a failed sync cannot report a thread id and an fd at once).
* Without CAP_SYS_ADMIN the kernel refuses a filter (EACCES) unless
  no_new_privs is set.  Root needs nothing; otherwise ``install_listener``
  sets PR_SET_NO_NEW_PRIVS and retries, which also means the server and
  everything it execs can no longer gain privileges through setuid or file
  capabilities.  That is the price of running hupt unprivileged.
"""

from __future__ import annotations

import ctypes
import errno
import functools
from collections.abc import Iterable, Sequence

from hupt.errors import AccessDenied, KernelError
from hupt.tracer import bpf
from hupt.tracer.abi import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    BPF_MAXINSNS,
    NOTIF_SIZES,
    PR_SET_NO_NEW_PRIVS,
    SECCOMP_DATA_ARCH,
    SECCOMP_DATA_NR,
    SO_ACCEPTCONN,
    SOCK_FPROG,
    SOL_SOCKET,
    SYS,
    SYS_I386,
    X32_SYSCALL_BIT,
    FilterFlag,
    Ret,
    SeccompOp,
    SocketCall,
    ret_errno,
    seccomp_data_arg,
)
from hupt.tracer.bpf import Insn, Label, jeq, jge, ld_abs, ret
from hupt.tracer.libc import prctl, syscall

# The i386 ways to make each syscall the filter can notify: its own number
# and, for socket calls, the socketcall() multiplexer's call number.
_I386_TWINS: dict[SYS, tuple[SYS_I386, SocketCall | None]] = {
    SYS.bind: (SYS_I386.bind, SocketCall.BIND),
    SYS.listen: (SYS_I386.listen, SocketCall.LISTEN),
    SYS.unlink: (SYS_I386.unlink, None),
    SYS.unlinkat: (SYS_I386.unlinkat, None),
}

RET_ENOSYS = ret_errno(errno.ENOSYS)

# hupt's own syscalls injected into a filtered process (the dummy listener's
# bind and listen when it stops accepting) must not be notified: the
# supervisor is single-threaded and busy injecting, so nobody would answer and
# the tracee would never stop.  Injected calls carry this value in the sixth
# argument register (r9), which bind/listen/unlink(at) ignore; the filter lets
# such calls through.
# It is the same for every hupt, on purpose: a filter outlives the hupt that
# installed it (filters cannot be removed), and a hupt that was killed leaves
# one behind whose listener is gone, so that every call it notifies fails with
# ENOSYS.  A later hupt (``hupt attach`` of that server) stacks its own filter,
# which gets the server's notifications (the newest filter's USER_NOTIF wins a
# tie), but its injected calls run through the orphan too: with a cookie of
# its own they failed there, and no pause could work.  A program that learns
# the value (it is in this file) gains nothing: it can only skip its own
# handoff.  Chance: a bind whose unused r9 holds these 64 bits.
INJECTION_COOKIE = 0x6875_7074_2D69_6E6A  # "hupt-inj"


def build_filter(notify: Iterable[SYS], *, cookie: int = INJECTION_COOKIE,
                 acceptconn: bool = True) -> list[Insn]:
    """Notify these x86_64 syscalls, refuse their i386 forms and all x32 calls, allow the rest.

    A notified call whose sixth argument is ``cookie`` is allowed (hupt's own injections).
    With ``acceptconn``, ``getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN)`` is notified too
    (and no other getsockopt): servers that may inherit their sockets (gunicorn,
    haproxy) ask it after bind() and skip listen() on a socket that listens
    already, as the held socket handed to them does; hupt counts the question
    as the listen it will not see.  Nothing asks it per request.
    """
    calls = sorted(set(notify))
    unguardable = [s.name for s in calls if s not in _I386_TWINS]
    if unguardable:
        raise ValueError(f"no i386 twin known for {unguardable}: the filter cannot guard them")
    twins = [_I386_TWINS[s][0] for s in calls]
    socketcalls = [c for s in calls if (c := _I386_TWINS[s][1]) is not None]
    items: list[Insn | bpf.Jump | Label] = [
        ld_abs(SECCOMP_DATA_ARCH),
        jeq(AUDIT_ARCH_X86_64, jf="not_x86_64"),
        ld_abs(SECCOMP_DATA_NR),
        jge(X32_SYSCALL_BIT, jt="enosys"),
        *(jeq(nr, jt="notify") for nr in calls),
        *([jeq(SYS.getsockopt, jt="getsockopt")] if acceptconn else []),
        ret(Ret.ALLOW),
        Label("not_x86_64"),
        jeq(AUDIT_ARCH_I386, jf="kill"),
        ld_abs(SECCOMP_DATA_NR),
        *(jeq(nr, jt="enosys") for nr in twins),
    ]
    if socketcalls:
        # socketcall dispatches on the low 32 bits of its first argument.
        items += [jeq(SYS_I386.socketcall, jf="allow"), ld_abs(seccomp_data_arg(0)),
                  *(jeq(c, jt="enosys") for c in socketcalls)]
    items += [ret(Ret.ALLOW)]  # end of the i386 checks
    if acceptconn:
        # getsockopt(fd, level, optname, ...): the low 32 bits of level and optname
        # (ints); the high halves are whatever the caller's registers held.
        items += [
            Label("getsockopt"),
            ld_abs(seccomp_data_arg(1)),
            jeq(SOL_SOCKET, jf="allow"),
            ld_abs(seccomp_data_arg(2)),
            jeq(SO_ACCEPTCONN, jf="allow"),
        ]
    items += [
        Label("notify"),
        ld_abs(seccomp_data_arg(5)),
        jeq(cookie & 0xFFFFFFFF, jf="user_notif"),
        ld_abs(seccomp_data_arg(5, high=True)),
        jeq(cookie >> 32, jf="user_notif"),
        Label("allow"), ret(Ret.ALLOW),
        Label("user_notif"), ret(Ret.USER_NOTIF),
        Label("enosys"), ret(RET_ENOSYS),
        Label("kill"), ret(Ret.KILL_PROCESS),
    ]
    return bpf.assemble(items)


def build_noop_filter(calls: Iterable[SYS], *, cookie: int = INJECTION_COOKIE) -> list[Insn]:
    """Make these x86_64 syscalls return 0 without running (RET_ERRNO with errno 0),
    bar hupt's own (sixth argument ``cookie``): pausing a listener removes the file
    of its unix stand-in with an injected unlink.

    Used on a retiring generation that was started before hupt held a unix
    socket, so its filter does not notify unlink: a second notify filter is
    refused with EBUSY (one listener per filter tree), and a plain filter
    cannot read the path, so every unlink/unlinkat of that generation becomes
    a no-op.  Otherwise its exit-time unlink of the socket path would cut new
    clients off the socket the next generation serves.  Other arches and x32
    calls pass: the notify filter already refuses them.
    """
    return bpf.assemble([
        ld_abs(SECCOMP_DATA_ARCH),
        jeq(AUDIT_ARCH_X86_64, jf="allow"),
        ld_abs(SECCOMP_DATA_NR),
        *(jeq(nr, jt="noop") for nr in sorted(set(calls))),
        Label("allow"), ret(Ret.ALLOW),
        Label("noop"),
        ld_abs(seccomp_data_arg(5)),
        jeq(cookie & 0xFFFFFFFF, jf="errno0"),
        ld_abs(seccomp_data_arg(5, high=True)),
        jeq(cookie >> 32, jf="errno0"),
        ret(Ret.ALLOW),  # BPF jumps only forward: not the "allow" above
        Label("errno0"), ret(ret_errno(0)),
    ])


def sock_fprog(prog_addr: int, n: int) -> bytes:
    """struct sock_fprog for ``n`` instructions at ``prog_addr`` (in the process reading it)."""
    if not 0 < n <= BPF_MAXINSNS:
        raise ValueError(f"{n} instructions (1..{BPF_MAXINSNS} allowed)")
    return SOCK_FPROG.pack(n, prog_addr)


def _fprog(prog: Sequence[Insn]) -> tuple[ctypes.Array[ctypes.c_char], ...]:
    """(struct sock_fprog, the code it points to): keep both alive until the call."""
    code = bpf.pack(prog)
    code_buf = ctypes.create_string_buffer(code, len(code))
    fprog = ctypes.create_string_buffer(sock_fprog(ctypes.addressof(code_buf), len(prog)),
                                        SOCK_FPROG.size)
    return fprog, code_buf


def install(prog: Sequence[Insn]) -> None:
    """Install ``prog`` on the calling thread, with no notify fd (no USER_NOTIF in it)."""
    fprog, _code = _fprog(prog)
    _set_mode_filter(FilterFlag(0), fprog)


def install_listener(prog: Sequence[Insn], *, tsync: bool = False,
                     wait_killable: bool = True) -> int:
    """Install ``prog`` on the calling process; return the notify fd (O_CLOEXEC).

    ``wait_killable`` asks for FLAG_WAIT_KILLABLE_RECV and silently drops it
    on kernels that refuse it; ``tsync`` applies the filter to every thread.
    """
    fprog, _code = _fprog(prog)
    flags = FilterFlag.NEW_LISTENER
    if tsync:
        flags |= FilterFlag.TSYNC | FilterFlag.TSYNC_ESRCH
    if wait_killable:
        try:
            return _set_mode_filter(flags | FilterFlag.WAIT_KILLABLE_RECV, fprog)
        except KernelError as e:
            if e.errno != errno.EINVAL:
                raise
    return _set_mode_filter(flags, fprog)


def _set_mode_filter(flags: FilterFlag, fprog: ctypes.Array[ctypes.c_char]) -> int:
    op = f"seccomp(SET_MODE_FILTER, {flags.name})"
    try:
        return syscall(SYS.seccomp, SeccompOp.SET_MODE_FILTER, int(flags), fprog, op=op)
    except AccessDenied as e:
        if e.errno != errno.EACCES:
            raise
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    return syscall(SYS.seccomp, SeccompOp.SET_MODE_FILTER, int(flags), fprog, op=op)


@functools.cache
def notif_sizes() -> tuple[int, int, int]:
    """(seccomp_notif, seccomp_notif_resp, seccomp_data) sizes of the running kernel."""
    buf = ctypes.create_string_buffer(NOTIF_SIZES.size)
    syscall(SYS.seccomp, SeccompOp.GET_NOTIF_SIZES, 0, buf, op="seccomp(GET_NOTIF_SIZES)")
    notif, resp, data = NOTIF_SIZES.unpack(buf.raw)
    return int(notif), int(resp), int(data)
