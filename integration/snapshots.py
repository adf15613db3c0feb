"""Snapshots of a live process, to prove that something left it exactly as it was.

A pause, a rollback, a failed exec or a refused attach must leave a server's fd
table (what each fd refers to, and its flags), its epoll registrations (events,
data) and its threads (tracer, seccomp filters, blocked signals) as they were.
Each helper reads one of these through hupt.tracer.procfs; comparing two
snapshots with == is the assertion.

Under load, client connections come and go between a listing and a read: those
fds and threads are skipped, and server_state() leaves client connections out.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

from harness import listener_inode, listener_inodes

from hupt.errors import KernelError
from hupt.tracer import procfs


def fd_table(pid: int) -> dict[int, tuple[str, int]]:
    """fd -> (what it refers to, its flags): what an exec or a resume must leave intact."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        fd = int(name)
        try:
            out[fd] = (os.readlink(f"/proc/{pid}/fd/{fd}"), procfs.fd_flags(pid, fd))
        except (FileNotFoundError, KernelError):
            # A client connection closed between the listing and the read:
            # it is under load, and connections are not part of the state.
            continue
    return out


def epoll_view(pid: int) -> dict[int, list[procfs.EpollEntry]]:
    """epoll fd -> its registrations, for every epoll instance of pid."""
    return {epfd: procfs.epoll_registrations(pid, epfd) for epfd in procfs.epoll_fds(pid)}


class ServerState(NamedTuple):
    listener: int | None
    """The inode of the listening socket on the port."""
    fds: dict[int, tuple[str, int]]
    """fd_table without the client connections."""
    regs: dict[int, list[procfs.EpollEntry]]
    """epoll fd -> its registrations of the listener."""


def server_state(pid: int, port: int) -> ServerState:
    """The fds that are not client connections, and how epoll watches the listener.

    Client connections come and go under load; everything else (the
    listener's fd number and flags, epoll instances, pipes, stdio) and the
    listener's epoll registrations (events, data) must be exactly as before.
    """
    listener = listener_inode(port)
    listening = listener_inodes(pid)
    fds = {fd: v for fd, v in fd_table(pid).items()
           if not v[0].startswith("socket:[") or int(v[0][8:-1]) in listening}
    regs = {epfd: [e for e in entries if e.ino == listener]
            for epfd, entries in epoll_view(pid).items()}
    return ServerState(listener, fds, regs)


def thread_filters(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (TracerPid, Seccomp_filters) of every thread of ``pid``.

    A thread that exits during the scan (one per connection, under load) is skipped.
    """
    out = {}
    for tid in procfs.threads(pid):
        try:
            out[tid] = (procfs.tracer_pid(tid), procfs.seccomp_filters(tid))
        except KernelError:
            continue
    return out


def thread_states(pid: int) -> dict[int, tuple[str, str]]:
    """tid -> (TracerPid, SigBlk) for every live thread."""
    out = {}
    for tid in procfs.threads(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            status = procfs.status_fields(tid)
            out[tid] = (status["TracerPid"], status["SigBlk"])
    return out


def whole_view(pid: int) -> tuple[object, ...]:
    """Every fd with its target and flags, every epoll registration, every thread's state."""
    return fd_table(pid), epoll_view(pid), thread_states(pid)
