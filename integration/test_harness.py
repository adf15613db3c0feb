"""The harness proven against bare servers (no hupt): it must see a working server
as working, and a broken one as broken, before it may judge hupt.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    PT_DYNAMIC,
    PT_INTERP,
    Background,
    Procs,
    Started,
    alive,
    descendants,
    elf_segment_types,
    free_port,
    go_cmd,
    http_get,
    http_server_cmd,
    kill_tree,
    listener_inode,
    listener_inodes,
    node_cmd,
    settle,
    socket_inodes,
    spawn_server,
    threaded_cmd,
    unix_cmd,
    wait_for,
    wait_gone,
    wait_listening,
)
from load import (
    HeldRequest,
    Load,
    LoadResult,
    RequestFailed,
    SlowRequest,
    Target,
    server_accepted,
)

from hupt.tracer.abi import SYS

SERVER_KINDS = [
    "go-v4", "go-v6", "go-unix",
    "node-v4", "node-v6", "node-unix",
    "threaded-v4", "threaded-v6", "threaded-unix",
    "unix_server",
]


def start_server(kind: str, request: pytest.FixtureRequest, procs: Procs,
                 sock_dir: Path) -> tuple[Started, Target]:
    program, _, family = kind.partition("-")
    target: Target
    if family == "v4":
        target = ("127.0.0.1", free_port("127.0.0.1"))
    elif family == "v6":
        target = ("::1", free_port("::1"))
    else:
        target = str(sock_dir / f"{program}.sock")
    if program == "go":
        cmd = go_cmd(request.getfixturevalue("go_server"), target)
    elif program == "node":
        cmd = node_cmd(target)
    elif program == "threaded":
        cmd = threaded_cmd(target)
    else:
        assert isinstance(target, str)
        cmd = unix_cmd(target)
    return spawn_server(procs, cmd, target, name=kind, env={"HUPT_TEST_TAG": kind}), target


def run_load(load: Load, seconds: float) -> LoadResult:
    with load:
        time.sleep(seconds)
    return load.result


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_server_answers_routes_and_load(kind: str, request: pytest.FixtureRequest,
                                        procs: Procs, short_tmp: Path) -> None:
    server, target = start_server(kind, request, procs, short_tmp)
    ok_body = f"ok pid={server.pid} tag={kind}\n"
    assert http_get(target, "/") == (200, ok_body)
    assert http_get(target, "/pid") == (200, f"{server.pid}\n")
    assert http_get(target, "/nope")[0] == 404
    t0 = time.monotonic()
    assert http_get(target, "/slow?ms=300") == (200, ok_body)
    assert time.monotonic() - t0 >= 0.3

    inode = listener_inode(target[1] if isinstance(target, tuple) else target)
    assert inode is not None
    assert listener_inodes(server.pid) == {inode}

    load = Load(target, fresh=2, keepalive=2, conn_requests=5)
    result = run_load(load, 0.8)
    assert result.failed == 0, result.summary()
    assert result.ok > 20, result.summary()
    assert result.responses == {f"tag={kind} pid={server.pid}": result.ok}
    assert result.pids == {server.pid}
    # The default rate cap (200 req/s in total) holds.
    assert result.ok <= 200 * result.duration + 4, result.summary()

    assert server.stop(10.0) == 0, server.log()
    if kind == "unix_server":
        assert not Path(str(target)).exists(), "unix_server unlinks its socket at exit"


def test_stock_http_server_http10(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    server = procs.spawn(http_server_cmd(port, directory=tmp_path), name="http.server")
    target = ("127.0.0.1", port)
    wait_listening(target, 10.0, server)
    status, body = http_get(target, "/")
    assert status == 200 and "Directory listing" in body
    # HTTP/1.0 closes after each response: keep-alive clients reconnect without a "retry".
    result = run_load(Load(target, fresh=1, keepalive=2), 0.8)
    assert result.failed == 0, result.summary()
    assert result.keepalive_retries == 0, result.summary()
    assert result.ok > 20 and result.responses == {"other": result.ok}


def test_threaded_server_threads_block_in_accept(procs: Procs) -> None:
    target = ("127.0.0.1", free_port())
    server = procs.spawn(threaded_cmd(target, threads=4), name="threaded")
    wait_listening(target, 10.0, server)
    (listener_fd,) = [fd for inode, fd in socket_inodes(server.pid).items()
                      if inode in listener_inodes(server.pid)]

    def in_accept() -> int:
        n = 0
        for task in Path(f"/proc/{server.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                fields = (task / "syscall").read_text().split()
                if fields[0] == str(int(SYS.accept4)) and int(fields[1], 16) == listener_fd:
                    n += 1
        return n

    deadline = time.monotonic() + 5.0
    while in_accept() < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_accept() == 4


def test_load_fails_when_server_killed(procs: Procs) -> None:
    target = ("127.0.0.1", free_port())
    server = procs.spawn(threaded_cmd(target), name="threaded")
    wait_listening(target, 10.0, server)
    load = Load(target, fresh=2, keepalive=2, timeout=2.0).start()
    deadline = time.monotonic() + 5.0
    while load.snapshot()[0] < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.signal(signal.SIGKILL)
    time.sleep(0.5)
    t0 = time.monotonic()
    result = load.stop()
    assert time.monotonic() - t0 < 2.0 + 2.0
    assert result.ok >= 20, result.summary()
    assert result.failed > 0, result.summary()
    assert {kind for _, kind, _ in result.failures} <= {"refused", "reset", "eof"}
    assert "refused" in {kind for _, kind, _ in result.failures}


# -- scripted in-process servers for the keep-alive retry rules -------------------------------

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"


def read_request(conn: socket.socket) -> bool:
    """Read one request head; False at EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            return False
        buf += chunk
    return True


