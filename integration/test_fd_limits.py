"""hupt at its limit of open files (issue 13), for real.

- Control clients against a soft and hard RLIMIT_NOFILE of 64 (`prlimit
  --nofile=64:64`: hupt cannot raise it): hupt stops accepting short of the
  limit and says so once; its CPU time stays flat meanwhile (no busy loop),
  the server answers HTTP, the log stays small.  A `hupt reload` started
  then waits, and is served once hupt has hung up on the clients that sent
  nothing (endpoint.IDLE_TIMEOUT); once they are closed `hupt status` works.
- A real EMFILE: hupt's soft limit lowered under it (prlimit on the running
  hupt) to two fds above what it holds; its first clients are let in whatever
  the count (endpoint.ALWAYS_ADMITTED), so the third hits EMFILE.  One line,
  no busy loop, and back to normal once the limit is.
- The limits: under `prlimit --nofile=256:2048` hupt runs with 2048:2048,
  and the server, a reloaded generation and a --before-reload hook with
  256:2048, as they would without hupt.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

from harness import (
    Background,
    Procs,
    Started,
    children,
    free_port,
    http_get,
    http_server_cmd,
    hupt_cli,
    wait_for,
    wait_listening,
)
from load import Target

from hupt import control
from hupt.endpoint import IDLE_TIMEOUT

WARNING = "out of file descriptors: not accepting control connections"
AGAIN = "accepting control connections again"


def hupt_under(procs: Procs, limits: str, *opts: str, cwd: Path) -> tuple[Started, Target]:
    """`prlimit --nofile=LIMITS python -m hupt run OPTS -- http.server` (prlimit execs: one pid)."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.spawn(["prlimit", f"--nofile={limits}", sys.executable, "-m", "hupt", "run",
                     *opts, "--", *http_server_cmd(port)], name="hupt", cwd=cwd)
    wait_listening(target, 20, proc=h)
    assert os.path.exists(control.socket_path(h.pid)), h.log()
    return h, target


def nofile(pid: int) -> tuple[int, int]:
    """The soft and hard limit of open files of ``pid``, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def fill(path: str, most: int) -> list[socket.socket]:
    """Connect to ``path`` until the backlog stays full for a second: hupt takes no more."""
    held: list[socket.socket] = []
    while len(held) < most:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setblocking(False)
        deadline = time.monotonic() + 1.0
        while True:
            try:
                s.connect(path)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    s.close()
                    return held
                time.sleep(0.02)
        held.append(s)
    return held


def busy(pid: int, seconds: float) -> float:
    """The share of one CPU ``pid`` used over ``seconds``."""
    before = cpu_ticks(pid)
    time.sleep(seconds)
    return (cpu_ticks(pid) - before) / os.sysconf("SC_CLK_TCK") / seconds


def hung_up_for_idling(s: socket.socket) -> bool:
    """Whether hupt answered ``s`` (which sent nothing) with its idle result and closed it."""
    s.settimeout(0.1)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(4096):
            data += chunk
    if not data.endswith(b"\n"):
        return False
    msg = json.loads(data.splitlines()[0])
    return bool(msg == {"event": "result", "ok": False,
                        "reason": f"no request within {IDLE_TIMEOUT:g} s"})


def test_control_clients_at_the_fd_limit(procs: Procs, tmp_path: Path) -> None:
    h, target = hupt_under(procs, "64:64", cwd=tmp_path)
    assert nofile(h.pid) == (64, 64)
    held = fill(control.socket_path(h.pid), 200)
    try:
        assert len(held) < 64, "hupt took clients past its limit of open files"
        wait_for("hupt to say it stops accepting", lambda: WARNING in h.log(), 10, h)
        assert busy(h.pid, 2.0) < 0.2, "hupt busy-loops at its limit"
        assert http_get(target)[0] == 200

        # Blocks in connect() until there is room in the backlog: hupt lets it in
        # once the clients that sent nothing have had their time.
        started = time.monotonic()
        reload = Background(lambda: hupt_cli("reload", str(h.pid), timeout=60))
        r = reload.result(IDLE_TIMEOUT + 30)
        assert r.returncode == 0, f"{r.stderr}\n{h.log()}"
        assert time.monotonic() - started < IDLE_TIMEOUT + 20
        assert sum(hung_up_for_idling(s) for s in held) > 0
        assert http_get(target)[0] == 200
    finally:
        for s in held:
            s.close()
    r = hupt_cli("status", str(h.pid))
    assert r.returncode == 0, f"{r.stderr}\n{h.log()}"
    log = h.log()
    assert log.count(WARNING) == 1, log
    assert AGAIN in log and "Traceback" not in log and "internal error" not in log, log
    assert h.err.stat().st_size < 10_000, "the log grew at the limit"
    assert h.stop() == 0, h.log()


def test_emfile_on_accept(procs: Procs, tmp_path: Path) -> None:
    h, target = hupt_under(procs, "1024:4096", cwd=tmp_path)
    soft, hard = nofile(h.pid)
    holds = len(os.listdir(f"/proc/{h.pid}/fd"))
    resource.prlimit(h.pid, resource.RLIMIT_NOFILE, (holds + 2, hard))
    held = fill(control.socket_path(h.pid), 6)
    try:
        wait_for("hupt to hit EMFILE", lambda: WARNING in h.log(), 10, h)
        assert "Too many open files" in h.log()
        assert busy(h.pid, 1.5) < 0.2, "hupt busy-loops at its limit"
        assert http_get(target)[0] == 200
        resource.prlimit(h.pid, resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        for s in held:
            s.close()
    r = hupt_cli("status", str(h.pid))
    assert r.returncode == 0, f"{r.stderr}\n{h.log()}"
    wait_for("hupt to accept again", lambda: AGAIN in h.log(), 5, h)
    log = h.log()
    assert log.count(WARNING) == 1 and "Traceback" not in log, log
    assert h.stop() == 0, h.log()


def test_the_server_starts_with_the_limit_hupt_was_started_with(procs: Procs,
                                                                tmp_path: Path) -> None:
    hook_saw = tmp_path / "hook-limits"
    h, target = hupt_under(procs, "256:2048", "--before-reload",
                           f"ulimit -Sn > {hook_saw}; ulimit -Hn >> {hook_saw}", cwd=tmp_path)
    assert nofile(h.pid) == (2048, 2048), "hupt did not raise its soft limit"
    [server] = children(h.pid)
    assert nofile(server) == (256, 2048)
    r = hupt_cli("reload", str(h.pid))
    assert r.returncode == 0, f"{r.stderr}\n{h.log()}"
    wait_for("the old generation to go", lambda: server not in children(h.pid), 20, h)
    [new] = children(h.pid)
    assert nofile(new) == (256, 2048)
    assert hook_saw.read_text().split() == ["256", "2048"]
    assert http_get(target)[0] == 200
    assert h.stop() == 0, h.log()

