"""hupt run --exec, end to end: the server keeps its PID across reloads.

For each server (stock http.server, the static Go server, node, a pre-fork
Python server with two workers): 10 reloads under fresh-connection and
keep-alive load with a 3-second request in flight at the first one.
Asserted: 0 failed requests, the slow request completes with 200, the
server's PID and parent PID never change, every reload is an exec (hupt
reports a new generation on the same PID) and the new image serves from the
very same listening socket.  Then the failure paths: a program replaced on
disk is the one that runs after a reload; a missing program and one the
kernel cannot exec leave the old image serving with its fds and epoll
registrations exactly as they were; an image that dies before it is ready is
replaced by a fresh start of the command while connections wait.

Helpers here are shared with test_attach.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    SERVERS,
    HuptProcess,
    Procs,
    alive,
    free_port,
    go_cmd,
    http_get,
    http_server_cmd,
    listener_inode,
    listener_inodes,
    node_cmd,
    unix_cmd,
    wait_gone,
    wait_listening,
)
from load import Load, SlowRequest, Target

from hupt.errors import KernelError
from hupt.tracer import procfs

pytestmark = pytest.mark.root

RELOADS = 10
KINDS = ["http.server", "go", "node", "prefork"]
READY = re.compile(r"generation (\d+) \(pid (\d+)\) is ready")

# A pre-fork server: the master binds and listens, then forks WORKERS
# processes that accept (thread per connection); the master only waits.  On
# SIGTERM the master stops its own workers and exits.  Children it does not
# know (workers of an image it replaced by exec) are reaped and ignored.
PREFORK = '''
import os, signal, socketserver, sys
sys.path.insert(0, {servers!r})
from routes import RoutesHandler as Handler, parse_address

class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

_, address = parse_address(sys.argv[1])
server = Server(address, Handler)
workers = []
for _ in range(int(sys.argv[2])):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
        server.serve_forever()
        os._exit(0)
    workers.append(pid)

def stop(*args):
    for w in workers:
        try:
            os.kill(w, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for w in workers:
        try:
            os.waitpid(w, 0)
        except ChildProcessError:
            pass
    os._exit(0)

signal.signal(signal.SIGTERM, stop)
while True:
    try:
        os.wait()
    except ChildProcessError:
        signal.pause()
'''

# A stand-in for "the new version": any program put at the old one's path.
V2 = '''#!{python}
import sys
sys.path.insert(0, {servers!r})
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from routes import parse_address

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"v2\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

ThreadingHTTPServer(parse_address(sys.argv[1])[1], Handler).serve_forever()
'''


# --- shared helpers ------------------------------------------------------------------------


def prefork_cmd(tmp: Path, target: Target, workers: int = 2) -> list[str]:
    script = tmp / "prefork.py"
    script.write_text(PREFORK.format(servers=str(SERVERS)))
    assert isinstance(target, tuple)
    return [sys.executable, str(script), f"{target[0]}:{target[1]}", str(workers)]


def server_cmd(kind: str, target: Target, tmp: Path, go: Path | None) -> list[str]:
    assert isinstance(target, tuple)
    if kind == "http.server":
        return http_server_cmd(target[1], bind=target[0])
    if kind == "go":
        assert go is not None
        return go_cmd(go, target)
    if kind == "node":
        return node_cmd(target)
    if kind == "prefork":
        return prefork_cmd(tmp, target)
    raise AssertionError(kind)


def write_executable(path: Path, data: bytes) -> None:
    """Put a new file at ``path`` in one step (the old one may be running)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, path)


def v2_program(path: Path) -> None:
    write_executable(path, V2.format(python=sys.executable, servers=str(SERVERS)).encode())


def ppid(pid: int) -> int:
    return procfs.ppid_of(pid)


def children(pid: int) -> set[int]:
    return {p for p, parent in procfs.parent_map().items() if parent == pid and alive(p)}


