"""hupt attach PID, end to end: servers started without hupt, taken over live.

Each server is started by the test (its parent is pytest, as it would be a
shell or systemd), then `hupt attach --yes PID` takes it over.  Asserted:
every thread of every process of the server carries the filter and none is
left traced; 10 exec-mode reloads under load (requested with the server's
PID and with the attach process's PID) with 0 failed requests, a request held
in flight across the first completing with 200, the PID and parent PID unchanged; a
pre-fork server (master + workers) is reloaded as a whole; a program
replaced on disk is what runs after a reload; `hupt stop` and the server's
own exit end hupt attach.  Refusals (no such PID, no listening socket,
already under hupt, traced by someone else, no ptrace permission, not
confirmed) print one line and leave the target exactly as it was.
"""

from __future__ import annotations

import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from harness import (
    KINDS,
    SERVERS,
    Procs,
    Started,
    alive,
    children,
    free_port,
    go_cmd,
    http_get,
    hupt_cli,
    hupt_env,
    listener_inode,
    listening_sockets,
    one_line_error,
    ppid,
    socket_inodes,
    spawn_server,
    unix_cmd,
    v2_program,
    wait_for,
    wait_listening,
)
from load import Load, Target
from snapshots import epoll_view, fd_table, thread_filters
from supervision import exec_reloads_under_load

from hupt.tracer import procfs
from hupt.tracer import ptrace as pt

pytestmark = pytest.mark.root


def _attached_or_gone(a: Started) -> bool:
    return "supervising pid" in a.err.read_text() or a.poll() is not None


def attach(procs: Procs, pid: int, *opts: str) -> Started:
    a = procs.spawn([sys.executable, "-m", "hupt", "attach", "--yes", "--drain-timeout", "20",
                     "--kill-timeout", "5", *opts, str(pid)], name="attach")
    wait_for("hupt attach to take over", partial(_attached_or_gone, a), 20)
    assert a.poll() is None, a.log()
    return a


def processes(pid: int) -> list[int]:
    return [pid, *sorted(children(pid))]


def untouched_view(pid: int) -> tuple[object, ...]:
    """What an attach refusal must leave as it was, in every process of the server."""
    return tuple((fd_table(p), epoll_view(p), thread_filters(p)) for p in processes(pid))


@pytest.mark.parametrize("kind", KINDS)
def test_attach_reloads_under_load(kind: str, procs: Procs,
                                   server_cmd: Callable[[str, Target], list[str]]) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    s = spawn_server(procs, server_cmd(kind, target), target)
    before = {p: thread_filters(p) for p in processes(s.pid)}
    a = attach(procs, s.pid)
    assert "unlink()" not in a.err.read_text(), "no unix socket: unlink is not filtered"
    for p, threads in before.items():
        assert set(threads.values()) == {(0, 0)}
        assert set(thread_filters(p).values()) == {(0, 1)}, f"pid {p}: filtered, not traced"
    # (socket_inodes skips the fds hupt opens and closes meanwhile: /proc files, netlink)
    assert listener_inode(port) in socket_inodes(a.pid), "hupt attach holds the listener"

    turn = iter(range(1000))

    def reload() -> subprocess.CompletedProcess[str]:
        # by the server's PID, and every third time by hupt attach's own
        return hupt_cli("reload", str(a.pid if next(turn) % 3 == 2 else s.pid))

    exec_reloads_under_load(kind, target, s.pid, os.getpid(), reload, a.log)
    # The server exits on its own (a signal from someone else): hupt attach follows.
    os.kill(s.pid, signal.SIGTERM)
    assert a.popen.wait(20) == 1, a.log()
    assert "exited on its own" in a.err.read_text()
    s.popen.wait(10)


