"""hupt run + hupt reload, end to end: real servers, real load, real kernel.

For each server: 20 reloads under fresh-connection and keep-alive load, with a
3-second request in flight across a reload. Asserted: 0 failed requests, the
slow request completes with 200, every generation serves from the very same
listening socket (same inode: the handoff engaged, not a rebind), old
generations exit, and nothing is left behind (the `procs` fixture).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from harness import (
    HuptProcess,
    Procs,
    free_port,
    go_cmd,
    http_get,
    http_server_cmd,
    listener_inode,
    listener_inodes,
    node_cmd,
    threaded_cmd,
    unix_cmd,
    wait_gone,
    wait_listening,
)
from load import Load, SlowRequest, Target

RELOADS = 20


def server_cmd(kind: str, target: Target, go_binary: Path | None) -> list[str]:
    if kind == "http.server":
        assert isinstance(target, tuple)
        return http_server_cmd(target[1], bind=target[0])
    if kind == "node":
        return node_cmd(target)
    if kind == "go":
        assert go_binary is not None
        return go_cmd(go_binary, target)
    if kind == "threaded":
        return threaded_cmd(target, threads=4)
    raise AssertionError(kind)


def server_pids(h: HuptProcess) -> set[int]:
    return h.descendants()


def wait_single_generation(h: HuptProcess, timeout: float = 30.0) -> set[int]:
    """Wait until the old generations have exited; return the serving processes.

    Fails (AssertionError) if more than one generation is still alive after
    `timeout` s, or if no server process is left at all.
    """
    deadline = time.monotonic() + timeout
    while True:
        pids = server_pids(h)
        gens = {_gen_marker(p) for p in pids}
        if len(gens) == 1:
            return pids
        if time.monotonic() > deadline:
            by_gen = {p: _gen_marker(p) for p in sorted(pids)}
            raise AssertionError(
                f"{len(gens)} generations still alive {timeout}s after the last reload "
                f"(want exactly 1): {by_gen}\n{h.log()}")
        time.sleep(0.1)


def _gen_marker(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for var in f.read().split(b"\0"):
                if var.startswith(b"HUPT_GEN="):
                    return var.decode()
    except OSError:
        pass
    return "?"


def reload_many(h: HuptProcess, where: int | str, n: int) -> list[set[int]]:
    """Reload n times; each new generation serves from the original listening socket.

    Returns the processes of each new generation (those that appeared with the reload).
    """
    inode = listener_inode(where)
    assert inode is not None
    seen = server_pids(h)
    generations = []
    for i in range(n):
        r = h.reload()
        assert r.returncode == 0, f"reload {i + 1} failed: {r.stderr}\n{h.log()}"
        assert "done" in r.stderr
        assert listener_inode(where) == inode, "the listening socket must never be replaced"
        new = server_pids(h) - seen
        assert new, f"reload {i + 1} started no new process"
        assert any(inode in listener_inodes(p) for p in new), (
            f"the new generation does not hold the original listener after reload {i + 1}")
        generations.append(new)
        seen |= new
        time.sleep(0.15)
    return generations


@pytest.mark.parametrize("kind", ["http.server", "node", "go", "threaded"])
def test_reloads_under_load(kind: str, procs: Procs, request: pytest.FixtureRequest) -> None:
    go_binary = request.getfixturevalue("go_server") if kind == "go" else None
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--drain-timeout", "20", "--kill-timeout", "5",
                   cmd=server_cmd(kind, target, go_binary))
    wait_listening(target, 20, proc=h)
    first = server_pids(h)

    with Load(target, fresh=2, keepalive=2, conn_requests=20) as load:
        time.sleep(0.3)
        slow = SlowRequest(target, 3.0)
        slow.start()
        time.sleep(0.5)
        generations = reload_many(h, port, RELOADS)
        status, elapsed = slow.result()
        time.sleep(0.3)
    res = load.result

    assert res.failed == 0, res.summary()
    assert res.ok > 100, res.summary()
    assert status == 200 and elapsed >= 2.9, (status, elapsed)
    # Every reload produced a new serving process.
    assert len(generations) == RELOADS and not set().union(*generations) & first
    if kind != "http.server":  # http.server has no pid route: the others say who answered
        assert len(res.pids) >= RELOADS // 2, res.summary()
    # Old generations exit once drained: the first one and every one reload_many
    # started except the last, which alone serves.
    last = wait_single_generation(h)
    assert not (last & first)
    assert not wait_gone(first, 1.0)
    old = set().union(*generations[:-1])
    assert not (last & old), f"an old generation still serves: {last & old}"
    still = wait_gone(old, 1.0)
    assert not still, f"old generations' processes still alive: {sorted(still)}\n{h.log()}"
    assert last <= generations[-1], (last, generations[-1])
    # A graceful stop ends hupt with status 0.
    h.signal(signal.SIGTERM)
    assert h.popen.wait(30) == 0, h.log()
    assert not wait_gone(last, 5.0)


def test_sighup_reloads(procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt(cmd=threaded_cmd(target, threads=2))
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    first = server_pids(h)
    with Load(target, fresh=2, keepalive=1) as load:
        for _ in range(3):
            h.send_hup()
            deadline = time.monotonic() + 20
            while server_pids(h) & first or not server_pids(h):
                assert time.monotonic() < deadline, h.log()
                time.sleep(0.1)
            first = server_pids(h)
            assert listener_inode(port) == inode
    assert load.result.failed == 0, load.result.summary()
    assert "ready" in h.log()


def _switchable(tmp: Path, target: Target) -> tuple[list[str], Path, Path]:
    """A server command that exits at once while FAIL exists and never listens while HANG does."""
    fail, hang = tmp / "FAIL", tmp / "HANG"
    assert isinstance(target, tuple)
    script = (f'if [ -e {fail} ]; then echo failing >&2; exit 3; fi; '
              f'if [ -e {hang} ]; then exec sleep 60; fi; '
              f'exec {sys.executable} -m http.server {target[1]} --bind {target[0]}')
    return ["sh", "-c", script], fail, hang


def test_new_generation_exiting_fails_the_reload_old_keeps_serving(
        procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    cmd, fail, _ = _switchable(tmp_path, target)
    h = procs.hupt(cmd=cmd)
    wait_listening(target, 20, proc=h)
    first = server_pids(h)
    with Load(target, fresh=2, keepalive=1) as load:
        fail.touch()
        r = h.reload()
        assert r.returncode == 1, r.stderr
        assert "exited (exit status 3) before it was ready" in r.stderr
        assert len(r.stderr.strip().splitlines()[-1]) < 300
        time.sleep(0.5)
        assert server_pids(h) == first, "the old generation keeps serving, untouched"
        fail.unlink()
        r = h.reload()
        assert r.returncode == 0, r.stderr
    assert load.result.failed == 0, load.result.summary()
    assert load.result.ok > 20


def test_not_ready_in_time_names_the_missing_address(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    cmd, _, hang = _switchable(tmp_path, target)
    h = procs.hupt("--ready-timeout", "2", "--kill-timeout", "2", cmd=cmd)
    wait_listening(target, 20, proc=h)
    first = server_pids(h)
    with Load(target, fresh=2, keepalive=1) as load:
        hang.touch()
        t0 = time.monotonic()
        r = h.reload()
        took = time.monotonic() - t0
        assert r.returncode == 1, r.stderr
        assert f"did not listen on 127.0.0.1:{port}" in r.stderr
        assert 1.5 < took < 15
        # The failed generation (sleep) is stopped; the old one still serves.
        deadline = time.monotonic() + 10
        while server_pids(h) != first:
            assert time.monotonic() < deadline, (server_pids(h), first)
            time.sleep(0.1)
    assert load.result.failed == 0, load.result.summary()
    assert http_get(target)[0] == 200


def test_unix_socket_server_reloads(procs: Procs, short_tmp: Path) -> None:
    path = str(short_tmp / "app.sock")
    h = procs.hupt("--drain-timeout", "20", cmd=unix_cmd(path))
    wait_listening(path, 20, proc=h)
    with Load(path, fresh=2, keepalive=2) as load:
        time.sleep(0.3)
        reload_many(h, path, 8)
        time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary()
    assert len(load.result.pids) >= 4
    assert os.path.exists(path), "the server's unlink of a held path must not remove it"


def test_ipv6_and_port_zero(procs: Procs) -> None:
    """A [::1] listener is handed over; a kernel-chosen port (the Go IPv6 probe) is ignored."""
    port = free_port("::1")
    target: Target = ("::1", port)
    h = procs.hupt(cmd=node_cmd(target))
    wait_listening(target, 20, proc=h)
    with Load(target, fresh=2, keepalive=1) as load:
        reload_many(h, port, 3)
    assert load.result.failed == 0, load.result.summary()


def test_reload_of_unknown_pid_is_a_clear_error(procs: Procs) -> None:
    import subprocess

    from harness import hupt_env

    sleeper = procs.spawn(["sleep", "30"])
    r = subprocess.run([sys.executable, "-m", "hupt", "reload", str(sleeper.pid)],
                       capture_output=True, text=True, timeout=30, env=hupt_env(os.environ))
    assert r.returncode == 2
    assert r.stderr.startswith("hupt: error:") and "not under hupt" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