def fd_table(pid: int) -> dict[int, tuple[str, int]]:
    """fd -> (what it refers to, its flags): what an exec or a resume must leave intact."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        fd = int(name)
        try:
            out[fd] = (os.readlink(f"/proc/{pid}/fd/{fd}"), procfs.fd_flags(pid, fd))
        except (FileNotFoundError, KernelError):
            # A client connection closed between the listing and the read:
            # it is under load, and connections are not part of the state.
            continue
    return out


def epoll_view(pid: int) -> dict[int, list[procfs.EpollEntry]]:
    return {epfd: procfs.epoll_registrations(pid, epfd) for epfd in procfs.epoll_fds(pid)}


def server_state(pid: int, port: int) -> tuple[object, ...]:
    """The fds that are not client connections, and how epoll watches the listener.

    Client connections come and go under load; everything else (the
    listener's fd number and flags, epoll instances, pipes, stdio) and the
    listener's epoll registrations (events, data) must be exactly as before.
    """
    listener = listener_inode(port)
    listening = listener_inodes(pid)
    fds = {fd: v for fd, v in fd_table(pid).items()
           if not v[0].startswith("socket:[") or int(v[0][8:-1]) in listening}
    regs = {epfd: [e for e in entries if e.ino == listener]
            for epfd, entries in epoll_view(pid).items()}
    return listener, fds, regs


def thread_filters(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (TracerPid, Seccomp_filters) of every thread of ``pid``.

    A thread that exits during the scan (one per connection, under load) is skipped.
    """
    out = {}
    for tid in procfs.threads(pid):
        try:
            out[tid] = (procfs.tracer_pid(tid), procfs.seccomp_filters(tid))
        except KernelError:
            continue
    return out


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("hupt: error:"), r.stderr
    assert all(n in lines[-1] for n in needles), r.stderr


def eventually(probe: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what or probe}"
        time.sleep(0.05)


def exec_reloads(reload: Callable[[], subprocess.CompletedProcess[str]], pid: int, parent: int,
                 port: int, n: int, log: Callable[[], str]) -> list[int]:
    """Reload n times; each must exec in place. Returns the generation numbers reported."""
    inode = listener_inode(port)
    assert inode is not None and inode in listener_inodes(pid)
    generations = []
    for i in range(n):
        r = reload()
        assert r.returncode == 0, f"reload {i + 1} failed: {r.stderr}\n{log()}"
        m = READY.search(r.stderr)
        assert m is not None, r.stderr
        generations.append(int(m[1]))
        assert int(m[2]) == pid, f"reload {i + 1}: a new process serves: {r.stderr}"
        assert "execed" in r.stderr, r.stderr
        assert alive(pid) and ppid(pid) == parent, "the PID and its parent must stay"
        assert listener_inode(port) == inode, "the listening socket must never be replaced"
        assert inode in listener_inodes(pid), "the new image does not hold the listener"
        time.sleep(0.15)
    assert generations == sorted(set(generations)), generations
    return generations


def reload_under_load(kind: str, target: Target, pid: int, parent: int,
                      reload: Callable[[], subprocess.CompletedProcess[str]],
                      log: Callable[[], str]) -> None:
    """RELOADS exec reloads under load, a 3-second request in flight at the first."""
    assert isinstance(target, tuple)
    workers = children(pid) if kind == "prefork" else set()
    with Load(target, fresh=2, keepalive=2, conn_requests=20) as load:
        time.sleep(0.3)
        slow = SlowRequest(target, 3.0)
        slow.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        exec_reloads(reload, pid, parent, target[1], RELOADS, log)
        took = time.monotonic() - t0
        status, elapsed = slow.result()
        time.sleep(0.3)
    res = load.result
    assert res.failed == 0, res.summary()
    assert res.ok > 100, res.summary()
    assert status == 200 and elapsed >= 2.9, (status, elapsed)
    assert took >= 2.5, "the first reload must wait for the slow request to finish"
    assert "drain timeout" not in log(), "every exec waited for the connections to finish"
    if kind in ("go", "node"):
        assert res.pids == {pid}, res.summary()
    if kind == "prefork":
        assert len(workers) == 2
        assert not wait_gone(workers, 10), "the old image's workers must be retired"
        eventually(lambda: len(children(pid)) == 2, what="the last image's workers alone")
        assert not children(pid) & workers
        assert len(res.pids) > 4, res.summary()


# --- hupt run --exec ---------------------------------------------------------------------


def start_exec(procs: Procs, cmd: list[str], *opts: str) -> tuple[HuptProcess, int, Target]:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--exec", "--drain-timeout", "20", "--kill-timeout", "5", *opts,
                   cmd=[a.replace("{PORT}", str(port)) for a in cmd])
    wait_listening(target, 20, proc=h)
    servers = children(h.pid)
    assert len(servers) == 1, servers
    return h, servers.pop(), target


