"""ptrace injection against real servers: pausing and resuming listeners, error paths.

Targets (integration/inject_targets/) listen on two ports: MAIN is paused,
AUX never is and shows that the process keeps working.  Each prints
"MAIN AUX" when ready.

What "paused" means here, measured from outside:
- a connection to MAIN completes (the kernel queues it) but gets no answer,
  and the listener's accept queue (rx_queue of a LISTEN entry in
  /proc/net/tcp) holds it;
- the target does not spin: utime+stime grows by at most a few ticks in 1 s;
- AUX still answers; no thread is traced (TracerPid 0) and every thread's
  SigBlk is what it was.
After resume_listeners every queued connection is answered and the listener's
epoll registrations, fd flags and fd table are what they were.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Procs, Started, fdinfo_flags, listener_inode, settle
from snapshots import thread_states, whole_view

from hupt.errors import AccessDenied, InjectionError, NoSuchProcess
from hupt.tracer import bpf, pidfd, procfs, seccomp
from hupt.tracer import ptrace as pt
from hupt.tracer.abi import F_DUPFD_CLOEXEC, O_CLOEXEC, O_NONBLOCK, SYS
from hupt.tracer.accepting import (
    PausedListeners,
    UnpausableListener,
    exec_in_place,
    inject_filter,
    pause_listeners,
    resume_listeners,
)
from hupt.tracer.inject import State, Tracee
from hupt.tracer.notify import NotifyFd

pytestmark = pytest.mark.root

TARGETS = Path(__file__).resolve().parent / "inject_targets"
ANSWER = re.compile(rb"^HTTP/1\.[01] 200 .*\r\n\r\nok\n$", re.S)


# --- helpers ------------------------------------------------------------------------------


def start(procs: Procs, cmd: list[str]) -> tuple[Started, int, int]:
    s = procs.spawn(cmd)
    line = settle(lambda: s.out.read_text(), lambda out: "\n" in out or s.poll() is not None,
                  timeout=20)
    ports = line.split()
    assert len(ports) == 2, f"target did not start:\n{s.log()}"
    return s, int(ports[0]), int(ports[1])


def send_request(port: int) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    c.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    return c


def read_response(c: socket.socket, timeout: float = 5.0) -> bytes:
    c.settimeout(timeout)
    data = b""
    with c:
        while chunk := c.recv(4096):
            data += chunk
    return data


def ask(port: int) -> bytes:
    return read_response(send_request(port))


def answered(c: socket.socket) -> bool:
    readable, _, _ = select.select([c], [], [], 0)
    return bool(readable)


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on 127.0.0.1:port."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                return int(queues.split(":")[1], 16)
    raise AssertionError(f"no listener on port {port}")


def cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (all threads)


def masks_unchanged(pid: int, before: dict[int, tuple[str, str]]) -> bool:
    now = thread_states(pid)
    return all(now[t] == before[t] for t in before.keys() & now.keys())


def listener_fds(pid: int, port: int) -> list[int]:
    ino = listener_inode(port)
    return sorted(fd for fd, i in procfs.socket_inodes(pid).items() if i == ino)


def listener_view(pid: int, port: int) -> tuple[object, ...]:
    """Everything pausing touches for one listener: its fds, their flags, its epoll entries."""
    ino = listener_inode(port)
    fds = listener_fds(pid, port)
    flags = [procfs.fd_flags(pid, fd) for fd in fds]
    entries = sorted((epfd, e) for epfd in procfs.epoll_fds(pid)
                     for e in procfs.epoll_registrations(pid, epfd) if e.ino == ino)
    return fds, flags, entries


def maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def python_target(name: str, *args: str) -> list[str]:
    return [sys.executable, str(TARGETS / name), *args]


TARGET_CMDS: dict[str, Callable[[Path], list[str]]] = {
    "threads-in-accept": lambda go: python_target("threaded_accept.py"),
    "epoll-level": lambda go: python_target("epoll_server.py", "plain"),
    "epoll-edge": lambda go: python_target("epoll_server.py", "et"),
    "epoll-exclusive": lambda go: python_target("epoll_server.py", "exclusive"),
    "node": lambda go: ["node", str(TARGETS / "node_server.js")],
    "go-static": lambda go: [str(go)],
}


@pytest.fixture(params=sorted(TARGET_CMDS))
def target_cmd(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    name: str = request.param
    go = request.getfixturevalue("go_inject_target") if name == "go-static" else Path()
    yield TARGET_CMDS[name](go)


# --- pause and resume ------------------------------------------------------------------


def test_pause_then_resume(procs: Procs, target_cmd: list[str]) -> None:
    s, main, aux = start(procs, target_cmd)
    assert ANSWER.match(ask(main))
    before_threads = thread_states(s.pid)
    before_listener = listener_view(s.pid, main)

    paused = pause_listeners(s.pid, listener_fds(s.pid, main))

    states = thread_states(s.pid)
    assert {tracer for tracer, _ in states.values()} == {"0"}
    assert settle(lambda: masks_unchanged(s.pid, before_threads), bool, 2.0)
    waiting = [send_request(main) for _ in range(3)]
    assert settle(lambda: accept_queue(main), lambda n: n == 3) == 3
    ticks = cpu_ticks(s.pid)
    time.sleep(1.0)
    assert cpu_ticks(s.pid) - ticks <= 5, "the paused target is spinning"
    assert not any(answered(c) for c in waiting), "a paused listener accepted"
    assert accept_queue(main) == 3
    assert ANSWER.match(ask(aux)), "the paused process stopped working"
    assert s.poll() is None

    assert resume_listeners(s.pid, paused) == []

    for c in waiting:
        assert ANSWER.match(read_response(c))
    assert ANSWER.match(ask(main))
    assert accept_queue(main) == 0
    assert listener_view(s.pid, main) == before_listener
    assert {tracer for tracer, _ in thread_states(s.pid).values()} == {"0"}


def test_pause_two_listeners_at_once(procs: Procs) -> None:
    s, main, aux = start(procs, python_target("epoll_server.py", "et"))
    before = whole_view(s.pid)
    paused = pause_listeners(s.pid, listener_fds(s.pid, main) + listener_fds(s.pid, aux))
    assert len(paused.listeners) == 2
    waiting = [send_request(main), send_request(aux)]
    time.sleep(0.5)
    assert not any(answered(c) for c in waiting)
    resume_listeners(s.pid, paused)
    for c in waiting:
        assert ANSWER.match(read_response(c))
    assert settle(lambda: whole_view(s.pid), lambda v: v == before) == before


def test_a_stopped_process_stays_stopped(procs: Procs) -> None:
    s, main, _ = start(procs, python_target("threaded_accept.py"))
    os.kill(s.pid, signal.SIGSTOP)
    assert settle(lambda: procfs.parse_stat(Path(f"/proc/{s.pid}/stat").read_bytes()).state,
                  lambda st: st == "T") == "T"
    paused = pause_listeners(s.pid, listener_fds(s.pid, main))
    time.sleep(0.2)
    assert procfs.parse_stat(Path(f"/proc/{s.pid}/stat").read_bytes()).state == "T"
    os.kill(s.pid, signal.SIGCONT)
    c = send_request(main)
    time.sleep(0.5)
    assert not answered(c)
    resume_listeners(s.pid, paused)
    assert ANSWER.match(read_response(c))


def test_a_temporary_signal_mask_survives(procs: Procs) -> None:
    # ppoll(..., {SIGUSR2}) while SIGUSR1 is blocked: /proc shows the temporary
    # mask, and after the session the program must still see SIGUSR1 blocked.
    s = procs.spawn(python_target("ppoll_waiter.py"))
    out = settle(lambda: s.out.read_text(), lambda o: "\n" in o, 20)
    port = int(out.split()[0])
    time.sleep(0.2)
    with Tracee.seize(s.pid) as t:
        assert t.syscall(SYS.getpid) == s.pid
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    out = settle(lambda: s.out.read_text(), lambda o: o.count("\n") >= 2)
    assert out.splitlines()[1].split() == [str(int(signal.SIGUSR1))]


def test_a_signal_sent_during_a_session_runs_its_handler_at_once(procs: Procs) -> None:
    # The blocked accept() must come back with EINTR when the signal is
    # delivered after the session, as it would have without us.
    s = procs.spawn(python_target("signal_waiter.py"))
    settle(lambda: s.out.read_text(), lambda o: "\n" in o, 20)
    time.sleep(0.2)
    with Tracee.seize(s.pid) as t:
        t.syscall(SYS.getpid)
        os.kill(s.pid, signal.SIGUSR1)
    out = settle(lambda: s.out.read_text(), lambda o: "signal" in o, 2.0)
    assert f"signal {int(signal.SIGUSR1)}" in out
    assert "accepted" not in out


def test_a_stop_signal_during_a_session_is_not_lost(procs: Procs) -> None:
    s = procs.spawn(python_target("signal_waiter.py"))
    port = int(settle(lambda: s.out.read_text(), lambda o: "\n" in o, 20).split()[0])
    with Tracee.seize(s.pid) as t:
        os.kill(s.pid, signal.SIGSTOP)  # SIGSTOP cannot be blocked: it stops the injection
        assert t.syscall(SYS.getpid) == s.pid
    state = settle(lambda: procfs.parse_stat(Path(f"/proc/{s.pid}/stat").read_bytes()).state,
                   lambda st: st == "T")
    assert state == "T"
    assert procfs.tracer_pid(s.pid) == 0
    os.kill(s.pid, signal.SIGCONT)
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert "accepted" in settle(lambda: s.out.read_text(), lambda o: "accepted" in o)


def test_injection_into_each_thread_and_a_second_tracer_refused(procs: Procs) -> None:
    s, main, _ = start(procs, python_target("threaded_accept.py"))
    with Tracee.seize(s.pid) as t:
        assert len(t.threads) == 5 and t.threads == procfs.threads(s.pid)
        for tid in t.threads:
            assert t.syscall(SYS.gettid, tid=tid) == tid
        with pytest.raises(AccessDenied), Tracee.seize(s.pid):
            pass
        assert t.syscall(SYS.getpid) == s.pid
    assert {tracer for tracer, _ in thread_states(s.pid).values()} == {"0"}
    assert ANSWER.match(ask(main))


# --- error paths -----------------------------------------------------------------------


def test_failure_midway_leaves_the_target_as_it_was(procs: Procs) -> None:
    # With a single free fd slot the saved copy and the epoll DELs succeed and
    # the dummy socket() fails with EMFILE: everything before must be undone.
    s, main, _ = start(procs, python_target("epoll_server.py", "et"))
    fds = sorted(map(int, os.listdir(f"/proc/{s.pid}/fd")))
    assert fds == list(range(len(fds))), f"fd table has holes: {fds}"
    limits = resource.prlimit(s.pid, resource.RLIMIT_NOFILE)
    before = whole_view(s.pid)
    before_maps = maps(s.pid)
    resource.prlimit(s.pid, resource.RLIMIT_NOFILE, (len(fds) + 1, limits[1]))
    try:
        with pytest.raises(InjectionError) as failed:
            pause_listeners(s.pid, listener_fds(s.pid, main))
    finally:
        resource.prlimit(s.pid, resource.RLIMIT_NOFILE, limits)
    assert failed.value.errno == errno.EMFILE and "socket" in failed.value.op
    assert whole_view(s.pid) == before
    assert maps(s.pid) == before_maps  # scratch pages unmapped
    assert ANSWER.match(ask(main))


def test_rollback_of_registered_changes(procs: Procs) -> None:
    s, main, _ = start(procs, python_target("threaded_accept.py"))
    before = whole_view(s.pid)
    fd = listener_fds(s.pid, main)[0]
    with pytest.raises(InjectionError) as failed, Tracee.seize(s.pid) as t:
        copy = t.syscall(SYS.fcntl, fd, F_DUPFD_CLOEXEC, 100)
        t.on_rollback("copy", lambda: t.syscall(SYS.close, copy))
        assert listener_fds(s.pid, main) == [fd, copy]
        t.syscall(SYS.close, 4000)  # not open: EBADF
    assert failed.value.errno == errno.EBADF
    assert t.state is State.RELEASED
    assert whole_view(s.pid) == before
    assert ANSWER.match(ask(main))


def test_keyboard_interrupt_inside_a_session(procs: Procs) -> None:
    s, main, _ = start(procs, python_target("epoll_server.py", "plain"))
    before, before_maps = whole_view(s.pid), maps(s.pid)
    with pytest.raises(KeyboardInterrupt), Tracee.seize(s.pid) as t, t.scratch(100) as addr:
        t.write(addr, b"x" * 100)
        copy = t.syscall(SYS.fcntl, listener_fds(s.pid, main)[0], F_DUPFD_CLOEXEC, 100)
        t.on_rollback("copy", lambda: t.syscall(SYS.close, copy))
        raise KeyboardInterrupt
    assert whole_view(s.pid) == before
    assert maps(s.pid) == before_maps
    assert ANSWER.match(ask(main))


def test_sigint_waits_for_the_end_of_the_session(procs: Procs) -> None:
    s, main, _ = start(procs, python_target("threaded_accept.py"))
    reached = 0
    with pytest.raises(KeyboardInterrupt), Tracee.seize(s.pid) as t:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # a KeyboardInterrupt here would leave no time to release
        reached = t.syscall(SYS.getpid)
    assert reached == s.pid
    assert {tracer for tracer, _ in thread_states(s.pid).values()} == {"0"}
    assert ANSWER.match(ask(main))


def test_a_seize_failing_halfway_lets_go_of_the_threads_it_had(procs: Procs) -> None:
    s, main, _ = start(procs, python_target("threaded_accept.py"))
    last = procfs.threads(s.pid)[-1]
    pt.seize(last)  # another tracer (us, outside any session) holds one thread
    try:
        with pytest.raises(AccessDenied), Tracee.seize(s.pid):
            pass
        states = thread_states(s.pid)
        assert {tracer for tid, (tracer, _) in states.items() if tid != last} == {"0"}
    finally:
        pt.interrupt(last)
        pt.waitstop(last, 5)
        pt.detach(last)
    assert procfs.tracer_pid(last) == 0
    assert ANSWER.match(ask(main))


def test_target_killed_mid_session(procs: Procs) -> None:
    s, _, _ = start(procs, python_target("threaded_accept.py"))
    t = Tracee.seize(s.pid)
    with pytest.raises(NoSuchProcess), t:
        t.syscall(SYS.getpid)
        os.kill(s.pid, signal.SIGKILL)
        t.syscall(SYS.getpid)
    assert t.state is State.RELEASED
    # Our own child's exit status was left for us to reap, not consumed by the tracer.
    assert s.popen.wait(5) == -signal.SIGKILL


def test_pause_of_a_dying_target_raises_cleanly(procs: Procs) -> None:
    s, main, _ = start(procs, python_target("threaded_accept.py"))
    fds = listener_fds(s.pid, main)
    s.popen.kill()
    s.popen.wait(5)
    with pytest.raises(NoSuchProcess):
        pause_listeners(s.pid, fds)


def test_pause_refuses_what_is_not_a_socket(procs: Procs) -> None:
    s, main, _ = start(procs, python_target("epoll_server.py", "plain"))
    before = whole_view(s.pid)
    with pytest.raises(UnpausableListener):
        pause_listeners(s.pid, [*listener_fds(s.pid, main), 0])
    assert whole_view(s.pid) == before


def test_resume_skips_a_listener_fd_the_program_replaced(procs: Procs) -> None:
    s, main, _ = start(procs, python_target("threaded_accept.py"))
    fd = listener_fds(s.pid, main)[0]
    paused = pause_listeners(s.pid, [fd])
    saved = paused.listeners[0].saved
    with Tracee.seize(s.pid) as t:  # the program "reuses" the fd number for something else
        t.syscall(SYS.dup3, 2, fd, 0)
    assert resume_listeners(s.pid, paused) == [fd]
    assert saved not in procfs.socket_inodes(s.pid)  # the copy was closed anyway
    assert listener_inode(main) is None  # nobody held the listener any more


def test_pause_gives_the_stand_in_the_mode_the_process_expects_and_resume_restores_it(
        procs: Procs) -> None:
    """O_NONBLOCK is the socket's, shared by every holder: another holder (the next
    generation, handed the socket) may have changed it.  The stand-in gets the mode the
    process expects, the socket itself is left alone while paused, and resuming puts
    the process's mode back on it, for every holder."""
    s, main, aux = start(procs, python_target("epoll_server.py", "plain"))
    (fd,) = listener_fds(s.pid, main)
    assert fdinfo_flags(s.pid, fd) & O_NONBLOCK, "an epoll server's listener does not block"
    handle = pidfd.pidfd_open(s.pid)
    try:
        other = pidfd.pidfd_getfd(handle, fd)
    finally:
        os.close(handle)
    try:
        os.set_blocking(other, True)  # what a blocking next generation is handed
        assert not fdinfo_flags(s.pid, fd) & O_NONBLOCK, "one flag for every holder"
        paused = pause_listeners(s.pid, [fd], nonblock={fd: True})
        try:
            assert fdinfo_flags(s.pid, fd) & O_NONBLOCK, "the stand-in in the process's mode"
            assert os.get_blocking(other), "the shared socket keeps the other holder's mode"
            assert ask(aux).endswith(b"ok\n"), "the process works on"
        finally:
            resume_listeners(s.pid, paused)
        assert fdinfo_flags(s.pid, fd) & O_NONBLOCK and not os.get_blocking(other)
        assert ask(main).endswith(b"ok\n")
        # Without a mode given, the stand-in takes the socket's own.
        os.set_blocking(other, True)
        paused = pause_listeners(s.pid, [fd])
        assert not fdinfo_flags(s.pid, fd) & O_NONBLOCK
        resume_listeners(s.pid, paused)
        assert os.get_blocking(other), "resuming keeps the mode it found"
    finally:
        os.close(other)


