"""What the reliability tests share: the form they run in, what each records, and
measures of hupt's own footprint and responsiveness.

hupt's footprint is read from /proc as integration/test_reload_under_load.py
does: the number of entries in /proc/PID/fd and VmRSS from /proc/PID/status.
A client being answered or a probe holds an fd for a moment, so the end count
is taken once it has come back down (`settled_fds`): an fd leaked per reload,
per control connection or per signal never does.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import HuptProcess, fds_and_rss
from load import LoadResult

from hupt import control

# -- the short form (CI) and the long form ----------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r}: a positive number of reloads expected")
    return int(value)


@dataclass(frozen=True)
class Form:
    """How big each test is: `HUPT_RELIABILITY=long` for the long form."""

    name: str
    soak_reloads: int
    sighup_bursts: int
    sighups_per_burst: int
    reload_rounds: int
    reload_clients: int
    fuzz_profile: str
    crowd_examples: int

    @classmethod
    def from_env(cls) -> Form:
        mode = os.environ.get("HUPT_RELIABILITY", "short").strip() or "short"
        if mode not in ("short", "long"):
            raise ValueError(f"HUPT_RELIABILITY={mode!r}: 'short' or 'long' expected")
        long = mode == "long"
        return cls(
            name=mode,
            soak_reloads=_env_int("HUPT_SOAK_RELOADS", 1000 if long else 100),
            sighup_bursts=20 if long else 6,
            sighups_per_burst=500 if long else 100,
            reload_rounds=30 if long else 5,
            reload_clients=6,
            fuzz_profile="hupt-long" if long else "hupt-short",
            crowd_examples=40 if long else 4,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FORM = Form.from_env()


# -- what a test records for the report --------------------------------------------------


@dataclass
class Record:
    """One test's figures for docs/reliability.md (reliability/report.py)."""

    reloads: int = 0
    requests: int = 0
    failed: int = 0
    fds: list[int] = field(default_factory=list)
    """hupt's fds at the start and at the end."""
    rss_kb: list[int] = field(default_factory=list)
    """hupt's RSS (KB) at the start and at the end."""
    notes: list[str] = field(default_factory=list)

    def load(self, res: LoadResult) -> None:
        """Count a load's requests (ok or failed)."""
        self.requests += res.ok + res.failed
        self.failed += res.failed

    def start(self, pid: int) -> tuple[int, int]:
        """hupt's fds and RSS now, as the start; returned."""
        fds, rss = fds_and_rss(pid)
        self.fds, self.rss_kb = [fds], [rss]
        return fds, rss

    def end(self, fds: int, rss: int) -> None:
        self.fds = [*self.fds[:1], fds]
        self.rss_kb = [*self.rss_kb[:1], rss]

    def note(self, text: str) -> None:
        self.notes.append(text)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- hupt's footprint ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """pid's user + system CPU time so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- talking to hupt ----------------------------------------------------------------------


def control_client(pid: int, timeout: float) -> socket.socket:
    """A client connected to hupt's control socket, `timeout` on each operation.

    A unix socket with a timeout is non-blocking, and its connect() fails with
    EAGAIN at once while hupt's listen backlog is full (clients arriving faster
    than its loop accepts them) instead of waiting for room as a blocking one
    does: hupt's own CLI fails there (test_storms.py, the strict xfail). This
    client tries again until `timeout`, as a blocking connect() would wait.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.connect(control.socket_path(pid))
            return s
        except BlockingIOError:
            if time.monotonic() > deadline:
                s.close()
                raise
            time.sleep(0.002)
        except BaseException:
            s.close()
            raise


def ask(pid: int, msg: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """The protocol as hupt/control.py's request() speaks it: one JSON line out, JSON
    lines back until the result (which must come within `timeout`); all of them."""
    deadline = time.monotonic() + timeout
    with control_client(pid, timeout) as s:
        s.sendall(json.dumps(msg).encode() + b"\n")
        buf = b""
        answers: list[dict[str, Any]] = []
        while not answers or answers[-1].get("event") != "result":
            s.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = s.recv(65536)
            assert chunk, f"hupt {pid} hung up without a result: {answers}"
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                answers.append(json.loads(line))
        return answers


def reload(h: HuptProcess, timeout: float = 60.0) -> float:
    """One reload over the control socket, as `hupt reload` asks it; it must succeed.

    Returns how long it took (seconds, request to result)."""
    started = time.monotonic()
    answers = ask(h.pid, {"cmd": "reload"}, timeout)
    assert answers[-1].get("ok") is True, (answers, h.log())
    return time.monotonic() - started


def ping_seconds(h: HuptProcess, timeout: float = 10.0) -> float:
    """How long hupt takes to answer a "ping" on its control socket (it must)."""
    started = time.monotonic()
    answers = ask(h.pid, {"cmd": "ping"}, timeout)
    assert answers[-1].get("ok") is True, answers
    return time.monotonic() - started


def no_traceback(h: HuptProcess) -> None:
    """hupt's log shows no traceback (a traceback is always a bug in hupt)."""
    log = h.err.read_text(errors="replace")
    assert "Traceback" not in log, h.log()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"