def test_attach_runs_the_replaced_program_and_stops_with_hupt_stop(
        procs: Procs, tmp_path: Path, go_server: Path) -> None:
    program = tmp_path / "bin" / "server"
    program.parent.mkdir()
    shutil.copy(go_server, program)
    port = free_port()
    target: Target = ("127.0.0.1", port)
    s = spawn_server(procs, [str(program), f"127.0.0.1:{port}"], target)
    a = attach(procs, s.pid)
    with Load(target, fresh=2, keepalive=1) as load:
        v2_program(program)
        r = hupt_cli("reload", str(s.pid))
        assert r.returncode == 0, r.stderr + a.log()
        time.sleep(0.3)
    assert load.result.failed == 0, load.result.summary()
    assert http_get(target) == (200, "v2\n")
    assert ppid(s.pid) == os.getpid()
    r = hupt_cli("stop", str(s.pid))
    assert r.returncode == 0, r.stderr
    assert a.popen.wait(20) == 0, a.log()
    assert s.popen.wait(10) == -signal.SIGTERM  # the v2 script dies of the stop signal


def test_attach_a_missing_program_fails_the_reload(
        procs: Procs, tmp_path: Path, go_server: Path) -> None:
    program = tmp_path / "server"
    shutil.copy(go_server, program)
    port = free_port()
    target: Target = ("127.0.0.1", port)
    s = spawn_server(procs, [str(program), f"127.0.0.1:{port}"], target)
    a = attach(procs, s.pid)
    with Load(target, fresh=2, keepalive=1) as load:
        program.unlink()
        r = hupt_cli("reload", str(s.pid))
        one_line_error(r, "reload failed")
        time.sleep(0.3)
    assert load.result.failed == 0, load.result.summary()
    assert http_get(target)[1].startswith(f"ok pid={s.pid}")
    assert a.poll() is None


def test_attach_a_unix_socket_server(procs: Procs, short_tmp: Path) -> None:
    # unix_server.py unlinks its path before bind(): the filter injected at
    # attach must cover unlink, or the first reload removes the path.
    path = str(short_tmp / "app.sock")
    s = spawn_server(procs, unix_cmd(path), path)
    a = attach(procs, s.pid)
    assert "unlink()" in a.err.read_text()  # the explanation names every filtered call
    inode = listener_inode(path)
    with Load(path, fresh=2, keepalive=2) as load:
        time.sleep(0.3)
        for _ in range(3):
            r = hupt_cli("reload", str(s.pid))
            assert r.returncode == 0 and f"(pid {s.pid}) is ready" in r.stderr, r.stderr
            assert os.path.exists(path) and listener_inode(path) == inode
            time.sleep(0.2)
    assert load.result.failed == 0, load.result.summary()
    assert load.result.pids == {s.pid}


# --- detaching ---------------------------------------------------------------------------

# A server that, on SIGUSR1, tries to bind a new socket and prints the outcome:
# how a server finds out, after hupt attach has gone, that its filter stayed.
BINDER = '''
import errno, os, signal, socket, sys
sys.path.insert(0, {servers!r})
from http.server import ThreadingHTTPServer
from routes import RoutesHandler, parse_address

def try_bind(*args):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 0))
            print("bind ok", flush=True)
        except OSError as e:
            print("bind", errno.errorcode[e.errno], flush=True)

signal.signal(signal.SIGUSR1, try_bind)
ThreadingHTTPServer(parse_address(sys.argv[1])[1], RoutesHandler).serve_forever(0.05)
'''


def binder(procs: Procs, tmp_path: Path) -> tuple[Started, Target]:
    script = tmp_path / "binder.py"
    script.write_text(BINDER.format(servers=str(SERVERS)))
    port = free_port()
    target: Target = ("127.0.0.1", port)
    return spawn_server(procs, [sys.executable, str(script), f"127.0.0.1:{port}"], target), target


def bind_outcome(s: Started) -> str:
    seen = s.out.read_text().count("bind ")
    s.signal(signal.SIGUSR1)
    wait_for("the server to bind", lambda: s.out.read_text().count("bind ") > seen)
    return s.out.read_text().strip().splitlines()[-1]


