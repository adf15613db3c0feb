"""Signals to hupt and `hupt stop`: reload on SIGHUP, graceful and forced stops.

SIGHUP reloads. SIGTERM or SIGINT (or `hupt stop`) stop gracefully: the
server stops accepting, the listening socket refuses new clients at once,
requests in flight finish, then hupt exits 0; a second SIGINT (or `hupt stop
--now`) stops at once. A request in flight is held open by the test
(load.HeldRequest) until its checks are done, so "while a request is in
flight" never depends on how fast the machine is.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from harness import (
    Background,
    Procs,
    alive,
    free_port,
    hupt_cli,
    listener_inode,
    node_cmd,
    threaded_cmd,
    wait_for,
    wait_gone,
    wait_listening,
)
from load import HeldRequest, Load, RequestFailed, Target, connect
from supervision import hupt_status, keepalive_connection, ping, start_hupt, states


def test_sighup_reloads(procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt(cmd=threaded_cmd(target, threads=2))
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    first = h.descendants()
    with Load(target, fresh=2, keepalive=1) as load:
        for _ in range(3):
            h.send_hup()
            deadline = time.monotonic() + 20
            while h.descendants() & first or not h.descendants():
                assert time.monotonic() < deadline, h.log()
                time.sleep(0.1)
            first = h.descendants()
            assert listener_inode(port) == inode
    assert load.result.failed == 0, load.result.summary()
    assert "ready" in h.log()


@pytest.mark.parametrize(("sig", "kind"), [(signal.SIGINT, "threaded"), (signal.SIGTERM, "node")])
def test_graceful_stop_drains_a_request_in_flight(sig: int, kind: str, procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    cmd = threaded_cmd(target, threads=4) if kind == "threaded" else node_cmd(target)
    h = procs.hupt("--drain-timeout", "30", "--kill-timeout", "5", cmd=cmd)
    wait_listening(target, 20, proc=h)
    server = ping(h)[1]["pid"]
    assert isinstance(server, int)
    held = HeldRequest(target).start()
    try:
        held.wait_accepted()
        h.signal(sig)
        # "draining" once the server was made to stop accepting.
        wait_for("generation 1 to drain", lambda: states(h) == {1: "draining"}, 5, h)
        assert "stopping: no more accepts" in h.log()
        # The server stopped accepting, and the listening socket takes no new
        # connections: refused at once, not queued until hupt exits and reset then.
        with pytest.raises(ConnectionRefusedError):
            connect(target, 2.0).close()
        # Still draining: the request in flight holds hupt and the server.
        time.sleep(1.0)
        assert h.poll() is None and alive(server), "hupt stopped with a request in flight"
    finally:
        held.release()
    status, elapsed = held.result()
    assert status == 200 and elapsed >= 1.0, (status, elapsed)
    code = h.popen.wait(15)
    assert code == 0, f"hupt exited {code}\n{h.log()}"
    log = h.log()
    assert "no connections in flight" in log and "drain timeout" not in log, log


def test_second_sigint_stops_at_once(procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--drain-timeout", "30", "--kill-timeout", "10",
                   cmd=threaded_cmd(target, threads=4))
    wait_listening(target, 20, proc=h)
    server = ping(h)[1]["pid"]
    assert isinstance(server, int)
    held = HeldRequest(target, timeout=40).start()  # never released: only a forced stop ends it
    held.wait_accepted()
    h.signal(signal.SIGINT)
    wait_for("hupt to start stopping", lambda: "stopping: no more accepts" in h.log(), 5, h)
    time.sleep(0.5)
    assert h.poll() is None, "one SIGINT must drain, not stop at once"
    t0 = time.monotonic()
    h.signal(signal.SIGINT)
    h.popen.wait(10)
    took = time.monotonic() - t0
    assert took < 2.0, f"hupt took {took:.1f}s to stop after the second SIGINT"
    assert "stopping now" in h.log(), h.log()
    assert not wait_gone([server], 2)
    with pytest.raises(RequestFailed):
        held.result()


def test_stop_command_drains_and_waits(procs: Procs) -> None:
    h, target = start_hupt(procs, "--drain-timeout", "30")
    servers = h.descendants()
    assert servers
    held = HeldRequest(target).start()  # in flight when the stop is issued
    try:
        held.wait_accepted()
        deadline = time.monotonic() + 10
        while (hupt_status(h)["generations"][0]["in_flight"] or 0) < 1:
            assert time.monotonic() < deadline, "the held request never reached the server"
            time.sleep(0.05)
        stop = Background(lambda: hupt_cli("stop", str(h.pid)))
        time.sleep(1.0)
        # `hupt stop` waits while the request is in flight, and so do the servers.
        assert not stop.done(), "`hupt stop` returned before the request finished"
        assert all(alive(p) for p in servers), "a server exited with a request in flight"
    finally:
        held.release()
    r = stop.result()
    # Checked before anything else: `hupt stop` returned only once the servers had exited.
    left = {p for p in servers if alive(p)}
    assert r.returncode == 0, r.stderr
    assert not left, f"server processes still alive when `hupt stop` returned: {left}"
    status, elapsed = held.result()
    assert status == 200 and elapsed >= 1.0, (status, elapsed)
    assert h.popen.wait(2) == 0, h.log()
    assert not wait_gone(servers, 0.1)


def test_stop_command_returns_after_hupt_has_exited(procs: Procs, tmp_path: Path) -> None:
    pidfile = tmp_path / "hupt.pid"
    h, target = start_hupt(procs, "--pidfile", str(pidfile))
    assert isinstance(target, tuple)
    servers = h.descendants()
    r = hupt_cli("stop", str(h.pid))
    hupt_alive, port_held, pidfile_left = alive(h.pid), listener_inode(target[1]), pidfile.exists()
    assert r.returncode == 0, r.stderr
    assert not {p for p in servers if alive(p)}
    assert h.popen.wait(10) == 0
    assert not hupt_alive, "hupt still running when `hupt stop` returned"
    assert port_held is None and not pidfile_left, (port_held, pidfile_left)


def test_stop_now_ends_drains_at_once(procs: Procs) -> None:
    h, target = start_hupt(procs, "--drain-timeout", "60")
    conn, _ = keepalive_connection(target)  # would pin the drain for a minute
    t0 = time.monotonic()
    r = hupt_cli("stop", "--now", str(h.pid))
    assert r.returncode == 0, r.stderr
    assert h.popen.wait(10) == 0
    assert time.monotonic() - t0 < 8
    conn.close()


STRAY = """
import socket, sys, time
s = socket.socket(fileno=int(sys.argv[1]))
s.setblocking(True)
errors, last = 0, 0.0
print(0, flush=True)
while True:
    try:
        conn, _ = s.accept()
        conn.close()
    except OSError:
        errors += 1  # EINVAL for ever once the listener is shut down
    if time.monotonic() - last > 0.1:
        last = time.monotonic()
        print(errors, flush=True)
