"""Servers that inspect the socket they bound: `getsockopt(SO_ACCEPTCONN)`, then
listen() only on a socket that does not listen yet.

haproxy and gunicorn's newest release do this to support inheriting their
sockets.  Under hupt a new generation's bind() is answered with the held
socket, which listens already, so such a server never calls listen(): the
bind itself must count as its listen.  The server here is written by the test
and does exactly that (it records which it did at each start), then serves
HTTP/1.1.  In fork mode and in exec mode: 10 reloads under fresh-connection
and keep-alive load, 0 failed requests, every reload ready in well under
--ready-timeout, the very same listening socket throughout, every generation
after the first skipping listen(), and the old generations gone.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import (
    HuptProcess,
    Procs,
    children,
    free_port,
    listener_inode,
    listener_inodes,
    wait_for,
    wait_gone,
    wait_listening,
)
from load import Load, Target
from supervision import (
    check_exec_reload,
    check_load,
    generations,
    held_by_hupt,
    reload_ok,
    states,
    stop_gracefully,
    wait_single_generation,
)

RELOADS = 10
READY_TIMEOUT = 20.0
# Measured here: 5 to 60 ms from start (or exec) to ready.  A reload that waited
# for the timeout, or for anything but the bind, would show as seconds.
QUICK_MS = 3000
READY_MS = re.compile(r"is ready in (\d+) ms")

INSPECTING_SERVER = '''
import os, socket, socketserver, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, STARTS = int(sys.argv[1]), sys.argv[2]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 15  # an idle keep-alive connection ends the drain after this at most

    def do_GET(self):
        body = f"ok pid={os.getpid()} tag=\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)  # no getfqdn()
        self.server_name, self.server_port = self.server_address[:2]

    def server_activate(self):
        # As gunicorn and haproxy do with a socket they may have inherited.
        if self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            how = "skipped listen"
        else:
            self.socket.listen(128)
            how = "listened"
        with open(STARTS, "a") as f:
            f.write(f"{os.getpid()} {how}\\n")


Server(("127.0.0.1", PORT), Handler).serve_forever()
'''


def start(procs: Procs, tmp_path: Path, *opts: str) -> tuple[HuptProcess, Target, Path]:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    script, starts = tmp_path / "inspecting_server.py", tmp_path / "starts"
    script.write_text(INSPECTING_SERVER)
    h = procs.hupt(*opts, "--ready-timeout", f"{READY_TIMEOUT:g}", "--drain-timeout", "20",
                   "--kill-timeout", "5", cmd=[sys.executable, str(script), str(port), str(starts)])
    wait_listening(target, 20, proc=h)
    return h, target, starts


def started(starts: Path) -> list[tuple[int, str]]:
    """Each start of the server: (pid, "listened" or "skipped listen")."""
    out = []
    for line in starts.read_text().splitlines():
        pid, how = line.split(" ", 1)
        out.append((int(pid), how))
    return out


def timed_reload(h: HuptProcess) -> subprocess.CompletedProcess[str]:
    """A reload that must succeed, and quickly: not the ready timeout's doing."""
    t0 = time.monotonic()
    r = reload_ok(h)
    took = time.monotonic() - t0
    m = READY_MS.search(r.stderr)
    assert m is not None, r.stderr
    ms = int(m[1])
    assert ms < QUICK_MS and took < READY_TIMEOUT / 2, (ms, took, r.stderr)
    return r


@pytest.mark.parametrize("copies", [1, 2])
def test_fork_mode_reloads_a_server_that_skips_listen(
        copies: int, procs: Procs, tmp_path: Path) -> None:
    # --multi 2: every copy must take the socket before the generation is ready.
    h, target, starts = start(procs, tmp_path, "--multi", str(copies))
    port = target[1] if isinstance(target, tuple) else 0
    inode = listener_inode(port)
    assert inode is not None
    wait_for("every copy of generation 1 to start",
             lambda: starts.exists() and len(started(starts)) == copies, 10, h)
    first = h.descendants()
    assert len(first) == copies
    # Generation 1's first copy binds a fresh socket and listens; the others (--multi)
    # are handed the socket it listens on.
    assert [how for _, how in started(starts)] == ["listened"] + ["skipped listen"] * (copies - 1)
    reloaded: list[set[int]] = []
    with Load(target, fresh=2, keepalive=2, conn_requests=20) as load:
        time.sleep(0.3)
        for i in range(RELOADS):
            before = max(generations(h))
            timed_reload(h)
            gens = generations(h)
            new = max(gens)
            assert new > before, f"reload {i + 1} started no new generation: {gens}"
            assert listener_inode(port) == inode, "the listening socket must never be replaced"
            assert held_by_hupt(h) == {inode}, "hupt must keep holding the original listener"
            assert len(gens[new]) == copies and all(inode in listener_inodes(p)
                                                     for p in gens[new]), (
                f"generation {new} does not serve from the original listening socket")
            reloaded.append(gens[new])
            time.sleep(0.2)
        time.sleep(0.3)
    check_load(load.result, 100)
    log = started(starts)
    assert len(log) == copies * (RELOADS + 1), log
    assert [how for _, how in log[copies:]] == ["skipped listen"] * (copies * RELOADS), (
        "every later generation found its socket listening and skipped listen()")
    assert len(load.result.pids) >= RELOADS // 2, load.result.summary()
    last = generations(h)[wait_single_generation(h)]
    old = first.union(*reloaded[:-1])
    assert not (last & old)
    still = wait_gone(old, 5.0)
    assert not still, f"old generations' processes still alive: {sorted(still)}\n{h.log()}"
    assert "was not ready" not in h.log()
    stop_gracefully(h)
    assert not wait_gone(last, 5.0)


@pytest.mark.root
def test_exec_mode_reloads_a_server_that_skips_listen(procs: Procs, tmp_path: Path) -> None:
    h, target, starts = start(procs, tmp_path, "--exec")
    port = target[1] if isinstance(target, tuple) else 0
    inode = listener_inode(port)
    (pid,) = children(h.pid)
    assert inode is not None and inode in listener_inodes(pid)
    numbers = []
    with Load(target, fresh=2, keepalive=2, conn_requests=20) as load:
        time.sleep(0.3)
        for i in range(RELOADS):
            r = timed_reload(h)
            numbers.append(check_exec_reload(r, i + 1, pid, h.pid, port, inode, h.log))
            assert held_by_hupt(h) == {inode}
            time.sleep(0.15)
        time.sleep(0.3)
    check_load(load.result, 100)
    assert numbers == sorted(set(numbers)), numbers
    assert load.result.pids == {pid}, load.result.summary()
    assert started(starts) == [(pid, "listened")] + [(pid, "skipped listen")] * RELOADS
    assert "afresh" not in h.log() and "was not ready" not in h.log(), h.log()
    wait_for("the exec'd images before the last to be gone",
             lambda: list(states(h)) == [numbers[-1]], 10, h)
    assert children(h.pid) == {pid}
    h.signal(signal.SIGTERM)
    assert h.popen.wait(30) == 0, h.log()
    assert not wait_gone({pid}, 5.0)
