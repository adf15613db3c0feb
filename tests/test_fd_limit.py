"""File descriptors and the control socket (issue 13): at the limit of open files
hupt stops accepting control clients, says so once, never busy-loops, and
accepts again by itself; idle clients are hung up on; the processes hupt
starts get back the soft limit it raised for itself.

The endpoint runs on a real loop and a real listening socket in a private
runtime directory, with a clock of the test's; accept() fails on demand."""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import math
import os
import resource
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hupt import control, endpoint, fdlimit, log
from hupt.command import Change
from hupt.endpoint import ACCEPT_RETRY, IDLE_TIMEOUT, ControlEndpoint
from hupt.loop import Loop
from hupt.upgrade import Waiter

WARNING = "out of file descriptors: not accepting control connections"
AGAIN = "accepting control connections again"
CLIENT_FDS = 500


class Commands:
    def __init__(self) -> None:
        self.waiters: list[Waiter] = []
        self.status_doc: dict[str, Any] = {}

    def request_reload(self, waiter: Waiter | None = None, *,
                       change: Change | None = None, wait_old: bool = False) -> None:
        assert waiter is not None
        self.waiters.append(waiter)

    def send_signal(self, sig: int, *,
                    every: bool = False) -> tuple[bool, str, list[dict[str, Any]]]:
        return False, "no generation serves", []

    def request_stop(self, *, now: bool = False, waiter: Waiter | None = None) -> None:
        pass

    def end_draining(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return dict(self.status_doc)

    def generations(self) -> list[dict[str, Any]]:
        return []


class Rig:
    """An open endpoint, its loop and clock, clients, and an accept() that can fail."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.now = 1000.0
        self.loop = Loop(lambda: self.now, strict=True)
        # The loop waits on the test's clock, which stands still unless advanced:
        # a step never waits for more than a moment.
        self.wait = self.loop.timeout
        self.loop.timeout = lambda: min(self.wait(), 0.2)  # type: ignore[method-assign]
        self.commands = Commands()
        self.ep = ControlEndpoint(self.loop, self.commands)
        self.ep.open()
        assert self.ep._server is not None
        self.server = self.ep._server
        self.path = self.server.path
        self.failing: int | None = None  # the errno accept() fails with
        self.failures = math.inf  # ... this many times
        self.accepts = 0
        real = self.server.accept

        def accept() -> socket.socket | None:
            self.accepts += 1
            if self.failing is not None and self.failures > 0:
                self.failures -= 1
                raise OSError(self.failing, os.strerror(self.failing))
            return real()

        self.server.accept = accept  # type: ignore[method-assign]
        self.clients: list[socket.socket] = []

    def connect(self, n: int = 1) -> list[socket.socket]:
        new = []
        for _ in range(n):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(self.path)  # completes in the backlog: hupt need not accept yet
            # Clients and hupt share this process's fd table: the clients' fds go
            # high, so that closing one frees no number hupt would be given.
            low = c.detach()
            c = socket.socket(fileno=fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, CLIENT_FDS))
            os.close(low)
            c.settimeout(5)
            new.append(c)
        self.clients += new
        return new

    def step(self) -> None:
        self.loop.step()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.loop.step()

    def listening(self) -> bool:
        return self.loop.handler(self.server.fileno()) is not None

    def peers(self) -> int:
        return len(self.ep._peers)

    def log(self) -> str:
        return self.capsys.readouterr().err

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.ep.close()
        self.loop.close()


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Rig]:
    d = Path(f"/tmp/hupt-t{os.getpid()}-{os.urandom(3).hex()}")  # short: a socket path
    d.mkdir(mode=0o700)
    monkeypatch.setattr(control, "runtime_dir", lambda uid=None: str(d))
    log.configure(color=False)
    # Descriptors of earlier tests' garbage (a supervisor's epoll fd in a reference
    # cycle) would otherwise be closed whenever the collector runs, mid-test,
    # opening holes in the table these tests count on.
    gc.collect()
    r = Rig(capsys)
    yield r
    r.close()
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def ask(c: socket.socket, cmd: str) -> None:
    c.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")


def answer(c: socket.socket) -> list[dict[str, Any]]:
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


# -- at the limit: EMFILE, ENFILE ------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENFILE])
def test_at_the_limit_hupt_stops_accepting_says_so_once_and_recovers(rig: Rig, err: int) -> None:
    rig.failing = err
    rig.connect(3)
    rig.step()
    assert rig.accepts == 1, "one failed accept(), not one per waiting client"
    assert not rig.listening(), "a listening socket left in the selector wakes it for ever"
    assert rig.wait() == pytest.approx(ACCEPT_RETRY)
    out = rig.log()
    assert out.count(WARNING) == 1 and "Traceback" not in out, out
    assert os.strerror(err) in out

    for _ in range(20):  # still at the limit: one accept() per retry, nothing said
        rig.advance(ACCEPT_RETRY)
        assert not rig.listening()
    assert rig.accepts == 21
    assert rig.log() == ""

    rig.failing = None
    rig.advance(ACCEPT_RETRY)
    assert rig.listening() and rig.peers() == 3
    assert rig.log().count(AGAIN) == 1
    for c in rig.clients:
        ask(c, "ping")
    rig.step()
    assert rig.peers() == 0
    assert all(answer(c)[0]["reason"] == "pong" for c in rig.clients)


def test_a_client_going_away_is_a_retry_at_once(rig: Rig) -> None:
    [first] = rig.connect()
    rig.step()
    assert rig.peers() == 1
    rig.failing = errno.EMFILE
    [waiting] = rig.connect()
    rig.step()
    assert not rig.listening()
    rig.failing = None
    first.close()  # an fd of hupt's is free once it has seen this
    rig.step()
    assert rig.peers() == 1 and rig.listening(), "accepted without waiting for the retry"
    ask(waiting, "ping")
    rig.step()
    assert answer(waiting)[0]["reason"] == "pong"


def test_a_client_that_aborts_before_accept_is_no_limit(rig: Rig) -> None:
    rig.failing, rig.failures = errno.ECONNABORTED, 1
    rig.connect()
    rig.step()
    assert rig.listening() and rig.peers() == 1 and WARNING not in rig.log()


# -- the reserve: clients never take the last fds hupt needs -------------------------------


def test_clients_stop_short_of_the_fds_kept_for_supervising(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    clients = rig.connect(8)
    # Six clients fit below the reserve of 2: fds are handed out lowest first,
    # and the table may have holes.  Earlier tests' loops that nobody closed
    # (their selectors' fds) go now, not in the middle of the count.
    gc.collect()
    probes = [os.dup(0) for _ in range(6)]
    sixth = probes[-1]
    for fd in probes:
        os.close(fd)
    monkeypatch.setattr(endpoint, "RESERVE", 2)
    monkeypatch.setattr(fdlimit, "soft_limit", lambda: sixth + 1 + 2)
    rig.step()
    assert rig.peers() == 6 and not rig.listening()
    out = rig.log()
    assert out.count(WARNING) == 1, out
    assert "6 control connections open, the last 2 of" in out
    rig.advance(ACCEPT_RETRY)  # nothing freed: nothing accepted
    assert rig.peers() == 6 and not rig.listening()

    clients[0].close()  # one goes, one of the waiting comes in; still no news
    rig.step()
    assert rig.peers() == 6 and not rig.listening() and rig.log() == ""

    for c in clients[1:5]:
        c.close()
    rig.step()
    assert rig.peers() == 3 and rig.listening()  # the last one waiting came in
    # Every client waiting is in, but the table is about as full as it was: no
    # news either way (fds coming and going one at a time must not make a
    # warning and a recovery of each).
    assert rig.log() == ""
    rig.connect(3)
    rig.step()
    assert rig.peers() == 6 and not rig.listening() and rig.log() == ""

    monkeypatch.setattr(fdlimit, "soft_limit", lambda: 10_000)  # room now
    rig.advance(ACCEPT_RETRY)
    assert rig.peers() == 6 and rig.listening()
    assert rig.log().count(AGAIN) == 1


def test_the_first_clients_are_let_in_whatever_the_count(rig: Rig,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """hupt's own fds may fill the table: it must stay controllable."""
    monkeypatch.setattr(fdlimit, "soft_limit", lambda: 8)  # every free fd is in the reserve
    rig.connect(6)
    rig.step()
    assert rig.peers() == endpoint.ALWAYS_ADMITTED and not rig.listening()
    assert rig.log().count(WARNING) == 1


# -- idle clients ------------------------------------------------------------------------


def test_a_client_that_sends_nothing_is_answered_and_hung_up_on(rig: Rig) -> None:
    [idle] = rig.connect()
    rig.step()
    assert rig.wait() == pytest.approx(IDLE_TIMEOUT)
    rig.advance(IDLE_TIMEOUT - 0.5)
    assert rig.peers() == 1
    rig.advance(0.5)
    assert rig.peers() == 0
    [msg] = answer(idle)
    assert msg == {"event": "result", "ok": False,
                   "reason": f"no request within {IDLE_TIMEOUT:g} s"}
    assert rig.wait() > IDLE_TIMEOUT, "nothing left to time"


def test_a_request_dribbled_in_gets_no_more_time(rig: Rig) -> None:
    [c] = rig.connect()
    rig.step()
    for byte in b'{"cmd": "sta':  # a byte every half second, never a whole line
        rig.now += 0.5
        c.send(bytes([byte]))
        rig.step()
    assert rig.peers() == 1
    rig.advance(1000.0 + IDLE_TIMEOUT - rig.now)
    assert rig.peers() == 0
    assert answer(c)[-1]["reason"] == f"no request within {IDLE_TIMEOUT:g} s"


def test_a_client_waiting_for_its_reload_is_not_idle(rig: Rig) -> None:
    [c] = rig.connect()
    rig.step()
    ask(c, "reload")
    rig.step()
    [waiter] = rig.commands.waiters
    rig.advance(10 * IDLE_TIMEOUT)  # a reload can take minutes (drains)
    assert rig.peers() == 1
    waiter.done(True, "reloaded")
    rig.step()
    assert rig.peers() == 0 and answer(c)[-1]["reason"] == "reloaded"


def test_an_answer_left_unread_is_dropped_after_the_timeout(rig: Rig) -> None:
    rig.commands.status_doc = {"pad": "x" * (8 << 20)}  # more than the socket buffers
    [c] = rig.connect()
    rig.step()
    rig.advance(IDLE_TIMEOUT - 1)  # it asks at the last moment: the answer gets its own time
    ask(c, "status")
    rig.step()
    assert rig.peers() == 1
    rig.advance(IDLE_TIMEOUT - 0.5)
    assert rig.peers() == 1
    rig.advance(0.5)
    assert rig.peers() == 0


def test_an_answer_larger_than_the_socket_buffer_is_delivered_whole(rig: Rig) -> None:
    rig.commands.status_doc = {"pad": "x" * (4 << 20)}
    [c] = rig.connect()
    rig.step()
    ask(c, "status")
    got: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: got.extend(answer(c)))
    reader.start()
    for _ in range(50):
        if not rig.peers():
            break
        rig.step()
    reader.join(10)
    assert rig.peers() == 0 and len(got[0]["status"]["pad"]) == 4 << 20


# -- the soft limit: raised for hupt, set back for what it starts ----------------------------

CHILD = textwrap.dedent("""
    import os, resource, sys
    from hupt import fdlimit
    from hupt.hooks import Hook

    fdlimit.raise_own()
    fdlimit.raise_own()  # twice: still the limit hupt was started with for its children
    print(*resource.getrlimit(resource.RLIMIT_NOFILE))
    hook = Hook("before-reload", "ulimit -Sn; ulimit -Hn")
    hook.start(dict(os.environ))
    os.waitpid(hook.pid, 0)
    hook.read()
    print(*hook.output.decode().split())
""")


def test_hupt_raises_its_soft_limit_and_its_children_start_with_the_old_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 64 or hard == resource.RLIM_INFINITY:
        pytest.skip(f"needs a finite hard limit of open files of 64 or more (is {hard})")
    low = min(soft, hard // 2)
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                       timeout=30, cwd=Path(__file__).resolve().parent.parent,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                             (low, hard)))
    assert r.returncode == 0, r.stderr
    own, child = r.stdout.splitlines()
    assert own.split() == [str(fdlimit._ceiling(hard)), str(hard)]
    assert child.split() == [str(low), str(hard)]
