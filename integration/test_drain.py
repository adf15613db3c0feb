"""Draining old generations: what ends a drain, and what bounds it.

A generation that stopped accepting serves the connections it has and exits
once the last one closes; several may drain at once, each ending on its own.
An idle keep-alive connection pins a drain until --close-idle closes it, the
--drain-timeout passes, or SIGUSR2 ends every drain now; a drained generation
gets --stop-signal, then SIGKILL after --kill-timeout. Connections that pin a
generation are held open by the test itself, so each phase lasts as long as
the test's checks, on any machine.
"""

from __future__ import annotations

import os
import signal
import time
from functools import partial

from harness import (
    Procs,
    free_port,
    health_cmd,
    listener_inode,
    serving_pid,
    threaded_cmd,
    wait_for,
    wait_gone,
    wait_listening,
)
from load import Connection, Load, Target, request_bytes, response_key
from supervision import (
    check_load,
    keepalive_connection,
    ping,
    reload_many,
    retired,
    start_hupt,
    states,
    stop_gracefully,
)


def test_reloads_while_older_generations_drain(procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    # Idle keep-alive connections stay open for 60 s on the server's side.
    h = procs.hupt("--drain-timeout", "60", "--kill-timeout", "5",
                   cmd=threaded_cmd(target, threads=8, idle_timeout=60))
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    assert inode is not None
    keep = request_bytes(target, "/", keep_alive=True)
    pins: list[tuple[Connection, str]] = []

    try:
        with Load(target, fresh=2, keepalive=2) as load:
            time.sleep(0.3)
            for gen in (1, 2, 3):
                # A keep-alive connection to the serving generation, left open.
                conn, response = keepalive_connection(target)
                key = response_key(response.body)
                assert key.endswith(f" pid={ping(h)[gen]['pid']}"), (key, ping(h))
                pins.append((conn, key))
                reload_many(h, 1, port)
            time.sleep(1.5)  # a few drain polls: nothing but the pins holds 1-3
            assert states(h) == {1: "draining", 2: "draining", 3: "draining", 4: "serving"}
            # A draining generation still serves the connections it has.
            for conn, key in pins:
                deadline = time.monotonic() + 10
                response = conn.exchange(keep, deadline)
                assert response.status == 200 and response_key(response.body) == key
            # Each drain ends on its own, as its last connection closes.
            order = (2, 1, 3)
            for i, gen in enumerate(order):
                pins[gen - 1][0].close()
                wait_for(f"generation {gen} to retire", partial(retired, h, gen), 10, h)
                assert set(order[i + 1:]) <= set(states(h)), (
                    f"closing generation {gen}'s last connection retired others: {states(h)}")
            time.sleep(0.3)
    finally:
        for conn, _ in pins:
            conn.close()
    check_load(load.result)
    assert states(h) == {4: "serving"}
    assert listener_inode(port) == inode
    log = h.log()
    assert log.count("no connections in flight") >= 3 and "drain timeout" not in log, log
    stop_gracefully(h)


def test_close_idle_ends_drains_early(procs: Procs) -> None:
    h, target = start_hupt(procs, "--drain-timeout", "30", "--close-idle", "300")
    old = serving_pid(target)
    conn, _ = keepalive_connection(target)  # pins the old generation
    t0 = time.monotonic()
    assert h.reload().returncode == 0
    assert not wait_gone({old}, 10), h.log()
    assert time.monotonic() - t0 < 10
    assert conn.sock.recv(100) == b"", "the idle connection was closed with a FIN"
    conn.close()


def test_without_close_idle_an_idle_connection_pins_the_old_generation(procs: Procs) -> None:
    h, target = start_hupt(procs, "--drain-timeout", "30")
    old = serving_pid(target)
    conn, _ = keepalive_connection(target)
    assert h.reload().returncode == 0
    assert wait_gone({old}, 2.0) == {old}, "still draining"
    os.kill(h.pid, signal.SIGUSR2)  # end every drain now
    assert not wait_gone({old}, 10), h.log()
    conn.close()


def test_drain_timeout_bounds_a_pinned_generation(procs: Procs) -> None:
    # The drain timeout runs from the moment the old generation stopped accepting,
    # before `hupt reload` returns: 4 s leave the check below 3 s of slack for that.
    h, target = start_hupt(procs, "--drain-timeout", "4")
    old = serving_pid(target)
    conn, _ = keepalive_connection(target)  # never closes by itself
    t0 = time.monotonic()
    assert h.reload().returncode == 0
    assert wait_gone({old}, 1.0) == {old}, "drains at first"
    assert not wait_gone({old}, 15), h.log()
    assert 3.8 < time.monotonic() - t0 < 15
    assert "drain timeout with 1 connection(s) still open" in h.log()
    conn.close()


def test_stop_signal_and_kill_timeout(procs: Procs) -> None:
    """A server that ignores SIGTERM: --stop-signal USR1 stops it at once;
    with the default TERM, --kill-timeout bounds the wait before SIGKILL."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h, _ = start_hupt(procs, "--stop-signal", "USR1", "--kill-timeout", "30",
                      cmd=health_cmd(target, "--ignore-term"), target=target)
    old = serving_pid(target)
    assert h.reload().returncode == 0
    assert not wait_gone({old}, 5), "USR1 stopped it long before the kill timeout"
    assert "SIGKILL" not in h.log()

    port = free_port()
    target = ("127.0.0.1", port)
    h2, _ = start_hupt(procs, "--kill-timeout", "1.5", cmd=health_cmd(target, "--ignore-term"),
                       target=target)
    old = serving_pid(target)
    t0 = time.monotonic()
    assert h2.reload().returncode == 0
    assert not wait_gone({old}, 10), h2.log()
    assert 1.3 < time.monotonic() - t0 < 10
    assert "still running 1.5 s after the stop signal: SIGKILL" in h2.log()
