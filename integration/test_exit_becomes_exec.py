"""Exec mode and attach with --drain-signal: the server's own exit becomes the exec.

Clients that hold one connection and keep sending on it used to stall an exec
reload for the whole drain timeout (nothing accepts meanwhile).  With the
server's graceful-stop signal the server closes them itself at a request
boundary and exits; hupt turns that exit into the exec.  Asserted, under 4
fresh clients and 2 persistent ones, over 10 reloads: 0 failed requests, no
request waited 2 s, every reload returned within the server's start time +
1 s (the drain timeout is 60 s), the same process (PID and start time) runs
every generation, its parent never saw an exit, and the listening socket is
the same one throughout (the handoff engaged).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from harness import (
    SERVERS,
    Procs,
    Started,
    alive,
    free_port,
    go_cmd,
    hupt_cli,
    listener_inode,
    nginx_cmd,
    spawn_server,
    wait_for,
    wait_listening,
)
from load import Load, LoadResult, SlowRequest, Target

from hupt.tracer import procfs

pytestmark = pytest.mark.root

RELOADS = 10
LONGEST_WAIT = 2.0


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: a new process with a reused PID would differ."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rfind(b")") + 2:].split()[19])


def generations(pid: int) -> list[dict[str, object]]:
    r = hupt_cli("status", "--json", str(pid), timeout=30)
    assert r.returncode == 0, r.stderr
    gens: list[dict[str, object]] = json.loads(r.stdout)["instances"][0]["generations"]
    return gens


def reloads(target: Target, server: int, reload: Callable[[], subprocess.CompletedProcess[str]],
            bound: float, log: Callable[[], str],
            parent_saw_no_exit: Callable[[], bool]) -> LoadResult:
    port = target[1] if isinstance(target, tuple) else 0
    # `hupt reload` is a Python program: its own start is no part of the reload.
    t0 = time.monotonic()
    assert hupt_cli("--version").returncode == 0
    bound += time.monotonic() - t0
    inode = listener_inode(port)
    born = start_time(server)
    took: list[float] = []
    with Load(target, fresh=4, keepalive=0, persistent=2) as load:
        time.sleep(0.5)
        for i in range(RELOADS):
            t0 = time.monotonic()
            r = reload()
            took.append(time.monotonic() - t0)
            assert r.returncode == 0, f"reload {i + 1}: {r.stdout}{r.stderr}\n{log()}"
            assert "finished draining and exited" in r.stdout + r.stderr, r.stdout + r.stderr
            assert listener_inode(port) == inode, "the same listening socket in every image"
            assert start_time(server) == born, "the same process, not a new one with its PID"
            assert parent_saw_no_exit(), log()
            last_reload = time.monotonic()
            time.sleep(0.3)
    result = load.result
    assert result.failed == 0, result.summary() + "\n" + log()
    assert result.longest_wait < LONGEST_WAIT, result.summary()
    assert len(result.persistent) == 2 and result.persistent_failed == 0, result.summary()
    for p in result.persistent:
        # Each was closed by the server at every drain, and carried on after the last one.
        assert p.ok > RELOADS and p.reconnects + p.retries >= RELOADS, result.summary()
        assert p.answers_after(last_reload), f"no answer after the last reload: {result.summary()}"
    assert result.ok - result.persistent_ok > RELOADS, result.summary()
    assert max(took) < bound, f"reloads took {took}, more than {bound:.1f} s\n{log()}"
    assert "drain timeout" not in log() and "execing it" not in log(), log()
    return result


def run_exec(procs: Procs, cmd: list[str], target: Target, *opts: str, sig: str = "TERM",
             workers: int = 0) -> None:
    t0 = time.monotonic()
    h = procs.hupt("--exec", "--drain-signal", sig, "--kill-timeout", "5", *opts, cmd=cmd)
    wait_listening(target, 20, proc=h)
    startup = time.monotonic() - t0
    server = int(str(generations(h.pid)[0]["pid"]))

    def no_exit_seen() -> bool:
        return f"(pid {server}) exited" not in h.log() and h.poll() is None

    reloads(target, server, h.reload, startup + 1.0, h.log, no_exit_seen)
    gens = [g for g in generations(h.pid) if g["state"] == "serving"]
    assert [g["pid"] for g in gens] == [server] and gens[0]["number"] == RELOADS + 1, gens
    left = h.descendants()
    assert server in left and len(left) == 1 + workers, f"old images' processes left: {left}"


def test_exec_mode_go_shutdown(procs: Procs, go_server: Path) -> None:
    """Go calls exit_group from a non-main thread after http.Server.Shutdown."""
    target: Target = ("127.0.0.1", free_port())
    run_exec(procs, go_cmd(go_server, target), target)


def test_exec_mode_node_sigterm_handler(procs: Procs) -> None:
    """node marks its stdio close-on-exec; the handler answers `Connection: close` while
    closing (servers/drain_node_server.js)."""
    target: Target = ("127.0.0.1", free_port())
    run_exec(procs, ["node", str(SERVERS / "drain_node_server.js"), f"127.0.0.1:{target[1]}"],
             target)


def test_exec_mode_nginx_quit(procs: Procs, tmp_path: Path) -> None:
    """nginx's master gets QUIT, lets its workers finish, and exits into the exec; the
    new master (same PID) forks new workers."""
    port = free_port()
    nginx = nginx_cmd(tmp_path, port)
    run_exec(procs, nginx,
             ("127.0.0.1", port), "--unlink", str(tmp_path / "nginx.pid"), sig="QUIT",
             workers=2)


def _attached(a: Started) -> bool:
    return "supervising pid" in a.err.read_text() or a.poll() is not None


@pytest.mark.parametrize("kind", ["go", "node"])
def test_attach(kind: str, procs: Procs, go_server: Path) -> None:
    """The server is this test's child: the test is the parent that must see no exit."""
    target: Target = ("127.0.0.1", free_port())
    cmd = (go_cmd(go_server, target) if kind == "go" else
           ["node", str(SERVERS / "drain_node_server.js"), f"127.0.0.1:{target[1]}"])
    t0 = time.monotonic()
    s = spawn_server(procs, cmd, target)
    startup = time.monotonic() - t0
    a = procs.spawn([sys.executable, "-m", "hupt", "attach", "--yes", "--drain-signal", "TERM",
                     "--kill-timeout", "5", str(s.pid)], name="attach")
    wait_for("hupt attach to take over", partial(_attached, a), 20)
    assert a.poll() is None, a.log()
    reloads(target, s.pid, lambda: hupt_cli("reload", str(s.pid)), startup + 1.0, a.log,
            lambda: s.poll() is None)
    r = hupt_cli("stop", str(s.pid))  # the stop signal: this exit is real, and seen
    assert r.returncode == 0, r.stderr
    assert a.popen.wait(20) == 0, a.log()
    assert s.popen.wait(20) == 0


