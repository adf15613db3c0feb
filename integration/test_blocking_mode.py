"""O_NONBLOCK is one flag of the shared listening socket; each generation keeps its own view.

The fact (kernel-facts.md, section 2): O_NONBLOCK is a file status flag of
the open file description, which every fd and process holding the socket
shares, and a socket cannot be reopened to get a description of one's own.
fcntl(F_SETFL) by one holder changes it for all.  A thread already asleep
in a blocking accept() stays asleep when another holder sets it (the mode is
read as the call starts), until a connection comes or a signal or ptrace
interrupts it.  Both are proven here first, on the kernel alone.

What hupt does with it: the new generation's bind() is answered with the
held socket set to the mode that generation asked for, so the old one sees
the new mode until it is paused; the pause then gives each old generation a
stand-in in ITS OWN mode (and wakes its threads asleep in accept(), which
restart on the stand-in); a rollback gives it back the shared socket in its
own mode.  Proven with a server (servers/blockmode_server.py) that accepts
like an event loop (non-blocking, accept until EAGAIN: given a blocking
socket it sleeps in accept() and starves every connection it serves) or
like a C server (a blocking accept() loop: given a non-blocking socket it
spins on EAGAIN), a different mode in each generation: fork mode reloads
and rollbacks under fresh and persistent clients, 0 failed requests, each
old generation gone well before --drain-timeout, and each generation's view
read from /proc/PID/fdinfo/FD (or printed by the server at its SIGTERM,
when its fd holds hupt's stand-in).  In exec mode one process runs image
after image, each in its own mode: each drains on a stand-in in its mode and
the next one gets the very socket in the mode it asked for (the handoff's
F_SETFL; without it the test fails).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import (
    O_NONBLOCK_FLAG,
    SERVERS,
    HuptProcess,
    Procs,
    fdinfo_flags,
    free_port,
    http_get,
    socket_inodes,
    wait_for,
    wait_gone,
    wait_listening,
)
from load import Load, Target
from supervision import generations, stop_gracefully

from hupt.tracer.abi import SYS

STARTED = re.compile(r"pid (\d+) (block|nonblock) on fd (\d+)")
AT_TERM = re.compile(r"pid (\d+) listener flags at term: ([0-7]+)")
EAGAIN = re.compile(r"pid (\d+) eagain after term: (\d+)")
DRAIN_TIMEOUT = 60.0
# Far below DRAIN_TIMEOUT: a generation asleep in accept() on the wrong mode
# drains only when the timeout kills it.
DRAINED_WITHIN = 25.0


# --- the facts -----------------------------------------------------------------------------


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def test_two_processes_holding_a_socket_share_its_o_nonblock(tmp_path: Path) -> None:
    lst = _listener()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              pass_fds=[lst.fileno()])
    try:
        fd = lst.fileno()
        assert not fdinfo_flags(holder.pid, fd) & O_NONBLOCK_FLAG
        lst.setblocking(False)  # fcntl(F_SETFL) here, in this process...
        assert fdinfo_flags(holder.pid, fd) & O_NONBLOCK_FLAG  # ...is the other's flag too
        lst.setblocking(True)
        assert not fdinfo_flags(holder.pid, fd) & O_NONBLOCK_FLAG
        # A dup is the same open file description; only FD_CLOEXEC is per fd.
        dup = os.dup(fd)
        try:
            os.set_blocking(dup, False)
            assert fdinfo_flags(os.getpid(), fd) & O_NONBLOCK_FLAG
        finally:
            os.close(dup)
        # /proc cannot give a description of one's own: sockets cannot be reopened.
        with pytest.raises(OSError):
            os.open(f"/proc/{holder.pid}/fd/{fd}", os.O_RDWR)
    finally:
        holder.kill()
        holder.wait()
        lst.close()


def test_a_blocking_accept_asleep_stays_asleep_when_another_holder_sets_o_nonblock() -> None:
    lst = _listener()
    other = os.dup(lst.fileno())  # another holder's fd: the same description
    got: list[object] = []

    def accept() -> None:
        try:
            got.append(lst.accept()[0])
        except OSError as e:
            got.append(e)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        wait_for("the thread to sleep in accept()", lambda: _in_accept(t), 10)
        os.set_blocking(other, False)
        time.sleep(1.0)  # an EAGAIN would come at once; none comes at all
        assert t.is_alive() and not got, got
        with socket.create_connection(lst.getsockname(), timeout=5):
            t.join(10)
        assert len(got) == 1 and isinstance(got[0], socket.socket), got
        # The next accept() reads the flag anew: EAGAIN, not sleep.
        with socket.socket(fileno=os.dup(lst.fileno())) as again, \
                pytest.raises(BlockingIOError):
            again.accept()
    finally:
        for s in got:
            if isinstance(s, socket.socket):
                s.close()
        os.close(other)
        lst.close()


def _in_accept(t: threading.Thread) -> bool:
    """The thread sleeps in accept() or accept4() (its /proc syscall line: the number)."""
    tid = t.native_id
    if tid is None:
        return False
    try:
        line = Path(f"/proc/self/task/{tid}/syscall").read_text().split()
    except OSError:
        return False
    return bool(line) and line[0] in (str(int(SYS.accept)), str(int(SYS.accept4)))


# --- hupt keeps each generation's view -----------------------------------------------------


def _start(procs: Procs, tmp: Path, mode: str, *opts: str) -> tuple[HuptProcess, Target, Path]:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    mode_file = tmp / "MODE"
    mode_file.write_text(mode)
    cmd = [sys.executable, str(SERVERS / "blockmode_server.py"), f"127.0.0.1:{port}",
           str(mode_file)]
    h = procs.hupt("--drain-timeout", str(DRAIN_TIMEOUT), "--kill-timeout", "5", *opts, cmd=cmd)
    wait_listening(target, 20, proc=h)
    return h, target, mode_file


def _started(h: HuptProcess, count: int = 0) -> dict[int, tuple[str, int]]:
    """pid -> (mode, listener fd) of every generation started so far, once `count` of them
    have said so: a server's line reaches hupt's log through a pipe, after it listens."""
    def seen() -> dict[int, tuple[str, int]] | None:
        got = {int(p): (m, int(fd)) for p, m, fd in STARTED.findall(h.log())}
        return got if len(got) >= count else None
    return wait_for(f"{count} generations' start lines", seen, 20, proc=h)


def _nonblock(pid: int, fd: int) -> bool:
    return bool(fdinfo_flags(pid, fd) & O_NONBLOCK_FLAG)


def _check_views_at_term(h: HuptProcess, modes: dict[int, tuple[str, int]]) -> None:
    """Each retired generation saw its own mode on its fd (hupt's stand-in) at SIGTERM, and a
    blocking one never got EAGAIN after it."""
    log = h.log()
    at_term = {int(p): int(f, 8) for p, f in AT_TERM.findall(log)}
    for pid, flags in at_term.items():
        mode = modes[pid][0]
        assert bool(flags & O_NONBLOCK_FLAG) == (mode == "nonblock"), (
            f"pid {pid} ({mode}) saw flags {flags:o} on its paused listener\n{log}")
    for p, n in EAGAIN.findall(log):
        if modes[int(p)][0] == "block":
            assert int(n) == 0, f"blocking pid {p} spun on EAGAIN {n} times\n{log}"


@pytest.mark.root
@pytest.mark.parametrize("first,second", [("nonblock", "block"), ("block", "nonblock")])
def test_each_generation_keeps_its_blocking_mode_across_reloads(
        first: str, second: str, procs: Procs, tmp_path: Path) -> None:
    h, target, mode_file = _start(procs, tmp_path, first, "--drain-signal", "TERM")
    order = [first, second, first, second]
    with Load(target, fresh=2, keepalive=1, persistent=2) as load:
        time.sleep(0.5)
        for i, mode in enumerate(order[1:]):
            old = set(generations(h)[max(generations(h))])
            mode_file.write_text(mode)
            r = h.reload()
            assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{h.log()}"
            new = generations(h)[max(generations(h))]
            modes = _started(h, i + 2)
            for pid in new:
                assert modes[pid][0] == mode, h.log()
                assert _nonblock(pid, modes[pid][1]) == (mode == "nonblock"), (
                    f"reload {i + 1}: the new generation's own view")
            t0 = time.monotonic()
            left = wait_gone(old, DRAINED_WITHIN)
            assert not left, (f"reload {i + 1}: the old generation {sorted(left)} still "
                              f"drains after {DRAINED_WITHIN} s\n{h.log()}")
            assert time.monotonic() - t0 < DRAINED_WITHIN
            time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary() + h.log()
    assert load.result.persistent_ok > 20, load.result.summary()
    assert len(load.result.pids) == len(order), load.result.summary()
    modes = _started(h, len(order))
    retired = [p for p in modes if p not in h.descendants()]
    assert len(retired) == len(order) - 1
    assert set(map(int, (p for p, _ in AT_TERM.findall(h.log())))) == set(retired), h.log()
    _check_views_at_term(h, modes)
    stop_gracefully(h)


@pytest.mark.root
@pytest.mark.parametrize("first,second", [("nonblock", "block"), ("block", "nonblock")])
def test_a_rollback_gives_the_old_generation_its_own_blocking_mode_back(
        first: str, second: str, procs: Procs, tmp_path: Path) -> None:
    h, target, mode_file = _start(procs, tmp_path, first, "--ready", "http:/healthz",
                                  "--ready-timeout", "2", "--drain-signal", "TERM")
    ((pid, (_, fd)),) = _started(h, 1).items()
    assert _nonblock(pid, fd) == (first == "nonblock")
    with Load(target, fresh=2, keepalive=1, persistent=2) as load:
        time.sleep(0.5)
        for i in range(2):
            mode_file.write_text(f"{second} sick")
            r = h.reload()
            assert r.returncode == 1 and "rolled back" in r.stderr, r.stderr + h.log()
            assert _nonblock(pid, fd) == (first == "nonblock"), (
                f"rollback {i + 1}: the old generation's listener is back in its own mode")
            for _ in range(10):
                status, body = http_get(target, "/pid", timeout=10)
                assert status == 200 and int(body) == pid, (i, body)
            time.sleep(1.0)  # the old generation serves on, its persistent clients too
    assert load.result.failed == 0, load.result.summary() + h.log()
    assert load.result.persistent_ok > 20, load.result.summary()
    failed = [p for p in _started(h, 3) if p != pid]
    assert len(failed) == 2
    assert not wait_gone(set(failed), 15), "the generations that failed are stopped"
    _check_views_at_term(h, _started(h))
    stop_gracefully(h)


@pytest.mark.root
@pytest.mark.parametrize("first,second", [("nonblock", "block"), ("block", "nonblock")])
def test_exec_mode_gives_each_image_its_own_blocking_mode(
        first: str, second: str, procs: Procs, tmp_path: Path) -> None:
    """Exec mode: one process, a different mode in each image.  The paused image's
    stand-in has its mode (it drains on it: a blocking acceptor that saw EAGAIN
    would spin, an event loop given a blocking one would sleep in accept()), and
    the image exec'd in its place gets the held socket in the mode it asked for."""
    h, target, mode_file = _start(procs, tmp_path, first, "--exec", "--drain-signal", "TERM")
    ((pid, (_, fd)),) = _started(h, 1).items()
    (held,) = [ino for ino, at in socket_inodes(pid).items() if at == fd]
    order = [first, second, first, second]
    with Load(target, fresh=2, keepalive=1, persistent=2) as load:
        time.sleep(0.5)
        for i, mode in enumerate(order[1:]):
            mode_file.write_text(mode)
            r = h.reload()
            assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{h.log()}"
            lines = _start_lines(h, i + 2)
            p, seen_mode, seen_fd = lines[i + 1]
            assert (int(p), seen_mode) == (pid, mode), "the same process, the new image's mode"
            assert _nonblock(pid, int(seen_fd)) == (mode == "nonblock"), (
                f"reload {i + 1}: the new image's own view of the held socket")
            assert socket_inodes(pid).get(held) == int(seen_fd), "the very socket of image 1"
            time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary() + h.log()
    assert load.result.persistent_ok > 20, load.result.summary()
    assert load.result.pids == {pid}, load.result.summary()
    log = h.log()
    at_term = [int(f, 8) for p, f in AT_TERM.findall(log) if int(p) == pid]
    assert len(at_term) == len(order) - 1, log
    for image, flags in zip(order, at_term, strict=False):
        assert bool(flags & O_NONBLOCK_FLAG) == (image == "nonblock"), (
            f"an image in {image} mode saw flags {flags:o} on its paused listener\n{log}")
    eagain = [n for p, n in EAGAIN.findall(log) if int(p) == pid]
    assert len(eagain) == len(order) - 1, f"each paused image's count\n{log}"
    for image, n in zip(order, eagain, strict=False):
        if image == "block":
            assert int(n) == 0, f"a blocking image spun on EAGAIN {n} times\n{log}"
    stop_gracefully(h)


def _start_lines(h: HuptProcess, count: int) -> list[tuple[str, str, str]]:
    """The first ``count`` start lines, in order (exec mode: one PID, a line per image)."""
    def seen() -> list[tuple[str, str, str]] | None:
        lines: list[tuple[str, str, str]] = STARTED.findall(h.log())
        return lines if len(lines) >= count else None
    return wait_for(f"{count} images' start lines", seen, 20, proc=h)
