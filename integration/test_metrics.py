"""`hupt run --metrics ADDR`: Prometheus metrics scraped from a real hupt.

Asserted: the text parses as the Prometheus format (tests/test_metrics.py's
checker); it says what `hupt status --json` says, through reloads that
succeed and fail and a generation draining a keep-alive connection; a client
that connects to the metrics port and sends nothing holds neither a reload
nor another scrape (hupt's loop never blocks on it); a unix socket endpoint
is served and removed at exit; an address other hosts can reach, or one in
use, is refused in one line and nothing starts, and --metrics-allow-remote
lets the former in.
"""

from __future__ import annotations

import http.client
import socket
import stat
import subprocess
import time
from pathlib import Path

from harness import Procs, free_port, health_cmd, one_line_error, wait_for
from load import Target
from supervision import hupt_status, keepalive_connection, start_hupt

from tests.test_metrics import parse, value

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(port: int) -> Samples:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        body = r.read().decode()
        assert r.status == 200, (r.status, body)
        assert r.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
        return parse(body)
    finally:
        conn.close()


def scrape_unix(path: Path) -> Samples:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: hupt\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:200]
    return parse(body.decode())


def test_metrics_follow_reloads_drains_and_failures(procs: Procs, tmp_path: Path) -> None:
    fail = tmp_path / "FAIL"
    port, mport = free_port(), free_port()
    target: Target = ("127.0.0.1", port)
    cmd = ["sh", "-c", f"test -e {fail} && exit 3; exec {' '.join(health_cmd(target))}"]
    h, _ = start_hupt(procs, "--name", f"m{mport}", "--drain-timeout", "30",
                      "--metrics", f"127.0.0.1:{mport}", cmd=cmd, target=target)
    s = scrape(mport)
    assert value(s, "hupt_info", name=f"m{mport}", mode="fork") == 1
    assert value(s, "hupt_reloads_total", outcome="ok") == 0
    assert value(s, "hupt_serving_generation") == 1
    assert value(s, "hupt_state", state="running") == 1
    uptime = value(s, "hupt_uptime_seconds")
    assert uptime is not None and 0 < uptime < 60
    backlog = value(s, "hupt_listener_backlog", address=f"127.0.0.1:{port}")
    assert backlog is not None and backlog >= 1024
    assert value(s, "hupt_listener_queued_connections", address=f"127.0.0.1:{port}") == 0
    assert "hupt_last_reload_duration_seconds" not in s

    assert h.reload().returncode == 0
    conn, _ = keepalive_connection(target)  # pins generation 2 while it drains
    s = scrape(mport)
    assert value(s, "hupt_generation_in_flight_connections", generation="2",
                 state="serving") == 1
    r = h.reload()
    assert r.returncode == 0, r.stderr
    s = scrape(mport)
    assert value(s, "hupt_reloads_total", outcome="ok") == 2
    assert value(s, "hupt_serving_generation") == 3
    assert value(s, "hupt_generations", state="draining") == 1
    assert value(s, "hupt_generation_in_flight_connections", generation="2",
                 state="draining") == 1
    drained = value(s, "hupt_generation_draining_seconds", generation="2")
    assert drained is not None and drained >= 0
    last = value(s, "hupt_last_reload_duration_seconds")
    assert last is not None and 0 < last < 30
    assert value(s, "hupt_last_reload_success") == 1

    fail.touch()  # generation 4 exits before it is ready
    assert h.reload().returncode == 1
    s = scrape(mport)
    assert value(s, "hupt_reloads_total", outcome="failed") == 1
    assert value(s, "hupt_last_reload_success") == 0
    assert value(s, "hupt_reload_duration_seconds_count") == 3
    assert value(s, "hupt_serving_generation") == 3
    # What hupt status says, the metrics say.
    inst = hupt_status(h)
    assert [x["ok"] for x in inst["reloads"]] == [True, True, False]
    by_state = {st: sum(g["state"] == st for g in inst["generations"])
                for st in ("serving", "draining")}
    assert {st: value(s, "hupt_generations", state=st) for st in by_state} == by_state

    conn.close()  # generation 2 finishes draining and leaves
    wait_for("generation 2 gone from the metrics", lambda: value(
        scrape(mport), "hupt_generations", state="draining") == 0, timeout=15)


def test_a_silent_metrics_client_holds_nothing_up(procs: Procs) -> None:
    mport = free_port()
    h, _ = start_hupt(procs, "--metrics", f"127.0.0.1:{mport}")
    silent = [socket.create_connection(("127.0.0.1", mport), timeout=5) for _ in range(2)]
    silent[1].sendall(b"GET /metr")  # half a request, never finished
    try:
        t = time.monotonic()
        r = h.reload()
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t < 5, "the reload waited for the metrics clients"
        assert value(scrape(mport), "hupt_reloads_total", outcome="ok") == 1
        # Hung up on after the client timeout (5 s), without an answer.
        for s in silent:
            s.settimeout(10)
            assert s.recv(100) == b""
    finally:
        for s in silent:
            s.close()
    assert h.poll() is None


def test_metrics_on_a_unix_socket(procs: Procs, short_tmp: Path) -> None:
    path = short_tmp / "metrics.sock"
    h, _ = start_hupt(procs, "--metrics", f"unix:{path}")
    wait_for("the metrics socket", path.exists)
    assert stat.S_ISSOCK(path.lstat().st_mode)
    s = scrape_unix(path)
    assert value(s, "hupt_generations", state="serving") == 1
    assert h.stop() == 0
    assert not path.exists(), "hupt removes its metrics socket at exit"


def test_refused_addresses_start_nothing(procs: Procs, tmp_path: Path) -> None:
    started = tmp_path / "started"
    port, mport = free_port(), free_port()
    target: Target = ("127.0.0.1", port)
    cmd = ["sh", "-c", f"touch {started}; exec {' '.join(health_cmd(target))}"]
    remote = procs.hupt("--metrics", f"0.0.0.0:{mport}", cmd=cmd)
    assert remote.popen.wait(20) == 2
    one_line_error_text(remote.err.read_text(), "--metrics 0.0.0.0:", "--metrics-allow-remote")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", mport))
        taken.listen(1)
        busy = procs.hupt("--metrics", f"127.0.0.1:{mport}", cmd=cmd)
        assert busy.popen.wait(20) == 2
    one_line_error_text(busy.err.read_text(), "cannot listen", "in use")
    assert not started.exists(), "the server was started"

    h, _ = start_hupt(procs, "--metrics", f"0.0.0.0:{mport}", "--metrics-allow-remote",
                      cmd=cmd, target=target)
    assert value(scrape(mport), "hupt_generations", state="serving") == 1
    assert h.poll() is None


def one_line_error_text(stderr: str, *needles: str) -> None:
    one_line_error(subprocess.CompletedProcess([], 2, "", stderr), *needles)
