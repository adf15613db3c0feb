"""The generations' output through hupt (hupt/output.py) against the fake kernel seam:
prefixed lines, the stderr tail a failed reload reports, hupt's writes that never
block it, and a full destination that stops the reading instead of losing lines."""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hupt import cli, log, output
from hupt.address import AF_INET, Address
from hupt.output import Lines, Output, Sink
from hupt.supervisor import Options, Supervisor
from tests.fakes import FakeSystem
from tests.test_supervisor import Recorder

A = Address(AF_INET, "127.0.0.1", 8000)


class Detailed(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.details: dict[str, Any] = {}

    def add_details(self, details: dict[str, Any]) -> None:
        self.details.update(details)


class Dest:
    """hupt's stdout and stderr in a test: pipes the test reads."""

    def __init__(self) -> None:
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe()
        for fd in (self.out_r, self.err_r):
            os.set_blocking(fd, False)

    def read(self, fd: int) -> bytes:
        got = b""
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            got += chunk

    def out(self) -> str:
        return self.read(self.out_r).decode()

    def err(self) -> str:
        return self.read(self.err_r).decode()

    def close(self) -> None:
        for fd in (self.out_r, self.out_w, self.err_r, self.err_w):
            os.close(fd)


@pytest.fixture
def dest() -> Iterator[Dest]:
    d = Dest()
    yield d
    log.before_write(None)  # an Output bound to a loop and never closed
    d.close()


def make(fake: FakeSystem, dest: Dest, prefix: tuple[bool, bool] = (True, True),
         **kw: Any) -> Supervisor:
    out = Output(prefix, sinks=(dest.out_w, dest.err_w))
    sup = Supervisor(fake, Options(argv=["server"], env={}, **kw), control=False, output=out)
    sup.start()
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    return sup


def out_of(sup: Supervisor) -> Output:
    assert sup.output is not None
    return sup.output


# -- lines ------------------------------------------------------------------------------------


def test_lines_are_prefixed_and_a_partial_line_waits_for_its_end() -> None:
    lines = Lines()
    p = output.label(3)
    assert lines.feed(b"one\ntw", p) == (b"[gen 3] one\n", [b"one"])
    assert lines.feed(b"o\n\nthree", p) == (b"[gen 3] two\n[gen 3] \n", [b"two", b""])
    assert lines.end(p) == (b"[gen 3] three\n", [b"three"])
    assert lines.end(p) == (b"", [])


def test_a_line_longer_than_the_limit_is_written_and_continued_without_a_prefix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "MAX_LINE", 8)
    lines = Lines()
    p = b"> "
    assert lines.feed(b"0123456789", p)[0] == b"> 0123456789"
    assert lines.feed(b"ab\ncd\n", p)[0] == b"ab\n> cd\n"  # continued, then a new line
    assert lines.feed(b"0123456789", p)[0] == b"> 0123456789"
    assert lines.end(p)[0] == b"\n"  # the stream ends mid-line: the line is ended


# -- through the supervisor ---------------------------------------------------------------------


def test_each_generations_lines_carry_its_number(fake: FakeSystem, dest: Dest) -> None:
    sup = make(fake, dest)
    g1 = sup.gens[0]
    fake.write(g1.pid, 1, b"hello\n")
    fake.write(g1.pid, 2, b"warning: x\npart")
    out_of(sup).drain()
    sup.request_reload(Recorder())
    g2 = sup.gens[1]
    fake.write(g2.pid, 1, b"hello too\n")
    fake.write(g1.pid, 2, b"ial\n")  # the old generation, still draining, goes on
    out_of(sup).drain()
    assert dest.out() == "[gen 1] hello\n[gen 2] hello too\n"
    assert dest.err() == "[gen 1] warning: x\n[gen 1] partial\n"


def test_the_pipes_are_read_from_the_loop(fake: FakeSystem, dest: Dest) -> None:
    sup = make(fake, dest)
    fake.write(sup.gens[0].pid, 1, b"from the loop\n")
    stream = next(fd for fd, s in out_of(sup)._streams.items() if s.which == 1)
    handler = sup.loop.handler(stream)
    assert handler is not None
    handler(selectors.EVENT_READ)
    assert dest.out() == "[gen 1] from the loop\n"


def test_a_stream_that_is_a_terminal_is_not_piped(fake: FakeSystem, dest: Dest) -> None:
    sup = make(fake, dest, prefix=(False, True))
    assert fake.stdio[sup.gens[0].pid][0] is None  # stdout: hupt's own, inherited
    assert fake.stdio[sup.gens[0].pid][1] is not None
    assert out_of(sup).captures_stderr
    assert not Output((True, False), sinks=(dest.out_w, dest.err_w)).captures_stderr


