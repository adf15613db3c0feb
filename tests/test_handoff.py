"""Answering bind() and listen(): what counts as a generation's listen.

The notify fd is a stand-in that answers from a queue; the "server" is this
very process (its memory holds the sockaddr, its fd table the sockets), so the
handoff reads memory, takes references and installs the held socket for real:
an ADDFD is a dup2 here.  Servers that inherit sockets (haproxy, newer
gunicorn) check SO_ACCEPTCONN after bind() and skip listen() on a socket that
listens already: the bind handed such a socket counts as the listen.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterator
from typing import cast

import pytest

from hupt.address import AF_INET, Address
from hupt.errors import KernelError
from hupt.handoff import Handoff
from hupt.listeners import Listeners
from hupt.tracer.abi import SYS
from hupt.tracer.notify import Notification, NotifyFd


class FakeNotify:
    """A notify fd whose notifications are queued by the test."""

    def __init__(self) -> None:
        self.queue: list[Notification] = []
        self.answers: list[tuple[int, str, int]] = []  # (id, "continue"/"result", errno)
        self.withdrawn: set[int] = set()  # ids whose caller was interrupted meanwhile
        self.addfd_error: KernelError | None = None
        self._next = 1
        self._buffers: list[ctypes.Array[ctypes.c_char]] = []

    def call(self, nr: SYS, *args: int) -> int:
        nid, self._next = self._next, self._next + 1
        full = (*args, 0, 0, 0, 0, 0, 0)[:6]
        self.queue.append(Notification(nid, os.getpid(), int(nr), 0, 0, full))
        return nid

    def bind(self, fd: int, addr: Address) -> int:
        buf = ctypes.create_string_buffer(addr.sockaddr(), 128)
        self._buffers.append(buf)
        return self.call(SYS.bind, fd, ctypes.addressof(buf), len(addr.sockaddr()))

    def listen(self, fd: int, backlog: int = 128) -> int:
        return self.call(SYS.listen, fd, backlog)

    # -- what Handoff uses -------------------------------------------------------
    def recv(self) -> Notification | None:
        return self.queue.pop(0) if self.queue else None

    def id_valid(self, nid: int) -> bool:
        return nid not in self.withdrawn

    def send_continue(self, nid: int) -> None:
        self.answers.append((nid, "continue", 0))

    def send_result(self, nid: int, val: int = 0, error: int = 0) -> None:
        self.answers.append((nid, "result", error))

    def addfd(self, nid: int, srcfd: int, newfd: int, *, cloexec: bool) -> int:
        if self.addfd_error is not None:
            raise self.addfd_error
        return os.dup2(srcfd, newfd, inheritable=not cloexec)

    def answer(self, nid: int) -> tuple[str, int]:
        return next((how, err) for i, how, err in self.answers if i == nid)


def listening_on(addr: Address) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr.host, addr.port))
    s.listen(5)
    return s


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


@pytest.fixture
def addr() -> Address:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Address(AF_INET, "127.0.0.1", port)


@pytest.fixture
def listeners() -> Iterator[Listeners]:
    held = Listeners()
    yield held
    held.close_all()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """The "server's" sockets, closed after the test."""
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def copy(listeners: Listeners, generation: int = 2) -> tuple[Handoff, FakeNotify]:
    """One copy of a generation: its own notify fd."""
    notify = FakeNotify()
    return Handoff(generation, cast(NotifyFd, notify), listeners), notify


def server_socket(sockets: list[socket.socket], *, reuseport: bool = False) -> socket.socket:
    s = socket.socket()
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sockets.append(s)
    return s


def test_a_bind_handed_a_listening_socket_is_the_listen(
        addr: Address, listeners: Listeners, sockets: list[socket.socket]) -> None:
    held = listeners.add(addr, listening_on(addr), 5)
    h, notify = copy(listeners)
    s = server_socket(sockets)
    nid = notify.bind(s.fileno(), addr)
    assert h.service() == [addr], "a server checking SO_ACCEPTCONN calls no listen()"
    assert notify.answer(nid) == ("result", 0)
    assert inode(s.fileno()) == held.inode
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    # A server that listens anyway: answered, and not counted a second time.
    nid = notify.listen(s.fileno(), 4096)
    assert h.service() == []
    assert notify.answer(nid) == ("result", 0)
    assert held.backlog == 4096


def test_a_fresh_socket_counts_at_its_listen(
        addr: Address, listeners: Listeners, sockets: list[socket.socket]) -> None:
    h, notify = copy(listeners, generation=1)
    s = server_socket(sockets)
    nid = notify.bind(s.fileno(), addr)
    assert h.service() == [], "bound by the kernel (CONTINUE): nothing listens yet"
    assert notify.answer(nid) == ("continue", 0)
    s.bind((addr.host, addr.port))  # what CONTINUE lets the kernel do
    nid = notify.listen(s.fileno())
    assert h.service() == [addr]
    assert notify.answer(nid) == ("result", 0)
    held = listeners.get(addr)
    assert held is not None and held.inode == inode(s.fileno())
    # Its worker binds the same address: the held socket, the same copy, no new count.
    worker = server_socket(sockets)
    notify.bind(worker.fileno(), addr)
    notify.listen(worker.fileno())
    assert h.service() == []
    assert inode(worker.fileno()) == held.inode


def test_every_copy_counts_once(
        addr: Address, listeners: Listeners, sockets: list[socket.socket]) -> None:
    listeners.add(addr, listening_on(addr), 5)
    copies = [copy(listeners) for _ in range(3)]
    for _, notify in copies:
        s = server_socket(sockets)
        notify.bind(s.fileno(), addr)
        notify.listen(s.fileno())
    # --multi 3: one report per copy, whether or not each also listened.
    assert [h.service() for h, _ in copies] == [[addr]] * 3


@pytest.mark.parametrize("how", ["withdrawn", "addfd fails"])
def test_a_bind_that_failed_does_not_count(
        how: str, addr: Address, listeners: Listeners, sockets: list[socket.socket]) -> None:
    held = listeners.add(addr, listening_on(addr), 5)
    h, notify = copy(listeners)
    s = server_socket(sockets)
    mine = inode(s.fileno())
    nid = notify.bind(s.fileno(), addr)
    if how == "withdrawn":
        notify.withdrawn.add(nid)  # a signal interrupted the caller: it binds again later
    else:
        notify.addfd_error = KernelError(errno.EMFILE, "seccomp NOTIF_ADDFD")
    assert h.service() == []
    assert inode(s.fileno()) == mine != held.inode
    assert all(a[1] != "result" for a in notify.answers), notify.answers
    # The retried bind goes through, and counts then.
    notify.withdrawn.clear()
    notify.addfd_error = None
    notify.bind(s.fileno(), addr)
    assert h.service() == [addr]


def test_a_held_socket_that_no_longer_listens_does_not_count(
        addr: Address, listeners: Listeners, sockets: list[socket.socket]) -> None:
    listeners.add(addr, listening_on(addr), 5)
    listeners.refuse_new()  # hupt stops: the held socket is out of LISTEN
    h, notify = copy(listeners)
    s = server_socket(sockets)
    nid = notify.bind(s.fileno(), addr)
    assert h.service() == []
    assert notify.answer(nid) == ("result", 0)


def test_joining_a_reuseport_group_counts_at_the_listen(
        addr: Address, listeners: Listeners, sockets: list[socket.socket]) -> None:
    # A generation 1 that shards its port: the second worker's bind is handed the
    # socket the first one bound, which listens only once a listen() is answered.
    h, notify = copy(listeners, generation=1)
    first = server_socket(sockets, reuseport=True)
    notify.bind(first.fileno(), addr)
    assert h.service() == []
    first.bind((addr.host, addr.port))
    second = server_socket(sockets, reuseport=True)
    nid = notify.bind(second.fileno(), addr)
    assert h.service() == []
    assert notify.answer(nid) == ("result", 0) and inode(second.fileno()) == inode(first.fileno())
    notify.listen(second.fileno())
    notify.listen(first.fileno())
    assert h.service() == [addr]


def test_an_execd_image_counts_again(
        addr: Address, listeners: Listeners, sockets: list[socket.socket]) -> None:
    listeners.add(addr, listening_on(addr), 5)
    h, notify = copy(listeners)
    s = server_socket(sockets)
    notify.bind(s.fileno(), addr)
    assert h.service() == [addr]
    # Exec mode: the same process and notify fd run the next generation's image,
    # whose bind of the held socket is its listen.
    h.generation = 3
    h.forget_image()
    notify.bind(server_socket(sockets).fileno(), addr)
    assert h.service() == [addr]