def test_resume_needs_the_pid_it_was_paused_in() -> None:
    with pytest.raises(ValueError):
        resume_listeners(1, PausedListeners(2, ()))


# --- exec in place and attach (stage 2) ------------------------------------------------


def test_exec_in_place_from_node_keeps_pid_and_stdio(procs: Procs) -> None:
    s, main, _ = start(procs, ["node", str(TARGETS / "node_server.js")])
    assert procfs.fd_flags(s.pid, 1) & O_CLOEXEC  # node's stdio is close-on-exec
    exec_in_place(s.pid, [sys.executable.encode(), str(TARGETS / "signal_waiter.py").encode()],
                  [b"PATH=/usr/bin:/bin"])
    out = settle(lambda: s.out.read_text(), lambda o: o.count("\n") >= 2, 20)
    port = int(out.splitlines()[1])  # printed by the new program, on the inherited stdout
    assert procfs.cmdline(s.pid)[1].endswith(b"signal_waiter.py")
    assert set(thread_states(s.pid).values()) == {("0", "0000000000000000")}
    assert listener_inode(main) is None  # node's fds did not survive the exec
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert "accepted" in settle(lambda: s.out.read_text(), lambda o: "accepted" in o)
    assert s.poll() is None


def test_a_failed_exec_leaves_the_process_as_it_was(procs: Procs) -> None:
    s, main, _ = start(procs, python_target("threaded_accept.py"))
    before, before_maps = whole_view(s.pid), maps(s.pid)
    with pytest.raises(InjectionError) as failed:
        exec_in_place(s.pid, [b"/nonexistent/program"], [])
    assert failed.value.errno == errno.ENOENT
    assert settle(lambda: whole_view(s.pid), lambda v: v == before) == before
    assert maps(s.pid) == before_maps
    assert all(ANSWER.match(ask(main)) for _ in range(4))


