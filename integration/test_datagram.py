"""Datagram sockets (UDP on 127.0.0.1 and ::1, unix SOCK_DGRAM) held across reloads.

A datagram server is held from its bind() (there is no listen()): hupt binds
the server's socket itself and keeps a reference, every later generation's
bind of that address is handed the same socket, fork mode and exec mode.
The old generation stops receiving once the new one is ready: its fd gets a
datagram dummy bound to the same address (a reuseport group whose selector
always picks the held socket), so an answer it still sends leaves from the
server's own address.

Under a counting client (datagram_load.py: numbered requests, no retries,
a persistent connect()ed socket that sees ICMP port unreachable as
ECONNREFUSED, and a fresh socket per fourth request) every request the kernel
took is answered across 10 reloads, the held socket (inode) is the one every
generation reads, no bind fails, and the servers' own answer counts add up
to what the client got.  "Ready" comes only after the bind (a server that
sleeps before binding).  A real DNS server from Debian (dnsmasq, which binds
UDP and TCP on one port: two held addresses, kept apart) answers every query.

Server rows (a matrix of real servers can take them as they are): the Python
echo server in servers/udp_echo_server.py, the same protocol in static Go
(servers/udpgo, built here with CGO_ENABLED=0: Go reads through its
edge-triggered netpoller), and dnsmasq.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from datagram_load import DatagramLoad, DatagramResult, DgramTarget, dns_answer, dns_query
from harness import SERVERS, HuptProcess, Procs, Reloadable, alive, socket_inodes, wait_for
from supervision import generations, ping, reload_ok, stop_gracefully, wait_single_generation

from conftest import build_static_go

RELOADS = 10
READY_MS = re.compile(r"generation (\d+) \(pid (\d+)\) is ready in (\d+) ms")
ANSWERED = re.compile(r"udp_echo_server (\d+) answered (\d+)")
DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq")
                                      else None)


# -- helpers ------------------------------------------------------------------------------


def free_udp_port(host: str) -> int:
    """A port free for both UDP and TCP on host (dnsmasq binds both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = int(u.getsockname()[1])
            with socket.socket(family, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
            return port


def echo_cmd(address: str, *opts: str) -> list[str]:
    return [sys.executable, str(SERVERS / "udp_echo_server.py"), address, *opts]


@pytest.fixture(scope="session")
def udp_go(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The static Go echo server (servers/udpgo), built once per session."""
    return build_static_go(SERVERS / "udpgo", tmp_path_factory)


EchoCmd = Callable[[str, str], list[str]]


@pytest.fixture
def echo(request: pytest.FixtureRequest) -> EchoCmd:
    """echo(kind, address): the echo server's command, "python" or "go"."""
    def make(kind: str, address: str) -> list[str]:
        if kind == "go":
            return [str(request.getfixturevalue("udp_go")), address]
        return echo_cmd(address)
    return make


def address_of(target: DgramTarget) -> str:
    if isinstance(target, str):
        return f"unixgram:{target}"
    host, port = target
    return f"udp:[{host}]:{port}" if ":" in host else f"udp:{host}:{port}"


def datagram_inodes(target: DgramTarget) -> set[int]:
    """Inodes of the datagram sockets bound to target, as /proc/net lists them."""
    found: set[int] = set()
    if isinstance(target, str):
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[4], 16) == socket.SOCK_DGRAM and fields[7:] == [target]:
                    found.add(int(fields[6]))
        return found
    for name in ("udp", "udp6"):
        with open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == target[1]:
                    found.add(int(fields[9]))
    return found


def held_inode(h: Reloadable, target: DgramTarget) -> int:
    """The one datagram socket on target in hupt's own fd table."""
    held = set(socket_inodes(h.pid)) & datagram_inodes(target)
    assert len(held) == 1, f"hupt holds {held} on {target!r}\n{h.log()}"
    return next(iter(held))


def ask(target: DgramTarget, payload: bytes, timeout: float = 5.0) -> bytes | None:
    """One request on a connected socket; None if nothing is bound there (refused)."""
    family = (socket.AF_UNIX if isinstance(target, str)
              else socket.AF_INET6 if ":" in target[0] else socket.AF_INET)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        if family == socket.AF_UNIX:
            s.bind(b"")
        s.settimeout(timeout)
        try:
            s.connect(target)
            s.send(payload)
            return s.recv(65536)
        except (ConnectionRefusedError, FileNotFoundError):
            return None


def wait_answering(target: DgramTarget, h: HuptProcess, timeout: float = 20.0) -> int:
    """Wait until the server answers; the number of requests it answered meanwhile (1).

    A request is resent only when refused (nothing bound yet: nobody got it),
    so the servers' own counts can be checked against the client's exactly.
    """
    def answered() -> bool:
        return ask(target, b"0") is not None
    wait_for(f"an answer on {target!r}", answered, timeout, h)
    return 1


def check_result(res: DatagramResult, min_sent: int = 300) -> None:
    assert res.lost == [], res.summary()
    assert res.refused == 0, "ICMP port unreachable: nothing was bound " + res.summary()
    assert res.errors == [] and res.bad_answers == 0, res.summary()
    assert res.sent >= min_sent, res.summary()
    assert res.answered == res.sent, res.summary()


def reloads_under_load(h: Reloadable, target: DgramTarget, *, exec_pid: int | None = None,
                       dns_name: str | None = None, tmp: Path | None = None,
                       reloads: int = RELOADS) -> DatagramResult:
    """`reloads` reloads under a counting client; each new generation reads the held socket."""
    inode = held_inode(h, target)
    with DatagramLoad(target, dns_name=dns_name) as load:
        wait_for("the client's first answers", lambda: load.answered_so_far() >= 20, 20, h)
        for i in range(reloads):
            r = reload_ok(h)
            assert "EADDRINUSE" not in r.stderr + h.log(), r.stderr
            m = READY_MS.search(r.stderr)
            assert m is not None, r.stderr
            new, pid = int(m[1]), int(m[2])
            if exec_pid is not None:
                assert pid == exec_pid and "execed" in r.stderr, f"reload {i + 1}: {r.stderr}"
            assert held_inode(h, target) == inode, "hupt must keep holding the same socket"
            # An exec'd image keeps its environment, so its generation mark too.
            if exec_pid is not None:
                pids = {exec_pid}
            else:  # fork mode: hupt run's generations (attach is exec mode)
                assert isinstance(h, HuptProcess)
                pids = generations(h).get(new, set())
            assert any(inode in socket_inodes(p) for p in pids), (
                f"reload {i + 1}: generation {new} does not read the held socket\n{h.log()}")
            time.sleep(0.3)
        time.sleep(0.5)
    return load.result


def server_answer_counts(h: HuptProcess) -> dict[int, int]:
    return {int(pid): int(n) for pid, n in ANSWERED.findall(h.log())}


# -- the echo server: fork and exec mode, v4, v6, unix ---------------------------------------


@pytest.mark.parametrize("mode", ["fork", "exec"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("kind", ["python", "go"])
def test_udp_server_reloads_lose_no_datagram(procs: Procs, echo: EchoCmd, kind: str, host: str,
                                             mode: str) -> None:
    target = (host, free_udp_port(host))
    opts = ["--exec"] if mode == "exec" else []
    h = procs.hupt(*opts, "--drain-timeout", "10", "--kill-timeout", "5",
                   cmd=echo(kind, address_of(target)))
    probes = wait_answering(target, h)
    first = next(iter(generations(h)[1]))
    res = reloads_under_load(h, target, exec_pid=first if mode == "exec" else None)
    check_result(res)
    if mode == "exec":
        assert set(res.pids) == {first}, res.summary()
    else:  # the load ran across the generations, each answered its share
        assert len(res.pids) >= RELOADS // 2, res.summary()
    assert [g["listening"] for g in ping(h).values()] == [[address_of(target)]]
    if mode == "fork":
        wait_single_generation(h)
    stop_gracefully(h)
    if mode == "fork":  # an exec'd image never exits: only the last one says its count
        counts = server_answer_counts(h)
        assert sum(counts.values()) == res.answered + probes, (counts, res.summary())
    assert datagram_inodes(target) == set(), "hupt released the socket at its exit"


@pytest.mark.parametrize("mode", ["fork", "exec"])
@pytest.mark.parametrize("kind", ["python", "go"])
def test_unix_datagram_server_reloads(procs: Procs, short_tmp: Path, echo: EchoCmd, kind: str,
                                      mode: str) -> None:
    path = str(short_tmp / "dgram.sock")
    opts = ["--exec"] if mode == "exec" else []
    h = procs.hupt(*opts, "--drain-timeout", "10", "--kill-timeout", "5",
                   cmd=echo(kind, address_of(path)))
    probes = wait_answering(path, h)
    file_inode = os.stat(path).st_ino
    res = reloads_under_load(h, path, exec_pid=(next(iter(generations(h)[1]))
                                                if mode == "exec" else None))
    check_result(res)
    assert os.stat(path).st_ino == file_inode, "the socket file must stay the first one"
    if mode == "fork":
        wait_single_generation(h)
    stop_gracefully(h)
    if mode == "fork":
        assert sum(server_answer_counts(h).values()) == res.answered + probes
    assert not os.path.exists(path), "hupt removes the path once nobody serves it"


def test_udp_and_tcp_on_one_port_are_two_addresses(procs: Procs) -> None:
    """A TCP listener and a UDP socket on the same port: each held, each handed to a
    bind of its own type only."""
    port = free_udp_port("127.0.0.1")
    script = (
        "import socket, signal, sys, os\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        f"t = socket.socket(); t.bind(('127.0.0.1', {port})); t.listen()\n"
        f"u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', {port}))\n"
        "while True:\n"
        "    d, a = u.recvfrom(100); u.sendto(d + b' ' + str(os.getpid()).encode(), a)\n"
    )
    h = procs.hupt("--drain-timeout", "5", "--kill-timeout", "5",
                   cmd=[sys.executable, "-c", script])
    wait_answering(("127.0.0.1", port), h)
    tcp = f"127.0.0.1:{port}"
    assert sorted(next(iter(ping(h).values()))["listening"]) == sorted(
        [tcp, f"udp:127.0.0.1:{port}"])
    reload_ok(h)
    gens = generations(h)
    new = max(gens)
    inode = held_inode(h, ("127.0.0.1", port))
    assert any(inode in socket_inodes(p) for p in gens[new])
    assert sorted(ping(h)[new]["listening"]) == sorted([tcp, f"udp:127.0.0.1:{port}"])
    answer = ask(("127.0.0.1", port), b"7")
    assert answer is not None and answer.split()[1] == str(next(iter(gens[new]))).encode()


# -- ready only after the bind ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_ready_only_after_the_bind(procs: Procs, mode: str) -> None:
    """A server that takes its time before bind(): the reload waits for the bind."""
    target = ("127.0.0.1", free_udp_port("127.0.0.1"))
    delay = 2.0
    opts = ["--exec"] if mode == "exec" else []
    h = procs.hupt(*opts, "--drain-timeout", "10", "--kill-timeout", "5",
                   "--ready-timeout", "30", cmd=echo_cmd(address_of(target),
                                                       "--bind-delay", str(delay)))
    wait_answering(target, h)
    with DatagramLoad(target) as load:
        wait_for("answers", lambda: load.answered_so_far() >= 10, 20, h)
        started = time.monotonic()
        r = reload_ok(h)
        took = time.monotonic() - started
        time.sleep(0.5)
    m = READY_MS.search(r.stderr)
    assert m is not None, r.stderr
    assert int(m[3]) >= delay * 1000 and took >= delay, (
        f"ready before the server bound anything: {r.stderr}")
    check_result(load.result, min_sent=100)


# -- query ports: datagram sockets a serving generation binds are not service addresses ------


def test_query_ports_bound_while_serving_are_not_held(procs: Procs) -> None:
    """A resolver binds a random port of its choosing per upstream query and closes it:
    not held (the next generation would never bind it, and hupt would pile up one
    socket per query), while the service address still is."""
    target = ("127.0.0.1", free_udp_port("127.0.0.1"))
    h = procs.hupt("--drain-timeout", "10", "--kill-timeout", "5", "--ready-timeout", "20",
                   cmd=echo_cmd(address_of(target), "--query-ports"))
    wait_answering(target, h)
    reload_ok(h)  # generation 2's start-up ends as it is ready: its query ports go unheld
    wait_single_generation(h)
    fds_before = len(os.listdir(f"/proc/{h.pid}/fd"))
    res = reloads_under_load(h, target, reloads=5)
    check_result(res, min_sent=150)
    assert [g["listening"] for g in ping(h).values()] == [[address_of(target)]]
    assert len(os.listdir(f"/proc/{h.pid}/fd")) <= fds_before + 5, "hupt holds query ports"


def test_the_held_socket_gets_every_datagram_from_its_bind_on(procs: Procs) -> None:
    """hupt binds a UDP socket it holds with SO_REUSEPORT and a selector that picks it,
    before the server gets it: a paused generation's dummy, joining that group on
    the same address, is never sent a datagram, from the first pause on.  Shown
    with a socket of our own in the dummy's place (same user, same address)."""
    target = ("127.0.0.1", free_udp_port("127.0.0.1"))
    h = procs.hupt("--drain-timeout", "5", "--kill-timeout", "5",
                   cmd=echo_cmd(address_of(target)))
    wait_answering(target, h)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(target)  # EADDRINUSE unless the held socket shares its address
        other.setblocking(False)
        for i in range(200):  # from many source ports: the kernel's hash would spread them
            assert ask(target, b"%d" % (i + 1)) is not None, f"request {i + 1} unanswered"
        with pytest.raises(BlockingIOError):
            other.recv(100)


# -- what the paused generation still sends --------------------------------------------------


def test_paused_generation_answers_from_the_held_address(procs: Procs) -> None:
    """A datagram the old generation read before its pause is answered after it, from
    the server's address: a connect()ed client (which takes answers from that
    address only) gets it.  Meanwhile the old generation receives nothing."""
    target = ("127.0.0.1", free_udp_port("127.0.0.1"))
    h = procs.hupt("--drain-timeout", "20", "--kill-timeout", "20",
                   cmd=echo_cmd(address_of(target), "--reply-delay", "4"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first:
        first.settimeout(10)
        first.connect(target)
        wait_for("the server bound", lambda: bool(datagram_inodes(target)), 20, h)
        old = next(iter(generations(h)[1]))
        first.send(b"1")
        time.sleep(0.3)  # it is in the server's hands now (4 s before it answers)
        inode = held_inode(h, target)
        started = time.monotonic()
        reload_ok(h)
        assert time.monotonic() - started < 3.5, "the reload must not wait for the answer"
        # The old generation is paused: its fd holds a dummy bound to the same port.
        old_fds = {fd: ino for ino, fd in socket_inodes(old).items()}
        dummies = datagram_inodes(target) - {inode}
        assert alive(old) and set(old_fds.values()) & dummies, (old_fds, dummies, h.log())
        answer = first.recv(100)
        assert answer == b"1 %d" % old, answer
    wait_single_generation(h)


# -- dnsmasq -----------------------------------------------------------------------------------


def dnsmasq_cmd(port: int, tmp: Path) -> list[str]:
    assert DNSMASQ is not None
    return [DNSMASQ, "--no-daemon", "--conf-file=/dev/null", f"--port={port}",
            "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
            "--address=/example.test/10.1.2.3", f"--pid-file={tmp / 'dnsmasq.pid'}",
            # Root stays root: an exec in place starts the new image as the process is.
            "--user=root", "--group=root", "--log-facility=-"]


@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_dnsmasq_forwarding_reloads_lose_no_query(procs: Procs, tmp_path: Path,
                                                  mode: str) -> None:
    """dnsmasq as a forwarder (no cache): every query goes upstream from a random
    port it binds itself, which hupt must let through unheld; the upstream is
    another dnsmasq, outside hupt."""
    if DNSMASQ is None:
        pytest.fail("dnsmasq is missing (.ci/run installs dnsmasq-base)")
    up_port, port = free_udp_port("127.0.0.1"), free_udp_port("127.0.0.1")
    upstream_dir = tmp_path / "upstream"
    upstream_dir.mkdir()
    procs.spawn([*dnsmasq_cmd(up_port, upstream_dir), "--address=/example.up/10.9.9.9"],
                name="upstream-dnsmasq")
    target = ("127.0.0.1", port)
    opts = ["--exec"] if mode == "exec" else []
    h = procs.hupt(*opts, "--drain-timeout", "10", "--kill-timeout", "5", "--ready-timeout",
                   "20", cmd=[*dnsmasq_cmd(port, tmp_path), f"--server=127.0.0.1#{up_port}",
                              "--cache-size=0"])

    def resolves() -> bool:
        got = ask(target, dns_query(1, "www.example.up"))
        return got is not None and got[-4:] == bytes([10, 9, 9, 9])
    wait_for("dnsmasq to forward", resolves, 20, h)
    first = next(iter(generations(h)[1]))
    res = reloads_under_load(h, target, exec_pid=first if mode == "exec" else None,
                             dns_name="www.example.up")
    check_result(res)
    listening = next(iter(ping(h).values()))["listening"]
    assert sorted(listening) == sorted([f"udp:127.0.0.1:{port}", f"127.0.0.1:{port}"]), (
        "a query port is held", listening)
    if mode == "fork":
        wait_single_generation(h)
    stop_gracefully(h)


@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_dnsmasq_reloads_lose_no_query(procs: Procs, tmp_path: Path, mode: str) -> None:
    if DNSMASQ is None:
        pytest.fail("dnsmasq is missing (.ci/run installs dnsmasq-base)")
    port = free_udp_port("127.0.0.1")
    target = ("127.0.0.1", port)
    opts = ["--exec"] if mode == "exec" else []
    h = procs.hupt(*opts, "--drain-timeout", "10", "--kill-timeout", "5",
                   cmd=dnsmasq_cmd(port, tmp_path))

    def resolves() -> bool:
        got = ask(target, dns_query(1, "example.test"))
        return got is not None and got[-4:] == bytes([10, 1, 2, 3])
    wait_for("dnsmasq to answer", resolves, 20, h)
    got = ask(target, dns_query(2, "example.test"))
    assert got is not None and dns_answer(got) == (2, 0, 1)
    listening = next(iter(ping(h).values()))["listening"]
    assert f"udp:127.0.0.1:{port}" in listening and f"127.0.0.1:{port}" in listening, listening
    first = next(iter(generations(h)[1]))
    res = reloads_under_load(h, target, exec_pid=first if mode == "exec" else None,
                             dns_name="example.test")
    check_result(res)
    if mode == "fork":
        wait_single_generation(h)
    stop_gracefully(h)