def test_the_last_line_without_a_newline_is_written_at_the_exit(fake: FakeSystem,
                                                                dest: Dest) -> None:
    sup = make(fake, dest)
    fake.write(sup.gens[0].pid, 2, b"no newline at the end")
    fake.exit(1, 1)
    out_of(sup).drain()
    assert dest.err() == "[gen 1] no newline at the end\n"
    assert not out_of(sup)._streams, "the pipes of an exited generation are closed"


def test_a_failed_reload_carries_the_last_lines_of_stderr(fake: FakeSystem, dest: Dest) -> None:
    sup = make(fake, dest)
    w = Detailed()
    sup.request_reload(w)
    g2 = sup.gens[1]
    lines = [f"line {i}" for i in range(30)]
    fake.write(g2.pid, 2, ("\n".join(lines) + "\nError: " + "x" * 1000).encode())
    fake.write(g2.pid, 1, b"stdout is not in the tail\n")
    fake.exit(2, 3)
    fake.advance(1.5)
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert "exited (exit status 3) before it was ready" in w.result[1]
    err = w.details["stderr"]
    assert err["generation"] == 2 and err["pid"] == g2.pid
    assert len(err["lines"]) == output.TAIL_LINES
    assert err["lines"][:-1] == lines[-(output.TAIL_LINES - 1):]
    assert err["lines"][-1] == ("Error: " + "x" * 1000)[:output.TAIL_LINE_CHARS]
    assert "[gen 2] line 29\n" in dest.err()  # and it went through to hupt's stderr


def test_a_generation_not_ready_in_time_has_its_tail_too(fake: FakeSystem, dest: Dest) -> None:
    sup = make(fake, dest, ready_timeout=5.0)
    w = Detailed()
    sup.request_reload(w)
    fake.write(sup.gens[1].pid, 2, b"waiting for the database\n")
    fake.advance(6)
    sup.tick()
    assert w.result is not None and not w.result[0] and "not ready after 5 s" in w.result[1]
    assert w.details["stderr"]["lines"] == ["waiting for the database"]


def test_without_a_pipe_for_stderr_there_is_no_tail(fake: FakeSystem, dest: Dest) -> None:
    sup = make(fake, dest, prefix=(True, False))
    w = Detailed()
    sup.request_reload(w)
    fake.exit(2, 3)
    fake.advance(1.5)
    sup.tick()
    assert w.result is not None and not w.result[0] and "stderr" not in w.details


def test_exec_mode_labels_the_root_with_the_image_it_runs(fake: FakeSystem, dest: Dest) -> None:
    sup = make(fake, dest, exec_mode=True)
    root = sup.gens[0].pid
    fake.write(root, 1, b"v1\n")
    out_of(sup).drain()
    sup.request_reload(Recorder())
    sup.tick()  # nothing in flight: it execs
    assert sup.gens[-1].number == 2 and sup.gens[-1].pid == root
    fake.write(root, 1, b"v2\n")
    out_of(sup).drain()
    assert dest.out() == "[gen 1] v1\n[gen 2] v2\n"


def test_multi_copies_have_a_pipe_each(fake: FakeSystem, dest: Dest) -> None:
    sup = make(fake, dest, multi=2)
    fake.advance(1)
    sup.tick()  # the other copy starts once the first has listened
    g = sup.gens[0]
    a, b = g.copies
    fake.write(a, 1, b"half of a ")
    fake.write(b, 1, b"line of b\n")
    fake.write(a, 1, b"line\n")
    out_of(sup).drain()
    assert sorted(dest.out().splitlines()) == ["[gen 1] half of a line", "[gen 1] line of b"]


def test_a_full_destination_stops_the_reading_and_loses_nothing(
        fake: FakeSystem, dest: Dest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "SINK_HIGH", 256 * 1024)
    monkeypatch.setattr(output, "SINK_LOW", 64 * 1024)
    sup = make(fake, dest)
    out = out_of(sup)
    pid = sup.gens[0].pid
    stream = next(fd for fd, s in out._streams.items() if s.which == 1)
    line = b"x" * 1023 + b"\n"
    sent = 0
    while sup.loop.handler(stream) is not None:  # nobody reads hupt's stdout meanwhile
        fake.write(pid, 1, line * 64)
        sent += 64
        out.drain()
        assert sent < 2000, "never stopped reading"
    sink = out._sinks[1]
    assert len(sink.buf) > output.SINK_HIGH
    got = b""
    while sup.loop.handler(stream) is None:  # the reader catches up: hupt writes, then reads
        got += dest.read(dest.out_r)
        room = sup.loop.handler(sink.fileno())
        assert room is not None
        room(selectors.EVENT_WRITE)
    fake.exit(1)
    out.drain()
    while sink.buf:
        got += dest.read(dest.out_r)
        sink.flush()
    got += dest.read(dest.out_r)
    assert got == (b"[gen 1] " + line) * sent


