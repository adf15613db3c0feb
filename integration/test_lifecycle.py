"""Lifecycle controls of `hupt run`, each against a real server under real load.

Every test fails if its option does nothing: it asserts the effect (a delay
that is waited, a READY=1 that is required, a rollback that brings the old
generation back, a hook's output as the reason...), and 0 failed requests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest.mock import ANY

from harness import (
    SERVERS,
    HuptProcess,
    Procs,
    alive,
    free_port,
    http_get,
    hupt_cli,
    listener_inode,
    wait_gone,
    wait_listening,
)
from load import Load, SlowRequest, Target

HEALTH = SERVERS / "health_server.py"


def health_cmd(target: Target, *extra: str) -> list[str]:
    assert isinstance(target, tuple)
    return [sys.executable, str(HEALTH), f"{target[0]}:{target[1]}", *extra]


def start(procs: Procs, *opts: str, cmd: list[str] | None = None,
          env: dict[str, str] | None = None,
          target: Target | None = None) -> tuple[HuptProcess, Target]:
    target = target or ("127.0.0.1", free_port())
    h = procs.hupt(*opts, cmd=cmd if cmd is not None else health_cmd(target), env=env)
    wait_listening(target, 20, proc=h)
    return h, target


def serving_pid(target: Target) -> int:
    status, body = http_get(target, "/")
    assert status == 200
    return int(body.split("pid=")[1].split()[0])


def test_status_json_describes_a_running_instance(procs: Procs) -> None:
    h, target = start(procs)
    assert h.reload().returncode == 0
    assert h.reload().returncode == 0
    r = hupt_cli("status", "--json", str(h.pid))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1 and len(doc["instances"]) == 1
    inst = doc["instances"][0]
    assert inst["hupt_pid"] == h.pid and inst["mode"] == "fork" and inst["state"] == "running"
    serving = [g for g in inst["generations"] if g["state"] == "serving"]
    assert len(serving) == 1 and serving[0]["number"] == 3
    assert serving[0]["pid"] == serving_pid(target)
    assert serving[0]["listening"] == [f"127.0.0.1:{target[1]}"]
    assert serving[0]["in_flight"] == 0
    (listener,) = inst["listeners"]
    assert listener["address"] == f"127.0.0.1:{target[1]}"
    assert listener["backlog"] >= 1024 and listener["queued"] == 0
    assert [r["ok"] for r in inst["reloads"]] == [True, True]
    assert all(r["duration_ms"] > 0 for r in inst["reloads"])
    # Without a PID: every instance of this user, this one among them.
    r = hupt_cli("status", "--json")
    assert h.pid in [i["hupt_pid"] for i in json.loads(r.stdout)["instances"]]
    # The human form names the generation and the listener.
    r = hupt_cli("status", str(h.pid))
    assert "generation 3" in r.stdout and "backlog" in r.stdout


# The documented keys of `hupt status --json` (hupt/status.py, README) and their JSON types.
NUMBER = (int, float)
INSTANCE_KEYS = {"hupt_pid": int, "command": list, "mode": str, "state": str,
                 "uptime_s": NUMBER, "generations": list, "listeners": list, "reloads": list}
GENERATION_KEYS = {"number": int, "pid": int, "pids": list, "state": str, "age_s": NUMBER,
                   "ready_ms": (*NUMBER, type(None)), "in_flight": (int, type(None)),
                   "listening": list}
LISTENER_KEYS = {"address": str, "inode": int, "queued": (int, type(None)),
                 "backlog": (int, type(None))}
RELOAD_KEYS = {"at": NUMBER, "duration_ms": NUMBER, "ok": bool, "reason": str,
               "generation": (int, type(None))}
GENERATION_STATES = {"starting", "serving", "failed", "draining", "retiring", "exited"}


def _typed(where: str, obj: object, keys: dict[str, type | tuple[type, ...]]) -> None:
    """Every documented key is present with its type (a bool is no number here)."""
    assert isinstance(obj, dict), (where, obj)
    missing = keys.keys() - obj.keys()
    assert not missing, f"{where}: documented keys missing: {sorted(missing)} in {obj}"
    for key, kind in keys.items():
        value = obj[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        assert ok, f"{where}.{key} = {value!r} is not {kind}"


def _check_schema(doc: dict[str, object]) -> None:
    assert doc.keys() >= {"schema", "instances"} and doc["schema"] == 1, doc
    assert isinstance(doc["instances"], list)
    for inst in doc["instances"]:
        _typed("instance", inst, INSTANCE_KEYS)
        assert all(isinstance(a, str) for a in inst["command"]), inst["command"]
        assert inst["mode"] in ("fork", "exec") and inst["uptime_s"] >= 0
        assert inst["state"] in ("running", "reloading", "stopping"), inst["state"]
        for g in inst["generations"]:
            _typed("generation", g, GENERATION_KEYS)
            assert g["state"] in GENERATION_STATES, g
            assert all(type(p) is int for p in g["pids"]), g
            assert all(isinstance(a, str) for a in g["listening"]), g
            assert g["age_s"] >= 0, g
        for listener in inst["listeners"]:
            _typed("listener", listener, LISTENER_KEYS)
        for r in inst["reloads"]:
            _typed("reload", r, RELOAD_KEYS)
            assert r["duration_ms"] >= 0, r


def _status(h: HuptProcess) -> dict[str, object]:
    r = hupt_cli("status", "--json", str(h.pid), timeout=20)
    assert r.returncode == 0, r.stderr
    doc: dict[str, object] = json.loads(r.stdout)
    _check_schema(doc)
    (inst,) = doc["instances"]  # type: ignore[misc]
    assert isinstance(inst, dict)
    return inst


def test_status_json_while_draining_and_after_a_failed_reload(
        procs: Procs, tmp_path: Path) -> None:
    """Every documented key with its type; a draining generation with a connection in
    flight shows as "draining" with in_flight >= 1; a failed reload is recorded."""
    fail = tmp_path / "FAIL"
    port = free_port()
    target: Target = ("127.0.0.1", port)
    cmd = ["sh", "-c", f"test -e {fail} && exit 3; exec {' '.join(health_cmd(target))}"]
    h, _ = start(procs, "--drain-timeout", "30", cmd=cmd, target=target)
    t_start = time.time()
    assert h.reload().returncode == 0
    draining = serving_pid(target)  # generation 2
    conn = _idle_keepalive(target)  # an open keep-alive connection pins generation 2
    r = h.reload()
    assert r.returncode == 0, r.stderr
    assert "draining 1 in flight" in r.stderr, r.stderr
    serving = serving_pid(target)  # generation 3
    assert serving != draining
    fail.touch()  # generation 4 exits before it is ready: the reload fails
    r = h.reload()
    assert r.returncode == 1, r.stderr
    assert "exit status 3" in r.stderr, r.stderr

    inst = _status(h)
    assert inst["hupt_pid"] == h.pid and inst["command"] == cmd
    assert inst["mode"] == "fork" and inst["state"] == "running"
    assert 0 < inst["uptime_s"] < time.time() - t_start + 30
    gens = {g["number"]: g for g in inst["generations"]}
    assert set(gens) == {2, 3}, inst["generations"]
    old, new = gens[2], gens[3]
    assert old["state"] == "draining", old
    assert old["pid"] == draining and draining in old["pids"], old
    assert isinstance(old["in_flight"], int) and old["in_flight"] >= 1, old
    assert new["state"] == "serving" and new["pid"] == serving and serving in new["pids"], new
    assert new["in_flight"] == 0, new
    assert old["age_s"] > new["age_s"], (old, new)
    for g in (old, new):
        assert g["listening"] == [f"127.0.0.1:{port}"], g
        assert g["ready_ms"] is not None and 0 < g["ready_ms"] <= g["age_s"] * 1000, g
    (listener,) = inst["listeners"]
    assert listener["address"] == f"127.0.0.1:{port}"
    assert listener["inode"] == listener_inode(port), (listener, listener_inode(port))
    assert listener["queued"] == 0 and listener["backlog"] >= 1024, listener
    reloads = inst["reloads"]
    assert [x["ok"] for x in reloads] == [True, True, False], reloads
    assert [x["generation"] for x in reloads] == [2, 3, 4], reloads
    failed = reloads[-1]
    assert "generation 4" in failed["reason"] and "exit status 3" in failed["reason"], failed
    assert all(t_start - 1 <= x["at"] <= time.time() + 1 for x in reloads), reloads
    assert [x["at"] for x in reloads] == sorted(x["at"] for x in reloads), "oldest first"
    assert all(x["duration_ms"] > 0 for x in reloads), reloads
    assert "is ready" in reloads[0]["reason"] and "is ready" in reloads[1]["reason"], reloads

    # Once its last connection closes, the draining generation exits and leaves the list.
    conn.close()
    assert not wait_gone({draining}, 10), h.log()
    deadline = time.monotonic() + 10
    while (numbers := [g["number"] for g in _status(h)["generations"]]) != [3]:
        assert time.monotonic() < deadline, numbers
        time.sleep(0.1)


def test_ready_delay_waits_before_switching(procs: Procs) -> None:
    h, target = start(procs, "--ready", "delay:1.5")
    old = serving_pid(target)
    with Load(target, fresh=2, keepalive=1) as load:
        t0 = time.monotonic()
        r = h.reload()
        took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took >= 1.5, took
    assert serving_pid(target) != old
    assert load.result.failed == 0, load.result.summary()


def test_ready_notify_requires_ready_1(procs: Procs, tmp_path: Path) -> None:
    silent = tmp_path / "SILENT"
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h, _ = start(procs, "--ready", "notify", "--ready-timeout", "3",
                 cmd=health_cmd(target, "--notify-after", "0.8", "--no-notify-if", str(silent)),
                 target=target)
    old = serving_pid(target)
    with Load(target, fresh=2, keepalive=1) as load:
        t0 = time.monotonic()
        r = h.reload()
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 >= 0.8
        new = serving_pid(target)
        assert new != old
        silent.touch()  # the next generation listens but never says READY=1
        r = h.reload()
        assert r.returncode == 1 and "--ready notify not satisfied" in r.stderr, r.stderr
        time.sleep(0.5)
        assert serving_pid(target) == new
    assert load.result.failed == 0, load.result.summary()


def test_ready_http_rolls_back_an_unhealthy_generation(procs: Procs, tmp_path: Path) -> None:
    sick = tmp_path / "SICK"
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h, _ = start(procs, "--ready", "http:/healthz", "--ready-timeout", "2",
                 cmd=health_cmd(target, "--fail-health-if", str(sick)), target=target)
    with Load(target, fresh=2, keepalive=2) as load:
        assert h.reload().returncode == 0
        healthy = serving_pid(target)
        sick.touch()
        r = h.reload()
        assert r.returncode == 1, r.stderr
        assert "503" in r.stderr and "rolled back" in r.stderr, r.stderr
        started = re.search(r"started generation (\d+) \(pid (\d+)\)", r.stderr)
        assert started is not None, r.stderr
        number, unhealthy = int(started[1]), int(started[2])
        assert unhealthy != healthy
        time.sleep(1.0)
        # The old generation accepts again: it alone answers now.
        assert {serving_pid(target) for _ in range(10)} == {healthy}
        # The unhealthy generation is stopped after the rollback.
        assert not wait_gone({unhealthy}, 15), f"pid {unhealthy} still alive\n{h.log()}"
        assert unhealthy not in h.descendants()
        assert f"generation {number} (pid {unhealthy}) exited" in h.log(), h.log()
        gens = _status(h)["generations"]
        assert [(g["number"], g["state"]) for g in gens] == [(2, "serving")], gens
        sick.unlink()
        assert h.reload().returncode == 0
    assert load.result.failed == 0, load.result.summary()
    assert healthy in load.result.pids


def test_before_reload_failure_aborts_with_its_output(procs: Procs, tmp_path: Path) -> None:
    flag = tmp_path / "BROKEN"
    hook = f"if [ -e {flag} ]; then echo 'config test failed: line 3'; exit 4; fi; echo ok"
    h, target = start(procs, "--before-reload", hook)
    old = serving_pid(target)
    flag.touch()
    r = h.reload()
    assert r.returncode == 1
    assert "config test failed: line 3" in r.stderr and "exit status 4" in r.stderr
    assert serving_pid(target) == old and len(h.descendants()) == 1, "no generation started"
    flag.unlink()
    assert h.reload().returncode == 0
    assert serving_pid(target) != old


def test_after_reload_runs_and_its_failure_is_reported(procs: Procs, tmp_path: Path) -> None:
    out = tmp_path / "warmed"
    h, _ = start(procs, "--after-reload",
                      f'echo "gen $HUPT_GENERATION" >> {out}; test -e {tmp_path}/FAIL && exit 2;'
                      " true")
    assert not out.exists()
    r = h.reload()
    assert r.returncode == 0 and out.read_text() == "gen 2\n"
    (tmp_path / "FAIL").touch()
    r = h.reload()
    assert r.returncode == 0, r.stderr
    assert "--after-reload command failed (exit status 2)" in r.stderr


def test_revive_restarts_a_crashed_server_while_clients_queue(procs: Procs) -> None:
    h, target = start(procs, "--revive")
    victims = []
    with Load(target, fresh=2, keepalive=1, timeout=15) as load:
        for _ in range(3):
            victim = serving_pid(target)
            victims.append(victim)
            http_get(target, "/exit?code=3")  # it crashes between requests
            deadline = time.monotonic() + 15
            while True:
                try:
                    if serving_pid(target) != victim:
                        break
                except (OSError, AssertionError):
                    pass
                assert time.monotonic() < deadline, h.log()
                time.sleep(0.1)
    assert load.result.failed == 0, load.result.summary()
    assert h.log().count("--revive: starting it again") == 3, h.log()
    assert h.poll() is None
    assert not wait_gone(victims, 1.0)


def test_without_revive_a_crash_ends_hupt_with_its_status(procs: Procs) -> None:
    h, target = start(procs)
    http_get(target, "/exit?code=3")
    assert h.popen.wait(15) == 3


def test_pidfile_and_unlink(procs: Procs, tmp_path: Path) -> None:
    hupt_pidfile = tmp_path / "hupt.pid"
    app_pid = tmp_path / "app.pid"
    port = free_port()
    target: Target = ("127.0.0.1", port)
    # A server that refuses to start while its pidfile exists: only --unlink makes a
    # second generation possible.
    cmd = ["sh", "-c", f"test -e {app_pid} && exit 9; echo $$ > {app_pid}; "
                       f"exec {' '.join(health_cmd(target))}"]
    h, _ = start(procs, "--pidfile", str(hupt_pidfile), "--unlink", str(app_pid), cmd=cmd,
                 target=target)
    assert hupt_pidfile.read_text().strip() == str(h.pid)
    for _ in range(2):
        r = h.reload()
        assert r.returncode == 0, r.stderr
        assert app_pid.read_text().strip() == str(serving_pid(target))
    h.signal(signal.SIGTERM)
    assert h.popen.wait(30) == 0
    assert not hupt_pidfile.exists()


def test_watch_reloads_on_change_debounced(procs: Procs, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "app.py").write_text("1")
    h, target = start(procs, "--watch", str(src))
    first = serving_pid(target)
    time.sleep(1.0)
    assert serving_pid(target) == first, "no change, no reload"
    for i in range(4):  # a burst of writes: one reload
        (src / "app.py").write_text(str(i))
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while serving_pid(target) == first:
        assert time.monotonic() < deadline, h.log()
        time.sleep(0.1)
    time.sleep(1.5)
    assert h.log().count("files changed") == 1, h.log()


def _idle_keepalive(target: Target) -> socket.socket:
    assert isinstance(target, tuple)
    s = socket.create_connection(target, timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"tag=health\n"):
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    return s


def test_close_idle_ends_drains_early(procs: Procs) -> None:
    h, target = start(procs, "--drain-timeout", "30", "--close-idle", "300")
    old = serving_pid(target)
    conn = _idle_keepalive(target)  # pins the old generation
    t0 = time.monotonic()
    assert h.reload().returncode == 0
    assert not wait_gone({old}, 10), h.log()
    assert time.monotonic() - t0 < 10
    assert conn.recv(100) == b"", "the idle connection was closed with a FIN"
    conn.close()


def test_without_close_idle_an_idle_connection_pins_the_old_generation(procs: Procs) -> None:
    h, target = start(procs, "--drain-timeout", "30")
    old = serving_pid(target)
    conn = _idle_keepalive(target)
    assert h.reload().returncode == 0
    assert wait_gone({old}, 2.0) == {old}, "still draining"
    os.kill(h.pid, signal.SIGUSR2)  # end every drain now
    assert not wait_gone({old}, 10), h.log()
    conn.close()


def test_stop_command_drains_and_waits(procs: Procs) -> None:
    h, target = start(procs, "--drain-timeout", "30")
    servers = h.descendants()
    assert servers
    slow = SlowRequest(target, 2.5).start()  # in flight when the stop is issued
    deadline = time.monotonic() + 10
    while (_status(h)["generations"][0]["in_flight"] or 0) < 1:
        assert time.monotonic() < deadline, "the slow request never reached the server"
        time.sleep(0.05)
    t0 = time.monotonic()
    r = hupt_cli("stop", str(h.pid))
    took = time.monotonic() - t0
    # Checked before anything else: `hupt stop` returned only once the servers had exited.
    left = {p for p in servers if alive(p)}
    assert r.returncode == 0, r.stderr
    assert not left, f"server processes still alive when `hupt stop` returned: {left}"
    status, elapsed = slow.result()
    assert status == 200 and elapsed >= 2.4, (status, elapsed)
    assert took >= 1.0, f"stop returned after {took:.2f}s, before the request finished"
    assert h.popen.wait(2) == 0, h.log()
    assert not wait_gone(servers, 0.1)


def test_stop_command_returns_after_hupt_has_exited(procs: Procs, tmp_path: Path) -> None:
    pidfile = tmp_path / "hupt.pid"
    h, target = start(procs, "--pidfile", str(pidfile))
    assert isinstance(target, tuple)
    servers = h.descendants()
    r = hupt_cli("stop", str(h.pid))
    hupt_alive, port_held, pidfile_left = alive(h.pid), listener_inode(target[1]), pidfile.exists()
    assert r.returncode == 0, r.stderr
    assert not {p for p in servers if alive(p)}
    assert h.popen.wait(10) == 0
    assert not hupt_alive, "hupt still running when `hupt stop` returned"
    assert port_held is None and not pidfile_left, (port_held, pidfile_left)


def test_sd_notify_messages(procs: Procs, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    mgr = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    mgr.bind(path)
    mgr.settimeout(10)

    def next_msg() -> dict[str, str]:
        data = mgr.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    h, target = start(procs, env={"NOTIFY_SOCKET": path})
    m = next_msg()
    assert m["READY"] == "1" and m["MAINPID"] == str(h.pid)
    # The server itself does not see hupt's manager socket.
    with open(f"/proc/{serving_pid(target)}/environ", "rb") as f:
        assert b"NOTIFY_SOCKET=" not in f.read()
    assert h.reload().returncode == 0
    m = next_msg()
    assert m["RELOADING"] == "1" and int(m["MONOTONIC_USEC"]) > 0
    m = next_msg()
    assert m["READY"] == "1" and "STATUS" in m
    h.signal(signal.SIGTERM)
    m = next_msg()
    assert m["STOPPING"] == "1"
    assert h.popen.wait(10) == 0
    mgr.close()


def _copies(h: HuptProcess, inode: int | None) -> set[int]:
    from harness import listener_inodes

    return {p for p in h.descendants() if inode in listener_inodes(p)}


def _wait_copies(h: HuptProcess, inode: int | None,
                 done: Callable[[set[int]], bool]) -> set[int]:
    deadline = time.monotonic() + 15
    while not done(copies := _copies(h, inode)):
        assert time.monotonic() < deadline, (copies, h.log())
        time.sleep(0.1)
    return copies


def test_multi_runs_copies_on_one_accept_queue(procs: Procs) -> None:
    from harness import listener_inode

    h, target = start(procs, "--multi", "4")
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
    from harness import listener_inode

    h, target = start(procs, "--multi", "3", "--revive")
    assert isinstance(target, tuple)
    inode = listener_inode(target[1])
    first = _wait_copies(h, inode, lambda c: len(c) == 3)
    with Load(target, fresh=2, keepalive=2) as load:
        # A crash between requests (SIGKILL would also cut the victim's own
        # requests in flight, which no supervisor can save).
        status, body = http_get(target, "/exit?code=3")
        assert status == 200
        victim = int(body.split("pid=")[1].split()[0])
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


def test_drain_timeout_bounds_a_pinned_generation(procs: Procs) -> None:
    h, target = start(procs, "--drain-timeout", "2")
    old = serving_pid(target)
    conn = _idle_keepalive(target)  # never closes by itself
    t0 = time.monotonic()
    assert h.reload().returncode == 0
    assert wait_gone({old}, 1.0) == {old}, "drains at first"
    assert not wait_gone({old}, 10), h.log()
    assert 1.8 < time.monotonic() - t0 < 10
    assert "drain timeout with 1 connection(s) still open" in h.log()
    conn.close()


def test_stop_signal_and_kill_timeout(procs: Procs) -> None:
    """A server that ignores SIGTERM: --stop-signal USR1 stops it at once;
    with the default TERM, --kill-timeout bounds the wait before SIGKILL."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h, _ = start(procs, "--stop-signal", "USR1", "--kill-timeout", "30",
                 cmd=health_cmd(target, "--ignore-term"), target=target)
    old = serving_pid(target)
    assert h.reload().returncode == 0
    assert not wait_gone({old}, 5), "USR1 stopped it long before the kill timeout"
    assert "SIGKILL" not in h.log()

    port = free_port()
    target = ("127.0.0.1", port)
    h2, _ = start(procs, "--kill-timeout", "1.5", cmd=health_cmd(target, "--ignore-term"),
                  target=target)
    old = serving_pid(target)
    t0 = time.monotonic()
    assert h2.reload().returncode == 0
    assert not wait_gone({old}, 10), h2.log()
    assert 1.3 < time.monotonic() - t0 < 10
    assert "still running 1.5 s after the stop signal: SIGKILL" in h2.log()


