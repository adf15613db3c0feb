"""The listening sockets hupt holds, keyed by the address the server chose.

hupt keeps its own reference to every listener a generation creates on an
address it chose (never a kernel-chosen port 0 or an autobound unix name).
Holding the reference is what keeps the accept queue alive while no
generation accepts: connections wait there instead of being refused.

Datagram sockets (UDP, unix SOCK_DGRAM) are held the same way from their
bind(), as there is no listen(): hupt's reference keeps the receive queue,
and the datagrams in it, alive while no generation reads (see handoff).
They have no backlog, and ``refuse_new`` leaves them alone: shutdown() of
an unconnected datagram socket makes every recvfrom() on it return 0 at
once, a busy loop for whoever still reads it.

A held listener is released (closed by hupt) only when no live generation
listens on its address any more, e.g. after a reload that dropped a port, or
at the end of ``hupt run``.

Unix socket paths: hupt answers the servers' unlink() of a held path without
unlinking it (see handoff), and a retiring generation's unlink is a no-op, so
the unlink every server does as it exits never happens.  The file would
outlive the server: a dead socket that refuses every connection.  So at
release hupt removes the path itself, but only if it is still the very file
that was there when hupt took the listener (same device and inode): a path
someone has since replaced with another file is not hupt's to remove.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from hupt.address import Address

# Connections queue in the held socket while no generation accepts (between
# the old one pausing and the new one's first accept(), during an exec): the
# kernel caps this at net.core.somaxconn.
MIN_BACKLOG = 1024
# Generations older than the last few handoffs are retired or paused already.
KEEP_VIEWS = 16
# A bound on the stand-in paths remembered: generations drain for a while, not forever.
MAX_STAND_INS = 4096


@dataclass
class Held:
    address: Address
    sock: socket.socket
    inode: int
    backlog: int
    # Unix paths: (st_dev, st_ino) of the socket file when hupt took the listener.
    file_id: tuple[int, int] | None = None
    # The other sockets of a SO_REUSEPORT group on the same address, found in
    # a server hupt attached to (one socket per worker): each has an accept
    # queue of its own, so each is held and handed on, none closed.
    group: list[socket.socket] = field(default_factory=list)
    # O_NONBLOCK is one flag of the socket, shared by every holder (a socket
    # cannot be reopened for a description of one's own), and each generation
    # may want it otherwise.  hupt sets it for a generation when the handoff
    # gives it the socket and when a resume gives it back: ``setter`` is the
    # generation whose mode it has now (None: not known, an adopted socket),
    # ``views`` the mode each other generation had when it last changed hands,
    # ``older`` (N, mode) the mode of the unknown generations before N.
    setter: int | None = None
    views: dict[int, bool] = field(default_factory=dict)
    older: tuple[int, bool] | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def sockets(self) -> list[socket.socket]:
        """The held socket first, then the rest of its reuseport group."""
        return [self.sock, *self.group]

    def nonblock(self) -> bool:
        """The socket's O_NONBLOCK now, as every holder sees it."""
        return bool(fcntl.fcntl(self.sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)

    def set_by(self, number: int, was: bool, nonblock: bool) -> None:
        """Generation ``number`` now has the socket with O_NONBLOCK ``nonblock`` (a
        handoff, a resume); until then it had ``was``: the last setter's mode, which
        that one may have changed itself since."""
        if self.setter is not None:
            self.views[self.setter] = was
        elif self.older is None:
            self.older = (number, was)
        self.views[number] = nonblock
        self.setter = number
        for n in sorted(self.views)[:-KEEP_VIEWS]:
            del self.views[n]

    def nonblock_of(self, number: int) -> bool:
        """The O_NONBLOCK generation ``number`` expects of the socket."""
        if number != self.setter:
            if number in self.views:
                return self.views[number]
            if self.older is not None and number < self.older[0]:
                return self.older[1]
        return self.nonblock()

    def raise_backlog(self, asked: int, sock: socket.socket | None = None) -> int:
        """listen() again on the held socket (or one of its group); on a listening
        socket this only resizes the queue.  A datagram socket has no backlog."""
        if self.address.is_datagram:
            return 0
        want = max(MIN_BACKLOG, asked, self.backlog)
        (sock or self.sock).listen(want)
        self.backlog = want
        return want


class Listeners:
    def __init__(self) -> None:
        self._by_addr: dict[Address, Held] = {}
        self._by_inode: dict[int, Held] = {}
        # Paths the stand-ins of paused unix listeners were bound to (their
        # files removed at once), by generation: what getsockname() answers
        # for the paused fd, so what a server unlinks at exit (gunicorn), and
        # the handoff answers that unlink with 0 as for a held path.
        self.stand_ins: dict[bytes, int] = {}

    def add_stand_in(self, path: bytes, number: int) -> None:
        self.stand_ins[path] = number
        for old in list(self.stand_ins)[:-MAX_STAND_INS]:
            del self.stand_ins[old]

    def forget_stand_ins(self, number: int) -> None:
        for path in [p for p, n in self.stand_ins.items() if n == number]:
            del self.stand_ins[path]

    def add(self, address: Address, sock: socket.socket, backlog: int) -> Held:
        old = self._by_addr.get(address)
        if old is not None:
            self.release(address)
        held = Held(address, sock, os.fstat(sock.fileno()).st_ino, 0, _file_id(address))
        held.raise_backlog(backlog)
        self._by_addr[address] = held
        self._by_inode[held.inode] = held
        return held

    def add_to_group(self, address: Address, sock: socket.socket) -> Held:
        """Hold ``sock`` too, another SO_REUSEPORT socket on held ``address``."""
        held = self._by_addr[address]
        held.group.append(sock)
        self._by_inode[os.fstat(sock.fileno()).st_ino] = held
        return held

    def get(self, address: Address) -> Held | None:
        return self._by_addr.get(address)

    def by_inode(self, inode: int) -> Held | None:
        return self._by_inode.get(inode)

    def addresses(self) -> set[Address]:
        return set(self._by_addr)

    def inodes(self) -> dict[int, Address]:
        """Every held socket's inode, reuseport group members included."""
        return {ino: h.address for ino, h in self._by_inode.items()}

    @property
    def has_unix(self) -> bool:
        return any(a.is_unix for a in self._by_addr)

    def unix_paths(self) -> set[bytes]:
        return {a.path for a in self._by_addr if a.is_unix and not a.is_abstract}

    def release(self, address: Address) -> None:
        held = self._by_addr.pop(address, None)
        if held is not None:
            for ino in [i for i, h in self._by_inode.items() if h is held]:
                del self._by_inode[ino]
            for sock in held.sockets():
                sock.close()
            if held.file_id is not None and _file_id(address) == held.file_id:
                with contextlib.suppress(OSError):
                    os.unlink(address.path)

    def keep_only(self, addresses: Iterable[Address]) -> list[Address]:
        keep = set(addresses)
        gone = [a for a in self._by_addr if a not in keep]
        for a in gone:
            self.release(a)
        return gone

    def refuse_new(self) -> None:
        """Stop every held socket taking connections, for all its holders at once.

        For a stop, once no generation accepts: shutdown() of a listening socket
        takes it out of LISTEN (TCP: the queued connections are reset, later
        SYNs refused; unix: connect() gets ECONNREFUSED).  As a server that
        closes its listener before draining, hupt then refuses new clients at
        once, who would otherwise wait in a queue nobody serves until hupt
        exits and be reset then.  Accepted connections are not touched.
        """
        for held in self._by_addr.values():
            if held.address.is_datagram:
                continue
            for sock in held.sockets():
                with contextlib.suppress(OSError):  # ENOTCONN: not listening after all
                    sock.shutdown(socket.SHUT_RD)

    def close_all(self) -> None:
        for a in list(self._by_addr):
            self.release(a)

    def __iter__(self) -> Iterator[Held]:
        return iter(list(self._by_addr.values()))

    def __len__(self) -> int:
        return len(self._by_addr)


def reuseport(sock: socket.socket) -> bool:
    """Whether ``sock`` has SO_REUSEPORT (it may share its address with a group)."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
    except OSError:  # unix sockets have none
        return False


def _file_id(address: Address) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the socket file at a unix path address; None if there is none."""
    if not address.is_unix or address.is_abstract:
        return None
    try:
        st = os.stat(address.path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None