def test_a_failed_exec_at_the_exit_keeps_the_sockets_and_starts_afresh(
        procs: Procs, tmp_path: Path, go_server: Path) -> None:
    """The program vanished before the reload's exit: the exec fails, the exit goes
    through, and hupt starts the command afresh on the held socket."""
    program = tmp_path / "server"
    program.write_bytes(go_server.read_bytes())
    program.chmod(0o755)
    target: Target = ("127.0.0.1", free_port())
    h = procs.hupt("--exec", "--drain-signal", "TERM", "--kill-timeout", "5",
                   cmd=go_cmd(program, target))
    wait_listening(target, 20, proc=h)
    inode = listener_inode(target[1])
    with Load(target, fresh=2, keepalive=0, persistent=1) as load:
        time.sleep(0.3)
        # Replaced by a script that fails to exec (no interpreter) once the old image exits.
        program.unlink()
        program.write_bytes(b"#!/nonexistent/interpreter\n")
        program.chmod(0o755)
        r = h.reload(timeout=60)
        assert r.returncode != 0 and "could not exec at its exit" in r.stdout + r.stderr, \
            r.stdout + r.stderr + h.log()
        program.unlink()
        program.write_bytes(go_server.read_bytes())
        program.chmod(0o755)
        wait_for("the command started afresh to serve",
                 lambda: any(g["state"] == "serving" for g in generations(h.pid)), 30)
        time.sleep(0.3)
    assert load.result.failed == 0, load.result.summary() + h.log()
    assert listener_inode(target[1]) == inode, "the socket stayed held throughout"