@pytest.mark.parametrize("kind", KINDS)
def test_exec_reloads_under_load(kind: str, procs: Procs, tmp_path: Path,
                                 request: pytest.FixtureRequest) -> None:
    go = request.getfixturevalue("go_server") if kind == "go" else None
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--exec", "--drain-timeout", "20", "--kill-timeout", "5",
                   cmd=server_cmd(kind, target, tmp_path, go))
    wait_listening(target, 20, proc=h)
    (pid,) = children(h.pid)
    reload_under_load(kind, target, pid, h.pid, h.reload, h.log)
    assert h.log().count(f"pid {pid} execed") == RELOADS
    h.signal(signal.SIGTERM)
    assert h.popen.wait(30) == 0, h.log()
    assert not wait_gone({pid}, 5.0)


def test_a_replaced_program_is_what_runs_after_the_reload(
        procs: Procs, tmp_path: Path, go_server: Path) -> None:
    program = tmp_path / "bin" / "server"
    program.parent.mkdir()
    shutil.copy(go_server, program)
    h, pid, target = start_exec(procs, [str(program), "127.0.0.1:{PORT}"])
    assert http_get(target)[1].startswith(f"ok pid={pid}")
    with Load(target, fresh=2, keepalive=1) as load:
        v2_program(program)
        r = h.reload()
        assert r.returncode == 0, r.stderr + h.log()
        time.sleep(0.3)
    assert load.result.failed == 0, load.result.summary()
    assert http_get(target) == (200, "v2\n")
    assert alive(pid) and ppid(pid) == h.pid
    assert procfs.exe(pid) == os.path.realpath(sys.executable)  # the script's interpreter


def test_a_missing_program_fails_the_reload_and_the_server_serves_on(
        procs: Procs, tmp_path: Path, go_server: Path) -> None:
    program = tmp_path / "server"
    shutil.copy(go_server, program)
    h, pid, target = start_exec(procs, [str(program), "127.0.0.1:{PORT}"])
    before = server_state(pid, target[1])
    with Load(target, fresh=2, keepalive=2) as load:
        program.unlink()
        r = h.reload()
        one_line_error(r, "reload failed", "not an executable file")
        time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary()
    assert load.result.ok > 20
    assert server_state(pid, target[1]) == before
    assert set(thread_filters(pid).values()) == {(0, 1)}, "not traced, only the filter it had"
    assert http_get(target)[1].startswith(f"ok pid={pid}")


