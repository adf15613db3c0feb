"""Facts about the x86_64 Linux ABI that hupt relies on: the one place for numbers.

Every syscall number, ioctl request, flag and struct layout hupt uses lives
here, so that call sites say ``SYS.bind`` or ``NOTIF.unpack(...)`` and never a
bare number.  Values were checked against the kernel headers and, where the
kernel reports them (``SECCOMP_GET_NOTIF_SIZES``), against the running kernel
by ``tests/test_abi.py`` (and every test in ``integration/`` that uses them).

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
    rt_sigaction = 13
    rt_sigprocmask = 14
    ioctl = 16
    dup2 = 33
    getpid = 39
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
    wait4 = 61
    fcntl = 72
    chdir = 80
    fchdir = 81
    unlink = 87
    prctl = 157
    gettid = 186
    tkill = 200
    restart_syscall = 219
    epoll_ctl = 233
    tgkill = 234
    openat = 257
    unlinkat = 263
    exit_group = 231
    accept4 = 288
    dup3 = 292
    process_vm_readv = 310
    seccomp = 317
    pidfd_send_signal = 424
    pidfd_open = 434
    clone3 = 435
    close_range = 436
    pidfd_getfd = 438


# struct clone_args (include/uapi/linux/sched.h), CLONE_ARGS_SIZE_VER2 (5.7+):
#   __aligned_u64 flags, pidfd, child_tid, parent_tid, exit_signal, stack,
#                 stack_size, tls, set_tid, set_tid_size, cgroup;
CLONE_ARGS = struct.Struct("<11Q")
# clone3() flags: the child starts in the cgroup whose directory fd is clone_args.cgroup.
CLONE_INTO_CGROUP = 0x200000000

# wait4() options (include/uapi/linux/wait.h).
WNOHANG = 1

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

# struct seccomp_notif_addfd { __u64 id; __u32 flags; __u32 srcfd; __u32 newfd;
#                               __u32 newfd_flags; };
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

# struct sigaction as the kernel takes it (x86_64, rt_sigaction with sigsetsize 8):
# { __sighandler_t sa_handler; unsigned long sa_flags; void *sa_restorer; sigset_t sa_mask; }
KERNEL_SIGACTION = struct.Struct("<QQQQ")
SIG_DFL = 0
SIG_IGN = 1

# prctl
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36

# close_range flags
CLOSE_RANGE_CLOEXEC = 1 << 2
# close_range's "to the end" upper bound (~0U)
CLOSE_RANGE_MAX_FD = 0xFFFFFFFF

# capability numbers (linux/capability.h): bit N of CapEff in /proc/PID/status
CAP_SYS_ADMIN = 21

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
F_DUPFD_CLOEXEC = 1030
FD_CLOEXEC = 1
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000

# sockets
SOL_SOCKET = 1
SO_ACCEPTCONN = 30
SO_ATTACH_FILTER = 26
SO_TYPE = 3
SO_REUSEPORT = 15
# Classic BPF run on a SO_REUSEPORT group to pick the socket a datagram goes to:
# its return value is an index into the group (as the kernel keeps it).
SO_ATTACH_REUSEPORT_CBPF = 51
IPPROTO_IPV6 = 41
IPV6_V6ONLY = 26
# struct sockaddr_in { sa_family_t sin_family; __be16 sin_port; struct in_addr sin_addr;
#                      unsigned char sin_zero[8]; }
SOCKADDR_IN = struct.Struct("<HH4s8x")
# struct sockaddr_in6 { sa_family_t sin6_family; __be16 sin6_port; __be32 sin6_flowinfo;
#                       struct in6_addr sin6_addr; __u32 sin6_scope_id; }
SOCKADDR_IN6 = struct.Struct("<HHI16sI")
SOCKADDR_MAX = 128  # struct sockaddr_storage
BPF_RET_K = 0x06  # BPF_RET | BPF_K: a classic BPF "return k"
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_NONBLOCK = O_NONBLOCK
SOCK_CLOEXEC = O_CLOEXEC
# struct sockaddr_un { sa_family_t sun_family; char sun_path[108]; }: bound with only
# its 2-byte family, a unix socket autobinds to a fresh abstract name.
SOCKADDR_FAMILY = struct.Struct("<H")
SUN_PATH_MAX = 108
SOCKADDR_UN = struct.Struct(f"<H{SUN_PATH_MAX}s")

# ptrace requests python-ptrace has no helper for
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_TRACECLONE = 1 << 3
PTRACE_O_TRACEEXEC = 1 << 4
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_STOP = 128
# struct ptrace_syscall_info {
#     __u8  op;                      /* @0: PTRACE_SYSCALL_INFO_* */
#     __u8  pad[3];
#     __u32 arch;                    /* @4 */
#     __u64 instruction_pointer;     /* @8 */
#     __u64 stack_pointer;           /* @16 */
#     union {
#         struct { __u64 nr; __u64 args[6]; } entry;      /* @24 */
#         struct { __s64 rval; __u8 is_error; } exit;     /* @24 */
#         struct { __u64 nr; __u64 args[6]; __u32 ret_data; } seccomp;
#     };
# };  (88 bytes with its tail padding; the kernel copies at most the size it is given)
PTRACE_SYSCALL_INFO = struct.Struct("<B3xIQQ7Q4x4x")
PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2
# waitpid/waitid option: also report threads other than the leader (linux/wait.h __WALL)
WALL = 0x40000000

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


# --- sock_diag (netlink) ----------------------------------------------------------
# Requests are built with pyroute2's message classes; replies are decoded with
# the layouts below (pyroute2's decoder costs ~60 µs a message: see sockdiag.py).


class TcpState(IntEnum):
    """Socket states (include/net/tcp_states.h); unix sockets use ESTABLISHED and LISTEN."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


# struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags;
#                   __u32 nlmsg_seq; __u32 nlmsg_pid; };
NLMSGHDR = struct.Struct("<IHHII")
# struct nlmsgerr { int error; struct nlmsghdr msg; };  (also the payload of NLMSG_DONE)
NLMSG_ERRNO = struct.Struct("<i")
# struct nlattr { __u16 nla_len; __u16 nla_type; };
NLATTR = struct.Struct("<HH")
NLA_U32 = struct.Struct("<I")  # the payload of a __u32 attribute
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED (1 << 15) and NLA_F_NET_BYTEORDER (1 << 14)
NL_ALIGNTO = 4

# struct inet_diag_msg {
#     __u8  idiag_family, idiag_state, idiag_timer, idiag_retrans;   /* @0  */
#     struct inet_diag_sockid {
#         __be16 idiag_sport;                                        /* @4  */
#         __be16 idiag_dport;                                        /* @6  */
#         __be32 idiag_src[4];                                       /* @8  */
#         __be32 idiag_dst[4];                                       /* @24 */
#         __u32  idiag_if;                                           /* @40 */
#         __u32  idiag_cookie[2];                                    /* @44 */
#     } id;
#     __u32 idiag_expires, idiag_rqueue, idiag_wqueue, idiag_uid, idiag_inode;  /* @52 */
# };
# Ports are big endian (ntohs them); the 4-byte IPv4 address is the first of src/dst.
INET_DIAG_MSG = struct.Struct("<BBBBHH16s16sI8sIIIII")
# enum inet_diag_attrs; a request asks for attribute A with idiag_ext bit 1 << (A - 1).
INET_DIAG_INFO = 2

# struct tcp_info {
#     __u8  tcpi_state, tcpi_ca_state, tcpi_retransmits, tcpi_probes, tcpi_backoff,
#           tcpi_options, tcpi_snd_wscale:4 + tcpi_rcv_wscale:4,
#           tcpi_delivery_rate_app_limited:1 + tcpi_fastopen_client_fail:2;  /* @0  */
#     __u32 tcpi_rto, tcpi_ato, tcpi_snd_mss, tcpi_rcv_mss;                  /* @8  */
#     __u32 tcpi_unacked, tcpi_sacked, tcpi_lost, tcpi_retrans, tcpi_fackets;/* @24 */
#     /* Times. */
#     __u32 tcpi_last_data_sent;                                             /* @44 */
#     __u32 tcpi_last_ack_sent;                                              /* @48 */
#     __u32 tcpi_last_data_recv;                                             /* @52 */
#     __u32 tcpi_last_ack_recv;                                              /* @56 */
#     ...  (grows with kernel versions; only this prefix is decoded)
# };
# last_data_sent, last_ack_sent, last_data_recv, last_ack_recv (milliseconds ago)
TCP_INFO_TIMES = struct.Struct("<IIII")
TCP_INFO_TIMES_OFFSET = 44

# struct unix_diag_msg { __u8 udiag_family, udiag_type, udiag_state, pad;
#                        __u32 udiag_ino; __u32 udiag_cookie[2]; };
UNIX_DIAG_MSG = struct.Struct("<BBBBI8s")
# enum unix_diag attributes (include/uapi/linux/unix_diag.h)
UNIX_DIAG_NAME = 0  # sun_path as bound: abstract names start with NUL, paths end with one
UNIX_DIAG_VFS = 1
UNIX_DIAG_PEER = 2  # __u32 inode of the peer socket
UNIX_DIAG_RQLEN = 4
# struct unix_diag_vfs { __u32 udiag_vfs_ino; __u32 udiag_vfs_dev; };
# (udiag_vfs_dev is the kernel's dev_t, major << 20 | minor, not st_dev's encoding)
UNIX_DIAG_VFS_S = struct.Struct("<II")
# struct unix_diag_rqlen { __u32 udiag_rqueue; __u32 udiag_wqueue; };
UNIX_DIAG_RQLEN_S = struct.Struct("<II")