def test_stopping_attach_detaches_and_the_server_serves_on(
        procs: Procs, tmp_path: Path) -> None:
    s, target = binder(procs, tmp_path)
    assert bind_outcome(s) == "bind ok"
    inode = listener_inode(target[1])
    a = attach(procs, s.pid)
    with Load(target, fresh=2, keepalive=2) as load:
        r = hupt_cli("reload", str(s.pid))  # the image that runs on is one hupt exec'd
        assert r.returncode == 0, r.stderr + a.log()
        time.sleep(0.3)
        a.signal(signal.SIGTERM)
        assert a.popen.wait(20) == 0, a.log()
        time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary()
    assert "detached" in a.err.read_text() and "ENOSYS" in a.err.read_text()
    assert s.poll() is None and ppid(s.pid) == os.getpid()
    assert listener_inode(target[1]) == inode
    assert http_get(target)[1].startswith(f"ok pid={s.pid}")
    assert set(thread_filters(s.pid).values()) == {(0, 1)}, "not traced; the filter stays"
    # What hupt attach warned about: nobody answers the filter any more.
    assert bind_outcome(s) == "bind ENOSYS"
    r = hupt_cli("reload", str(s.pid))
    one_line_error(r, str(s.pid))
    assert s.stop() == -signal.SIGTERM


def test_detach_is_confirmed_on_a_terminal(procs: Procs, tmp_path: Path) -> None:
    s, target = binder(procs, tmp_path)

    def controlling_tty() -> None:  # hupt attach in the terminal's foreground, as in a shell
        import fcntl
        import termios
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    primary, secondary = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "hupt", "attach", str(s.pid)], stdin=secondary,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=hupt_env(os.environ),
                         start_new_session=True, preexec_fn=controlling_tty)
    os.close(secondary)
    try:
        os.write(primary, b"y\n")  # attach? yes
        wait_for("the attach", lambda: procfs.seccomp_filters(s.pid) == 1, 20)
        wait_for("hupt attach", lambda: hupt_cli("status", str(s.pid)).returncode == 0, 20)
        p.send_signal(signal.SIGINT)
        time.sleep(1)
        assert p.poll() is None, "it asks first"
        os.write(primary, b"n\n")  # detach? no: still supervising
        wait_for("a reload", lambda: hupt_cli("reload", str(s.pid)).returncode == 0, 20)
        p.send_signal(signal.SIGINT)
        time.sleep(1)
        os.write(primary, b"y\n")  # detach? yes
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
        _, err = p.communicate(timeout=10)
        os.close(primary)
    text = err.decode()
    assert text.count("Detach? [y/N]") == 2 and "not detaching" in text, text
    assert "detached" in text and s.poll() is None
    assert http_get(target)[1].startswith(f"ok pid={s.pid}")
    assert bind_outcome(s) == "bind ENOSYS"


def test_a_stop_signal_while_attaching_never_leaves_an_orphaned_filter(
        procs: Procs, go_server: Path) -> None:
    # SIGTERM at moments spread over hupt attach's start: before it touches the
    # server it may die of it (the server untouched), after that it must detach
    # cleanly (exit 0) rather than die with the filter installed and unanswered.
    # The last moment is not a delay but the attach reported done, however long
    # that took: at least one signal comes after the attach on any machine.
    outcomes = set()
    for delay in (0.05, 0.15, 0.25, 0.35, 0.45, 0.6, 0.8, 1.2, None):
        port = free_port()
        target: Target = ("127.0.0.1", port)
        s = spawn_server(procs, [str(go_server), f"127.0.0.1:{port}"], target)
        a = procs.spawn([sys.executable, "-m", "hupt", "attach", "--yes", str(s.pid)],
                        name="attach")
        if delay is None:
            wait_for("hupt attach to take over", partial(_attached_or_gone, a), 20)
        else:
            time.sleep(delay)
        a.signal(signal.SIGTERM)
        code = a.popen.wait(20)
        if procfs.seccomp_filters(s.pid):
            assert code == 0 and "detached" in a.err.read_text(), a.log()
            outcomes.add("detached")
        else:
            assert code == -signal.SIGTERM, a.log()
            outcomes.add("untouched")
        assert procfs.tracer_pid(s.pid) == 0
        assert http_get(target)[0] == 200
        assert s.stop() == 0
    assert "detached" in outcomes, "some signal must have come after the attach"


# --- refusals ----------------------------------------------------------------------------


@pytest.fixture
def go_target(procs: Procs, go_server: Path) -> tuple[Started, Target]:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    return spawn_server(procs, [str(go_server), f"127.0.0.1:{port}"], target), target


