"""Fuzzing hupt's control protocol (hupt/control.py) with hypothesis, on a live hupt.

The protocol: a client sends ONE JSON object on a line (at most
control.MAX_REQUEST bytes) and reads JSON lines until a "result"; hupt then
hangs up. Whatever a client sends, hupt must answer it as the protocol says
and go on supervising: its control socket keeps answering, its server keeps
serving, and it keeps no fd of a client that is gone.

What each example sends, and what hupt must answer (`expected`), from the
first line alone (hupt reads no further):

- a first line longer than MAX_REQUEST (or as much without a newline): one
  result "request too large", then hupt hangs up;
- a line that is not JSON, or JSON but not an object: one result "malformed
  request";
- an object whose "cmd" is not a command: one result "unknown command";
  "status" and "ping" are answered ok ("reload" and "stop" are not sent:
  reloads are the soak's and the storms' business);
- no newline by the time the client shuts its side down: no answer, hupt
  hangs up.

Every answer line is a JSON object with an "event"; the last is the result.
Clients end in every way a client can: shutting down their writing side
(half-closed) and reading to the end, closing at once without reading,
sending part of a request and shutting down, connecting and sending nothing
(hupt hangs up on those after endpoint.IDLE_TIMEOUT, with a result saying
so), hundreds of them at once.

Each test runs a hupt with the static Go server under a Load (fresh and
persistent clients) for the whole fuzzing, and checks after each example that
hupt answers a "ping", and at the end: 0 failed requests, `hupt status`
works, hupt's fd count back to what it was before, no traceback in its log,
and a log that stayed small (repeated warnings are rate-limited). The number
of examples is the hypothesis profile's ("hupt-short": 300 per test, CI;
"hupt-long": 3,000, `HUPT_RELIABILITY=long`; conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    HuptProcess,
    Procs,
    fd_targets,
    fds_and_rss,
    free_port,
    go_cmd,
    settled_fds,
    wait_listening,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from load import Load, Target
from supervision import hupt_status, stop_gracefully

from hupt import control, endpoint
from reliability.common import (
    FORM,
    Record,
    control_client,
    ms,
    no_traceback,
    ping_seconds,
)

MAX = control.MAX_REQUEST
PROFILE = settings.get_profile(FORM.fuzz_profile)
# hupt hangs up within this long once a client has shut its side down (seconds).
HANG_UP = 5.0
# hupt's log may grow by this much over a whole fuzzing run (bytes): a warning per
# bad request, unlimited, would be far more.
LOG_BOUND = 16384

# -- what hupt must answer ----------------------------------------------------------------

NO_ANSWER = "no answer"
TOO_LARGE = "request too large"
MALFORMED = "malformed request"
UNKNOWN = "unknown command"
OK = "ok"
NOT_SENT = frozenset({"reload", "stop"})


def expected(data: bytes) -> str | None:
    """What hupt answers to `data` (then the client's shutdown); None: a reload or a
    stop, which the fuzzers do not send."""
    first, newline, _ = data.partition(b"\n")
    if len(first) > MAX:
        return TOO_LARGE
    if not newline:
        return NO_ANSWER
    try:
        msg = json.loads(first)
    except (ValueError, RecursionError):
        return MALFORMED
    if not isinstance(msg, dict):
        return MALFORMED
    cmd = msg.get("cmd")
    if isinstance(cmd, str) and cmd in NOT_SENT:
        return None
    return OK if cmd in ("status", "ping") else UNKNOWN


def check_answers(kind: str, answers: list[dict[str, Any]], data: bytes) -> None:
    if kind == NO_ANSWER:
        assert answers == [], (data[:200], answers)
        return
    assert len(answers) == 1, (data[:200], answers)
    (result,) = answers
    assert result.get("event") == "result", (data[:200], result)
    if kind == OK:
        assert result.get("ok") is True and result.get("reason") in ("status", "pong"), result
    else:
        assert result.get("ok") is False, (data[:200], result)
        assert str(result.get("reason", "")).startswith(kind), (data[:200], kind, result)


# -- a client of hupt's control socket ------------------------------------------------------


def read_to_end(s: socket.socket) -> bytes:
    """Everything hupt sends until it hangs up (EOF, or a reset once it closed with
    our request unread); TimeoutError if it does not within the socket's timeout."""
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            got += chunk
    return got


def parse(raw: bytes) -> list[dict[str, Any]]:
    """hupt's answer lines: each one a JSON object with an "event"."""
    assert raw == b"" or raw.endswith(b"\n"), raw[-200:]
    answers = [json.loads(line) for line in raw.splitlines()]
    for a in answers:
        assert isinstance(a, dict) and "event" in a, answers
    return answers


def connected(h: HuptProcess, timeout: float = HANG_UP) -> socket.socket:
    return control_client(h.pid, timeout)


def send(s: socket.socket, data: bytes) -> None:
    """Send what hupt takes of `data` (it may hang up before the end)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(data)


def half_close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):  # hupt may have hung up already
        s.shutdown(socket.SHUT_WR)


def exchange(h: HuptProcess, data: bytes) -> list[dict[str, Any]]:
    """Send `data`, shut our writing side down, read hupt's answers to the end."""
    with connected(h) as s:
        send(s, data)
        half_close(s)
        return parse(read_to_end(s))


# -- the live hupt every test fuzzes -------------------------------------------------------


@dataclass
class Fuzzed:
    h: HuptProcess
    examples: int = 0
    pings: list[float] = field(default_factory=list)

    def alive(self) -> None:
        """After each example: hupt still answers on its control socket."""
        self.examples += 1
        assert self.h.poll() is None, self.h.log()
        self.pings.append(ping_seconds(self.h))


@contextlib.contextmanager
def fuzzed(procs: Procs, go_server: Path, record: Record) -> Iterator[Fuzzed]:
    """hupt serving the Go server under load; yields; then checks it came through."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--drain-signal", "TERM", cmd=go_cmd(go_server, target))
    wait_listening(target, 20, proc=h)
    hupt_status(h)  # whatever hupt opens the first time it is asked, it has now
    fds0, _ = record.start(h.pid)
    log0 = h.err.stat().st_size
    f = Fuzzed(h)
    with Load(target, fresh=2, keepalive=0, persistent=1, max_requests=10_000_000) as load:
        yield f
        inst = hupt_status(h)
    res = load.result
    record.load(res)
    _, rss1 = fds_and_rss(h.pid)
    fds1 = settled_fds(h.pid, fds0)
    record.end(fds1, rss1)
    grown = h.err.stat().st_size - log0
    record.note(f"{f.examples} examples; ping after each: max {ms(max(f.pings, default=0))}; "
                f"log +{grown} bytes")
    assert res.failed == 0, res.summary()
    assert res.ok > 0, res.summary()
    assert [g["state"] for g in inst["generations"]] == ["serving"], inst
    assert fds1 <= fds0, f"hupt holds {fds1 - fds0} more fds: {fd_targets(h.pid)}"
    no_traceback(h)
    assert grown < LOG_BOUND, h.log()[-4000:]
    stop_gracefully(h)


# -- arbitrary bytes -------------------------------------------------------------------------

# Pieces of requests, of JSON and of what breaks parsers, for byte strings that are
# nearly requests (random bytes alone are almost never a line of JSON).
TOKENS = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\n", b"\r\n", b" ", b"\x00",
          b'"cmd"', b'"status"', b'"ping"', b'"reload "', b"null", b"true", b"-0", b"1e999",
          b"NaN", b"\xff", b"\xef\xbb\xbf", b"\xfe\xff", b"\\ud800", b'"\\u0000"', b"\x7f"]
near_requests = st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join)
any_bytes = st.one_of(st.binary(max_size=512), near_requests,
                      st.tuples(st.binary(max_size=64), st.integers(0, 3 * MAX),
                                st.binary(min_size=1, max_size=4))
                      .map(lambda t: t[0] + t[2] * (t[1] // len(t[2])) + b"\n"))


def test_fuzz_arbitrary_bytes(procs: Procs, go_server: Path, record: Record) -> None:
    with fuzzed(procs, go_server, record) as f:

        @PROFILE
        @given(any_bytes)
        @example(b"")
        @example(b"\n")
        @example(b"[" * MAX + b"\n")  # nested beyond the parser's recursion limit
        @example(b'{"cmd": "status"}\n{"cmd": "stop"}\n')  # only the first line is read
        def one(data: bytes) -> None:
            kind = expected(data)
            if kind is None:
                return
            check_answers(kind, exchange(f.h, data), data)
            f.alive()

        one()


# -- arbitrary JSON values ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)
commands = st.sampled_from(["status", "ping", "", "Status", "ping ", "STOP", "relaod",
                            "status\x00"]) | json_values
requests = st.builds(lambda extra, cmd: {**extra, "cmd": cmd},
                     st.dictionaries(st.text(max_size=8), json_values, max_size=4), commands)


def _line(value: object, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode() + b"\n"


def test_fuzz_arbitrary_json_values(procs: Procs, go_server: Path, record: Record) -> None:
    with fuzzed(procs, go_server, record) as f:

        @PROFILE
        @given(st.one_of(json_values, requests), st.booleans(), st.binary(max_size=32))
        @example({"cmd": "status"}, True, b"")
        @example({"cmd": ["status"]}, True, b"")
        @example({"cmd": {"cmd": "ping"}}, False, b"")
        @example([{"cmd": "status"}], True, b"")
        def one(value: object, ascii_only: bool, after: bytes) -> None:
            data = _line(value, ascii_only) + after  # what follows the line is never read
            kind = expected(data)
            if kind is None:
                return
            check_answers(kind, exchange(f.h, data), data)
            f.alive()

        one()


# -- oversized and half-closed -----------------------------------------------------------------


def padded(size: int) -> bytes:
    """A "status" request line of exactly `size` bytes (its newline not counted), or
    filler if `size` is too small for one."""
    head, tail = b'{"cmd": "status", "pad": "', b'"}'
    if size < len(head) + len(tail):
        return b"x" * size + b"\n"
    return head + b"p" * (size - len(head) - len(tail)) + tail + b"\n"


sizes = st.one_of(st.integers(MAX - 40, MAX + 40), st.integers(0, 4 * MAX),
                  st.integers(4 * MAX, 1 << 20))
ENDINGS = ["half-close", "cut-then-half-close", "no-newline", "close-unread", "gone-at-once"]


def test_fuzz_oversized_and_half_closed(procs: Procs, go_server: Path, record: Record) -> None:
    with fuzzed(procs, go_server, record) as f:

        @PROFILE
        @given(sizes, st.sampled_from(ENDINGS), st.floats(0, 1))
        @example(MAX, "half-close", 0)
        @example(MAX + 1, "half-close", 0)
        @example(8 << 20, "no-newline", 0)  # 8 MB: hupt hangs up after MAX_REQUEST
        @example(8 << 20, "close-unread", 0)
        def one(size: int, ending: str, cut: float) -> None:
            data = padded(size)
            if ending == "cut-then-half-close":
                data = data[:int(len(data) * cut)]
            elif ending == "no-newline":
                data = data[:-1]
            with connected(f.h) as s:
                if ending != "gone-at-once":
                    send(s, data)
                if ending in ("close-unread", "gone-at-once"):
                    s.close()  # hupt's answer, if any, meets a closed socket
                else:
                    half_close(s)
                    kind = expected(data)
                    assert kind is not None
                    check_answers(kind, parse(read_to_end(s)), data)
            f.alive()

        one()


# -- many connections at once ------------------------------------------------------------------

CROWD = ["status", "ping", "garbage", "too-large", "partial", "close-unread", "gone-at-once",
         "half-close-silent"]
# hupt's first clients get endpoint.IDLE_TIMEOUT to send a request; the test waits that
# long and this much more for it to hang up on those that sent nothing.
IDLE_SLACK = 10.0
SILENT = 100


def crowd_request(kind: str) -> bytes:
    return {"status": b'{"cmd": "status"}\n', "ping": b'{"cmd": "ping"}\n',
            "garbage": b"\x00\xff{]\n", "too-large": b"y" * (4 * MAX),
            "partial": b'{"cmd": "sta', "close-unread": b'{"cmd": "status"}\n'}.get(kind, b"")


def test_fuzz_many_connections_at_once(procs: Procs, go_server: Path, record: Record) -> None:
    with fuzzed(procs, go_server, record) as f:
        fds0 = record.fds[0]
        # Clients that connect and send nothing, open all along: hupt hangs up on them.
        silent = [connected(f.h, endpoint.IDLE_TIMEOUT + IDLE_SLACK) for _ in range(SILENT)]
        opened = time.monotonic()
        most = [0]

        @settings(PROFILE, max_examples=FORM.crowd_examples)
        @given(st.lists(st.sampled_from(CROWD), min_size=50, max_size=300))
        def one(kinds: list[str]) -> None:
            socks = []
            for kind in kinds:  # all connected, every request sent, none answered yet
                s = connected(f.h)
                socks.append(s)
                if kind == "gone-at-once":
                    s.close()
                else:
                    send(s, crowd_request(kind))
            most[0] = max(most[0], fds_and_rss(f.h.pid)[0])
            f.alive()  # hupt answers others meanwhile
            for kind, s in zip(kinds, socks, strict=True):
                with s:
                    if kind in ("close-unread", "gone-at-once"):
                        continue
                    half_close(s)
                    data = crowd_request(kind)
                    expect = expected(data)
                    assert expect is not None
                    check_answers(expect, parse(read_to_end(s)), data)

        one()
        # The silent ones: hupt said why and hung up, by itself, in time.
        for s in silent:
            with s:
                answers = parse(read_to_end(s))
                assert [a.get("reason") for a in answers] == [
                    f"no request within {endpoint.IDLE_TIMEOUT:g} s"], answers
        waited = time.monotonic() - opened
        # hupt held the silent clients (all but those still in its listen backlog, 17 at
        # most) and the crowd's: it took them in, they did not wait at its door.
        assert most[0] >= fds0 + SILENT // 2, "hupt did not take the crowd in: nothing tested"
        record.note(f"{SILENT} silent clients open throughout, hung up on after "
                    f"{waited:.1f} s; up to {most[0]} hupt fds")
