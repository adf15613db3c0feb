"""--drain-signal in fork mode: clients that never let go of their connection.

Real clients (browsers, connection pools, load balancers) hold one connection
and keep sending on it; such a connection never ends on its own, so without
help an old generation answers them with the old code until --drain-timeout.
With `--drain-signal TERM` the static Go test server (servers/goserver, which
calls http.Server.Shutdown on SIGTERM) is asked to drain itself as soon as it
stops accepting: it answers the request in flight with `Connection: close`
and closes idle connections, and the clients reconnect to the new generation.

The load's persistent clients (load.py) are such clients: ONE keep-alive
connection each for the whole test, requests back to back. A client opens
another connection only when the server closed its own: after an answer
carrying `Connection: close`, or when the connection ended before any byte of
an answer (the request is then retried, what any HTTP client does for an
idempotent request; counted apart). Anything else is a failure. The drain
timeout is 30 s, so an old generation gone within 2 s was drained by the
signal, not by the timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness import (
    SERVERS,
    HuptProcess,
    Procs,
    free_port,
    go_cmd,
    http_get,
    hupt_cli,
    nginx_cmd,
    wait_gone,
    wait_listening,
)
from load import Load, SlowRequest, Target

RELOADS = 10
GONE_WITHIN = 2.0  # seconds after `hupt reload` returned
DRAIN_TIMEOUT = "30"


def clients(target: Target, persistent: int = 2, fresh: int = 4) -> Load:
    """`fresh` clients opening a connection per request, `persistent` holding one each."""
    return Load(target, fresh=fresh, keepalive=0, persistent=persistent)


def serving_pid(target: Target) -> int:
    status, body = http_get(target, "/pid")
    assert status == 200, body
    return int(body)


def wait_only(h: HuptProcess, pid: int, within: float) -> float:
    """Seconds until `pid` is hupt's only descendant; fails after `within`."""
    start = time.monotonic()
    while (left := h.descendants()) != {pid}:
        if time.monotonic() - start > within:
            raise AssertionError(f"{within:g} s after the reload hupt still runs {sorted(left)}, "
                                 f"not only {pid}\n{h.log()}")
        time.sleep(0.05)
    return time.monotonic() - start


def status_of(h: HuptProcess) -> dict[str, object]:
    r = hupt_cli("status", "--json", str(h.pid), timeout=30)
    assert r.returncode == 0, r.stderr
    instances = json.loads(r.stdout)["instances"]
    assert len(instances) == 1
    inst: dict[str, object] = instances[0]
    return inst


def test_go_shutdown_on_drain_signal_frees_persistent_clients_at_once(
        procs: Procs, go_server: Path) -> None:
    target = ("127.0.0.1", free_port())
    reloads_under_persistent_clients(procs, go_cmd(go_server, target), target)


def test_node_with_a_sigterm_handler_drains_itself_too(procs: Procs) -> None:
    """servers/drain_node_server.js: server.close(), `Connection: close` while closing."""
    target = ("127.0.0.1", free_port())
    cmd = ["node", str(SERVERS / "drain_node_server.js"), f"{target[0]}:{target[1]}"]
    reloads_under_persistent_clients(procs, cmd, target)


def reloads_under_persistent_clients(procs: Procs, cmd: list[str],
                                     target: tuple[str, int]) -> None:
    h = procs.hupt("--drain-signal", "TERM", "--drain-timeout", DRAIN_TIMEOUT,
                   "--kill-timeout", "5", cmd=cmd)
    wait_listening(target, proc=h)
    took: list[float] = []
    with clients(target) as load:
        time.sleep(0.5)
        for i in range(RELOADS):
            r = h.reload(timeout=60)
            returned = time.monotonic()
            assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{h.log()}"
            new = serving_pid(target)
            took.append(wait_only(h, new, GONE_WITHIN))
            time.sleep(0.3)  # the persistent clients send on their new connections
            for p in load.so_far().persistent:
                assert p.old_answers(returned + GONE_WITHIN, new) == 0, \
                    "old code answered a persistent client after its generation was gone"
    result = load.result
    assert result.failed == 0, result.summary()
    assert len(result.persistent) == 2 and result.persistent_failed == 0, result.summary()
    for p in result.persistent:
        assert p.ok > RELOADS and p.reconnects + p.retries >= RELOADS, result.summary()
    assert result.ok - result.persistent_ok > RELOADS, result.summary()  # the fresh clients
    log = h.log()
    assert log.count("(--drain-signal)") >= RELOADS, log
    assert "drain timeout" not in log, log
    assert max(took) < GONE_WITHIN, took