def refused(pid: int, *needles: str, args: tuple[str, ...] = ("--yes",),
            caps: list[str] | None = None) -> None:
    before = untouched_view(pid)
    r = hupt_cli("attach", *args, str(pid), user_caps=caps)
    one_line_error(r, *needles)
    assert untouched_view(pid) == before


def test_refused_no_such_process(procs: Procs) -> None:
    gone = procs.spawn(["true"])
    gone.popen.wait(10)
    r = hupt_cli("attach", "--yes", str(gone.pid))
    one_line_error(r, f"no process with PID {gone.pid}")


def test_refused_no_listening_socket(procs: Procs) -> None:
    s = procs.spawn(["sleep", "30"])
    wait_for("sleep to start", lambda: procfs.cmdline(s.pid)[:1] == [b"sleep"])
    refused(s.pid, "no listening socket")


def test_refused_already_under_hupt(procs: Procs, go_server: Path) -> None:
    port = free_port()
    h = procs.hupt(cmd=[str(go_server), f"127.0.0.1:{port}"])
    wait_listening(("127.0.0.1", port), 20, proc=h)
    (server,) = children(h.pid)
    refused(server, "already under hupt", f"pid {h.pid}")


def test_refused_traced(go_target: tuple[Started, Target]) -> None:
    s, target = go_target
    tid = procfs.threads(s.pid)[-1]
    pt.seize(tid)  # someone else (this test) traces one thread
    try:
        refused(s.pid, "is being traced by", str(os.getpid()))
    finally:
        pt.interrupt(tid)
        pt.waitstop(tid, 5)
        pt.detach(tid)
    assert http_get(target)[0] == 200


def test_refused_without_ptrace_permission(go_target: tuple[Started, Target]) -> None:
    s, target = go_target
    # root without CAP_SYS_PTRACE may not trace a process with more capabilities
    caps = ["--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace"]
    refused(s.pid, "not allowed to trace", caps=caps)
    assert http_get(target)[0] == 200


def test_refused_without_confirmation(go_target: tuple[Started, Target]) -> None:
    s, target = go_target
    refused(s.pid, "not confirmed", "--yes", args=())
    assert http_get(target)[0] == 200


def test_confirmation_on_a_terminal(go_target: tuple[Started, Target]) -> None:
    s, _ = go_target
    argv = [sys.executable, "-m", "hupt", "attach", str(s.pid)]

    def answer(text: bytes) -> tuple[subprocess.Popen[bytes], int]:
        # The terminal must stay open while hupt runs: a closed one is no terminal.
        primary, secondary = pty.openpty()
        p = subprocess.Popen(argv, stdin=secondary, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=hupt_env(os.environ))
        os.close(secondary)
        os.write(primary, text)
        return p, primary

    before = untouched_view(s.pid)
    p, tty = answer(b"n\n")
    try:
        _, err = p.communicate(timeout=30)
    finally:
        os.close(tty)
    assert p.returncode == 1 and err.decode().strip().endswith("hupt: error: not confirmed")
    assert b"cannot be removed" in err and b"Attach? [y/N]" in err
    assert untouched_view(s.pid) == before

    p, tty = answer(b"y\n")
    try:
        wait_for("the attach", lambda: procfs.seccomp_filters(s.pid) == 1, 20)
        r = hupt_cli("reload", str(s.pid))
        assert r.returncode == 0, r.stderr
        r = hupt_cli("stop", str(s.pid))
        assert r.returncode == 0, r.stderr
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)
        os.close(tty)
    assert s.popen.wait(10) == 0  # the Go server shut down gracefully on the stop signal


