"""hupt under systemd (Type=notify): what it tells the manager's NOTIFY_SOCKET, and when.

READY=1 with MAINPID=hupt's own PID once generation 1 is ready, RELOADING=1
then READY=1 around each reload, STOPPING=1 at a stop; the server never sees
the manager's socket. With --ready notify or --ready http:, generation 1 is
ready only once the server said READY=1 itself or passed its health check,
however long after its listen() that is. (Exec mode's notify socket:
test_exec_mode.py.)
"""

from __future__ import annotations

import signal
from pathlib import Path
from unittest.mock import ANY

from harness import Procs, free_port, health_cmd, http_get, serving_pid, wait_for
from load import Load, Target
from supervision import NotifyManager, start_hupt


def test_sd_notify_messages(procs: Procs, tmp_path: Path) -> None:
    mgr = NotifyManager(tmp_path / "notify.sock")
    h, target = start_hupt(procs, env={"NOTIFY_SOCKET": mgr.path})
    m = mgr.expect(10)
    assert m["READY"] == "1" and m["MAINPID"] == str(h.pid)
    # The server itself does not see hupt's manager socket.
    with open(f"/proc/{serving_pid(target)}/environ", "rb") as f:
        assert b"NOTIFY_SOCKET=" not in f.read()
    assert h.reload().returncode == 0
    m = mgr.expect(10)
    assert m["RELOADING"] == "1" and int(m["MONOTONIC_USEC"]) > 0
    m = mgr.expect(10)
    assert m["READY"] == "1" and "STATUS" in m
    h.signal(signal.SIGTERM)
    m = mgr.expect(10)
    assert m["STOPPING"] == "1"
    assert h.popen.wait(10) == 0
    mgr.close()


def test_ready_1_for_the_first_generation_waits_for_its_notify(
        procs: Procs, tmp_path: Path) -> None:
    mgr = NotifyManager(tmp_path / "manager.sock")
    ready = tmp_path / "READY"
    target: Target = ("127.0.0.1", free_port())
    h, _ = start_hupt(procs, "--ready", "notify", env={"NOTIFY_SOCKET": mgr.path},
                      cmd=health_cmd(target, "--notify-when", str(ready)), target=target)
    # It listens (start_hupt connected), and says READY=1 itself only once the test
    # lets it: that is what hupt passes on, not its listen().
    assert mgr.next(1.0) is None, "READY=1 before the server sent it"
    ready.touch()
    m = mgr.next(20)
    assert m is not None and m["READY"] == "1", m
    assert serving_pid(target) > 0
    assert "READY=1" in h.err.read_text()
    h.signal(signal.SIGTERM)
    assert h.popen.wait(10) == 0
    mgr.close()


def test_ready_1_for_the_first_generation_waits_for_its_health_probe(
        procs: Procs, tmp_path: Path) -> None:
    mgr = NotifyManager(tmp_path / "manager.sock")
    sick = tmp_path / "SICK"
    sick.touch()
    target: Target = ("127.0.0.1", free_port())
    h, _ = start_hupt(procs, "--ready", "http:/healthz", "--ready-timeout", "2",
                      env={"NOTIFY_SOCKET": mgr.path},
                      cmd=health_cmd(target, "--fail-health-if", str(sick)), target=target)
    unhealthy = serving_pid(target)
    assert http_get(target, "/healthz")[0] == 503
    assert mgr.next(3) is None, "no READY=1 while the health check fails"
    wait_for("hupt to report generation 1 not ready",
             lambda: "not ready after 2 s" in h.err.read_text(), 10, h)
    sick.unlink()
    with Load(target, fresh=1, keepalive=1) as load:
        r = h.reload()  # the new generation is healthy: the reload makes it ready
    assert r.returncode == 0, r.stderr
    assert mgr.next(5) == {"RELOADING": "1", "MONOTONIC_USEC": ANY, "STATUS": "reloading"}
    m = mgr.next(5)
    assert m is not None and m["READY"] == "1", m
    assert serving_pid(target) != unhealthy
    assert load.result.failed == 0, load.result.summary()
    h.signal(signal.SIGTERM)
    assert h.popen.wait(10) == 0
    mgr.close()