def test_stop_now_ends_drains_at_once(procs: Procs) -> None:
    h, target = start(procs, "--drain-timeout", "60")
    conn = _idle_keepalive(target)  # would pin the drain for a minute
    t0 = time.monotonic()
    r = hupt_cli("stop", "--now", str(h.pid))
    assert r.returncode == 0, r.stderr
    assert h.popen.wait(10) == 0
    assert time.monotonic() - t0 < 8
    conn.close()


def _manager(path: str) -> tuple[socket.socket, Callable[[float], dict[str, str] | None]]:
    """A stand-in for systemd: hupt's NOTIFY_SOCKET, and a read with a timeout."""
    mgr = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    mgr.bind(path)

    def next_msg(timeout: float) -> dict[str, str] | None:
        mgr.settimeout(timeout)
        try:
            data = mgr.recv(4096).decode()
        except TimeoutError:
            return None
        return dict(line.split("=", 1) for line in data.splitlines())

    return mgr, next_msg


def test_ready_1_for_the_first_generation_waits_for_its_notify(
        procs: Procs, tmp_path: Path) -> None:
    mgr, next_msg = _manager(str(tmp_path / "manager.sock"))
    target: Target = ("127.0.0.1", free_port())
    h, _ = start(procs, "--ready", "notify", env={"NOTIFY_SOCKET": mgr.getsockname()},
                 cmd=health_cmd(target, "--notify-after", "1.5"), target=target)
    # It listens (start() connected) and says READY=1 itself 1.5 s later: that
    # is what hupt passes on, not its listen().
    listened = time.monotonic()
    m = next_msg(20)
    assert m is not None and m["READY"] == "1", m
    assert time.monotonic() - listened >= 1.0
    assert serving_pid(target) > 0
    assert "READY=1" in h.err.read_text()
    h.signal(signal.SIGTERM)
    assert h.popen.wait(10) == 0
    mgr.close()