def test_attach_to_an_unprivileged_server_sets_no_new_privs(
        procs: Procs, go_server: Path) -> None:
    # Without CAP_SYS_ADMIN in the target, the kernel accepts the injected
    # filter only once no_new_privs is set, which hupt injects first.
    port = free_port()
    target: Target = ("127.0.0.1", port)
    drop = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin"]
    s = spawn_server(procs, [*drop, str(go_server), f"127.0.0.1:{port}"], target)
    status = procfs.status_fields(s.pid)
    assert status["NoNewPrivs"] == "0" and not int(status["CapEff"], 16) >> 21 & 1
    attach(procs, s.pid)
    assert procfs.status_fields(s.pid)["NoNewPrivs"] == "1"
    with Load(target, fresh=2, keepalive=1) as load:
        for _ in range(3):
            r = hupt_cli("reload", str(s.pid))
            assert r.returncode == 0, r.stderr
    assert load.result.failed == 0, load.result.summary()
    assert ppid(s.pid) == os.getpid()


# A server with a notify filter of its own: another supervisor's, as far as
# hupt can tell (no hupt control socket answers for it).
OWN_LISTENER = '''
import socket, sys
from hupt.tracer import seccomp
from hupt.tracer.abi import SYS
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
notify = seccomp.install_listener(seccomp.build_filter([SYS.bind, SYS.listen]))
while True:
    conn, _ = listener.accept()
    conn.close()
'''


def test_refused_by_another_supervisors_filter(procs: Procs) -> None:
    port = free_port()
    s = procs.spawn([sys.executable, "-c", OWN_LISTENER, str(port)], name="own-listener",
                    env=hupt_env({}))
    wait_listening(("127.0.0.1", port), 20, proc=s)
    wait_for("its own filter", lambda: procfs.seccomp_filters(s.pid) == 1)
    # The injected seccomp() fails with EBUSY, atomically: nothing to undo.
    refused(s.pid, "already has a seccomp filter that notifies a supervisor")


def test_attach_close_idle_lets_the_exec_happen_before_the_drain_timeout(
        go_target: tuple[Started, Target], procs: Procs) -> None:
    # An idle keep-alive client (Go's server has no idle timeout by default)
    # would hold the exec back for the whole drain timeout, while nothing accepts.
    s, target = go_target
    a = attach(procs, s.pid, "--close-idle", "300", "--drain-timeout", "30")
    assert isinstance(target, tuple)
    idle = socket.create_connection(target, timeout=5)
    idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(4096).startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    r = hupt_cli("reload", str(s.pid))
    assert r.returncode == 0, r.stderr + a.log()
    assert time.monotonic() - t0 < 10, "execed once the idle connection was closed"
    assert "drain timeout" not in a.err.read_text()
    idle.settimeout(5)
    assert idle.recv(100) == b"", "the idle connection was closed with a FIN"
    idle.close()
    assert http_get(target)[0] == 200


def test_attach_keeps_every_queue_of_a_reuseport_sharded_server(procs: Procs) -> None:
    # Four workers, a SO_REUSEPORT socket each: four accept queues on one port.
    # hupt holds all four and hands them to the re-exec'd image's four binds,
    # so no queue is ever closed (closing one resets what it holds).
    port = free_port()
    target: Target = ("127.0.0.1", port)
    s = spawn_server(procs, [sys.executable, str(SERVERS / "reuseport_server.py"),
                             f"127.0.0.1:{port}", "4"], target)
    wait_for("four listening sockets", lambda: len(listening_sockets(port)) == 4)
    group = listening_sockets(port)
    a = attach(procs, s.pid)
    with Load(target, fresh=3, keepalive=1) as load:
        for i in range(5):
            r = hupt_cli("reload", str(s.pid))
            assert r.returncode == 0, r.stderr + a.log()
            assert listening_sockets(port) == group, f"reload {i + 1}: the group changed"
            wait_for("the new image's workers", lambda: len(children(s.pid)) == 4)
    assert load.result.failed == 0, load.result.summary()
    workers = children(s.pid)
    assert {ino for w in workers for ino in socket_inodes(w)} >= set(group)
    r = hupt_cli("stop", str(s.pid))
    assert r.returncode == 0, r.stderr