@pytest.mark.parametrize("program", [b"/nonexistent/program", b"not-executable"])
def test_a_failed_exec_leaves_inheritable_fds_inheritable(
        procs: Procs, tmp_path: Path, program: bytes) -> None:
    # The exec marks every fd >= 3 close-on-exec first (close_range CLOEXEC); when the
    # execve fails, the fds that were inheritable must be so again, or the process's
    # own next fork+exec would lose them.
    s, main, _ = start(procs, python_target("threaded_accept.py", "--inheritable"))
    pipes = sorted(fd for fd in map(int, os.listdir(f"/proc/{s.pid}/fd"))
                   if os.readlink(f"/proc/{s.pid}/fd/{fd}").startswith("pipe:"))
    assert len(pipes) == 2 and min(pipes) >= 3, pipes
    assert not any(fdinfo_flags(s.pid, fd) & O_CLOEXEC for fd in pipes), "target set-up"
    others = [fd for fd in map(int, os.listdir(f"/proc/{s.pid}/fd")) if fd >= 3 and fd not in
              pipes]
    assert others and all(fdinfo_flags(s.pid, fd) & O_CLOEXEC for fd in others)
    before = whole_view(s.pid)
    if program == b"not-executable":
        path = tmp_path / "program"
        path.write_bytes(b"\x7fELF not really\n")
        path.chmod(0o755)
        program, want = str(path).encode(), errno.ENOEXEC
    else:
        want = errno.ENOENT
    with pytest.raises(InjectionError) as failed:
        exec_in_place(s.pid, [program], [])
    assert failed.value.errno == want
    flags = {fd: fdinfo_flags(s.pid, fd) for fd in pipes}
    assert not any(f & O_CLOEXEC for f in flags.values()), (
        f"inheritable fds left close-on-exec after the failed exec: {flags}")
    assert all(fdinfo_flags(s.pid, fd) & O_CLOEXEC for fd in others), "and the others kept it"
    assert settle(lambda: whole_view(s.pid), lambda v: v == before) == before
    assert all(ANSWER.match(ask(main)) for _ in range(4))


