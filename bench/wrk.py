"""Driving wrk and reading its totals.

Facts this rests on (wrk 4.1, Debian package):

- `-d` takes whole seconds only (it parses an unsigned integer plus a unit).
- wrk catches SIGINT, stops its threads and prints the same summary as at the
  end of `-d`, with the duration actually run: a load of unknown length (while
  reloads happen) is a long `-d` ended with SIGINT.
- Its text summary rounds and changes units; the `done(summary, latency,
  requests)` hook of a Lua script gives exact counts and µs latencies. A script
  that defines no `request`/`response` function keeps wrk's static fast path.
- Errors: `connect`, `read` (includes EOF before a complete response), `write`,
  `timeout` (no response within --timeout) are socket errors; `status` counts
  responses with a status >= 400 (wrk's "Non-2xx or 3xx responses").
- "Fresh connections" are `-H "Connection: close"`: the server closes after
  each response and wrk reconnects, without counting an error.
- wrk is a closed-loop generator: its latency percentiles are those of a
  saturated server (no coordinated-omission correction), fine for comparing
  the same server bare and under hupt in the same conditions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LUA = Path(__file__).resolve().with_name("wrk_summary.lua")
_SUMMARY = re.compile(r"^WRK_SUMMARY (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    connect: int
    read: int
    write: int
    timeout: int
    http_errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    def errors_text(self) -> str:
        return f"{self.connect}/{self.read}/{self.write}/{self.timeout}"


def argv(url: str, *, seconds: int, connections: int, fresh: bool,
         threads: int = 1, timeout_s: int = 2) -> list[str]:
    """wrk's command line; `fresh`: one connection per request (Connection: close)."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
           f"--timeout={timeout_s}s", "-s", str(LUA)]
    if fresh:
        cmd += ["-H", "Connection: close"]
    return [*cmd, url]


def parse(stdout: str) -> WrkResult:
    """The totals from wrk's output (ValueError if the summary line is missing)."""
    m = _SUMMARY.search(stdout)
    if m is None:
        raise ValueError(f"no WRK_SUMMARY line in wrk's output:\n{stdout[-2000:]}")
    f = dict(part.split("=", 1) for part in m[1].split())
    return WrkResult(
        requests=int(f["requests"]),
        duration_s=int(f["duration_us"]) / 1e6,
        p50_ms=float(f["p50_us"]) / 1000,
        p99_ms=float(f["p99_us"]) / 1000,
        max_ms=float(f["max_us"]) / 1000,
        connect=int(f["connect"]),
        read=int(f["read"]),
        write=int(f["write"]),
        timeout=int(f["timeout"]),
        http_errors=int(f["status"]),
    )