@pytest.mark.parametrize("kind", ["go", "node"])
def test_a_failed_exec_restores_the_listeners_exactly(
        kind: str, procs: Procs, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # The file is there and executable, but the kernel refuses it (ENOEXEC):
    # the server was paused and drained, and must accept again exactly as before.
    program = tmp_path / "server"
    real = request.getfixturevalue("go_server") if kind == "go" else Path(shutil.which("node")
                                                                           or "/usr/bin/node")
    program.symlink_to(real)
    cmd = [str(program), "127.0.0.1:{PORT}"]
    if kind == "node":
        cmd[1:1] = [str(SERVERS / "node_server.js")]
    h, pid, target = start_exec(procs, cmd)
    before = server_state(pid, target[1])
    assert any(before[2].values()), "the server watches its listener with epoll"
    with Load(target, fresh=2, keepalive=2) as load:
        program.unlink()
        write_executable(program, b"\x7fELF not really\n")
        r = h.reload()
        one_line_error(r, "could not exec", "ENOEXEC")
        assert server_state(pid, target[1]) == before
        time.sleep(0.5)
        program.unlink()
        program.symlink_to(real)
        r = h.reload()
        assert r.returncode == 0, r.stderr
    assert load.result.failed == 0, load.result.summary()
    assert alive(pid) and ppid(pid) == h.pid


# variant_server.py behind a pipe whose two ends (fds >= 3) are inheritable (no
# FD_CLOEXEC), as a server that hands fds to the programs it runs keeps them.
INHERITING = """
import os, runpy, sys
for end in os.pipe():
    os.set_inheritable(end, True)
sys.path.insert(0, {servers!r})
sys.argv[0] = {variant!r}
runpy.run_path({variant!r}, run_name="__main__")
"""
FD_CLOEXEC_FLAG = 0o2000000  # O_CLOEXEC in the octal "flags:" of /proc/PID/fdinfo/FD


def _fdinfo_flags(pid: int, fd: int) -> int:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags line in /proc/{pid}/fdinfo/{fd}")


def _pipes(pid: int) -> list[int]:
    return sorted(fd for fd, (what, _) in fd_table(pid).items() if what.startswith("pipe:"))


def test_a_failed_exec_leaves_inheritable_fds_inheritable(procs: Procs, tmp_path: Path) -> None:
    # hupt marks every fd >= 3 close-on-exec before the execve; when the execve fails,
    # the fds that were inheritable must lose the mark again.
    program = tmp_path / "python3"
    real = Path(os.path.realpath(sys.executable))
    program.symlink_to(real)
    script = tmp_path / "inheriting.py"
    script.write_text(INHERITING.format(servers=str(SERVERS),
                                        variant=str(SERVERS / "variant_server.py")))
    h, pid, target = start_exec(procs, [str(program), str(script), "127.0.0.1:{PORT}"])
    pipes = _pipes(pid)
    assert len(pipes) == 2 and min(pipes) >= 3, fd_table(pid)
    assert not any(_fdinfo_flags(pid, fd) & FD_CLOEXEC_FLAG for fd in pipes), "set-up"
    before = server_state(pid, target[1])
    with Load(target, fresh=2, keepalive=2) as load:
        program.unlink()
        write_executable(program, b"\x7fELF not really\n")
        r = h.reload()
        one_line_error(r, "could not exec", "ENOEXEC")
        flags = {fd: _fdinfo_flags(pid, fd) for fd in pipes}
        assert not any(f & FD_CLOEXEC_FLAG for f in flags.values()), (
            f"inheritable fds left close-on-exec after the failed exec: {flags}")
        assert server_state(pid, target[1]) == before
        time.sleep(0.5)
        program.unlink()
        program.symlink_to(real)
        r = h.reload()
        assert r.returncode == 0 and f"(pid {pid}) is ready" in r.stderr, r.stderr
    assert load.result.failed == 0, load.result.summary()
    assert load.result.ok > 20, load.result.summary()
    assert alive(pid) and ppid(pid) == h.pid
    # The new image made a pipe of its own: the old one was closed by the exec.
    assert len(_pipes(pid)) == 2


def test_an_image_dying_before_ready_is_started_afresh(
        procs: Procs, tmp_path: Path, go_server: Path) -> None:
    program = tmp_path / "server"
    flag = tmp_path / "FAIL_ONCE"
    # Fails once when the flag exists (the exec'd image), then runs the Go server.
    write_executable(program, (f'#!/bin/sh\nif [ -e {flag} ]; then rm {flag}; exit 3; fi\n'
                               f'exec {go_server} "$@"\n').encode())
    h, pid, target = start_exec(procs, [str(program), "127.0.0.1:{PORT}"])
    inode = listener_inode(target[1])
    with Load(target, fresh=2, keepalive=2) as load:
        flag.touch()
        r = h.reload()
        one_line_error(r, "exited (exit status 3) before it was ready",
                       "started the command afresh")
        eventually(lambda: http_get(target)[1].startswith("ok pid="), what="a fresh server")
        time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary()
    (fresh,) = children(h.pid)
    assert fresh != pid and listener_inode(target[1]) == inode
    assert http_get(target)[1].startswith(f"ok pid={fresh}")
    r = h.reload()  # the fresh start is supervised in exec mode like the first
    assert r.returncode == 0 and f"(pid {fresh}) is ready" in r.stderr, r.stderr


def test_unix_socket_server_keeps_its_path_across_exec_reloads(
        procs: Procs, short_tmp: Path) -> None:
    # unix_server.py unlinks its socket path before bind(), like gunicorn: the
    # exec'd image's unlink must not remove the path hupt holds.
    path = str(short_tmp / "app.sock")
    h = procs.hupt("--exec", "--drain-timeout", "20", cmd=unix_cmd(path))
    wait_listening(path, 20, proc=h)
    (pid,) = children(h.pid)
    inode = listener_inode(path)
    with Load(path, fresh=2, keepalive=2) as load:
        time.sleep(0.3)
        for _ in range(5):
            r = h.reload()
            assert r.returncode == 0 and f"(pid {pid}) is ready" in r.stderr, r.stderr + h.log()
            assert os.path.exists(path) and listener_inode(path) == inode
            time.sleep(0.2)
    assert load.result.failed == 0, load.result.summary()
    assert load.result.pids == {pid}
    assert set(thread_filters(pid).values()) == {(0, 1)}, "no filter stacked by the reloads"
