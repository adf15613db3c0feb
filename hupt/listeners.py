"""The listening sockets hupt holds, keyed by the address the server chose.

hupt keeps its own reference to every listener a generation creates on an
address it chose (never a kernel-chosen port 0 or an autobound unix name).
Holding the reference is what keeps the accept queue alive while no
generation accepts: connections wait there instead of being refused.

A held listener is released (closed by hupt) only when no live generation
listens on its address any more, e.g. after a reload that dropped a port.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from hupt.address import Address

# Connections queue in the held socket while no generation accepts (between
# the old one pausing and the new one's first accept(), during an exec): the
# kernel caps this at net.core.somaxconn.
MIN_BACKLOG = 1024


@dataclass
class Held:
    address: Address
    sock: socket.socket
    inode: int
    backlog: int

    def fileno(self) -> int:
        return self.sock.fileno()

    def raise_backlog(self, asked: int) -> int:
        """listen() again on the held socket; on a listening socket this only resizes the queue."""
        want = max(MIN_BACKLOG, asked, self.backlog)
        self.sock.listen(want)
        self.backlog = want
        return want


class Listeners:
    def __init__(self) -> None:
        self._by_addr: dict[Address, Held] = {}
        self._by_inode: dict[int, Held] = {}

    def add(self, address: Address, sock: socket.socket, backlog: int) -> Held:
        old = self._by_addr.get(address)
        if old is not None:
            self.release(address)
        held = Held(address, sock, os.fstat(sock.fileno()).st_ino, 0)
        held.raise_backlog(backlog)
        self._by_addr[address] = held
        self._by_inode[held.inode] = held
        return held

    def get(self, address: Address) -> Held | None:
        return self._by_addr.get(address)

    def by_inode(self, inode: int) -> Held | None:
        return self._by_inode.get(inode)

    def addresses(self) -> set[Address]:
        return set(self._by_addr)

    def inodes(self) -> dict[int, Address]:
        return {ino: h.address for ino, h in self._by_inode.items()}

    @property
    def has_unix(self) -> bool:
        return any(a.is_unix for a in self._by_addr)

    def unix_paths(self) -> set[bytes]:
        return {a.path for a in self._by_addr if a.is_unix and not a.is_abstract}

    def release(self, address: Address) -> None:
        held = self._by_addr.pop(address, None)
        if held is not None:
            self._by_inode.pop(held.inode, None)
            held.sock.close()

    def keep_only(self, addresses: Iterable[Address]) -> list[Address]:
        keep = set(addresses)
        gone = [a for a in self._by_addr if a not in keep]
        for a in gone:
            self.release(a)
        return gone

    def close_all(self) -> None:
        for a in list(self._by_addr):
            self.release(a)

    def __iter__(self) -> Iterator[Held]:
        return iter(list(self._by_addr.values()))

    def __len__(self) -> int:
        return len(self._by_addr)