def reset(conn: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


class ScriptedServer:
    """Loopback server running handler(conn, connection_index) per connection, in threads."""

    def __init__(self, handler: Callable[[socket.socket, int], None]) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.target = ("127.0.0.1", self.sock.getsockname()[1])
        self.count = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(2.0)
        self.sock.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5.0)
            self.count += 1
            threading.Thread(target=self._serve, args=(conn, self.count), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        try:
            self.handler(conn, index)
        except OSError:
            pass
        finally:
            conn.close()


def kinds(events: list[tuple[float, str, str]]) -> set[str]:
    return {kind for _, kind, _ in events}


def test_retry_when_idle_connection_closed_before_send() -> None:
    def answer_then_idle_close(conn: socket.socket, index: int) -> None:
        if read_request(conn):
            conn.sendall(OK_RESPONSE)
            time.sleep(0.1)

    with ScriptedServer(answer_then_idle_close) as server:
        result = run_load(Load(server.target, fresh=0, keepalive=1, max_rate=4), 1.2)
    assert result.failed == 0, result.summary()
    assert result.keepalive_retries >= 2, result.summary()
    assert kinds(result.retry_events) == {"closed-before-send"}


@pytest.mark.parametrize("close", ["eof", "reset"])
def test_retry_when_reused_connection_dies_before_status_line(close: str) -> None:
    def answer_first_only(conn: socket.socket, index: int) -> None:
        if read_request(conn):
            conn.sendall(OK_RESPONSE)
        if read_request(conn) and close == "reset":
            reset(conn)

    with ScriptedServer(answer_first_only) as server:
        result = run_load(Load(server.target, fresh=0, keepalive=1, max_rate=40), 0.6)
    assert result.failed == 0, result.summary()
    assert result.keepalive_retries > 3 and result.ok > 3, result.summary()
    assert kinds(result.retry_events) == {close}


def test_no_retry_on_fresh_connection() -> None:
    def close_after_request(conn: socket.socket, index: int) -> None:
        read_request(conn)

    with ScriptedServer(close_after_request) as server:
        result = run_load(Load(server.target, fresh=1, keepalive=1, max_rate=40), 0.5)
    assert result.ok == 0 and result.keepalive_retries == 0, result.summary()
    assert result.failed > 3 and kinds(result.failures) == {"eof"}, result.summary()


def test_no_retry_after_partial_response() -> None:
    def half_answer_second(conn: socket.socket, index: int) -> None:
        if read_request(conn):
            conn.sendall(OK_RESPONSE)
        if read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\n")

    with ScriptedServer(half_answer_second) as server:
        result = run_load(Load(server.target, fresh=0, keepalive=1, max_rate=40), 0.5)
    assert result.keepalive_retries == 0, result.summary()
    assert result.failed > 3 and kinds(result.failures) == {"eof"}, result.summary()


def test_retry_only_once() -> None:
    def answer_very_first_request(conn: socket.socket, index: int) -> None:
        if read_request(conn) and index == 1:
            conn.sendall(OK_RESPONSE)
            read_request(conn)

    with ScriptedServer(answer_very_first_request) as server:
        result = run_load(Load(server.target, fresh=0, keepalive=1, max_rate=40), 0.5)
    assert result.ok == 1 and result.keepalive_retries == 1, result.summary()
    assert result.failed > 3, result.summary()


def test_bad_status_is_a_failure() -> None:
    def unavailable(conn: socket.socket, index: int) -> None:
        while read_request(conn):
            conn.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 5\r\n\r\nbusy\n")

    with ScriptedServer(unavailable) as server:
        result = run_load(Load(server.target, fresh=1, keepalive=1, max_rate=40), 0.4)
    assert result.ok == 0 and result.failed > 3 and kinds(result.failures) == {"status"}


def test_stop_is_bounded_when_server_never_answers() -> None:
    def hold(conn: socket.socket, index: int) -> None:
        read_request(conn)
        time.sleep(4.0)

    with ScriptedServer(hold) as server:
        load = Load(server.target, fresh=1, keepalive=1, timeout=1.0).start()
        time.sleep(0.3)
        t0 = time.monotonic()
        result = load.stop()
        assert time.monotonic() - t0 < 1.0 + 2.0
    assert result.ok == 0 and result.failed == 2 and kinds(result.failures) == {"timeout"}


# -- persistent clients: one connection held, reconnecting only when the server closed it --------


def answer(body: bytes = b"ok pid=4242 tag=scripted\n", close: bool = False) -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n").encode() + body


def persistent_load(target: Target, clients: int = 1, max_rate: float = 40) -> Load:
    return Load(target, fresh=0, keepalive=0, persistent=clients, max_rate=max_rate)


def test_persistent_clients_hold_one_connection_each() -> None:
    def keep_answering(conn: socket.socket, index: int) -> None:
        while read_request(conn):
            conn.sendall(answer())

    with ScriptedServer(keep_answering) as server:
        load = persistent_load(server.target, clients=2).start()
        wait_for("answers", lambda: load.so_far().persistent_ok >= 4, 5.0)
        time.sleep(0.3)
        result = load.stop()
        assert server.count == 2, "one connection per client, never another"
    assert result.failed == 0 and result.persistent_failed == 0, result.summary()
    assert result.persistent_retries == 0 and result.persistent_reconnects == 0
    assert len(result.persistent) == 2 and all(p.ok > 4 for p in result.persistent)
    assert result.ok == result.persistent_ok
    assert {pid for _, pid in result.persistent_answers} == {4242}
    assert result.pids == {4242}
    times = [t for t, _ in result.persistent_answers]
    assert result.started < times[0] and times[-1] <= result.stopped
    assert all(p.old_answers(result.started, 4242) == 0 for p in result.persistent)
    assert result.persistent[0].answers_after(times[-1]) == []


def test_persistent_client_reconnects_after_connection_close() -> None:
    def close_every_third(conn: socket.socket, index: int) -> None:
        for i in range(3):
            if not read_request(conn):
                return
            conn.sendall(answer(close=i == 2))

    with ScriptedServer(close_every_third) as server:
        result = run_load(persistent_load(server.target), 0.6)
        connections = server.count
    assert result.failed == 0, result.summary()
    assert result.persistent_retries == 0, result.summary()
    # Counted when the server closed it; a new one is opened for the next request.
    assert connections - 1 <= result.persistent_reconnects <= connections, result.summary()
    assert result.persistent_reconnects >= 3 and result.persistent_ok > 9, result.summary()


def test_persistent_client_reconnects_when_the_idle_connection_was_closed() -> None:
    def answer_then_idle_close(conn: socket.socket, index: int) -> None:
        if read_request(conn):
            conn.sendall(answer())
            time.sleep(0.1)

    with ScriptedServer(answer_then_idle_close) as server:
        result = run_load(persistent_load(server.target, max_rate=4), 1.2)
    assert result.failed == 0, result.summary()
    assert result.persistent_retries == 0 and result.keepalive_retries == 0, result.summary()
    assert result.persistent_reconnects >= 2, result.summary()


@pytest.mark.parametrize("close", ["eof", "reset"])
def test_persistent_client_retries_when_nothing_of_the_answer_came(close: str) -> None:
    def answer_first_only(conn: socket.socket, index: int) -> None:
        if read_request(conn):
            conn.sendall(answer())
        if read_request(conn) and close == "reset":
            reset(conn)

    with ScriptedServer(answer_first_only) as server:
        result = run_load(persistent_load(server.target), 0.6)
    assert result.failed == 0, result.summary()
    assert result.persistent_retries > 3 and result.persistent_ok > 3, result.summary()
    assert result.persistent_reconnects == result.persistent_retries, result.summary()
    assert result.keepalive_retries == 0, result.summary()
    assert kinds(result.retry_events) == {close}


def test_persistent_client_fails_on_a_partial_answer() -> None:
    def half_answer_second(conn: socket.socket, index: int) -> None:
        if read_request(conn):
            conn.sendall(answer())
        if read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\n")

    with ScriptedServer(half_answer_second) as server:
        result = run_load(persistent_load(server.target), 0.5)
    assert result.persistent_retries == 0, result.summary()
    assert result.failed > 3 and result.persistent_failed == result.failed, result.summary()
    assert kinds(result.failures) == {"eof"}, result.summary()
    assert all("persistent client 0" in error for _, _, error in result.failures)


def test_persistent_client_timeout_is_a_failure() -> None:
    def hold(conn: socket.socket, index: int) -> None:
        read_request(conn)
        time.sleep(3.0)

    with ScriptedServer(hold) as server:
        load = Load(server.target, fresh=0, keepalive=0, persistent=1, timeout=1.0).start()
        time.sleep(0.3)
        t0 = time.monotonic()
        result = load.stop()
        assert time.monotonic() - t0 < 1.0 + 2.0
    assert result.ok == 0 and result.failed == 1 and result.persistent_failed == 1
    assert kinds(result.failures) == {"timeout"}


def test_longest_wait_is_the_slowest_answer_of_any_client() -> None:
    delays = iter([0.0, 0.6] + [0.0] * 1000)

    def answer_one_late(conn: socket.socket, index: int) -> None:
        while read_request(conn):
            time.sleep(next(delays))
            conn.sendall(answer())

    with ScriptedServer(answer_one_late) as server:
        result = run_load(Load(server.target, fresh=1, keepalive=1, persistent=1,
                               max_rate=30), 1.2)
    assert result.failed == 0, result.summary()
    assert 0.6 <= result.longest_wait < 1.5, result.summary()
    assert result.started < result.longest_wait_at <= result.stopped
    assert "longest wait" in result.summary()


def test_persistent_pause_is_the_wait_between_requests() -> None:
    gaps: list[float] = []

    def timed(conn: socket.socket, index: int) -> None:
        last = None
        while read_request(conn):
            if last is not None:
                gaps.append(time.monotonic() - last)
            conn.sendall(answer())
            last = time.monotonic()

    with ScriptedServer(timed) as server:
        # max_rate alone would pace it at 10 ms.
        result = run_load(Load(server.target, fresh=0, keepalive=0, persistent=1,
                               persistent_pause=0.2, max_rate=100), 1.1)
    assert result.failed == 0 and 3 <= result.persistent_ok <= 7, result.summary()
    assert gaps and min(gaps) >= 0.19, gaps


# -- slow requests ------------------------------------------------------------------------


def test_slow_request_holds_a_request_in_flight(procs: Procs, tmp_path: Path) -> None:
    stock = ("127.0.0.1", free_port())
    http_server = procs.spawn(http_server_cmd(stock[1], directory=tmp_path), name="http.server")
    single = ("127.0.0.1", free_port())
    threaded = procs.spawn(threaded_cmd(single, threads=1), name="threaded")
    wait_listening(stock, 10.0, http_server)
    wait_listening(single, 10.0, threaded)
    slow_stock = SlowRequest(stock, 3.0).start()
    slow_single = SlowRequest(single, 3.0).start()
    slow_stock.wait_accepted()
    slow_single.wait_accepted()
    # The one-thread server is busy inside the slow request: nobody accepts another.
    with pytest.raises(RequestFailed) as busy:
        http_get(single, "/", timeout=1.0)
    assert busy.value.kind == "timeout"
    for slow in (slow_stock, slow_single):
        status, elapsed = slow.result()
        assert status == 200
        assert 2.9 <= elapsed < 4.0


def test_held_request_is_in_flight_until_released(procs: Procs) -> None:
    single = ("127.0.0.1", free_port())
    threaded = procs.spawn(threaded_cmd(single, threads=1), name="threaded")
    wait_listening(single, 10.0, threaded)
    held = HeldRequest(single, interval=0.2).start()
    try:
        held.wait_accepted()
        assert server_accepted(single[1], held.client_port)
        time.sleep(1.0)  # several header lines trickled in: still one request in flight
        with pytest.raises(RequestFailed) as busy:
            http_get(single, "/", timeout=1.0)
        assert busy.value.kind == "timeout"
    finally:
        held.release()
    status, elapsed = held.result()
    assert status == 200 and elapsed >= 2.0, (status, elapsed)
    assert http_get(single, "/")[0] == 200


def test_held_request_never_released_ends_by_itself(procs: Procs) -> None:
    target = ("127.0.0.1", free_port())
    server = procs.spawn(threaded_cmd(target, threads=2), name="threaded")
    wait_listening(target, 10.0, server)
    held = HeldRequest(target, timeout=1.0).start()
    with pytest.raises(AssertionError, match="never released"):
        held.result()


def test_wait_for_and_settle() -> None:
    values = iter(range(100))
    assert wait_for("3", lambda: (v := next(values)) >= 3 and v, 5.0) == 3
    with pytest.raises(AssertionError, match=r"timed out after 0\.2s waiting for nothing"):
        wait_for("nothing", lambda: None, 0.2)
    assert settle(lambda: 7, 7, 0.1) == 7
    assert settle(lambda: 8, 7, 0.1) == 8  # the last value, for the caller's assertion
    assert settle(lambda: 8, lambda v: v > 7, 0.1) == 8

    def five() -> int:
        time.sleep(0.3)
        return 5

    job = Background(five)
    assert not job.done()
    assert job.result(5.0) == 5 and job.done()


# -- the harness's own process handling ---------------------------------------------------


def test_go_binary_is_static(go_server: Path) -> None:
    segments = elf_segment_types(go_server)
    assert PT_INTERP not in segments and PT_DYNAMIC not in segments
    # The check can fail: the Python interpreter is dynamically linked.
    assert PT_INTERP in elf_segment_types(Path(sys.executable).resolve())


def test_descendants_and_kill_tree(procs: Procs) -> None:
    shell = procs.spawn(["sh", "-c", "sleep 30 & (sleep 30 & wait) & wait"], name="tree")
    deadline = time.monotonic() + 5.0
    while len(tree := descendants(shell.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(tree) == 3, tree  # sleep, subshell, the subshell's sleep
    killed = kill_tree(shell.pid)
    assert killed == tree | {shell.pid}
    assert wait_gone(killed, 5.0) == set()
    with pytest.raises(ValueError):
        kill_tree(1)


def test_procs_fails_on_leftovers(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    shell = procs.spawn(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], name="orphan")
    assert shell.popen.wait(5) == 0
    orphan = int(shell.out.read_text())
    assert alive(orphan) and orphan not in descendants(shell.pid)
    stubborn = procs.spawn([sys.executable, "-c",
                            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                            " print('ready', flush=True); time.sleep(30)"], name="stubborn")
    deadline = time.monotonic() + 5.0
    while "ready" not in stubborn.out.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    problems = procs.finish(term_timeout=0.5, grace=0.5)
    text = "\n".join(problems)
    assert "stubborn" in text and "ignored SIGTERM" in text
    assert f"{orphan}: sleep 30" in text
    assert not alive(orphan) and not alive(stubborn.pid)
    # A clean run reports nothing.
    assert Procs(tmp_path).finish() == []