def test_without_drain_signal_a_persistent_client_holds_the_drain_and_hupt_says_so(
        procs: Procs, go_server: Path) -> None:
    target = ("127.0.0.1", free_port())
    h = procs.hupt("--drain-timeout", DRAIN_TIMEOUT, "--kill-timeout", "5",
                   cmd=go_cmd(go_server, target))
    wait_listening(target, proc=h)
    with clients(target, persistent=1, fresh=1) as load:
        time.sleep(0.3)
        old = serving_pid(target)
        r = h.reload(timeout=60)
        assert r.returncode == 0, r.stderr
        new = serving_pid(target)
        time.sleep(GONE_WITHIN)
        assert old in h.descendants(), "the persistent client pins the old generation"
        held = load.so_far().persistent[0]
        assert held.old_answers(time.monotonic() - 0.5, new) > 0, "old code still answers"
        deadline = time.monotonic() + 15
        while "still open after" not in h.log():
            assert time.monotonic() < deadline, h.log()
            time.sleep(0.2)
        gens = status_of(h)["generations"]
        assert isinstance(gens, list)
        draining = [g for g in gens if g["state"] == "draining"]
        assert len(draining) == 1 and draining[0]["pid"] == old, gens
        assert draining[0]["in_flight"] >= 1 and draining[0]["draining_s"] >= 5, draining
        assert draining[0]["drain_signal"] is None
        # The persistent client's connection, open since before the reload. hupt dates a
        # connection from the drain poll that first saw it, which a busy machine delays
        # past the drain's start (4.93 s once, where draining_s was 5.0).
        assert draining[0]["oldest_connection_s"] >= 4, draining
        assert draining[0]["oldest_connection_s"] <= draining[0]["draining_s"], draining
        plain = hupt_cli("status", str(h.pid), timeout=30).stdout
        assert "--drain-signal" in plain and "still open" in plain, plain
    # The client gone, its connection closes and the old generation drains.
    assert load.result.failed == 0, load.result.summary()
    assert load.result.persistent_failed == 0, load.result.summary()
    wait_only(h, new, 10)
    log = h.log()
    said = [line for line in log.splitlines() if "still open after" in line]
    assert len(said) == 1, log  # once per drain, not a flood
    assert "connection(s) still open" in said[0] and "--drain-signal" in said[0], said


@contextmanager
def reload_during_a_slow_request(
        procs: Procs, go_server: Path) -> Iterator[tuple[HuptProcess, Target, int, SlowRequest,
                                                         Load]]:
    """The Go server under --drain-signal TERM, a 3 s request inside its handler and a
    load of fresh and keep-alive clients for the whole block, then one reload."""
    target: Target = ("127.0.0.1", free_port())
    h = procs.hupt("--drain-signal", "TERM", "--drain-timeout", DRAIN_TIMEOUT,
                   "--kill-timeout", "5", cmd=go_cmd(go_server, target))
    wait_listening(target, proc=h)
    old = serving_pid(target)
    with Load(target, fresh=2, keepalive=1) as load:
        slow = SlowRequest(target, seconds=0.1, path="/slow?ms=3000").start()
        slow.wait_accepted()
        time.sleep(0.3)  # inside the handler
        r = h.reload(timeout=60)
        assert r.returncode == 0, r.stderr + h.log()
        yield h, target, old, slow, load


def test_a_slow_request_in_flight_at_the_reload_completes_with_200(
        procs: Procs, go_server: Path) -> None:
    with reload_during_a_slow_request(procs, go_server) as (h, target, old, slow, load):
        assert old in h.descendants(), "the old generation finishes the request it has"
        status, took = slow.result()
        assert status == 200 and took >= 3.0, (status, took)
        wait_only(h, serving_pid(target), GONE_WITHIN + 3.0)
    assert load.result.failed == 0, load.result.summary()
    assert "drain timeout" not in h.log()


def test_hupt_killed_during_a_drain_leaves_a_server_that_finishes_and_exits(
        procs: Procs, go_server: Path) -> None:
    with reload_during_a_slow_request(procs, go_server) as (h, target, old, slow, load):
        new = serving_pid(target)
        assert new != old and {old, new} <= h.descendants()
    assert load.result.failed == 0, load.result.summary()
    h.popen.kill()  # hupt dies while the old generation drains
    h.popen.wait(10)
    try:
        status, took = slow.result()
        assert status == 200 and took >= 3.0, (status, took)
        assert not wait_gone({old}, 15.0), "the old generation exits by itself"
        assert serving_pid(target) == new, "the new one serves on without hupt"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(new, signal.SIGKILL)  # ours: no hupt is left to stop it
        wait_gone({new}, 10.0)


def test_nginx_quit_drains_old_masters_at_once(procs: Procs, tmp_path: Path) -> None:
    """nginx's graceful stop, QUIT: its workers close keep-alive connections at the next
    request boundary and the old master exits; 2 s after each reload only the new master
    and its two workers are left."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    nginx = nginx_cmd(tmp_path, port)
    h = procs.hupt("--drain-signal", "QUIT", "--drain-timeout", DRAIN_TIMEOUT,
                   "--kill-timeout", "5", "--stop-signal", "QUIT",
                   "--unlink", str(tmp_path / "nginx.pid"),
                   cmd=nginx)
    wait_listening(target, 20, proc=h)
    took: list[float] = []
    with clients(target) as load:
        time.sleep(0.5)
        for i in range(RELOADS):
            before = h.descendants()
            r = h.reload(timeout=60)
            assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{h.log()}"
            start = time.monotonic()
            while h.descendants() & before or len(h.descendants()) != 3:
                assert time.monotonic() - start < GONE_WITHIN, (before, h.descendants(),
                                                                 h.log())
                time.sleep(0.05)
            took.append(time.monotonic() - start)
            time.sleep(0.3)
    result = load.result
    assert result.failed == 0, result.summary()
    assert result.persistent_failed == 0, result.summary()
    for p in result.persistent:
        assert p.ok > RELOADS and p.reconnects + p.retries >= RELOADS, result.summary()
    assert h.log().count("(--drain-signal)") >= RELOADS, h.log()
    assert "drain timeout" not in h.log(), h.log()