def test_hupts_own_line_waits_for_the_servers_lines_before_it(fake: FakeSystem,
                                                             dest: Dest) -> None:
    sup = make(fake, dest)
    fcntl.fcntl(dest.err_w, fcntl.F_SETPIPE_SZ, 4096)
    fake.write(sup.gens[0].pid, 2, b"w" * 99 + b"\n" * 100)
    fake.write(sup.gens[0].pid, 2, (b"z" * 99 + b"\n") * 100)
    out_of(sup).drain()
    sink = out_of(sup)._sinks[2]
    assert sink.buf, "the destination is full"
    expected = len(b"[gen 1] ") * 200 + 199 + 10_000
    got = bytearray()

    def read_slowly() -> None:  # someone reads hupt's stderr, at their pace
        deadline = time.monotonic() + 10
        while len(got) < expected and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                got.extend(os.read(dest.err_r, 512))
            time.sleep(0.001)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    log.info("a line of hupt's own")
    assert not sink.buf, "the servers' lines went first"
    reader.join()
    assert len(got) == expected


def test_close_writes_what_the_pipes_hold(fake: FakeSystem, dest: Dest) -> None:
    sup = make(fake, dest)
    fake.write(sup.gens[0].pid, 1, b"last words\nand half")
    out_of(sup).close()
    assert dest.out() == "[gen 1] last words\n[gen 1] and half"


# -- writing without blocking hupt ---------------------------------------------------------------


def test_a_pipe_destination_is_written_through_a_non_blocking_description_of_its_own(
        dest: Dest) -> None:
    sink = Sink(dest.out_w)
    assert sink.fileno() != dest.out_w
    assert os.get_blocking(dest.out_w), "the description shared with others stays blocking"
    fcntl.fcntl(dest.out_w, fcntl.F_SETPIPE_SZ, 4096)
    sink.write(b"y" * 100_000)  # would block a blocking write
    assert 0 < len(sink.buf) < 100_000
    got = dest.read(dest.out_r)
    sink.flush()
    got += dest.read(dest.out_r)
    while sink.buf:
        sink.flush()
        got += dest.read(dest.out_r)
    assert got == b"y" * 100_000
    sink.close()


def test_a_socket_destination_is_written_with_msg_dontwait() -> None:
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sink = Sink(a.fileno())
        sink.write(b"z" * 1_000_000)
        assert sink.buf, "a full socket buffer leaves the rest waiting"
        assert a.getblocking()
        b.setblocking(False)
        got = b""
        while len(got) < 1_000_000:
            try:
                got += b.recv(1 << 20)
            except BlockingIOError:
                sink.flush()
        assert got == b"z" * 1_000_000 and not sink.buf
        sink.close()
    finally:
        a.close()
        b.close()


def test_a_file_destination_is_written_as_it_is(tmp_path: Path) -> None:
    with open(tmp_path / "log", "ab") as f:
        sink = Sink(f.fileno())
        sink.write(b"to the file\n")
        assert not sink.buf
        sink.close()
    assert (tmp_path / "log").read_bytes() == b"to the file\n"


def test_a_destination_without_a_reader_drops_what_it_gets(dest: Dest) -> None:
    r, w = os.pipe()
    sink = Sink(w)
    os.close(r)
    sink.write(b"nobody reads this\n")
    assert sink.broken and not sink.buf
    sink.write(b"nor this\n")
    sink.close()
    os.close(w)


# -- the command line --------------------------------------------------------------------------


def test_run_takes_prefix_output() -> None:
    p = cli.build_parser()
    assert p.parse_args(["run", "--", "x"]).prefix_output is None
    assert p.parse_args(["run", "--prefix-output", "--", "x"]).prefix_output is True
    assert p.parse_args(["run", "--no-prefix-output", "--", "x"]).prefix_output is False


def test_a_failed_generations_lines_come_before_the_outcome(
        capsys: pytest.CaptureFixture[str]) -> None:
    cli._print_details({"stderr": {"generation": 4, "pid": 9, "lines": ["boom", "Error: x"]}})
    assert capsys.readouterr().err.splitlines() == [
        "hupt: generation 4 (pid 9) wrote to stderr (last 2 line(s)):",
        "  | boom", "  | Error: x"]
    cli._print_details({"stderr": {"generation": 4, "pid": 9, "lines": []}})
    assert capsys.readouterr().err == "hupt: generation 4 (pid 9) wrote nothing to stderr\n"
