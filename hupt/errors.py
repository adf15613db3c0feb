"""The small exception tree every kernel error becomes, at one boundary.

Kernel calls report failure as an errno; callers care about a handful of
meanings: the process is gone, we are not allowed, the notification was
withdrawn, the input was wrong.  ``from_errno`` is the only translation from
errno to these classes, and ``hupt.tracer.libc`` (raw syscalls) and
``kernel_errors`` (os.* calls) are its only users, so an errno never leaks past
``hupt/tracer``.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterator
from contextlib import contextmanager


class HuptError(Exception):
    """Anything hupt reports to the user as a one-line error."""


class UsageError(HuptError):
    """Bad command-line input: nothing was started or touched."""


class ControlError(HuptError):
    """The control socket could not be reached or answered badly."""


class NotUnderHupt(ControlError):
    """The given PID belongs to no hupt instance of this user."""


class ControlTimeout(ControlError):
    """No result within the client's timeout: the operation may still be going on."""


class Refused(HuptError):
    """A path or a peer hupt would have to trust is not safe (a symlink, someone
    else's directory, a socket answered by another user): nothing was started
    or believed."""


class ReloadFailed(HuptError):
    """A reload did not produce a serving generation; the old one still serves."""


class KernelError(HuptError):
    """A kernel call failed; ``errno`` and ``op`` say which and why."""

    def __init__(self, errno: int, op: str, detail: str = "") -> None:
        self.errno = errno
        self.op = op
        msg = f"{op}: {_errno.errorcode.get(errno, str(errno))} ({_strerror(errno)})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class NoSuchProcess(KernelError):
    """The target process or thread does not exist (any more)."""


class AccessDenied(KernelError):
    """The kernel refused: ptrace scope, another user's process, seccomp without privileges."""


class NotificationGone(KernelError):
    """A seccomp notification was withdrawn (signal, death) before it was answered."""


class InjectionError(HuptError):
    """A syscall injected into a tracee failed; every change made so far was undone."""

    def __init__(self, op: str, errno: int) -> None:
        self.op = op
        self.errno = errno
        super().__init__(f"injected {op} failed: {_errno.errorcode.get(errno, str(errno))}")


def _strerror(e: int) -> str:
    import os

    return os.strerror(e)


_BY_ERRNO: dict[int, type[KernelError]] = {
    _errno.ESRCH: NoSuchProcess,
    _errno.EPERM: AccessDenied,
    _errno.EACCES: AccessDenied,
}


def from_errno(errno: int, op: str, detail: str = "", *, notify: bool = False) -> KernelError:
    """The exception for ``errno`` raised by ``op``.

    ``notify`` marks operations on a seccomp notification, where ENOENT means
    the notification was withdrawn rather than a missing file.
    """
    if notify and errno == _errno.ENOENT:
        return NotificationGone(errno, op, detail)
    return _BY_ERRNO.get(errno, KernelError)(errno, op, detail)


@contextmanager
def kernel_errors(op: str, detail: str = "", *, notify: bool = False) -> Iterator[None]:
    """Translate an OSError raised inside the block into the tree above."""
    try:
        yield
    except OSError as e:
        if e.errno is None:
            raise
        raise from_errno(e.errno, op, detail, notify=notify) from e
