"""Several processes accepting on one port: SO_REUSEPORT servers, and hupt run --multi N.

A server that shards its port with SO_REUSEPORT (a socket per worker) would
have a reuseport group of accept queues, all but one of which are reset when
the old generation exits: hupt gives the later binds the first socket, one
queue from the first generation on. With --multi N hupt runs N copies of each
generation on the one held socket, and with --revive replaces a copy that
crashed by itself. (hupt attach keeps a whole reuseport group: test_attach.py.)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import pytest
from harness import (
    SERVERS,
    HuptProcess,
    Procs,
    answer_pid,
    free_port,
    http_get,
    hupt_cli,
    listener_inode,
    listener_inodes,
    listening_sockets,
    serving_pid,
    wait_for,
    wait_gone,
    wait_listening,
)
from load import Load, Target
from supervision import (
    check_load,
    reload_many,
    reload_ok,
    start_hupt,
    stop_gracefully,
    wait_single_generation,
)


@pytest.mark.parametrize("order", ["bind-first", "bind-together"])
def test_reuseport_workers_share_one_held_socket(order: str, procs: Procs) -> None:
    """Four workers, each binding its own SO_REUSEPORT socket before any listens
    (all in the master before forking, or each in its worker at the same
    moment): one reuseport group, four accept queues, of which hupt could hand
    on one; the others' queues would be reset as the old generation exits.
    hupt gives the later binds the first socket: one queue from the first
    generation on."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--drain-timeout", "10", "--kill-timeout", "3",
                   cmd=[sys.executable, str(SERVERS / "reuseport_server.py"),
                        f"127.0.0.1:{port}", "4", order])
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    assert inode is not None
    wait_for("the four workers", lambda: len(h.descendants()) == 5 or None, 10, h)
    workers = {p for p in h.descendants() if inode in listener_inodes(p)}
    assert len(workers) == 4, "every worker listens on the one socket"
    assert listening_sockets(port) == [inode], "one socket on the port, not a group of four"
    with Load(target, fresh=3, keepalive=1) as load:
        time.sleep(0.3)
        reload_many(h, 8, port)
    check_load(load.result, 100)
    wait_single_generation(h)  # the last old workers retire
    assert len({p for p in h.descendants() if inode in listener_inodes(p)}) == 4
    assert listening_sockets(port) == [inode]
    stop_gracefully(h)


def test_a_reuseport_socket_closed_before_listening_leaves_the_port_free(
        procs: Procs) -> None:
    # hupt keeps a reference to a first SO_REUSEPORT socket (for the binds that
    # would join its group); it must not keep the address from a plain bind.
    port = free_port()
    target: Target = ("127.0.0.1", port)
    script = f"""
import socket, sys
sys.path.insert(0, {str(SERVERS)!r})
from routes import RoutesHandler
from http.server import HTTPServer
probe = socket.socket()
probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
probe.bind(("127.0.0.1", {port}))
probe.close()
HTTPServer(("127.0.0.1", {port}), RoutesHandler).serve_forever()
"""
    h = procs.hupt(cmd=[sys.executable, "-c", script])
    wait_listening(target, 20, proc=h)
    assert http_get(target, "/")[0] == 200
    reload_ok(h)
    assert http_get(target, "/")[0] == 200
    stop_gracefully(h)


# -- --multi N ------------------------------------------------------------------------------


def _copies(h: HuptProcess, inode: int | None) -> set[int]:
    return {p for p in h.descendants() if inode in listener_inodes(p)}


def _wait_copies(h: HuptProcess, inode: int | None,
                 done: Callable[[set[int]], bool]) -> set[int]:
    deadline = time.monotonic() + 15
    while not done(copies := _copies(h, inode)):
        assert time.monotonic() < deadline, (copies, h.log())
        time.sleep(0.1)
    return copies


def test_multi_runs_copies_on_one_accept_queue(procs: Procs) -> None:
    h, target = start_hupt(procs, "--multi", "4")
    assert isinstance(target, tuple)
    inode = listener_inode(target[1])
    first = _wait_copies(h, inode, lambda c: len(c) == 4)
    # All four serve from the one held socket: keep asking until each has answered.
    seen: set[int] = set()
    deadline = time.monotonic() + 20
    while seen != first:
        assert time.monotonic() < deadline, (seen, first)
        seen.add(serving_pid(target))
    with Load(target, fresh=2, keepalive=2) as load:
        r = h.reload()
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary()
    assert listener_inode(target[1]) == inode
    assert not wait_gone(first, 15), "the old copies retire"
    second = _copies(h, inode)
    assert len(second) == 4 and not second & first
    doc = json.loads(hupt_cli("status", "--json", str(h.pid)).stdout)
    (serving,) = [g for g in doc["instances"][0]["generations"] if g["state"] == "serving"]
    assert set(serving["pids"]) >= second


def test_multi_revive_replaces_a_crashed_copy(procs: Procs) -> None:
    h, target = start_hupt(procs, "--multi", "3", "--revive")
    assert isinstance(target, tuple)
    inode = listener_inode(target[1])
    first = _wait_copies(h, inode, lambda c: len(c) == 3)
    with Load(target, fresh=2, keepalive=2) as load:
        # A crash between requests (SIGKILL would also cut the victim's own
        # requests in flight, which no supervisor can save).
        status, body = http_get(target, "/exit?code=3")
        assert status == 200
        victim = answer_pid(body)
        assert victim in first
        now = _wait_copies(h, inode, lambda c: len(c) == 3 and victim not in c)
        time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary()
    (new,) = now - first
    assert now - {new} == first - {victim}, "the other copies served on"
    assert listener_inode(target[1]) == inode
    assert f"copy pid {victim} exited on its own (exit status 3)" in h.log()
    assert "starting a copy again" in h.log()
    doc = json.loads(hupt_cli("status", "--json", str(h.pid)).stdout)
    gens = doc["instances"][0]["generations"]
    assert [g["number"] for g in gens] == [1], "the same generation, one copy replaced"
    assert new in gens[0]["pids"]
