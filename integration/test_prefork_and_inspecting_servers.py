"""Pre-fork servers (gunicorn, node's cluster module) and servers that inspect the
socket they bound: `getsockopt(SO_ACCEPTCONN)`, then listen() only on a socket
that does not listen yet.

haproxy and gunicorn (from release 23) do this to support inheriting their
sockets.  Under hupt a new generation's bind() is answered with the held
socket, which listens already, so such a server never calls listen(): hupt's
filter notifies that one getsockopt question, and asked of a handed socket it
counts as the listen.  Asserted for a server written here (it records what it
did at each start) and for gunicorn with two sync workers: fork mode, --multi
2, exec mode and hupt attach, 10 reloads under load each, 0 failed requests,
each reload ready in well under --ready-timeout, the same listening socket
throughout, every generation after the first skipping listen(), no zombie and
only the last generation's processes left.  node's cluster module (a primary
that accepts and hands connections to two workers, draining on SIGTERM):
fork mode, exec mode and attach, with --drain-signal, under fresh and
persistent clients.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from harness import (
    SERVERS,
    HuptProcess,
    Procs,
    Started,
    free_port,
    hupt_cli,
    listener_inode,
    spawn_server,
    wait_for,
    wait_listening,
    zombie_children,
)
from load import Load, Target
from supervision import generations, wait_single_generation

pytestmark = pytest.mark.root

RELOADS = 10
READY_TIMEOUT = 20.0
# Measured: 5 to 300 ms from start to ready.  A reload that waited for the ready
# timeout (the listen() that never comes) would take 20 s.
QUICK_MS = 5000
READY_MS = re.compile(r"is ready in (\d+) ms")

INSPECTING_SERVER = '''
import os, socket, socketserver, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, STARTS = int(sys.argv[1]), sys.argv[2]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5

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


def inspecting_cmd(tmp_path: Path, port: int) -> tuple[list[str], Path]:
    script, starts = tmp_path / "inspecting_server.py", tmp_path / "starts"
    script.write_text(INSPECTING_SERVER)
    return [sys.executable, str(script), str(port), str(starts)], starts


def gunicorn_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}",
            "--chdir", str(SERVERS), "--graceful-timeout", "5", "--no-control-socket",
            "wsgi_app:app"]


def quick(r: subprocess.CompletedProcess[str], i: int, log: str) -> None:
    assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{log}"
    m = READY_MS.search(r.stderr)
    assert m is not None and int(m[1]) < QUICK_MS, f"reload {i + 1}: {r.stderr}"


def reloads_under_load(reload: Callable[[], subprocess.CompletedProcess[str]],
                       log: Callable[[], str], port: int, *,
                       each: Callable[[], None] = lambda: None, fresh: int = 4,
                       keepalive: int = 0, persistent: int = 2,
                       conn_requests: int = 20) -> None:
    """RELOADS quick reloads under load: the same listening socket throughout, `each()`
    checked after every reload, 0 failed requests."""
    target: Target = ("127.0.0.1", port)
    inode = listener_inode(port)
    with Load(target, fresh=fresh, keepalive=keepalive, persistent=persistent,
              conn_requests=conn_requests) as load:
        time.sleep(0.3)
        for i in range(RELOADS):
            quick(reload(), i, log())
            assert listener_inode(port) == inode, "the same listening socket"
            each()
            time.sleep(0.3)
    assert load.result.failed == 0, load.result.summary() + log()
    assert load.result.ok > 50, load.result.summary()


def run(procs: Procs, cmd: list[str], target: Target, *opts: str) -> HuptProcess:
    h = procs.hupt(*opts, "--ready-timeout", f"{READY_TIMEOUT:g}", "--drain-timeout", "5",
                   "--kill-timeout", "5", cmd=cmd)
    wait_listening(target, 30, proc=h)
    return h


@pytest.mark.parametrize("opts", [(), ("--multi", "2"), ("--exec",)], ids=["fork", "multi", "exec"])
def test_a_server_that_skips_listen_on_a_listening_socket(
        opts: tuple[str, ...], procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    cmd, starts = inspecting_cmd(tmp_path, port)
    h = run(procs, cmd, target, *opts)
    reloads_under_load(h.reload, h.log, port, fresh=3, keepalive=1, persistent=0,
                       conn_requests=10)
    hows = [line.split(" ", 1)[1] for line in starts.read_text().splitlines()]
    copies = 2 if "--multi" in opts else 1
    # The first start listened (a --multi copy after it may find the socket held).
    assert hows[0] == "listened" and len(hows) == copies * (RELOADS + 1), hows
    assert hows[copies:] == ["skipped listen"] * (RELOADS * copies), hows
    if "--exec" not in opts:
        wait_single_generation(h)
    assert not zombie_children(h.pid)


@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_gunicorn_reloads_under_load(mode: str, procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    opts = ("--exec", "--drain-signal", "TERM") if mode == "exec" else ()
    h = run(procs, gunicorn_cmd(port), target, *opts)
    reloads_under_load(h.reload, h.log, port)
    if mode == "fork":
        last = wait_single_generation(h)
        assert len(generations(h)[last]) == 3, "a master and its two workers"
        # gunicorn unlinks a unix listener's path at exit, by getsockname() of its
        # listener, which is hupt's stand-in while paused: it must not look like one.
        assert "embedded null" not in h.log() and "Traceback" not in h.log(), h.log()
    else:
        def settled() -> bool:
            return len(h.descendants()) == 3 and not zombie_children(h.pid)
        wait_for("the master and its two workers alone", settled, 20)
        for p in h.descendants():
            assert not zombie_children(p), f"zombies under {p}"


def test_gunicorn_attached(procs: Procs) -> None:
    attached_reloads(procs, gunicorn_cmd)


def attached_reloads(procs: Procs, cmd: Callable[[int], list[str]]) -> None:
    """The server started without hupt, attached with --drain-signal TERM, reloaded
    under fresh and persistent clients; this test is its parent and sees no exit."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    s = spawn_server(procs, cmd(port), target)
    a = procs.spawn([sys.executable, "-m", "hupt", "attach", "--yes", "--drain-signal", "TERM",
                     "--ready-timeout", f"{READY_TIMEOUT:g}", "--kill-timeout", "5", str(s.pid)],
                    name="attach")
    wait_for("hupt attach to take over", lambda: _attached(a), 20)

    def no_exit_seen() -> None:
        assert s.poll() is None, "the parent never sees an exit"

    reloads_under_load(partial(hupt_cli, "reload", str(s.pid)), a.log, port,
                       each=no_exit_seen)
    wait_for("no zombie under the master", lambda: not zombie_children(s.pid), 10)
    r = hupt_cli("stop", str(s.pid))
    assert r.returncode == 0, r.stderr
    assert a.popen.wait(30) == 0, a.log()
    s.popen.wait(30)


def _attached(a: Started) -> bool:
    return "supervising pid" in a.err.read_text() or a.poll() is not None


# -- node's cluster module: a primary and two workers ---------------------------------------


def cluster_cmd(port: int) -> list[str]:
    return ["node", str(SERVERS / "cluster_server.js"), f"127.0.0.1:{port}", "2"]


@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_node_cluster_reloads_under_load(mode: str, procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    opts = ("--exec",) if mode == "exec" else ()
    h = run(procs, cluster_cmd(port), target, *opts, "--drain-signal", "TERM")
    reloads_under_load(h.reload, h.log, port)

    def settled() -> bool:
        return len(h.descendants()) == 3 and not zombie_children(h.pid)
    wait_for("the primary and its two workers alone", settled, 20)
    for p in h.descendants():
        assert not zombie_children(p), f"zombies under {p}"


def test_node_cluster_attached(procs: Procs) -> None:
    attached_reloads(procs, cluster_cmd)