def test_hupt_killed_while_it_follows_the_exit_leaves_a_server_that_finishes(
        procs: Procs, go_server: Path) -> None:
    """A 3 s request keeps the Go server draining; hupt is SIGKILLed meanwhile.  The
    kernel lets go of the server: the request completes and the server exits."""
    target: Target = ("127.0.0.1", free_port())
    h = procs.hupt("--exec", "--drain-signal", "TERM", cmd=go_cmd(go_server, target))
    wait_listening(target, 20, proc=h)
    server = int(str(generations(h.pid)[0]["pid"]))
    slow = SlowRequest(target, 3.0).start()
    slow.wait_accepted()
    reload = subprocess.Popen([sys.executable, "-m", "hupt", "reload", str(h.pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("the reload to follow the exit", lambda: "its exit becomes the exec" in h.log())
        wait_for("the server to be traced",
                 lambda: int(procfs.status_fields(server)["TracerPid"]) == h.pid)
        os.kill(h.pid, signal.SIGKILL)
        h.popen.wait(10)
        status, elapsed = slow.result()
        assert status == 200 and elapsed >= 2.9, (status, elapsed)
        wait_for("the server to exit", lambda: not alive(server), 20)
    finally:
        reload.wait(30)


def test_attach_nginx_quit_with_the_command_given(procs: Procs, tmp_path: Path) -> None:
    """nginx rewrites its command line ("nginx: master process ..."): attach refuses it
    alone, and takes the real command after `--`; then QUIT drains each master, whose
    exit becomes the exec, under fresh and persistent clients."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    nginx = nginx_cmd(tmp_path, port)
    cmd = nginx
    t0 = time.monotonic()
    s = spawn_server(procs, cmd, target)
    startup = time.monotonic() - t0
    wait_for("nginx's title", lambda: b"master process" in Path(f"/proc/{s.pid}/cmdline")
             .read_bytes())
    refused = hupt_cli("attach", "--yes", str(s.pid))
    assert refused.returncode != 0 and "looks rewritten" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and f"hupt attach {s.pid} -- CMD" in refused.stderr
    a = procs.spawn([sys.executable, "-m", "hupt", "attach", "--yes", "--drain-signal", "QUIT",
                     "--kill-timeout", "5", str(s.pid), "--", *cmd], name="attach")
    wait_for("hupt attach to take over", partial(_attached, a), 20)
    assert a.poll() is None, a.log()
    reloads(target, s.pid, lambda: hupt_cli("reload", str(s.pid)), startup + 1.0, a.log,
            lambda: s.poll() is None)
    r = hupt_cli("stop", str(s.pid))
    assert r.returncode == 0, r.stderr
    assert a.popen.wait(20) == 0, a.log()
    s.popen.wait(20)


MASTER_WORKER = '''
import os, signal, socket, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

host, port = sys.argv[1].rsplit(":", 1)
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((host, int(port)))
sock.listen(128)
worker = os.fork()
if worker == 0:
    busy = stop = False

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            global busy
            busy = True
            body = f"ok pid={os.getpid()} tag=\\\\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            busy = False

        def log_message(self, *args):
            pass

    def on_usr1(sig, frame):
        global stop
        stop = True
        if not busy:
            os._exit(0)

    signal.signal(signal.SIGUSR1, on_usr1)
    server = HTTPServer((host, int(port)), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    while not stop:
        server.handle_request()
    os._exit(0)
# The master, as haproxy -W's: forwards the soft stop, and exits with its last worker.
signal.signal(signal.SIGUSR1, lambda sig, frame: os.kill(worker, signal.SIGUSR1))
sock.close()
os.waitpid(worker, 0)
sys.exit(0)
'''


def test_exec_mode_a_master_that_exits_with_its_last_worker(procs: Procs,
                                                            tmp_path: Path) -> None:
    """haproxy -W's master exits as soon as its last worker has: --drain-signal sent to
    the worker when the old image starts draining ends the master too, so its exit
    must be followed (becoming the exec) before the worker is signalled, or the root
    is gone and the reload fails."""
    script = tmp_path / "master_worker.py"
    script.write_text(MASTER_WORKER)
    target: Target = ("127.0.0.1", free_port())
    run_exec(procs, [sys.executable, str(script), f"127.0.0.1:{target[1]}"], target,
             sig="USR1", workers=1)
