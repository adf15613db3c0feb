"""--metrics: the Prometheus text (rendering, escaping, the reload counters) and the
HTTP responder served from a real Loop over real sockets (answers, limits, timeouts,
unix socket paths), without a supervisor."""

from __future__ import annotations

import math
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hupt import metrics
from hupt.address import AF_INET, AF_UNIX, Address
from hupt.errors import UsageError
from hupt.loop import Loop
from hupt.metrics import MetricsEndpoint, ReloadStats, parse_address, render
from hupt.supervisor import Options, Supervisor, Waiter
from tests.fakes import FakeSystem

A = Address(AF_INET, "127.0.0.1", 8000)

# -- a checker of the text format (0.0.4), strict enough to catch what a scraper refuses --------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE},?)*)\}})? "
                     r"(\S+)")
_LABEL = re.compile(rf'([a-zA-Z_][a-zA-Z0-9_]*)=({_LABEL_VALUE})')


def _unescape(quoted: str) -> str:
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), quoted[1:-1])


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name; fails on anything a Prometheus scraper would refuse."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helped: set[str] = set()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name) and name not in helped, line
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types and name in helped, f"TYPE twice or before HELP: {line}"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[name] = kind
        else:
            m = _SAMPLE.fullmatch(line)
            assert m is not None, f"not a sample: {line!r}"
            name, labels, value = m.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert family in types, f"sample before its TYPE: {line}"
            assert family == name or types[family] == "histogram", line
            parsed = {k: _unescape(v) for k, v in _LABEL.findall(labels or "")}
            samples.setdefault(name, []).append((parsed, float(value)))
    for name, kind in types.items():
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            buckets = samples[f"{name}_bucket"]
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), f"{name}: buckets not cumulative"
            assert buckets[-1][0]["le"] == "+Inf"
            assert counts[-1] == samples[f"{name}_count"][0][1]
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], metric: str, /,
          **labels: str) -> float | None:
    found = [v for ls, v in samples.get(metric, [])
             if all(ls.get(k) == x for k, x in labels.items())]
    assert len(found) <= 1, (metric, labels, found)
    return found[0] if found else None


def doc(**over: Any) -> dict[str, Any]:
    """An instance's status document, as the supervisor has it."""
    d: dict[str, Any] = {
        "hupt_pid": 100, "name": "web", "version": "0.1.0", "command": ["srv"],
        "mode": "fork", "state": "running", "uptime_s": 12.5, "started_at": 1700000000.0,
        "generations": [
            {"number": 2, "pid": 20, "pids": [20, 21], "state": "draining", "age_s": 9.0,
             "ready_ms": 50.0, "in_flight": 3, "draining_s": 1.5, "drain_signal": None,
             "oldest_connection_s": 1.0, "listening": ["127.0.0.1:8000"]},
            {"number": 3, "pid": 30, "pids": [30], "state": "serving", "age_s": 1.0,
             "ready_ms": 40.0, "in_flight": 0, "draining_s": None, "drain_signal": None,
             "oldest_connection_s": None, "listening": ["127.0.0.1:8000"]},
            {"number": 4, "pid": 40, "pids": [40], "state": "starting", "age_s": 0.1,
             "ready_ms": None, "in_flight": None, "draining_s": None, "drain_signal": None,
             "oldest_connection_s": None, "listening": []}],
        "listeners": [{"address": "127.0.0.1:8000", "inode": 9, "queued": 5, "backlog": 1024},
                      {"address": "unix:/run/a.sock", "inode": 10, "queued": None,
                       "backlog": None}],
        "reloads": []}
    d.update(over)
    return d


# -- rendering ---------------------------------------------------------------------------------