"""


def test_stop_names_a_process_still_holding_the_listener_and_does_not_shut_it(
        procs: Procs) -> None:
    """A process hupt cannot pause (here: one that got the listening socket some other
    way) would spin on accept() failing with EINVAL if hupt shut the socket down at its
    stop. hupt names it and leaves the socket listening."""
    import os
    import sys

    from hupt.tracer import pidfd
    from hupt.tracer import procfs as tprocfs

    h, target = start_hupt(procs)
    (server,) = h.descendants()  # the one generation's one process
    inode = listener_inode(target[1])
    fd = next(f for f, i in tprocfs.socket_inodes(server).items() if i == inode)
    handle = pidfd.pidfd_open(server)
    try:
        copy = pidfd.pidfd_getfd(handle, fd)
    finally:
        os.close(handle)
    try:
        stray = procs.spawn([sys.executable, "-c", STRAY, str(copy)], name="stray",
                            pass_fds=(copy,))
    finally:
        os.close(copy)
    wait_for("the stray to report", lambda: stray.out.read_text().strip() or None)
    r = hupt_cli("stop", str(h.pid))
    assert r.returncode == 0, r.stderr
    assert h.popen.wait(20) == 0, h.log()
    assert f"pid {stray.pid} (python" in h.log() and "still holds" in h.log(), h.log()
    time.sleep(0.5)
    before = int(stray.out.read_text().split()[-1])
    time.sleep(1.0)
    after = int(stray.out.read_text().split()[-1])
    assert after - before < 5, f"the stray spins on accept(): {before} -> {after} errors"
