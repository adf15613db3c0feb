"""Facts about pidfds: stable handles on processes, and how hupt takes their fds.

A pidfd refers to one process for its whole life: unlike a pid it cannot be
recycled under us, which is why hupt signals and copies fds through it.

- ``pidfd_open(pid)`` wants a thread-group leader.  A seccomp notification
  names the *thread* that made the call (``notif.pid`` is a TID): for any thread
  but the leader, ``pidfd_open(TID)`` fails with ENOENT (ESRCH means no such
  task at all).  Callers translate first with ``procfs.tgid_of(tid)``;
  PIDFD_THREAD (Linux 6.9+) would accept the TID but is not needed.  The
  pid -> pidfd step itself can race with pid reuse: for a notification, check
  SECCOMP_IOCTL_NOTIF_ID_VALID after opening, which proves the thread that
  sent it was still alive.
- ``pidfd_getfd(pidfd, fd)`` duplicates the target's fd into ours, like
  SCM_RIGHTS without the target's cooperation.  It needs ptrace-attach rights
  over the target (root, or the same user under yama ptrace_scope 0/1 for our
  own descendants).  The copy always comes back O_CLOEXEC; it shares the open
  file description (O_NONBLOCK, offset, the socket itself) with the target.
  EBADF: the target has no such fd; ESRCH: the target is exiting.
- ``pidfd_send_signal`` fails with ESRCH once the process has been reaped,
  never hitting a recycled pid.
- A pidfd polls readable when the process exits, so it fits a selectors loop.
  pidfds are always O_CLOEXEC.

os.pidfd_open and signal.pidfd_send_signal exist since Python 3.9; the raw
syscall is the fallback where the os module was built without them.
"""

from __future__ import annotations

import errno
import os
import signal
from types import TracebackType

from hupt.errors import KernelError, kernel_errors
from hupt.tracer import libc
from hupt.tracer.abi import SYS


def pidfd_open(pid: int, flags: int = 0) -> int:
    """A pidfd for process ``pid`` (a thread-group id, not a TID: see above)."""
    try:
        if hasattr(os, "pidfd_open"):
            with kernel_errors("pidfd_open", f"pid {pid}"):
                return os.pidfd_open(pid, flags)
        return libc.syscall(SYS.pidfd_open, pid, flags, op="pidfd_open")
    except KernelError as e:
        if e.errno == errno.ENOENT:
            raise KernelError(e.errno, "pidfd_open",
                              f"{pid} is a thread, not a process (use procfs.tgid_of)") from e
        raise


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Our own copy (O_CLOEXEC) of fd ``targetfd`` of the process behind ``pidfd``."""
    return libc.syscall(SYS.pidfd_getfd, pidfd, targetfd, 0, op="pidfd_getfd")


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """Send ``sig`` to the process behind ``pidfd``."""
    if hasattr(signal, "pidfd_send_signal"):
        with kernel_errors("pidfd_send_signal", f"signal {sig}"):
            signal.pidfd_send_signal(pidfd, sig)
        return
    libc.syscall(SYS.pidfd_send_signal, pidfd, sig, 0, 0, op="pidfd_send_signal")


class PidFd:
    """An open pidfd on process ``pid``; closes itself as a context manager."""

    def __init__(self, pid: int, flags: int = 0) -> None:
        self.pid = pid
        self._fd = pidfd_open(pid, flags)

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def getfd(self, targetfd: int) -> int:
        """Our own copy (O_CLOEXEC) of the process's fd ``targetfd``; the caller closes it."""
        return pidfd_getfd(self._fd, targetfd)

    def send_signal(self, sig: int) -> None:
        pidfd_send_signal(self._fd, sig)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PidFd:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PidFd(pid={self.pid}, fd={self._fd})"