def test_render_gives_every_figure_of_the_status_document() -> None:
    stats = ReloadStats()
    stats.record(True, 0.04, 1700000010.0)
    stats.record(False, 3.0, 1700000020.0)
    stats.record(True, 0.2, 1700000030.0, revive=True)
    s = parse(render(doc(), stats))
    assert value(s, "hupt_info", version="0.1.0", name="web", mode="fork") == 1
    assert value(s, "hupt_start_time_seconds") == 1700000000.0
    assert value(s, "hupt_uptime_seconds") == 12.5
    assert [value(s, "hupt_state", state=x) for x in metrics.INSTANCE_STATES] == [1, 0, 0, 0]
    assert value(s, "hupt_reloads_total", outcome="ok") == 1
    assert value(s, "hupt_reloads_total", outcome="failed") == 1
    assert value(s, "hupt_revives_total", outcome="ok") == 1  # not a reload
    assert value(s, "hupt_reload_duration_seconds_count") == 2
    assert value(s, "hupt_reload_duration_seconds_sum") == pytest.approx(3.04)
    assert value(s, "hupt_reload_duration_seconds_bucket", le="0.05") == 1
    assert value(s, "hupt_reload_duration_seconds_bucket", le="2.5") == 1
    assert value(s, "hupt_reload_duration_seconds_bucket", le="5.0") == 2
    assert value(s, "hupt_last_reload_duration_seconds") == 3.0
    assert value(s, "hupt_last_reload_success") == 0
    assert value(s, "hupt_last_reload_timestamp_seconds") == 1700000020.0
    assert value(s, "hupt_serving_generation") == 3
    assert {ls["state"]: v for ls, v in s["hupt_generations"]} == {
        "starting": 1, "serving": 1, "failed": 0, "draining": 1, "retiring": 0}
    assert value(s, "hupt_generation_in_flight_connections", generation="2",
                 state="draining") == 3
    assert value(s, "hupt_generation_in_flight_connections", generation="3") == 0
    # Not counted (a starting generation): left out, not 0.
    assert value(s, "hupt_generation_in_flight_connections", generation="4") is None
    assert value(s, "hupt_generation_processes", generation="2") == 2
    assert value(s, "hupt_generation_draining_seconds", generation="2") == 1.5
    assert value(s, "hupt_generation_draining_seconds", generation="3") is None
    assert value(s, "hupt_listener_queued_connections", address="127.0.0.1:8000") == 5
    assert value(s, "hupt_listener_backlog", address="127.0.0.1:8000") == 1024
    assert value(s, "hupt_listener_backlog", address="unix:/run/a.sock") is None


def test_render_before_any_reload_and_with_nothing_serving() -> None:
    text = render(doc(name=None, state="down", generations=[], listeners=[]), ReloadStats())
    s = parse(text)
    assert value(s, "hupt_info", name="") == 1
    assert value(s, "hupt_state", state="down") == 1
    assert value(s, "hupt_reloads_total", outcome="ok") == 0
    assert value(s, "hupt_reload_duration_seconds_bucket", le="+Inf") == 0
    assert "hupt_last_reload_duration_seconds" not in text  # no reload yet: no figure
    assert "hupt_serving_generation" not in text
    assert all(v == 0 for _, v in s["hupt_generations"])


def test_label_values_and_help_are_escaped() -> None:
    odd = 'unix:/tmp/a"b\\c\nd'
    s = parse(render(doc(listeners=[{"address": odd, "inode": 1, "queued": 0,
                                     "backlog": 8}]), ReloadStats()))
    assert value(s, "hupt_listener_backlog", address=odd) == 8


def test_numbers() -> None:
    assert [metrics._number(x) for x in (3, True, 0.5, math.inf, -math.inf)] == [
        "3", "1", "0.5", "+Inf", "-Inf"]
    assert metrics._number(math.nan) == "NaN"


# -- the address -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "shown"), [
    ("127.0.0.1:9100", "127.0.0.1:9100"), ("localhost:9100", "127.0.0.1:9100"),
    ("[::1]:9100", "[::1]:9100"), ("127.0.0.53:1", "127.0.0.53:1"),
    ("unix:/run/hupt-metrics.sock", "unix:/run/hupt-metrics.sock"), ("unix:@m", "unix:@m")])
def test_loopback_and_unix_addresses_are_taken(text: str, shown: str) -> None:
    a = parse_address(text)
    assert str(a) == shown
    metrics.check_exposure(a, allow_remote=False)


@pytest.mark.parametrize("text", ["0.0.0.0:9100", ":9100", "[::]:9100", "192.168.1.5:9100"])
def test_an_address_other_hosts_reach_needs_allow_remote(text: str) -> None:
    a = parse_address(text)
    with pytest.raises(UsageError, match="--metrics-allow-remote"):
        metrics.check_exposure(a, allow_remote=False)
    metrics.check_exposure(a, allow_remote=True)


