"""hupt run --exec, end to end: the server keeps its PID across reloads.

For each server (stock http.server, the static Go server, node, a pre-fork
Python server with two workers): 10 reloads under fresh-connection and
keep-alive load with a request held in flight across the first one.
Asserted: 0 failed requests, the first reload waits for the held request,
which completes with 200, the server's PID and parent PID never change, every
reload is an exec (hupt reports a new generation on the same PID) and the new
image serves from the very same listening socket.  Then the failure paths: a
program replaced on disk is the one that runs after a reload; a missing
program and one the kernel cannot exec leave the old image serving with its
fds and epoll registrations exactly as they were; an image that dies before it
is ready is replaced by a fresh start of the command while connections wait.
An exec'd image is a generation like a spawned one: the same environment,
--ready notify, --unlink, and SIGUSR2 mid-reload execs at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    KINDS,
    O_CLOEXEC_FLAG,
    SERVERS,
    HuptProcess,
    Procs,
    alive,
    children,
    environ,
    fdinfo_flags,
    free_port,
    health_cmd,
    http_get,
    hupt_env,
    listener_inode,
    nginx_cmd,
    one_line_error,
    ppid,
    serving_pid,
    unix_cmd,
    v2_program,
    wait_for,
    wait_gone,
    wait_listening,
    write_executable,
)
from load import HeldRequest, Load, RequestFailed, Target
from snapshots import fd_table, server_state, thread_filters
from supervision import DRAINING_FOR_EXEC, EXEC_RELOADS, NotifyManager, exec_reloads_under_load

from hupt.tracer import procfs

pytestmark = pytest.mark.root


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
def test_exec_reloads_under_load(kind: str, procs: Procs,
                                 server_cmd: Callable[[str, Target], list[str]]) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--exec", "--drain-timeout", "20", "--kill-timeout", "5",
                   cmd=server_cmd(kind, target))
    wait_listening(target, 20, proc=h)
    (pid,) = children(h.pid)
    exec_reloads_under_load(kind, target, pid, h.pid, h.reload, h.log)
    assert h.log().count(f"pid {pid} execed") == EXEC_RELOADS
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
    assert isinstance(target, tuple)
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
    assert isinstance(target, tuple)
    before = server_state(pid, target[1])
    assert any(before.regs.values()), "the server watches its listener with epoll"
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


def _pipes(pid: int) -> list[int]:
    """The server's own pipes (its stdout and stderr are hupt's: pipes too, when prefixed)."""
    return sorted(fd for fd, (what, _) in fd_table(pid).items()
                  if what.startswith("pipe:") and fd > 2)


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
    assert isinstance(target, tuple)
    pipes = _pipes(pid)
    assert len(pipes) == 2 and min(pipes) >= 3, fd_table(pid)
    assert not any(fdinfo_flags(pid, fd) & O_CLOEXEC_FLAG for fd in pipes), "set-up"
    before = server_state(pid, target[1])
    with Load(target, fresh=2, keepalive=2) as load:
        program.unlink()
        write_executable(program, b"\x7fELF not really\n")
        r = h.reload()
        one_line_error(r, "could not exec", "ENOEXEC")
        flags = {fd: fdinfo_flags(pid, fd) for fd in pipes}
        assert not any(f & O_CLOEXEC_FLAG for f in flags.values()), (
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
    assert isinstance(target, tuple)
    inode = listener_inode(target[1])
    with Load(target, fresh=2, keepalive=2) as load:
        flag.touch()
        r = h.reload()
        one_line_error(r, "exited (exit status 3) before it was ready",
                       "started the command afresh")
        wait_for("a fresh server", lambda: http_get(target)[1].startswith("ok pid="))
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


# -- lifecycle options in exec mode ------------------------------------------------------------


def test_exec_ready_notify_environment_and_unlink(procs: Procs, tmp_path: Path) -> None:
    manager = NotifyManager(tmp_path / "manager.sock")
    stale = tmp_path / "server.pid"
    target: Target = ("127.0.0.1", free_port())
    h = procs.hupt("--exec", "--ready", "notify", "--ready-timeout", "10",
                   "--unlink", str(stale),
                   cmd=health_cmd(target, "--notify-after", "0.8"),
                   env={"NOTIFY_SOCKET": manager.path, "HUPT_TEST_VAR": "kept"})
    wait_listening(target, 20, proc=h)
    pid = serving_pid(target)
    first = environ(pid)
    assert first["HUPT_TEST_VAR"] == "kept"
    assert first["NOTIFY_SOCKET"] != manager.path, "hupt's manager is hupt's"
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
            assert env["NOTIFY_SOCKET"] not in (manager.path, first["NOTIFY_SOCKET"])
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
    held = HeldRequest(target, timeout=30).start()  # pins the drain far beyond the SIGUSR2
    held.wait_accepted()
    reload = subprocess.Popen([sys.executable, "-m", "hupt", "reload", str(h.pid)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=hupt_env(os.environ))
    wait_for("the server to drain before it execs",
             lambda: DRAINING_FOR_EXEC in h.err.read_text(), 10, h)
    t0 = time.monotonic()
    h.signal(signal.SIGUSR2)  # end every drain now
    _, err = reload.communicate(timeout=20)
    assert reload.returncode == 0, err + h.log()
    assert time.monotonic() - t0 < 10
    assert "execing now" in h.err.read_text()
    assert serving_pid(target) == pid, "the server execed; it was not stopped"
    assert h.popen.poll() is None
    held.release()
    with contextlib.suppress(RequestFailed):
        held.result()  # the request in flight was given up on (cut by the exec)
    h.signal(signal.SIGTERM)
    assert h.popen.wait(20) == 0, h.log()


def test_nginx_exec_mode_keeps_one_master_over_50_reloads(procs: Procs, tmp_path: Path) -> None:
    """A pre-fork master in exec mode: after every reload exactly one master (the same
    PID) and its two workers are left, none unknown to hupt serving on the held socket.

    Stray masters were seen in 2 of 5 reloads once.  Their cause, found by running
    this check on the history: hupt's --multi top-up (hupt/revive.py) started the
    missing "copies" of a generation whose first listen it saw while it served, and
    an exec'd image has no copies at all, so it counted as missing one and hupt
    spawned the command again: a second full master with its own workers, sharing
    the held socket.  Whether the image's listen was seen before or after it was
    promoted made it intermittent.  At the parent of the fix (a generation hupt did
    not start as copies gets none) a stray master appeared within 1 to 9 reloads in
    every run; from the fix on, none in 30 reloads per run."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    nginx = nginx_cmd(tmp_path, port)
    h = procs.hupt("--exec", "--drain-timeout", "10", "--kill-timeout", "5",
                   "--unlink", str(tmp_path / "nginx.pid"),
                   cmd=nginx)
    wait_listening(target, 20, proc=h)
    (master,) = children(h.pid)
    inode = listener_inode(port)
    with Load(target, fresh=4, keepalive=0) as load:
        for i in range(50):
            r = h.reload()
            assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{h.log()}"
            deadline = time.monotonic() + 10
            while True:
                # A worker just forked shows its master's title until it sets its own.
                tree = h.descendants()
                if (len(tree) == 3 and children(h.pid) == {master}
                        and _masters(tree) == [master]):
                    break
                assert time.monotonic() < deadline, \
                    f"reload {i + 1}: {tree}, masters {_masters(tree)}\n{h.log()}"
                time.sleep(0.05)
            assert listener_inode(port) == inode
    assert load.result.failed == 0, load.result.summary()
    assert load.result.ok > 50, load.result.summary()


def _masters(pids: set[int]) -> list[int]:
    out = []
    for p in sorted(pids):
        with contextlib.suppress(OSError):
            if b"master process" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.append(p)
    return out