def test_ready_1_for_the_first_generation_waits_for_its_health_probe(
        procs: Procs, tmp_path: Path) -> None:
    mgr, next_msg = _manager(str(tmp_path / "manager.sock"))
    sick = tmp_path / "SICK"
    sick.touch()
    target: Target = ("127.0.0.1", free_port())
    h, _ = start(procs, "--ready", "http:/healthz", "--ready-timeout", "2",
                 env={"NOTIFY_SOCKET": mgr.getsockname()},
                 cmd=health_cmd(target, "--fail-health-if", str(sick)), target=target)
    unhealthy = serving_pid(target)
    assert http_get(target, "/healthz")[0] == 503
    assert next_msg(3) is None, "no READY=1 while the health check fails"
    time.sleep(0.5)
    assert "not ready after 2 s" in h.err.read_text(), h.log()
    sick.unlink()
    with Load(target, fresh=1, keepalive=1) as load:
        r = h.reload()  # the new generation is healthy: the reload makes it ready
    assert r.returncode == 0, r.stderr
    assert next_msg(5) == {"RELOADING": "1", "MONOTONIC_USEC": ANY, "STATUS": "reloading"}
    m = next_msg(5)
    assert m is not None and m["READY"] == "1", m
    assert serving_pid(target) != unhealthy
    assert load.result.failed == 0, load.result.summary()
    h.signal(signal.SIGTERM)
    assert h.popen.wait(10) == 0
    mgr.close()