def test_inject_filter_reaches_every_thread(procs: Procs) -> None:
    s = procs.spawn(python_target("bind_on_signal.py"))
    settle(lambda: s.out.read_text(), lambda o: "ready" in o, 20)
    masks = {tid: procfs.status_fields(tid)["SigBlk"] for tid in procfs.threads(s.pid)}
    fd = inject_filter(s.pid, bpf.pack(seccomp.build_filter([SYS.bind])))
    assert fd is not None
    with NotifyFd(fd) as notify:
        tids = procfs.threads(s.pid)
        assert len(tids) == 5
        assert {tid: procfs.status_fields(tid)["SigBlk"] for tid in tids} == masks
        assert all(procfs.seccomp_filters(tid) == 1 for tid in tids)
        assert all(procfs.tracer_pid(tid) == 0 for tid in tids)
        assert not [fd for fd in os.listdir(f"/proc/{s.pid}/fd")
                    if "seccomp" in os.readlink(f"/proc/{s.pid}/fd/{fd}")]
        os.kill(s.pid, signal.SIGUSR1)
        readable, _, _ = select.select([notify], [], [], 5)
        assert readable
        n = notify.recv()
        assert n is not None and n.nr == SYS.bind and procfs.tgid_of(n.pid) == s.pid
        notify.send_continue(n.id)
        assert "bound" in settle(lambda: s.out.read_text(), lambda o: "bound" in o)
    # The listener is gone with hupt's copy: the filtered syscall fails for good.
    os.kill(s.pid, signal.SIGUSR1)
    out = settle(lambda: s.out.read_text(), lambda o: "bind failed" in o)
    assert f"bind failed {errno.ENOSYS}" in out


