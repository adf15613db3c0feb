"""hupt.tracer.sockdiag against real sockets, in this process and in child servers."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from harness import Procs, Started, settle

from hupt.address import Address
from hupt.tracer.abi import AF_INET, AF_INET6, AF_UNIX, TcpState
from hupt.tracer.sockdiag import SockDiag, in_flight, kernel_dev

WAIT = 10.0

# A server that accepts on every listener it is given and keeps what it accepts:
# a client's b"close" makes it close that connection; a client's EOF does not
# (the socket stays open in CLOSE_WAIT). argv[1] is a JSON list of [host, port]
# (port -1: the previous listener's port) or ["unix", name] (abstract if it starts
# with NUL). Reports the listeners' ports.
SERVER = r"""
import json, selectors, signal, socket, sys
spec = json.loads(sys.argv[1])
backlog = int(sys.argv[2])
for attempt in range(20):
    listeners, ports = [], []
    try:
        for host, port in spec:
            if host == "unix":
                s = socket.socket(socket.AF_UNIX)
                s.bind(port)
                ports.append(port)
            else:
                fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                s = socket.socket(fam)
                if host.startswith("::ffff:"):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind((host, ports[-1] if port == -1 else port))
                ports.append(s.getsockname()[1])
            listeners.append(s)
        break
    except OSError:
        for s in listeners:
            s.close()
else:
    sys.exit("no common free port")
sel = selectors.DefaultSelector()
for s in listeners:
    s.listen(backlog)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, "listener")
held = []
sys.stdout.write(json.dumps(ports) + "\n")
sys.stdout.flush()
while True:
    for key, _ in sel.select():
        if key.data == "listener":
            try:
                conn, _ = key.fileobj.accept()
            except BlockingIOError:
                continue
            sel.register(conn, selectors.EVENT_READ, "conn")
            continue
        conn = key.fileobj
        data = conn.recv(64)
        if not data:
            sel.unregister(conn)
            held.append(conn)
        elif data.startswith(b"close"):
            sel.unregister(conn)
            conn.close()
