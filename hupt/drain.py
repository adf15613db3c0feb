"""Draining an old generation: counting what it still serves, closing what is idle.

Counting is ``sockdiag.in_flight``: accepted connections of the held
listeners whose socket is in one of the generation's fd tables, read from the
kernel's socket tables; nothing is intercepted, so a server pays nothing for
it while it serves.

``--close-idle MS`` ends keep-alive connections that would otherwise pin an
old generation until the drain timeout.  A connection is idle when nothing
was received or sent on it for MS milliseconds and both its queues are
empty.  hupt takes its own reference to the socket (pidfd_getfd) and shuts
it down both ways: the client sees a FIN, the server's next read() returns
end-of-file and it closes the connection as if the client had left.

The race this cannot avoid (nginx and every HTTP server share it): a client
may send its next request at the very moment the connection is closed; it
then sees the connection close without a response, and a client that does
not retry idempotent requests on a reused connection reports an error.
Hence: off by default, and MS should exceed the clients' typical think time.
Only TCP connections carry the timing information; unix connections are left
to the drain timeout.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from hupt.address import Address
from hupt.errors import HuptError, NoSuchProcess
from hupt.tracer import pidfd, procfs
from hupt.tracer.abi import TcpState
from hupt.tracer.sockdiag import SockDiag

_WILDCARD = {"0.0.0.0", "::"}


@dataclass(frozen=True)
class Idle:
    pid: int
    fd: int
    inode: int
    peer: str


def idle_connections(diag: SockDiag, listeners: Iterable[Address], pids: Iterable[int],
                     idle_ms: int) -> list[Idle]:
    inodes: set[int] = set()
    peers: dict[int, str] = {}
    for a in listeners:
        if a.is_unix:
            continue
        for c in diag.tcp_connections(a.family, a.port):
            if (c.inode and c.state == TcpState.ESTABLISHED
                    and (a.host in _WILDCARD or c.local_host == a.host)
                    and c.rqueue == 0 and c.wqueue == 0
                    and c.last_data_recv_ms is not None and c.last_data_recv_ms >= idle_ms
                    and c.last_data_sent_ms is not None and c.last_data_sent_ms >= idle_ms):
                inodes.add(c.inode)
                peers[c.inode] = f"{c.remote_host}:{c.remote_port}"
    if not inodes:
        return []
    found: list[Idle] = []
    for pid in pids:
        try:
            table = procfs.socket_inodes(pid)
        except NoSuchProcess:
            continue
        for fd, ino in table.items():
            if ino in inodes:
                found.append(Idle(pid, fd, ino, peers[ino]))
    return found


def close_connection(c: Idle) -> bool:
    """Shut the connection down both ways through our own reference; False if it is gone."""
    try:
        with pidfd.PidFd(c.pid) as p:
            fd = p.getfd(c.fd)
    except HuptError:
        return False
    with socket.socket(fileno=fd) as s:
        if os.fstat(fd).st_ino != c.inode:
            return False  # the fd number was reused since the scan
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
    return True

