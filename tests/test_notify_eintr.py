"""NOTIF_ADDFD interrupted by a signal to hupt is asked again (hupt/tracer/notify.py).

Found by reliability/test_storms.py: SIGHUPs a millisecond apart while
reloads ran made ADDFD fail with EINTR now and then; the bind it answered
then ran unfiltered, failed with EADDRINUSE, and the reload failed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from hupt.errors import KernelError
from hupt.tracer import notify as notify_mod
from hupt.tracer.abi import NOTIF_ADDFD
from hupt.tracer.notify import NotifyFd


@pytest.fixture
def notify_fd() -> Iterator[NotifyFd]:
    n = NotifyFd(os.open("/dev/null", os.O_RDONLY))
    yield n
    n.close()


def _ioctl(outcomes: list[int | KernelError],
           seen: list[tuple[int, ...]]) -> object:
    def ioctl_buf(fd: int, request: int, buf: bytearray, *, op: str,
                  notify: bool = False) -> int:
        seen.append(NOTIF_ADDFD.unpack(bytes(buf)))
        outcome = outcomes.pop(0)
        if isinstance(outcome, KernelError):
            raise outcome
        return outcome

    return ioctl_buf


def test_addfd_interrupted_by_a_signal_is_asked_again(
        notify_fd: NotifyFd, monkeypatch: pytest.MonkeyPatch) -> None:
    eintr = KernelError(errno.EINTR, "seccomp NOTIF_ADDFD")
    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr(notify_mod, "ioctl_buf", _ioctl([eintr, eintr, 7], seen))
    assert notify_fd.addfd(42, 5, 7, cloexec=False) == 7
    assert len(seen) == 3 and len(set(seen)) == 1, seen  # the same request each time


def test_addfd_other_errors_are_not_retried(
        notify_fd: NotifyFd, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr(notify_mod, "ioctl_buf",
                        _ioctl([KernelError(errno.EBADF, "seccomp NOTIF_ADDFD")], seen))
    with pytest.raises(KernelError) as e:
        notify_fd.addfd(42, 5, 7, cloexec=True)
    assert e.value.errno == errno.EBADF and len(seen) == 1
