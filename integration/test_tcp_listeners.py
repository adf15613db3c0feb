"""Which TCP listeners hupt holds and hands over, and how, under load.

A dual-stack [::] listener serving IPv4 and IPv6 clients (an IPv4 client of it
counts as in flight), an IPv6 [::1] listener, a kernel-chosen port that is
never held or awaited, both listeners of a two-port server, and each
generation's own blocking mode on the one shared socket. Each test asserts the
mechanism: the very same listening socket (inode) held by hupt and by each new
generation, hupt's own view of its generations, 0 failed requests.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    O_NONBLOCK_FLAG,
    SERVERS,
    Procs,
    fdinfo_flags,
    free_port,
    http_get,
    listener_inode,
    listener_inodes,
    node_cmd,
    socket_inodes,
    variant_cmd,
    wait_listening,
)
from load import HeldRequest, Load, Target
from supervision import (
    check_load,
    generations,
    held_by_hupt,
    ping,
    reload_many,
    reload_ok,
    states,
    stop_gracefully,
    wait_single_generation,
)


@pytest.mark.parametrize("kind", ["node", "go"])
def test_dual_stack_listener_serves_v4_and_v6_across_reloads(
        kind: str, procs: Procs, server_cmd: Callable[[str, Target], list[str]]) -> None:
    port = free_port("::")
    v4: Target = ("127.0.0.1", port)
    v6: Target = ("::1", port)
    h = procs.hupt("--drain-timeout", "20", "--kill-timeout", "5",
                   cmd=server_cmd(kind, ("::", port)))
    wait_listening(v4, 20, proc=h)
    wait_listening(v6, 20, proc=h)
    # One socket serves both families: listener_inode() would fail on a second listener.
    inode = listener_inode(port)
    assert inode is not None and held_by_hupt(h) == {inode}
    assert [g["listening"] for g in ping(h).values()] == [[f"[::]:{port}"]]

    with Load(v4, fresh=1, keepalive=1, max_rate=100) as load4, \
            Load(v6, fresh=1, keepalive=1, max_rate=100) as load6:
        time.sleep(0.3)
        # An IPv4 client of the dual-stack socket (an AF_INET6 connection with a
        # ::ffff: address) must count as in flight: generation 1 may not retire under it.
        # The request is held until the checks are done, however long they take.
        held = HeldRequest(v4).start()
        try:
            held.wait_accepted()
            reload_many(h, 1, port)
            time.sleep(1.0)  # unpinned, generation 1 would retire within a drain poll or two
            assert "retiring generation 1" not in h.log(), (
                "generation 1 retired with an IPv4 request in flight\n" + h.log())
            assert states(h)[1] == "draining", states(h)
            reload_many(h, 3, port)
        finally:
            held.release()
        status, elapsed = held.result()
        time.sleep(0.3)
    assert status == 200 and elapsed >= 1.0, (status, elapsed)
    for res in (load4.result, load6.result):
        check_load(res, 30)
        assert len(res.pids) >= 3, res.summary()
    wait_single_generation(h)
    assert "retiring generation 1 (pid" in h.log()
    assert listener_inode(port) == inode
    stop_gracefully(h)


def test_ipv6_and_port_zero(procs: Procs) -> None:
    """A [::1] listener is handed over; a kernel-chosen port (the Go IPv6 probe) is ignored."""
    port = free_port("::1")
    target: Target = ("::1", port)
    h = procs.hupt(cmd=node_cmd(target))
    wait_listening(target, 20, proc=h)
    with Load(target, fresh=2, keepalive=1) as load:
        reload_many(h, 3, port, pause=0.15)
    assert load.result.failed == 0, load.result.summary()


def test_port_zero_listener_is_never_held(procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--ready-timeout", "10", "--drain-timeout", "20", "--kill-timeout", "5",
                   cmd=variant_cmd(target, "--port0"))
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    assert inode is not None

    def extra_port() -> int:
        status, body = http_get(target, "/port0")
        assert status == 200
        return int(body)

    ports = [extra_port()]
    assert held_by_hupt(h) == {inode}, "hupt holds more than the chosen address"
    with Load(target, fresh=2, keepalive=2) as load:
        time.sleep(0.3)
        for gen in (2, 3, 4):
            # Ready once the chosen address is taken: were the port-0 address awaited too,
            # it would never come (a new port each time) and the reload would time out.
            r = reload_ok(h)
            waiting = [line for line in r.stderr.splitlines() if "waiting for it to listen" in line]
            assert waiting and waiting[0].endswith(f"listen on 127.0.0.1:{port}"), r.stderr
            new_port = extra_port()
            assert new_port not in ports, "the port-0 socket was handed over"
            ports.append(new_port)
            extra_inode = listener_inode(new_port)
            assert extra_inode is not None
            assert extra_inode not in socket_inodes(h.pid), "hupt holds the port-0 socket"
            assert any(extra_inode in listener_inodes(p) for p in generations(h)[gen])
            assert held_by_hupt(h) == {inode}
            time.sleep(0.2)
        time.sleep(0.3)
    check_load(load.result)
    assert all(g["listening"] == [f"127.0.0.1:{port}"] for g in ping(h).values()), ping(h)
    wait_single_generation(h)
    # Nobody held the retired generations' port-0 sockets: they closed with them.
    assert all(listener_inode(p) is None for p in ports[:-1])
    assert listener_inode(ports[-1]) is not None
    stop_gracefully(h)


TWO_PORTS = """
import sys, threading
sys.path.insert(0, {servers!r})
from http.server import ThreadingHTTPServer
from routes import RoutesHandler
servers = [ThreadingHTTPServer(("127.0.0.1", p), RoutesHandler) for p in ({a}, {b})]
threading.Thread(target=servers[1].serve_forever, daemon=True).start()
servers[0].serve_forever()
"""


def test_every_listener_of_a_two_port_server_is_handed_over(procs: Procs) -> None:
    a, b = free_port(), free_port()
    h = procs.hupt("--drain-timeout", "10", "--kill-timeout", "3",
                   cmd=[sys.executable, "-c", TWO_PORTS.format(servers=str(SERVERS), a=a, b=b)])
    for port in (a, b):
        wait_listening(("127.0.0.1", port), 20, proc=h)
    inodes = {port: listener_inode(port) for port in (a, b)}
    assert None not in inodes.values() and len(set(inodes.values())) == 2
    with Load(("127.0.0.1", a), fresh=2, keepalive=1) as load_a, \
            Load(("127.0.0.1", b), fresh=2, keepalive=1) as load_b:
        time.sleep(0.3)
        for _ in range(6):
            r = reload_ok(h)
            # Ready only once it listens on both: the progress names each.
            assert r.stderr.count("the held socket (") == 2, r.stderr
            assert {port: listener_inode(port) for port in (a, b)} == inodes
            time.sleep(0.2)
    check_load(load_a.result)
    check_load(load_b.result)
    last = wait_single_generation(h)
    (pid,) = generations(h)[last]
    assert set(inodes.values()) <= listener_inodes(pid)
    stop_gracefully(h)


def listener_nonblocking(pid: int, inode: int) -> bool:
    fd = socket_inodes(pid).get(inode)
    assert fd is not None, f"pid {pid} does not hold listener inode {inode}"
    return bool(fdinfo_flags(pid, fd) & O_NONBLOCK_FLAG)


def test_each_generation_gets_the_blocking_mode_it_asked_for(
        procs: Procs, tmp_path: Path) -> None:
    """O_NONBLOCK lives on the one open file description every generation shares: at
    each handoff hupt sets it to what the new generation's own socket had at bind()."""
    flag = tmp_path / "NONBLOCK"
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--drain-timeout", "10", "--kill-timeout", "3",
                   cmd=variant_cmd(target, "--nonblock-if", str(flag)))
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    assert inode is not None
    ((first,),) = generations(h).values()
    assert not listener_nonblocking(first, inode), "generation 1 asked for a blocking socket"
    modes = [True, False, True, True, False, False, True]  # flips, and repeats of a mode
    with Load(target, fresh=2, keepalive=2) as load:
        time.sleep(0.3)
        for i, nonblock in enumerate(modes):
            if nonblock:
                flag.touch()
            else:
                flag.unlink(missing_ok=True)
            before = max(generations(h))
            reload_ok(h)
            gens = generations(h)
            assert max(gens) == before + 1, gens
            (pid,) = gens[max(gens)]
            assert listener_inode(port) == inode and inode in listener_inodes(pid)
            got = listener_nonblocking(pid, inode)
            assert got == nonblock, (
                f"reload {i + 1}: generation {max(gens)} asked for a "
                f"{'non-' if nonblock else ''}blocking listener; its fd has O_NONBLOCK "
                f"{'set' if got else 'clear'}\n{h.log()}")
            # The same open file description: hupt's own reference shows the same flag.
            assert listener_nonblocking(h.pid, inode) == nonblock
            time.sleep(0.3)
    check_load(load.result, 100)
    assert h.log().count("(non-blocking listener)") == modes.count(True), h.log()
    assert len(load.result.pids) >= len(modes) // 2, load.result.summary()
    assert wait_single_generation(h) == len(modes) + 1
    stop_gracefully(h)