def test_attach_a_server_whose_hupt_was_killed(procs: Procs, go_server: Path) -> None:
    """A killed hupt leaves its filter in the server, its listener gone: every call it
    notifies fails with ENOSYS, forever.  A new `hupt attach` stacks its own filter
    (which gets the notifications) and its injected calls pass both filters, so the
    server is paused, drained and execed as any other (issue: every pause used to
    fail with ENOSYS and the reload reported success while resetting connections)."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt(cmd=go_cmd(go_server, target))
    wait_listening(target, 20, proc=h)
    server = int(http_get(target, "/pid")[1])
    os.kill(h.pid, signal.SIGKILL)
    h.popen.wait(10)
    assert http_get(target)[0] == 200, "the server serves on without hupt"
    assert set(thread_filters(server).values()) == {(0, 1)}, "the orphaned filter"
    a = attach(procs, server, "--drain-signal", "TERM")
    assert set(thread_filters(server).values()) == {(0, 2)}, "hupt's filter stacked on it"
    inode = listener_inode(port)
    with Load(target, fresh=2, keepalive=0, persistent=2) as load:
        time.sleep(0.3)
        for i in range(3):
            r = hupt_cli("reload", str(server))
            assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{a.log()}"
            assert listener_inode(port) == inode
            assert int(http_get(target, "/pid")[1]) == server, "the same process"
            time.sleep(0.3)
    assert load.result.failed == 0, load.result.summary() + a.log()
    assert "could not stop accepting" not in a.log(), a.log()
    r = hupt_cli("stop", str(server))
    assert r.returncode == 0, r.stderr
    assert a.popen.wait(20) == 0, a.log()
    wait_for("the server to exit", lambda: not alive(server), 20)


def test_an_attached_command_that_fails_is_not_started_again_until_given(
        procs: Procs, tmp_path: Path, go_server: Path) -> None:
    """`hupt attach PID -- CMD` with a command that cannot serve (a title, options
    missing): the first reload execs it and it exits.  hupt does not start that
    command again by itself (it would fail the same way, again and again); the
    listening socket stays held, so a client that connects meanwhile queues and is
    answered once the operator gives the right command (issue 11.6)."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    s = spawn_server(procs, go_cmd(go_server, target), target)
    starts = tmp_path / "starts"
    wrong = ["/bin/sh", "-c", f"echo started >> {starts}; exit 3"]
    a = procs.spawn([sys.executable, "-m", "hupt", "attach", "--yes", "--drain-timeout", "20",
                     "--kill-timeout", "5", "--drain-signal", "TERM", str(s.pid), "--", *wrong],
                    name="attach")
    wait_for("hupt attach to take over", partial(_attached_or_gone, a), 20)
    assert a.poll() is None, a.log()
    inode = listener_inode(port)
    r = hupt_cli("reload", str(a.pid))
    one_line_error(r, "has never served under hupt", "-- CMD ARGS")
    assert s.popen.wait(10) == 3, "the wrong command ran in the server's process and exited"
    time.sleep(3)  # longer than the first backoff step of a retry
    assert starts.read_text() == "started\n", "started once (the exec), never again"
    assert a.poll() is None, "hupt attach holds on: " + a.log()
    assert listener_inode(port) == inode, "the listening socket is still held"
    status = hupt_cli("status", "--json", str(a.pid))
    assert '"state": "down"' in status.stdout, status.stdout
    # A client connecting now is queued on the held socket, not refused.
    queued = socket.create_connection(("127.0.0.1", port), timeout=30)
    queued.sendall(b"GET / HTTP/1.0\r\n\r\n")
    r = hupt_cli("reload", str(a.pid), "--", *go_cmd(go_server, target))
    assert r.returncode == 0, r.stderr + a.log()
    reply = b""
    try:
        while chunk := queued.recv(4096):
            reply += chunk
    except OSError as e:
        raise AssertionError(f"the queued client: {e}\n{a.log()}") from None
    queued.close()
    assert reply.startswith(b"HTTP/1.0 200") or reply.startswith(b"HTTP/1.1 200"), reply
    assert listener_inode(port) == inode, "the right command took the same socket"
    with Load(target, fresh=2, keepalive=0, persistent=1) as load:
        time.sleep(0.5)
        r = hupt_cli("reload", str(a.pid))
        assert r.returncode == 0, r.stderr + a.log()
        time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary()
    assert listener_inode(port) == inode
    r = hupt_cli("stop", str(a.pid))
    assert r.returncode == 0, r.stderr
    assert a.popen.wait(20) == 0, a.log()
