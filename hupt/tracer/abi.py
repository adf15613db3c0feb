"""Facts about the x86_64 Linux ABI that hupt relies on: the one place for numbers.

Every syscall number, ioctl request, flag and struct layout hupt uses lives
here, so that call sites say ``SYS.bind`` or ``NOTIF.unpack(...)`` and never a
bare number.  Values were checked against the kernel headers and, where the
kernel reports them (``SECCOMP_GET_NOTIF_SIZES``), against the running kernel
by ``tests/test_abi.py`` and ``integration/test_kernel_facts.py``.

Only x86_64 is supported: seccomp filters see raw syscall numbers, and the
ptrace injection writes x86_64 registers.  An x32 task uses the same
AUDIT_ARCH but sets bit 30 of the syscall number; filters reject it.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag


class SYS(IntEnum):
    """x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)."""

    read = 0
    write = 1
    close = 3
    mmap = 9
    munmap = 11
    rt_sigprocmask = 14
    ioctl = 16
    dup2 = 33
    socket = 41
    connect = 42
    accept = 43
    bind = 49
    listen = 50
    getsockname = 51
    setsockopt = 54
    getsockopt = 55
    clone = 56
    fork = 57
    execve = 59
    exit = 60
    fcntl = 72
    unlink = 87
    prctl = 157
    gettid = 186
    tkill = 200
    restart_syscall = 219
    epoll_ctl = 233
    tgkill = 234
    unlinkat = 263
    accept4 = 288
    dup3 = 292
    process_vm_readv = 310
    seccomp = 317
    pidfd_send_signal = 424
    pidfd_open = 434
    close_range = 436
    pidfd_getfd = 438


# x32 syscalls are x86_64 numbers with this bit set.
X32_SYSCALL_BIT = 0x40000000
AUDIT_ARCH_X86_64 = 0xC000003E
# A 64-bit task can still make i386 syscalls with `int 0x80` (IA32 emulation);
# seccomp then reports this arch and i386 numbers.
AUDIT_ARCH_I386 = 0x40000003


class SYS_I386(IntEnum):
    """i386 syscall numbers (arch/x86/entry/syscalls/syscall_32.tbl) hupt's filter guards."""

    unlink = 10
    getpid = 20
    socketcall = 102
    unlinkat = 301
    bind = 361
    listen = 363


class SocketCall(IntEnum):
    """First argument of i386 socketcall(call, args) (include/uapi/linux/net.h)."""

    SOCKET = 1
    BIND = 2
    LISTEN = 4


class SeccompOp(IntEnum):
    SET_MODE_STRICT = 0
    SET_MODE_FILTER = 1
    GET_ACTION_AVAIL = 2
    GET_NOTIF_SIZES = 3


class FilterFlag(IntFlag):
    TSYNC = 1 << 0
    LOG = 1 << 1
    SPEC_ALLOW = 1 << 2
    NEW_LISTENER = 1 << 3
    TSYNC_ESRCH = 1 << 4
    WAIT_KILLABLE_RECV = 1 << 5


class Ret(IntEnum):
    """seccomp filter return actions (the high 16 bits select the action)."""

    KILL_PROCESS = 0x80000000
    KILL_THREAD = 0x00000000
    TRAP = 0x00030000
    ERRNO = 0x00050000
    USER_NOTIF = 0x7FC00000
    TRACE = 0x7FF00000
    LOG = 0x7FFC0000
    ALLOW = 0x7FFF0000


def ret_errno(errno_: int) -> int:
    return int(Ret.ERRNO) | (errno_ & 0xFFFF)


# struct seccomp_data {
#     int   nr;                   /* @0  */
#     __u32 arch;                 /* @4  */
#     __u64 instruction_pointer;  /* @8  */
#     __u64 args[6];              /* @16 */
# };
SECCOMP_DATA = struct.Struct("<iIQ6Q")
SECCOMP_DATA_NR = 0
SECCOMP_DATA_ARCH = 4
SECCOMP_DATA_IP = 8


def seccomp_data_arg(n: int, high: bool = False) -> int:
    """Byte offset of the low (or high) 32-bit half of args[n] (little endian)."""
    return 16 + 8 * n + (4 if high else 0)


# struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; };
SOCK_FILTER = struct.Struct("<HBBI")
# struct sock_fprog { unsigned short len; /* 6 bytes padding */ struct sock_filter *filter; };
SOCK_FPROG = struct.Struct("<H6xQ")
BPF_MAXINSNS = 4096


# struct seccomp_notif_sizes { __u16 seccomp_notif, seccomp_notif_resp, seccomp_data; };
NOTIF_SIZES = struct.Struct("<HHH")

# struct seccomp_notif {
#     __u64 id;                    /* @0  */
#     __u32 pid;                   /* @8  a TID, in the supervisor's pid namespace */
#     __u32 flags;                 /* @12 */
#     struct seccomp_data data;    /* @16 */
# };
NOTIF = struct.Struct("<QII" + "iIQ6Q")

# SECCOMP_IOCTL_NOTIF_ID_VALID takes a pointer to the __u64 id, not the id itself.
NOTIF_ID = struct.Struct("<Q")

# struct seccomp_notif_resp { __u64 id; __s64 val; __s32 error; __u32 flags; };
NOTIF_RESP = struct.Struct("<QqiI")
USER_NOTIF_FLAG_CONTINUE = 1

# struct seccomp_notif_addfd { __u64 id; __u32 flags; __u32 srcfd; __u32 newfd; __u32 newfd_flags; };
NOTIF_ADDFD = struct.Struct("<QIIII")
ADDFD_FLAG_SETFD = 1
ADDFD_FLAG_SEND = 2

# ioctl requests on the notify fd (include/uapi/linux/seccomp.h, _IOWR('!', n, T)).
IOCTL_NOTIF_RECV = 0xC0502100
IOCTL_NOTIF_SEND = 0xC0182101
IOCTL_NOTIF_ID_VALID = 0x40082102
IOCTL_NOTIF_ADDFD = 0x40182103
IOCTL_NOTIF_SET_FLAGS = 0x40082104
USER_NOTIF_FD_SYNC_WAKE_UP = 1

# prctl
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36

# close_range flags
CLOSE_RANGE_CLOEXEC = 1 << 2

# epoll_ctl ops and the event bits that /proc fdinfo shows
EPOLL_CTL_ADD = 1
EPOLL_CTL_DEL = 2
EPOLL_CTL_MOD = 3
EPOLLERR = 0x008
EPOLLHUP = 0x010
EPOLLEXCLUSIVE = 1 << 28
EPOLLONESHOT = 1 << 30
EPOLLET = 1 << 31
# struct epoll_event { __u32 events; __u64 data; } __attribute__((packed)) on x86_64
EPOLL_EVENT = struct.Struct("<IQ")

# mmap
PROT_READ = 1
PROT_WRITE = 2
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20

# fcntl
F_GETFD = 1
F_SETFD = 2
F_GETFL = 3
F_SETFL = 4
FD_CLOEXEC = 1
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000

# sockets
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_NONBLOCK = O_NONBLOCK
SOCK_CLOEXEC = O_CLOEXEC

# ptrace requests python-ptrace has no helper for
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_TRACEEXEC = 1 << 4
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_STOP = 128

# Kernel-internal restart codes seen in rax of a thread interrupted in a syscall.
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516

# The two bytes of the `syscall` instruction.
SYSCALL_INSN = b"\x0f\x05"

# pidfd_open flags
PIDFD_NONBLOCK = O_NONBLOCK
PIDFD_THREAD = O_EXCL = 0o200
