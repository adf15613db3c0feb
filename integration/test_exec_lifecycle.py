"""Lifecycle options in exec mode (hupt run --exec), against a real server.

An exec'd image is a generation like a spawned one: it gets the same
environment (the servers', never hupt's own NOTIFY_SOCKET; with --ready
notify a socket of hupt's where its READY=1 counts), --unlink runs before
it starts, and ending the drains (SIGUSR2) mid-reload execs at once rather
than stopping the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Procs, free_port, hupt_env, wait_listening
from load import Load, RequestFailed, SlowRequest, Target
from test_lifecycle import health_cmd, serving_pid

pytestmark = pytest.mark.root

def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [e.decode().partition("=") for e in f.read().split(b"\0") if e]
    return {k: v for k, _, v in pairs}


def test_exec_ready_notify_environment_and_unlink(procs: Procs, tmp_path: Path) -> None:
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "manager.sock"))
    stale = tmp_path / "server.pid"
    target: Target = ("127.0.0.1", free_port())
    h = procs.hupt("--exec", "--ready", "notify", "--ready-timeout", "10",
                   "--unlink", str(stale),
                   cmd=health_cmd(target, "--notify-after", "0.8"),
                   env={"NOTIFY_SOCKET": manager.getsockname(), "HUPT_TEST_VAR": "kept"})
    wait_listening(target, 20, proc=h)
    pid = serving_pid(target)
    first = environ(pid)
    assert first["HUPT_TEST_VAR"] == "kept"
    assert first["NOTIFY_SOCKET"] != manager.getsockname(), "hupt's manager is hupt's"
    with Load(target, fresh=2, keepalive=1) as load:
        for i in range(3):
            stale.write_text(f"{pid}\n")  # what a server's own pidfile check would find
            t0 = time.monotonic()
            r = h.reload()
            took = time.monotonic() - t0
            assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{h.log()}"
            assert took >= 0.8, "ready only once the new image said READY=1"
            assert serving_pid(target) == pid, "exec mode keeps the PID"
            env = environ(pid)  # the new image's starting environment
            assert env["HUPT_TEST_VAR"] == "kept"
            assert env["NOTIFY_SOCKET"] not in (manager.getsockname(), first["NOTIFY_SOCKET"])
            assert not stale.exists(), "--unlink runs before the exec too"
    assert "started afresh" not in h.err.read_text(), h.log()
    assert load.result.failed == 0, load.result.summary()
    h.signal(signal.SIGTERM)
    assert h.popen.wait(20) == 0, h.log()
    manager.close()


def test_sigusr2_mid_exec_reload_execs_at_once(procs: Procs) -> None:
    target: Target = ("127.0.0.1", free_port())
    h = procs.hupt("--exec", "--drain-timeout", "60", cmd=health_cmd(target))
    wait_listening(target, 20, proc=h)
    pid = serving_pid(target)
    slow = SlowRequest(target, 15.0)  # pins the drain far beyond the SIGUSR2
    slow.start()
    time.sleep(0.3)
    reload = subprocess.Popen([sys.executable, "-m", "hupt", "reload", str(h.pid)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=hupt_env(os.environ))
    deadline = time.monotonic() + 10
    while "draining it before it execs" not in h.err.read_text():
        assert time.monotonic() < deadline, h.log()
        time.sleep(0.05)
    t0 = time.monotonic()
    h.signal(signal.SIGUSR2)  # end every drain now
    _, err = reload.communicate(timeout=20)
    assert reload.returncode == 0, err + h.log()
    assert time.monotonic() - t0 < 10
    assert "execing now" in h.err.read_text()
    assert serving_pid(target) == pid, "the server execed; it was not stopped"
    assert h.popen.poll() is None
    with contextlib.suppress(RequestFailed):
        slow.result()  # the request in flight was given up on (cut by the exec)
    h.signal(signal.SIGTERM)
    assert h.popen.wait(20) == 0, h.log()