def test_a_paused_tcp_listener_looks_like_a_tcp_socket_nobody_can_reach(procs: Procs) -> None:
    """Servers ask a listener what it is (gunicorn unlinks a unix name it gets from
    getsockname at exit): the stand-in is a TCP socket on loopback, listening, that
    drops every SYN and is never readable."""
    s, main, aux = start(procs, python_target("epoll_server.py", "plain"))
    fds = listener_fds(s.pid, main)
    paused = pause_listeners(s.pid, fds)
    try:
        handle = pidfd.pidfd_open(s.pid)
        try:
            stand_in = socket.socket(fileno=pidfd.pidfd_getfd(handle, fds[0]))
        finally:
            os.close(handle)
        with stand_in:
            assert stand_in.family == socket.AF_INET
            host, port = stand_in.getsockname()
            assert host == "127.0.0.1" and port not in (0, main)
            assert stand_in.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            with socket.socket() as c:
                c.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    c.connect(("127.0.0.1", port))
                _, writable, _ = select.select([], [c], [], 0.5)
                assert not writable, "a connection to the stand-in completed"
            readable, _, _ = select.select([stand_in], [], [], 0.2)
            assert not readable
        assert ask(aux).endswith(b"ok\n"), "the process works on"
    finally:
        resume_listeners(s.pid, paused)
    assert ask(main).endswith(b"ok\n")


