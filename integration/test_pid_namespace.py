"""hupt as PID 1 of a PID namespace (a container's entrypoint, `unshare --pid`).

The CLI finds the hupt that supervises a PID by walking up its ancestors to
a control socket named after a PID; PID 1 itself must count.  Run in the
namespace (nsenter), `hupt status 1`, `hupt reload 1` and `hupt stop 1` work
as they do elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from harness import free_port, http_get, hupt_env, wait_for, wait_listening

pytestmark = pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("nsenter")),
                                reason="needs util-linux's unshare and nsenter")


def in_namespace(host_pid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(host_pid), "-p", "-m",
                           sys.executable, "-m", "hupt", *args],
                          capture_output=True, text=True, timeout=60,
                          env=hupt_env(os.environ))


def test_hupt_as_pid_1_answers_status_reload_and_stop() -> None:
    port = free_port()
    # --kill-child: if the test dies, the namespace's PID 1 (hupt) dies with it.
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-m",
         "hupt", "run", "--", sys.executable, "-m", "http.server", str(port),
         "--bind", "127.0.0.1"],
        env=hupt_env(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(("127.0.0.1", port), 20)
        # hupt's PID on the host: the child of unshare.
        hupt_host = wait_for("hupt in the namespace", lambda: _child_of(outer.pid), 10)
        r = in_namespace(hupt_host, "status", "1")
        assert r.returncode == 0 and r.stdout.startswith("hupt 1 "), r.stdout + r.stderr
        r = in_namespace(hupt_host, "reload", "1")
        assert r.returncode == 0 and "reload done" in r.stderr, r.stderr
        assert http_get(("127.0.0.1", port))[0] == 200
        # From the host, its 1.sock is not the host's PID 1: a PID not under hupt
        # does not resolve to it by walking up to init.
        r = subprocess.run([sys.executable, "-m", "hupt", "reload", str(os.getpid())],
                           capture_output=True, text=True, timeout=60, env=hupt_env(os.environ))
        assert r.returncode != 0 and "not under hupt" in r.stderr, r.stderr
        r = in_namespace(hupt_host, "stop", "1")
        assert r.returncode == 0 and "stop done" in r.stderr, r.stderr
        assert outer.wait(20) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(outer.pid, signal.SIGKILL)
        outer.wait(20)


def _child_of(parent: int) -> int | None:
    try:
        kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def test_two_namespaces_sharing_the_runtime_directory_do_not_clash() -> None:
    """Both hupts are PID 1, each in its own PID namespace, with one /run: their
    control sockets differ, each CLI reaches its own, and one leaving does not take
    the other's socket with it. The host's `hupt status` lists neither."""
    ports = [free_port(), free_port()]
    outers = [subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-m",
         "hupt", "run", "--", sys.executable, "-m", "http.server", str(port),
         "--bind", "127.0.0.1"],
        env=hupt_env(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for port in ports]
    try:
        for port in ports:
            wait_listening(("127.0.0.1", port), 20)
        hupts = [wait_for("hupt in the namespace", partial(_child_of, o.pid), 10)
                 for o in outers]
        for h, port in zip(hupts, ports, strict=True):
            r = in_namespace(h, "status", "--json", "1")
            assert r.returncode == 0, r.stderr
            (inst,) = json.loads(r.stdout)["instances"]
            assert inst["hupt_pid"] == 1 and f"{port}" in " ".join(inst["command"]), inst
        sockets = [n for n in os.listdir("/run/hupt") if n.startswith("1.ns")]
        assert len(sockets) >= 2, sockets
        host = subprocess.run([sys.executable, "-m", "hupt", "status", "--json"],
                              capture_output=True, text=True, timeout=60,
                              env=hupt_env(os.environ))
        listed = [i["hupt_pid"] for i in json.loads(host.stdout)["instances"]]
        assert 1 not in listed, listed
        r = in_namespace(hupts[0], "stop", "1")
        assert r.returncode == 0, r.stderr
        assert outers[0].wait(20) == 0
        r = in_namespace(hupts[1], "reload", "1")
        assert r.returncode == 0 and "reload done" in r.stderr, r.stderr
        r = in_namespace(hupts[1], "stop", "1")
        assert r.returncode == 0, r.stderr
        assert outers[1].wait(20) == 0
    finally:
        for o in outers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(o.pid, signal.SIGKILL)
            o.wait(20)
