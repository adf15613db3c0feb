"""hupt.tracer.pidfd against real child processes."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import subprocess
import sys

import pytest
from harness import Procs, python_child

from hupt.errors import KernelError, NoSuchProcess
from hupt.tracer import pidfd, procfs
from hupt.tracer.abi import F_GETFD, FD_CLOEXEC

WAIT = 10.0


# A socket and a second thread; reports fd numbers, the socket's inode and the thread's TID.
SOCKET_CHILD = """
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
tids = []
ev = threading.Event()
def run():
    tids.append(threading.get_native_id())
    ev.set()
    hold()
threading.Thread(target=run, daemon=True).start()
ev.wait()
report({"fd": s.fileno(), "ino": os.fstat(s.fileno()).st_ino, "port": s.getsockname()[1],
        "tid": tids[0]})
hold()
"""


def test_getfd_is_the_same_socket(procs: Procs) -> None:
    c, info = python_child(procs, SOCKET_CHILD)
    with pidfd.PidFd(c.pid) as p:
        assert fcntl.fcntl(p.fileno(), F_GETFD) & FD_CLOEXEC
        fd = p.getfd(info["fd"])
        try:
            assert os.fstat(fd).st_ino == info["ino"]
            assert fcntl.fcntl(fd, F_GETFD) & FD_CLOEXEC
            assert procfs.socket_inodes(os.getpid())[fd] == info["ino"]
        finally:
            os.close(fd)
        with pytest.raises(KernelError) as e:
            p.getfd(999)
        assert e.value.errno == errno.EBADF
    assert p.closed


def test_thread_id_is_refused_and_tgid_works(procs: Procs) -> None:
    c, info = python_child(procs, SOCKET_CHILD)
    tid = info["tid"]
    with pytest.raises(KernelError) as e:
        pidfd.pidfd_open(tid)
    assert e.value.errno == errno.ENOENT
    assert "tgid_of" in str(e.value)
    assert procfs.tgid_of(tid) == c.pid
    fd = pidfd.pidfd_open(procfs.tgid_of(tid))
    try:
        got = pidfd.pidfd_getfd(fd, info["fd"])
        assert os.fstat(got).st_ino == info["ino"]
        os.close(got)
    finally:
        os.close(fd)


def test_send_signal_and_exit_readable(procs: Procs) -> None:
    c, _ = python_child(procs, "report({}); hold()")
    with pidfd.PidFd(c.pid) as p:
        assert select.select([p], [], [], 0)[0] == []
        p.send_signal(signal.SIGTERM)
        assert select.select([p], [], [], WAIT)[0] == [p]  # readable once it exits
        assert c.popen.wait(WAIT) == -signal.SIGTERM
        # Reaped: the pidfd still names that process, which is gone, never a new one.
        with pytest.raises(NoSuchProcess):
            p.send_signal(signal.SIGTERM)


def test_no_such_process() -> None:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait(WAIT)
    with pytest.raises(NoSuchProcess):
        pidfd.PidFd(p.pid)


def test_raw_syscall_fallback(procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    # The branch for Pythons built without os.pidfd_open / signal.pidfd_send_signal,
    # run against the real kernel.
    monkeypatch.delattr(os, "pidfd_open")
    monkeypatch.delattr(signal, "pidfd_send_signal")
    c, info = python_child(procs, SOCKET_CHILD)
    with pytest.raises(KernelError) as e:
        pidfd.pidfd_open(info["tid"])
    assert e.value.errno == errno.ENOENT
    with pidfd.PidFd(c.pid) as p:
        fd = p.getfd(info["fd"])
        assert os.fstat(fd).st_ino == info["ino"]
        os.close(fd)
        p.send_signal(signal.SIGKILL)
        assert c.popen.wait(WAIT) == -signal.SIGKILL
