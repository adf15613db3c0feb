"""Facts about the seccomp notify fd, the supervisor's end of the filter.

Each notified syscall blocks its thread until the supervisor answers on
this fd.  What one has to know to answer correctly:

* The fd is pollable: POLLIN means a notification is waiting, POLLHUP that
  no task uses the filter any more (the last one is exiting: POLLHUP shows
  before the process is reaped, even before it is a zombie).
  NOTIF_RECV blocks while nothing is pending, so ``recv`` polls first and
  returns None instead of stalling the supervisor's single-threaded loop.
* RECV needs a zeroed buffer of the kernel's ``sizeof(struct seccomp_notif)``
  (EINVAL otherwise); the sizes come from SECCOMP_GET_NOTIF_SIZES at run
  time, the buffer is at least as large as hupt's struct layout, and the
  response is zero-padded the same way.
* ``pid`` in a notification is the thread id of the caller, in hupt's pid
  namespace.  Everything read from the target (the sockaddr, a path) may
  change under us or belong to a reused id: read, then ask ID_VALID, then
  act.  ID_VALID takes a pointer to the u64 id.
* A notification disappears when the caller dies or, before hupt received
  it (or always, without FLAG_WAIT_KILLABLE_RECV), when it takes a signal;
  with SA_RESTART the syscall then comes back under a new id.  RECV,
  ID_VALID, SEND and ADDFD report ENOENT for it: ``recv`` returns None,
  ``id_valid`` False, ``send_*`` and ``addfd`` raise NotificationGone.
* ADDFD blocks until the caller has taken the fd, and fails with EINTR if
  hupt takes a signal meanwhile (no SA_RESTART); the kernel then withdraws
  the request (nothing installed) unless the caller took the fd already, in
  which case ADDFD reports that outcome instead.  An EINTR is asked again.
* SEND's ``error`` is a negative errno; ``send_result`` takes the positive
  one.  CONTINUE runs the syscall as if unfiltered, with arguments re-read
  from the target's memory: never use it to approve something checked
  earlier (hupt only continues calls it does not interfere with).
* ADDFD with SETFD puts one of our fds at a chosen number in the target,
  replacing (closing) what was there, and returns that number; a following
  SEND then completes the syscall.  ADDFD_FLAG_SEND would do both at once but
  makes the syscall return the fd number, which is wrong for bind().
* SET_FLAGS(SYNC_WAKE_UP, 6.6+) takes the flag by value and makes the
  kernel switch straight to the woken thread: a round trip drops from about
  40 µs to about 7 µs.  Older kernels answer EINVAL.
"""

from __future__ import annotations

import errno
import os
import select
from dataclasses import dataclass
from types import TracebackType

from hupt.errors import KernelError, NotificationGone
from hupt.tracer.abi import (
    ADDFD_FLAG_SETFD,
    IOCTL_NOTIF_ADDFD,
    IOCTL_NOTIF_ID_VALID,
    IOCTL_NOTIF_RECV,
    IOCTL_NOTIF_SEND,
    IOCTL_NOTIF_SET_FLAGS,
    NOTIF,
    NOTIF_ADDFD,
    NOTIF_ID,
    NOTIF_RESP,
    O_CLOEXEC,
    USER_NOTIF_FD_SYNC_WAKE_UP,
    USER_NOTIF_FLAG_CONTINUE,
)
from hupt.tracer.libc import ioctl_buf, ioctl_int
from hupt.tracer.seccomp import notif_sizes


@dataclass(frozen=True)
class Notification:
    """One intercepted syscall, as seccomp_notif reports it."""

    id: int
    pid: int  # the calling thread's id (TID), not necessarily a process id
    nr: int
    arch: int
    ip: int
    args: tuple[int, ...]


class NotifyFd:
    """Owns a seccomp notify fd; closes it on ``close`` or at the end of a with block."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        notif_size, resp_size, _ = notif_sizes()
        self._recv_size = max(notif_size, NOTIF.size)
        self._resp_size = max(resp_size, NOTIF_RESP.size)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("notify fd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def recv(self) -> Notification | None:
        """The next pending notification; None if none is pending or it was withdrawn."""
        p = select.poll()
        p.register(self.fileno(), select.POLLIN)
        if not any(ev & select.POLLIN for _, ev in p.poll(0)):
            return None
        buf = bytearray(self._recv_size)
        try:
            ioctl_buf(self._fd, IOCTL_NOTIF_RECV, buf, op="seccomp NOTIF_RECV", notify=True)
        except NotificationGone:
            return None
        except KernelError as e:
            if e.errno == errno.EINTR:
                return None
            raise
        nid, pid, _flags, nr, arch, ip, *args = NOTIF.unpack_from(buf)
        return Notification(nid, pid, nr, arch, ip, tuple(args))

    def id_valid(self, nid: int) -> bool:
        """Whether notification ``nid`` still waits for an answer (its caller is still blocked)."""
        try:
            ioctl_buf(self.fileno(), IOCTL_NOTIF_ID_VALID, bytearray(NOTIF_ID.pack(nid)),
                      op="seccomp NOTIF_ID_VALID", notify=True)
        except NotificationGone:
            return False
        return True

    def send_continue(self, nid: int) -> None:
        """Let the syscall run in the kernel as if it had not been filtered."""
        self._send(nid, 0, 0, USER_NOTIF_FLAG_CONTINUE)

    def send_result(self, nid: int, val: int = 0, error: int = 0) -> None:
        """Complete the syscall unrun: it returns ``val``, or fails with errno ``error``."""
        if error < 0:
            raise ValueError(f"error is a positive errno, got {error}")
        self._send(nid, val, -error, 0)

    def addfd(self, nid: int, srcfd: int, newfd: int, *, cloexec: bool) -> int:
        """Install our ``srcfd`` as fd ``newfd`` of the caller (closing what was there).

        ADDFD waits for the caller to take the fd; a signal to hupt meanwhile (a
        SIGHUP, a SIGCHLD: Python's handlers are installed without SA_RESTART)
        makes it fail with EINTR, the request withdrawn and nothing installed.
        It is asked again: an EINTR would otherwise fail a bind that should have
        got the held socket.
        """
        while True:
            buf = bytearray(NOTIF_ADDFD.pack(nid, ADDFD_FLAG_SETFD, srcfd, newfd,
                                             O_CLOEXEC if cloexec else 0))
            try:
                return ioctl_buf(self.fileno(), IOCTL_NOTIF_ADDFD, buf,
                                 op="seccomp NOTIF_ADDFD", notify=True)
            except KernelError as e:
                if e.errno != errno.EINTR:
                    raise

    def enable_sync_wakeup(self) -> bool:
        """Ask for synchronous wake-ups (faster round trips); False if the kernel lacks them."""
        try:
            ioctl_int(self.fileno(), IOCTL_NOTIF_SET_FLAGS, USER_NOTIF_FD_SYNC_WAKE_UP,
                      op="seccomp NOTIF_SET_FLAGS")
        except KernelError as e:
            if e.errno == errno.EINVAL:
                return False
            raise
        return True

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> NotifyFd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _send(self, nid: int, val: int, error: int, flags: int) -> None:
        buf = bytearray(self._resp_size)
        NOTIF_RESP.pack_into(buf, 0, nid, val, error, flags)
        ioctl_buf(self.fileno(), IOCTL_NOTIF_SEND, buf, op="seccomp NOTIF_SEND", notify=True)