@pytest.mark.parametrize("text", ["9100", "example.com:9100", "127.0.0.1:0", "127.0.0.1:x",
                                  "unix:"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_address(text)


# -- the responder ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def loop(clock: Clock) -> Iterator[Loop]:
    lp = Loop(clock, strict=True)
    yield lp
    lp.close()


Served = Callable[..., MetricsEndpoint]


@pytest.fixture
def serve(loop: Loop) -> Iterator[Served]:
    opened: list[MetricsEndpoint] = []

    def make(address: Address | None = None, text: Callable[[], str] = lambda: "up 1\n",
             allow_remote: bool = False) -> MetricsEndpoint:
        ep = MetricsEndpoint(loop, address or Address(AF_INET, "127.0.0.1", 0), text)
        ep.open(allow_remote)
        opened.append(ep)
        return ep

    yield make
    for ep in opened:
        ep.close()


def connect(ep: MetricsEndpoint | Address) -> socket.socket:
    a = ep if isinstance(ep, Address) else ep.address
    s = socket.socket(AF_UNIX if a.is_unix else AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(a.pyaddr())
    return s


def run_until_answered(loop: Loop, s: socket.socket, limit: float = 5.0) -> bytes:
    """Step the loop until the server has closed ``s``; everything it sent."""
    got = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if select.select([s], [], [], 0)[0]:
            chunk = s.recv(65536)
            if not chunk:
                return got
            got += chunk
            continue
        loop.step()
    raise AssertionError(f"no end of answer within {limit} s: {got!r}")


def steps(loop: Loop, n: int = 3) -> None:
    """Steps that have something to do (each returns at once)."""
    for _ in range(n):
        loop.run_later()
        for key, mask in loop._sel.select(0):
            key.data(mask)


def http(loop: Loop, ep: MetricsEndpoint | Address,
         request: bytes) -> tuple[int, dict[str, str], bytes]:
    s = connect(ep)
    s.sendall(request)
    raw = run_until_answered(loop, s)
    s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), raw
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_get_metrics(loop: Loop, serve: Served) -> None:
    ep = serve(text=lambda: "hupt_up 1\n")
    assert ep.address.port != 0  # the kernel's choice, known
    status, headers, body = http(loop, ep, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and body == b"hupt_up 1\n"
    assert headers["Content-Type"] == metrics.CONTENT_TYPE
    assert headers["Content-Length"] == str(len(body)) and headers["Connection"] == "close"
    # HTTP/1.0, a query string, bare newlines (what nc sends): the same answer.
    status, _, body = http(loop, ep, b"GET /metrics?x=1 HTTP/1.0\n\n")
    assert status == 200 and body == b"hupt_up 1\n"
    status, headers, body = http(loop, ep, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and headers["Content-Length"] == "10"


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET / HTTP/1.1\r\n\r\n", 404), (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"GARBAGE\r\n\r\n", 400), (b"GET metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics SPDY/3\r\n\r\n", 400), (b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n", 400)])
def test_other_requests(loop: Loop, serve: Served, request_bytes: bytes, status: int) -> None:
    ep = serve()
    got, headers, _ = http(loop, ep, request_bytes)
    assert got == status
    if status == 405:
        assert headers["Allow"] == "GET, HEAD"


def test_a_request_over_the_limit_is_answered_431(loop: Loop, serve: Served) -> None:
    ep = serve()
    s = connect(ep)
    s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * metrics.MAX_REQUEST)
    raw = run_until_answered(loop, s)
    s.close()
    assert raw.startswith(b"HTTP/1.1 431 ")


def test_a_failing_render_is_a_500_and_the_endpoint_goes_on(loop: Loop, serve: Served) -> None:
    calls = []

    def text() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return "ok 1\n"

    ep = serve(text=text)
    assert http(loop, ep, b"GET /metrics HTTP/1.1\r\n\r\n")[0] == 500
    assert http(loop, ep, b"GET /metrics HTTP/1.1\r\n\r\n")[2] == b"ok 1\n"


def test_a_silent_client_is_hung_up_on_after_the_timeout(
        loop: Loop, serve: Served, clock: Clock) -> None:
    ep = serve()
    s = connect(ep)
    s.sendall(b"GET /metr")  # and nothing more
    steps(loop)
    assert ep.deadline() == clock.now + metrics.CLIENT_TIMEOUT
    clock.now += metrics.CLIENT_TIMEOUT - 0.1
    loop.tick()
    assert not select.select([s], [], [], 0)[0]  # still connected
    clock.now += 0.2
    loop.tick()
    assert s.recv(100) == b""  # hung up on, no answer
    assert ep.deadline() == math.inf
    s.close()
    assert http(loop, ep, b"GET /metrics HTTP/1.1\r\n\r\n")[0] == 200


def test_at_most_max_clients_at_once_the_others_wait(loop: Loop, serve: Served) -> None:
    ep = serve(text=lambda: "n 1\n")
    idle = [connect(ep) for _ in range(metrics.MAX_CLIENTS)]
    steps(loop)
    waiting = connect(ep)  # in the backlog: hupt does not accept it yet
    waiting.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
    steps(loop, 5)
    assert not select.select([waiting], [], [], 0.05)[0]
    assert len(ep._clients) == metrics.MAX_CLIENTS
    idle.pop().close()  # one leaves: the next is let in and served
    raw = run_until_answered(loop, waiting)
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"n 1\n")
    for s in [*idle, waiting]:
        s.close()


