"""Facts about clone3(CLONE_INTO_CGROUP): a child born in its generation's cgroup.

Every process hupt starts must be in its generation's cgroup before the
server's first instruction (hupt/tracer/cgroup.py), so that everything it
makes is a member.  Two ways to get there:

* Join: fork(), then the child writes "0" to the group's ``cgroup.procs``.
  A migration takes ``cgroup_threadgroup_rwsem`` for writing, a per-CPU
  rw-semaphore whose writer waits for an RCU grace period unless another
  writer went through shortly before.  Measured on these machines: the
  first migration after a quiet spell 20 ms, the next ones 0.2 ms.  A
  reload is a quiet spell's first migration, so every generation used to
  start 10 to 20 ms late (`hupt run` to the server's exec: 98 ms with it,
  90 ms with no cgroup at all, on one CPU).
* Born there: clone3() (5.3) with CLONE_INTO_CGROUP (5.7) and
  ``clone_args.cgroup`` an fd of the group's directory creates the child in
  the group: no migration, no write lock (0.35 ms here, what fork costs).
  The child is a member from its first instruction, as a joiner is from its
  write on.

CPython has no clone3.  ``os.fork()`` is PyOS_BeforeFork() (the at-fork
"before" handlers, the import lock), fork(), then PyOS_AfterFork_Child()
(the GIL, the threading module's state, the "after in child" handlers) or
PyOS_AfterFork_Parent(), all with the GIL held.  ``fork_into`` does the same
around the raw syscall, called through ctypes.PyDLL so that the GIL stays
held across it (a CDLL call releases it), as os.fork holds it across fork().

What glibc's fork() does and a raw clone3 does not: glibc's own at-fork work
(its stdio and malloc locks, free in a process with one thread, which hupt
is by design), and the TID cached in the thread descriptor, which in the
child is still the parent's: pthread_kill() or raise() on itself would aim
at the parent.  The child here makes a few syscalls through Python and
execve()s (hupt/tracer/spawn.py); it never signals itself.

Refusals, after which nothing was created and hupt forks and joins instead:
ENOSYS (kernel before 5.3, or a container's seccomp profile that hides
clone3 so that glibc falls back to clone), EINVAL or E2BIG (no
CLONE_INTO_CGROUP: before 5.7), EBUSY or EOPNOTSUPP (the group cannot take
processes: a threaded or invalid domain), EACCES or EPERM (no write access
to its ``cgroup.procs``).
"""

from __future__ import annotations

import ctypes
import signal

from hupt.errors import KernelError
from hupt.tracer.abi import CLONE_ARGS, CLONE_INTO_CGROUP, SYS
from hupt.tracer.libc import syscall_holding_gil

_api = ctypes.pythonapi  # a PyDLL: these calls hold the GIL


def fork_into(group_fd: int) -> int:
    """fork(), the child born in the cgroup whose directory ``group_fd`` is open on:
    0 in the child, its PID in the parent.  KernelError if the kernel refused
    (see the module; no process was created)."""
    raw = bytearray(CLONE_ARGS.pack(CLONE_INTO_CGROUP, 0, 0, 0, int(signal.SIGCHLD), 0, 0, 0, 0,
                                    0, group_fd))
    args = (ctypes.c_char * len(raw)).from_buffer(raw)
    _api.PyOS_BeforeFork()
    try:
        pid = syscall_holding_gil(SYS.clone3, args, len(raw), op="clone3(CLONE_INTO_CGROUP)")
    except KernelError:
        _api.PyOS_AfterFork_Parent()
        raise
    if pid == 0:
        _api.PyOS_AfterFork_Child()
    else:
        _api.PyOS_AfterFork_Parent()
    return pid