UNIX_HOLDER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(8)
print(s.fileno(), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_paused_unix_listener_answers_getsockname_with_a_path_that_is_not_there(
        sealed: bool, procs: Procs, short_tmp: Path) -> None:
    """gunicorn unlinks, at exit, the path getsockname() of its listener gives (an
    abstract name made it fail with "embedded null character"): a unix listener's
    stand-in is bound next to it, under the listener's path plus a suffix, and its
    file removed at once: a path, nothing on disk, nothing anyone can connect to.
    Also in a process whose every unlink a filter makes a no-op (a retiring
    generation's seal): hupt's own unlink goes through."""
    path = short_tmp / "app.sock"
    s = procs.spawn([sys.executable, "-c", UNIX_HOLDER, str(path)])
    out = settle(lambda: s.out.read_text(), lambda o: "\n" in o or s.poll() is not None, 20)
    fd = int(out)
    if sealed:
        noop = bpf.pack(seccomp.build_noop_filter([SYS.unlink, SYS.unlinkat]))
        inject_filter(s.pid, noop, listener=False)
    inode = path.stat().st_ino
    paused = pause_listeners(s.pid, [fd])
    try:
        (p,) = paused.listeners
        assert p.stand_in is not None and p.stand_in.startswith(bytes(path) + b".paused-")
        handle = pidfd.pidfd_open(s.pid)
        try:
            stand_in = socket.socket(fileno=pidfd.pidfd_getfd(handle, fd))
        finally:
            os.close(handle)
        with stand_in:
            name = stand_in.getsockname()
            assert isinstance(name, str) and os.fsencode(name) == p.stand_in
            assert not os.path.lexists(name), "the stand-in's file is left on disk"
            assert stand_in.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert not select.select([stand_in], [], [], 0.2)[0]
        assert sorted(os.listdir(short_tmp)) == ["app.sock"]
        assert path.stat().st_ino == inode
    finally:
        resume_listeners(s.pid, paused)
    handle = pidfd.pidfd_open(s.pid)
    try:
        with socket.socket(fileno=pidfd.pidfd_getfd(handle, fd)) as back:
            assert back.getsockname() == str(path)
    finally:
        os.close(handle)


def test_a_session_with_a_zombie_fails_at_once() -> None:
    """A process that exited and waits to be reaped (exec mode: a root that exited
    while it drained, as haproxy -W's master does with its last worker) has no live
    thread: the session must fail at once, not try to seize the zombie for ever."""
    import subprocess

    from harness import Background, wait_for

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_for("the child to be a zombie",
                 lambda: procfs.parse_stat(Path(f"/proc/{child.pid}/stat").read_bytes())
                 .state == "Z", 10)

        def session() -> None:
            with Tracee.seize(child.pid):
                pass

        entered = Background(session)
        with pytest.raises(NoSuchProcess):
            entered.result(10)
    finally:
        child.wait(10)