def test_a_unix_socket_replaces_a_stale_one_and_is_removed_at_close(
        loop: Loop, serve: Served, tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    stale = socket.socket(AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: nobody answers (a killed hupt's)
    stale.close()
    ep = serve(address=parse_address(f"unix:{path}"), text=lambda: "u 1\n")
    assert path.is_socket()
    assert http(loop, ep, b"GET /metrics HTTP/1.1\r\n\r\n")[2] == b"u 1\n"
    ep.close()
    assert not path.exists()


def test_a_unix_path_in_use_or_not_a_socket_is_refused(loop: Loop, tmp_path: Path) -> None:
    live = tmp_path / "live.sock"
    other = socket.socket(AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(live))
    other.listen(1)
    plain = tmp_path / "file"
    plain.write_text("x")
    try:
        for path, why in ((live, "in use"), (plain, "not a socket")):
            ep = MetricsEndpoint(loop, parse_address(f"unix:{path}"), lambda: "")
            with pytest.raises(UsageError, match=why):
                ep.open()
            assert path.exists()
    finally:
        other.close()


def test_a_unix_path_someone_else_replaced_is_left_alone(
        loop: Loop, serve: Served, tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    ep = serve(address=parse_address(f"unix:{path}"))
    path.unlink()
    path.write_text("not ours")
    ep.close()
    assert path.read_text() == "not ours"


def test_a_taken_port_and_a_remote_address_are_refused_in_one_line(loop: Loop) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        ep = MetricsEndpoint(loop, Address(AF_INET, "127.0.0.1", taken.getsockname()[1]),
                             lambda: "")
        with pytest.raises(UsageError, match="cannot listen"):
            ep.open()
    finally:
        taken.close()
    ep = MetricsEndpoint(loop, Address(AF_INET, "0.0.0.0", 0), lambda: "")
    with pytest.raises(UsageError, match="--metrics-allow-remote"):
        ep.open()
    assert not ep.opened


def test_remote_allowed(loop: Loop, serve: Served) -> None:
    ep = serve(address=Address(AF_INET, "0.0.0.0", 0), allow_remote=True)
    local = Address(AF_INET, "127.0.0.1", ep.address.port)
    assert http(loop, local, b"GET /metrics HTTP/1.1\r\n\r\n")[0] == 200


# -- the supervisor's figures ------------------------------------------------------------------


def test_the_supervisor_counts_every_reload_and_renders_its_state(fake: FakeSystem) -> None:
    from hupt.tracer.spawn import SpawnError

    sup = Supervisor(fake, Options(argv=["server"], env={}, revive=True), control=False)
    sup.endpoint.name = "web"
    sup.start()
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    for n in range(2, 4):  # two reloads that succeed
        sup.request_reload(Waiter())
        fake.listen(n, A)
        sup.on_notify(sup.gens[-1])
    fake.spawn_error = SpawnError("nope")  # and one that fails
    sup.request_reload(Waiter())
    fake.spawn_error = None
    s = parse(sup.metrics_text())
    assert value(s, "hupt_info", name="web", mode="fork") == 1
    assert value(s, "hupt_reloads_total", outcome="ok") == 2
    assert value(s, "hupt_reloads_total", outcome="failed") == 1
    assert value(s, "hupt_reload_duration_seconds_count") == 3
    assert value(s, "hupt_last_reload_success") == 0
    assert value(s, "hupt_serving_generation") == 3
    assert value(s, "hupt_generations", state="serving") == 1
    assert value(s, "hupt_generation_processes", generation="3", state="serving") == 1
    assert value(s, "hupt_listener_backlog", address=str(A)) is not None
    # The serving generation crashes and is revived: a revive, not a reload.
    fake.exit(3, 1)
    fake.advance(2)
    sup.tick()
    s = parse(sup.metrics_text())
    assert value(s, "hupt_state", state="down") == 1
    assert "hupt_serving_generation" not in s
    fake.advance(0.6)
    sup.tick()
    fake.listen(sup.gens[-1].number, A)
    sup.on_notify(sup.gens[-1])
    s = parse(sup.metrics_text())
    assert value(s, "hupt_revives_total", outcome="ok") == 1
    assert value(s, "hupt_reloads_total", outcome="ok") == 2
    assert value(s, "hupt_state", state="running") == 1