"""


def server(procs: Procs, spec: list[Any], *, backlog: int = 128,
           cwd: Path | None = None) -> tuple[Started, list[Any]]:
    s = procs.spawn([sys.executable, "-c", SERVER, json.dumps(spec), str(backlog)],
                    name="server", cwd=cwd)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        line = s.out.read_text().partition("\n")
        if line[1]:
            return s, json.loads(line[0])
        if s.poll() is not None:
            break
        time.sleep(0.01)
    pytest.fail(f"server did not start\n{s.log()}")


@pytest.fixture
def diag() -> Iterator[SockDiag]:
    with SockDiag() as d:
        yield d


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def connect(stack: ExitStack, family: int, addr: Any) -> socket.socket:
    c = stack.enter_context(socket.socket(family))
    c.settimeout(WAIT)
    c.connect(addr)
    return c


def ino(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino


# --- TCP listeners --------------------------------------------------------------------


@pytest.mark.parametrize(("family", "host"), [(AF_INET, "127.0.0.1"), (AF_INET6, "::1")])
def test_listener_queue_grows_and_backlog(diag: SockDiag, stack: ExitStack,
                                          family: int, host: str) -> None:
    lst = stack.enter_context(socket.socket(family))
    lst.bind((host, 0))
    lst.listen(7)
    port = lst.getsockname()[1]
    (entry,) = diag.tcp_listeners(family, port)
    assert (entry.family, entry.host, entry.port, entry.inode) == (family, host, port, ino(lst))
    assert (entry.queued, entry.backlog) == (0, 7)
    assert entry in diag.tcp_listeners(family)  # unfiltered too

    clients = [connect(stack, family, (host, port)) for _ in range(3)]
    assert settle(lambda: diag.tcp_listeners(family, port)[0].queued, 3) == 3
    # Waiting in the accept queue: full sockets, but no process holds them.
    queued = diag.tcp_connections(family, port)
    assert len(queued) == 3
    assert all(c.inode == 0 and c.state == TcpState.ESTABLISHED for c in queued)
    assert {c.remote_port for c in queued} == {c.getsockname()[1] for c in clients}

    accepted, _ = lst.accept()
    stack.enter_context(accepted)
    assert diag.tcp_listeners(family, port)[0].queued == 2
    inodes = {c.inode for c in diag.tcp_connections(family, port)}
    assert inodes == {0, ino(accepted)}


def test_kernel_filters_by_port(diag: SockDiag, stack: ExitStack) -> None:
    ports = []
    for _ in range(3):
        s = stack.enter_context(socket.socket())
        s.bind(("127.0.0.1", 0))
        s.listen()
        ports.append(s.getsockname()[1])
    # No Python-side filter exists for listeners: only the kernel's idiag_sport can do this.
    for p in ports:
        assert [entry.port for entry in diag.tcp_listeners(AF_INET, p)] == [p]
    assert set(ports) <= {entry.port for entry in diag.tcp_listeners(AF_INET)}
    # A client socket's local port is ephemeral: only server sides match sport.
    connect(stack, AF_INET, ("127.0.0.1", ports[0]))
    assert all(c.local_port == ports[0] for c in diag.tcp_connections(AF_INET, ports[0]))


# --- TCP connections ------------------------------------------------------------------


def test_connection_fields_and_states(diag: SockDiag, stack: ExitStack) -> None:
    lst = stack.enter_context(socket.socket())
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    port = lst.getsockname()[1]
    client = connect(stack, AF_INET, ("127.0.0.1", port))
    srv, _ = lst.accept()
    stack.enter_context(srv)
    client.sendall(b"0123456789")

    def mine() -> Any:
        return next((c for c in diag.tcp_connections(AF_INET, port) if c.inode == ino(srv)),
                    None)

    assert settle(lambda: mine().rqueue, 10) == 10
    c = mine()
    assert (c.family, c.local_host, c.local_port) == (AF_INET, "127.0.0.1", port)
    assert (c.remote_host, c.remote_port) == ("127.0.0.1", client.getsockname()[1])
    assert c.state == TcpState.ESTABLISHED
    assert c.last_data_recv_ms is not None and 0 <= c.last_data_recv_ms < 5000
    assert c.last_data_sent_ms is not None and c.last_data_sent_ms >= c.last_data_recv_ms
    time.sleep(0.3)
    assert mine().last_data_recv_ms >= 250  # the clock the retirement policy reads

    client.shutdown(socket.SHUT_WR)  # the client is done sending; the server still holds it
    assert settle(lambda: mine().state, TcpState.CLOSE_WAIT) == TcpState.CLOSE_WAIT
    assert in_flight(diag, [Address(AF_INET, "127.0.0.1", port)], [os.getpid()]) == 1

    # Server half-closed, still reading: FIN_WAIT2 once the client ACKs, still in flight.
    client2 = connect(stack, AF_INET, ("127.0.0.1", port))
    srv2, _ = lst.accept()
    stack.enter_context(srv2)
    srv2.shutdown(socket.SHUT_WR)
    state = settle(lambda: next(c.state for c in diag.tcp_connections(AF_INET, port)
                                    if c.inode == ino(srv2)), TcpState.FIN_WAIT2)
    assert state == TcpState.FIN_WAIT2
    assert in_flight(diag, [Address(AF_INET, "127.0.0.1", port)], [os.getpid()]) == 2
    assert client2.recv(1) == b""


def test_in_flight_counts_right_pids_and_addresses(procs: Procs, diag: SockDiag,
                                                   stack: ExitStack) -> None:
    srv, (port, port6) = server(procs, [["127.0.0.1", 0], ["::1", -1]])
    assert port == port6
    other, _ = server(procs, [["127.0.0.1", 0]])  # a process holding unrelated sockets
    v4 = [connect(stack, AF_INET, ("127.0.0.1", port)) for _ in range(3)]
    v6 = [connect(stack, AF_INET6, ("::1", port)) for _ in range(2)]
    a4, a6 = Address(AF_INET, "127.0.0.1", port), Address(AF_INET6, "::1", port)

    def count(addrs: list[Address], pids: list[int]) -> int:
        return in_flight(diag, addrs, pids)

    assert settle(lambda: count([a4, a6], [srv.pid]), 5) == 5
    assert count([a4], [srv.pid]) == 3
    assert count([a6], [srv.pid]) == 2
    assert count([Address(AF_INET, "0.0.0.0", port)], [srv.pid]) == 3
    assert count([Address(AF_INET6, "::", port)], [srv.pid]) == 2
    assert count([Address(AF_INET, "192.0.2.1", port)], [srv.pid]) == 0  # other local address
    assert count([Address(AF_INET, "127.0.0.1", port + 1 if port < 65535 else 1)],
                 [srv.pid]) == 0
    assert count([a4, a4, a6], [srv.pid, srv.pid]) == 5  # no double counting
    # The client ends are ours, the server ends the child's; `other` holds neither.
    assert count([a4, a6], [os.getpid()]) == 0
    assert count([a4, a6], [other.pid]) == 0
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait(WAIT)
    assert count([a4, a6], [gone.pid, srv.pid, other.pid]) == 5  # vanished pids hold nothing
    assert count([], [srv.pid]) == 0

    v4[0].sendall(b"close")  # the server closes it: no longer in flight
    assert settle(lambda: count([a4], [srv.pid]), 2) == 2
    v6[0].shutdown(socket.SHUT_WR)  # EOF: the server keeps it (CLOSE_WAIT), still in flight
    assert settle(
        lambda: sum(c.state == TcpState.CLOSE_WAIT for c in diag.tcp_connections(AF_INET6, port)),
        1) == 1
    assert count([a6], [srv.pid]) == 2


def test_ipv4_clients_of_a_v6_socket_are_mapped(procs: Procs, diag: SockDiag,
                                                stack: ExitStack) -> None:
    # An AF_INET6 socket bound to ::ffff:127.0.0.1 takes IPv4 clients, as a
    # dual-stack [::] listener would, without listening on every interface.
    srv, (port,) = server(procs, [["::ffff:127.0.0.1", 0]])
    for _ in range(2):
        connect(stack, AF_INET, ("127.0.0.1", port))
    mapped = Address(AF_INET6, "::ffff:127.0.0.1", port)
    assert settle(lambda: in_flight(diag, [mapped], [srv.pid]), 2) == 2
    conns = diag.tcp_connections(AF_INET6, port)
    assert {c.local_host for c in conns} == {"::ffff:127.0.0.1"}
    assert {c.remote_host for c in conns} == {"::ffff:127.0.0.1"}
    assert diag.tcp_connections(AF_INET, port) == []
    assert in_flight(diag, [Address(AF_INET6, "::ffff:7f00:1", port)], [srv.pid]) == 2
    assert in_flight(diag, [Address(AF_INET6, "::", port)], [srv.pid]) == 2
    assert in_flight(diag, [Address(AF_INET, "127.0.0.1", port)], [srv.pid]) == 0


# --- unix -----------------------------------------------------------------------------


def test_unix_listeners_and_queue(diag: SockDiag, stack: ExitStack, short_tmp: Path) -> None:
    path = str(short_tmp / "q.sock")
    lst = stack.enter_context(socket.socket(AF_UNIX))
    lst.bind(path)
    lst.listen(5)
    abstract = b"\0hupt-test-" + uuid.uuid4().hex.encode()
    alst = stack.enter_context(socket.socket(AF_UNIX))
    alst.bind(abstract)
    alst.listen(3)

    def entry(s: socket.socket) -> Any:
        return next(u for u in diag.unix_listeners() if u.inode == ino(s))

    e = entry(lst)
    st = os.stat(path)
    assert (e.path, e.queued, e.backlog) == (os.fsencode(path), 0, 5)
    assert (e.vfs_ino, e.vfs_dev) == (st.st_ino, kernel_dev(st.st_dev))
    a = entry(alst)
    assert (a.path, a.queued, a.backlog, a.vfs_ino) == (abstract, 0, 3, 0)

    clients = [connect(stack, AF_UNIX, path) for _ in range(2)]
    assert entry(lst).queued == 2
    # Not yet accepted: the server-side sockets are in no table.
    assert diag.unix_connections(os.fsencode(path)) == []
    srv, _ = lst.accept()
    stack.enter_context(srv)
    assert entry(lst).queued == 1
    assert [c.inode for c in diag.unix_connections(os.fsencode(path))] == [ino(srv)]
    # Accepted in order; bytes the server has not read yet show in rqueue.
    clients[0].sendall(b"1234567")
    (c,) = diag.unix_connections(os.fsencode(path))
    assert (c.peer_inode, c.rqueue) == (ino(clients[0]), 7)


def test_unix_connections_and_in_flight(procs: Procs, diag: SockDiag, stack: ExitStack,
                                        short_tmp: Path) -> None:
    abstract = "\0hupt-test-" + uuid.uuid4().hex
    absolute = str(short_tmp / "abs.sock")
    # "rel.sock" is bound relative to the server's cwd: sock_diag reports it as passed.
    srv, _ = server(procs, [["unix", "rel.sock"], ["unix", absolute], ["unix", abstract]],
                    cwd=short_tmp)
    rel = os.fsencode(short_tmp / "rel.sock")
    names = {u.path for u in diag.unix_listeners()}
    assert {b"rel.sock", os.fsencode(absolute), os.fsencode(abstract)} <= names

    rel_clients = [connect(stack, AF_UNIX, str(short_tmp / "rel.sock")) for _ in range(2)]
    abs_client = connect(stack, AF_UNIX, absolute)
    abstract_client = connect(stack, AF_UNIX, abstract)
    addrs = [Address(AF_UNIX, path=p) for p in (rel, os.fsencode(absolute),
                                                 os.fsencode(abstract))]
    assert settle(lambda: in_flight(diag, addrs, [srv.pid]), 4) == 4

    conns = diag.unix_connections(rel)
    assert {c.peer_inode for c in conns} == {ino(c) for c in rel_clients}
    assert [c.peer_inode for c in diag.unix_connections(os.fsencode(absolute))] == \
        [ino(abs_client)]
    assert [c.peer_inode for c in diag.unix_connections(os.fsencode(abstract))] == \
        [ino(abstract_client)]
    assert in_flight(diag, addrs[:1], [srv.pid]) == 2
    assert in_flight(diag, addrs, [os.getpid()]) == 0  # we hold the client ends only

    rel_clients[0].sendall(b"close")
    assert settle(lambda: in_flight(diag, addrs, [srv.pid]), 3) == 3

    # The file gone, the relative name still matches by suffix.
    os.unlink(short_tmp / "rel.sock")
    assert in_flight(diag, addrs[:1], [srv.pid]) == 1


# --- the socket itself ----------------------------------------------------------------


def test_reopens_after_close(stack: ExitStack) -> None:
    lst = stack.enter_context(socket.socket())
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    port = lst.getsockname()[1]
    d = SockDiag()
    assert len(d.tcp_listeners(AF_INET, port)) == 1
    d.close()
    assert len(d.tcp_listeners(AF_INET, port)) == 1  # a fresh netlink socket
    d.close()
    d.close()


def test_many_requests_keep_sequence(diag: SockDiag, stack: ExitStack) -> None:
    lst = stack.enter_context(socket.socket())
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    port = lst.getsockname()[1]
    for _ in range(200):
        assert [e.port for e in diag.tcp_listeners(AF_INET, port)] == [port]
        diag.unix_listeners()


# --- speed ----------------------------------------------------------------------------


def test_in_flight_speed_1000_connections(procs: Procs, diag: SockDiag,
                                          stack: ExitStack) -> None:
    n = 1000
    srv, (port,) = server(procs, [["127.0.0.1", 0]], backlog=n + 24)
    for _ in range(n):
        connect(stack, AF_INET, ("127.0.0.1", port))
    addr = [Address(AF_INET, "127.0.0.1", port)]
    assert settle(lambda: in_flight(diag, addr, [srv.pid]), n, timeout=30) == n

    def timed(fn: Callable[[], object], rounds: int = 15) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    total = timed(lambda: in_flight(diag, addr, [srv.pid]))
    listing = timed(lambda: diag.tcp_connection_inodes(AF_INET, port))
    detailed = timed(lambda: diag.tcp_connections(AF_INET, port))
    print(f"\n{n} connections: in_flight {total:.1f} ms (netlink part {listing:.1f} ms); "
          f"tcp_connections with tcp_info {detailed:.1f} ms")
    assert total < 200
