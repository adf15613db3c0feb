"""``hupt run --metrics ADDR``: Prometheus metrics over HTTP, from hupt's own loop.

What is exposed (``render``), from the same figures as ``hupt status --json``
plus counters that outlive its 20-reload history:

* ``hupt_info{version,name,mode}`` (always 1), ``hupt_start_time_seconds``,
  ``hupt_uptime_seconds``, ``hupt_state{state}`` (1 for the current one of
  running, reloading, down, stopping);
* ``hupt_reloads_total{outcome="ok"|"failed"}``, a histogram
  ``hupt_reload_duration_seconds`` (request to outcome), and the last reload's
  ``hupt_last_reload_duration_seconds``, ``hupt_last_reload_success`` and
  ``hupt_last_reload_timestamp_seconds``; ``hupt_revives_total{outcome}``
  counts the starts of the command after nothing served (``--revive``, exec
  mode's fresh start), which are not reloads;
* ``hupt_serving_generation`` (its number), ``hupt_generations{state}`` (live
  generations by state), and per live generation
  ``hupt_generation_in_flight_connections{generation,state}``,
  ``hupt_generation_processes{generation,state}`` and, while it drains,
  ``hupt_generation_draining_seconds{generation}``;
* per held listener ``hupt_listener_queued_connections{address}`` (its
  accept-queue length now) and ``hupt_listener_backlog{address}``.

A sample whose figure is unknown (the kernel's tables did not say, nothing
counted yet) is left out rather than given a made-up value.

Why not prometheus_client: its ways of serving are a thread with an HTTP
server (start_http_server) or a WSGI/ASGI app, and hupt's supervisor is
single-threaded by design (fork() in spawn, no locks); only its text
formatter would be usable, which for these few gauges and counters is less
code than adapting the collected figures to its registry, and every
installation would carry the dependency for an option most leave off.  The
text format (version 0.0.4) is small and stable: ``# HELP`` and ``# TYPE``
lines, then ``name{label="value"} number`` samples, label values escaped
(backslash, double quote, newline).

The responder (``MetricsEndpoint``) is a handful of lines of HTTP/1.x, served
without blocking from hupt's loop like the control socket:

* GET (or HEAD) /metrics answers 200 with the text; other paths 404, other
  methods 405, a malformed request 400; every answer closes the connection.
* A request (its line and headers) is read up to MAX_REQUEST bytes (431
  beyond); a client has CLIENT_TIMEOUT for the whole exchange, then is hung
  up on; at most MAX_CLIENTS are served at once (the others wait in the
  listening socket's backlog); at the limit of open files hupt stops
  accepting and tries again ACCEPT_RETRY later.
* Each scrape looks at the generations afresh (a /proc scan and a few
  sock_diag queries, about a millisecond): no figure is older than the scrape.

Exposure: no authentication, no TLS.  A TCP address must be a loopback one
(127.0.0.0/8, ::1, localhost) unless ``--metrics-allow-remote`` is given:
the figures name hupt's version, listeners and process counts, and a port
open to other hosts should be a deliberate choice (with a firewall in
front).  A unix socket is reached by whoever its directory and mode let in
(connecting takes write permission; the mode is hupt's umask's: with 022 only
hupt's user); an existing socket nobody answers on (left by a killed hupt)
is replaced, anything else at the path is refused.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import math
import os
import selectors
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hupt import log
from hupt.address import AF_INET, AF_INET6, AF_UNIX, Address, parse_user_address
from hupt.errors import UsageError
from hupt.loop import Loop

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PATH = "/metrics"
MAX_REQUEST = 8192
CLIENT_TIMEOUT = 5.0
MAX_CLIENTS = 4
ACCEPT_RETRY = 1.0
# Reload durations (seconds): a static server reloads in milliseconds, a
# --ready http probe or an exec-mode drain can take the ready or drain timeout.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GENERATION_STATES = ("starting", "serving", "failed", "draining", "retiring")
INSTANCE_STATES = ("running", "reloading", "down", "stopping")
OUTCOMES = ("ok", "failed")


# -- the address -----------------------------------------------------------------------------


def parse_address(text: str) -> Address:
    """``unix:PATH``, ``unix:@NAME``, ``HOST:PORT`` or ``[V6]:PORT`` (UsageError if not)."""
    host, sep, port = text.rpartition(":")
    if not text.startswith("unix:") and sep and host in ("localhost", "[localhost]"):
        text = f"127.0.0.1:{port}"
    return parse_user_address(text)


def is_loopback(address: Address) -> bool:
    return address.is_unix or ipaddress.ip_address(address.host).is_loopback


def check_exposure(address: Address, allow_remote: bool) -> None:
    """Refuse an address other hosts can reach unless it was asked for (see above)."""
    if allow_remote or is_loopback(address):
        return
    raise UsageError(f"--metrics {address}: other hosts could reach it and it has no "
                     f"authentication; use 127.0.0.1:PORT or unix:PATH, or add "
                     f"--metrics-allow-remote")


# -- the figures ------------------------------------------------------------------------------


@dataclass
class ReloadStats:
    """What the reloads came to since hupt started (hupt status keeps the last 20 only)."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    revives: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    seconds_sum: float = 0.0
    last_seconds: float | None = None
    last_ok: bool | None = None
    last_at: float | None = None

    def record(self, ok: bool, seconds: float, at: float, *, revive: bool = False) -> None:
        outcome = "ok" if ok else "failed"
        if revive:
            self.revives[outcome] += 1
            return
        self.outcomes[outcome] += 1
        for i, le in enumerate(BUCKETS):
            if seconds <= le:
                self.buckets[i] += 1
        self.seconds_sum += seconds
        self.last_seconds, self.last_ok, self.last_at = seconds, ok, at

    @property
    def count(self) -> int:
        return sum(self.outcomes.values())


def _number(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Text:
    """The exposition text, one metric family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str,
               samples: Iterable[tuple[dict[str, str], float | None]],
               suffix: str = "") -> None:
        help = help.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        self.samples(name + suffix, samples)

    def samples(self, name: str, samples: Iterable[tuple[dict[str, str], float | None]]) -> None:
        for labels, value in samples:
            if value is None:
                continue
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}" if inner
                              else f"{name} {_number(value)}")


def render(doc: dict[str, Any], stats: ReloadStats) -> str:
    """The text for one instance: ``doc`` is its status document (hupt status --json's
    instance: generations, listeners, state, uptime_s, name, version, mode)."""
    t = _Text()
    uptime = float(doc["uptime_s"])
    t.family("hupt_info", "gauge", "hupt's version, the instance's name (hupt run --name; "
             "empty without) and mode (fork or exec); always 1.",
             [({"version": str(doc.get("version") or ""), "name": str(doc.get("name") or ""),
                "mode": str(doc["mode"])}, 1)])
    if doc.get("started_at") is not None:
        t.family("hupt_start_time_seconds", "gauge",
                 "When hupt started, in seconds since the epoch.",
                 [({}, float(doc["started_at"]))])
    t.family("hupt_uptime_seconds", "gauge", "How long hupt has been running.",
             [({}, uptime)])
    t.family("hupt_state", "gauge", "The instance's state: 1 for the current one (down: "
             "nothing serves and the command is being started again).",
             [({"state": s}, int(doc["state"] == s)) for s in INSTANCE_STATES])

    t.family("hupt_reloads_total", "counter", "Reloads since hupt started, by outcome (ok: "
             "the new generation serves; failed: the old one serves on).",
             [({"outcome": o}, stats.outcomes[o]) for o in OUTCOMES])
    t.family("hupt_reload_duration_seconds", "histogram", "How long reloads took, from the "
             "request to the outcome.", [])
    t.samples("hupt_reload_duration_seconds_bucket",
              [({"le": _number(le)}, n) for le, n in zip(BUCKETS, stats.buckets, strict=True)]
              + [({"le": "+Inf"}, stats.count)])
    t.samples("hupt_reload_duration_seconds_sum", [({}, stats.seconds_sum)])
    t.samples("hupt_reload_duration_seconds_count", [({}, stats.count)])
    if stats.last_seconds is not None:
        t.family("hupt_last_reload_duration_seconds", "gauge",
                 "How long the last reload took.", [({}, stats.last_seconds)])
        t.family("hupt_last_reload_success", "gauge",
                 "1 if the last reload succeeded, 0 if it failed.", [({}, stats.last_ok)])
        t.family("hupt_last_reload_timestamp_seconds", "gauge",
                 "When the last reload ended, in seconds since the epoch.",
                 [({}, stats.last_at)])
    t.family("hupt_revives_total", "counter", "Starts of the command after no generation "
             "served (--revive, exec mode's fresh start), by outcome.",
             [({"outcome": o}, stats.revives[o]) for o in OUTCOMES])

    gens = [g for g in doc["generations"] if g["state"] != "exited"]
    serving = [g["number"] for g in gens if g["state"] == "serving"]
    if serving:
        t.family("hupt_serving_generation", "gauge",
                 "The number of the generation that serves.", [({}, max(serving))])
    t.family("hupt_generations", "gauge", "Live generations, by state.",
             [({"state": s}, sum(g["state"] == s for g in gens)) for s in GENERATION_STATES])

    def per_gen(g: dict[str, Any]) -> dict[str, str]:
        return {"generation": str(g["number"]), "state": str(g["state"])}

    t.family("hupt_generation_in_flight_connections", "gauge", "Accepted connections still "
             "open, per live generation (left out when not counted).",
             [(per_gen(g), g.get("in_flight")) for g in gens])
    t.family("hupt_generation_processes", "gauge", "Processes of each live generation.",
             [(per_gen(g), len(g.get("pids") or [])) for g in gens])
    t.family("hupt_generation_draining_seconds", "gauge",
             "For how long each draining generation has drained.",
             [({"generation": str(g["number"])}, g.get("draining_s")) for g in gens])
    listeners = doc["listeners"]
    t.family("hupt_listener_queued_connections", "gauge", "Connections waiting in each held "
             "listening socket's accept queue.",
             [({"address": str(x["address"])}, x.get("queued")) for x in listeners])
    t.family("hupt_listener_backlog", "gauge",
             "Each held listening socket's backlog (the accept queue's limit).",
             [({"address": str(x["address"])}, x.get("backlog")) for x in listeners])
    return "\n".join(t.lines) + "\n"


# -- the responder ----------------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}
_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EINTR, errno.EPROTO})


def response(status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
             head: bool = False, extra: str = "") -> bytes:
    header = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return header.encode() + (b"" if head else body)


def answer(request: bytes, render_text: Callable[[], str]) -> bytes:
    """The whole response to one request (its line and headers)."""
    line = request.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        return response(400, b"bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    head = method == b"HEAD"
    if method not in (b"GET", b"HEAD"):
        return response(405, b"only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
    if target != PATH.encode():
        return response(404, f"not found: the metrics are at {PATH}\n".encode(), head=head)
    try:
        body = render_text().encode()
    except Exception as e:  # a bug in hupt: said once per scrape, the supervisor goes on
        log.error(f"internal error rendering the metrics (a bug in hupt; please report it): "
                  f"{type(e).__name__}: {e}")
        return response(500, b"internal error\n", head=head)
    return response(200, body, content_type=CONTENT_TYPE, head=head)


class _Client:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.deadline = deadline
        self.request = b""
        self.out: bytes | None = None  # the answer, once the request is complete


class MetricsEndpoint:
    """GET /metrics on ``address``, served from ``loop`` (a Timer of it: client timeouts)."""

    def __init__(self, loop: Loop, address: Address, render_text: Callable[[], str]) -> None:
        self._loop = loop
        self.address = address
        self._render = render_text
        self._sock: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._accepting = False
        self._retry_at = math.inf
        self._unix_inode: int | None = None  # the socket file this endpoint made
        loop.add_timer("metrics", self)

    @property
    def opened(self) -> bool:
        return self._sock is not None

    def open(self, allow_remote: bool = False) -> None:
        """Listen (UsageError in one line if the address is refused or taken)."""
        check_exposure(self.address, allow_remote)
        a = self.address
        family = AF_UNIX if a.is_unix else AF_INET6 if a.family == AF_INET6 else AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            if a.is_unix and not a.is_abstract:
                _clear_stale(a.path)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(a.pyaddr())
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise UsageError(f"--metrics {a}: cannot listen: {e.strerror or e}") from e
        except BaseException:
            sock.close()
            raise
        if a.is_unix and not a.is_abstract:
            self._unix_inode = os.lstat(a.path).st_ino
        self._sock = sock
        if not a.is_unix and a.port == 0:  # the kernel's choice: say which
            name = sock.getsockname()
            self.address = Address(a.family, a.host, int(name[1]))
        self._listen()
        shown = (f"http://{self.address}{PATH}" if not self.address.is_unix
                 else f"{self.address} (GET {PATH})")
        log.info(f"metrics on {shown}")

    def close(self) -> None:
        sock, self._sock = self._sock, None  # first: a client dropped below lets no one in
        self._accepting = False
        self._retry_at = math.inf
        for c in list(self._clients.values()):
            self._drop(c)
        if sock is None:
            return
        self._loop.remove(sock.fileno())
        sock.close()
        if self._unix_inode is not None:
            with contextlib.suppress(OSError):
                if os.lstat(self.address.path).st_ino == self._unix_inode:  # still its own
                    os.unlink(self.address.path)
            self._unix_inode = None

    # -- accepting ------------------------------------------------------------------------------
    def _listen(self) -> None:
        assert self._sock is not None
        if not self._accepting:
            self._loop.add(self._sock.fileno(), self._on_listener)
            self._accepting = True
        self._retry_at = math.inf

    def _pause(self, retry_at: float) -> None:
        assert self._sock is not None
        if self._accepting:
            self._loop.remove(self._sock.fileno())
            self._accepting = False
        self._retry_at = retry_at

    def _on_listener(self, mask: int) -> None:
        assert self._sock is not None
        while len(self._clients) < MAX_CLIENTS:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _TRANSIENT:
                    continue
                log.warn(f"metrics: accept(): {e.strerror or e}; trying again in "
                         f"{ACCEPT_RETRY:g} s")
                self._pause(self._loop.now() + ACCEPT_RETRY)
                return
            conn.setblocking(False)
            c = _Client(conn, self._loop.now() + CLIENT_TIMEOUT)
            self._clients[c.fd] = c
            self._loop.add(c.fd, functools.partial(self._on_client, c))
        # Full: the others wait in the backlog until a client is done (not a busy loop
        # on a listening socket that stays readable).
        self._pause(math.inf)

    # -- one client -----------------------------------------------------------------------------
    def _on_client(self, c: _Client, mask: int) -> None:
        if c.out is None and mask & selectors.EVENT_READ:
            self._read(c)
        if c.out is not None and self._clients.get(c.fd) is c:  # not dropped meanwhile
            self._write(c)

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        c.request += data
        end = _end_of_head(c.request)
        if end is None:
            if len(c.request) > MAX_REQUEST:
                c.out = response(431, f"request over {MAX_REQUEST} bytes\n".encode())
                self._loop.modify(c.fd, selectors.EVENT_WRITE)
            return
        c.out = answer(c.request[:end], self._render)
        self._loop.modify(c.fd, selectors.EVENT_WRITE)

    def _write(self, c: _Client) -> None:
        assert c.out is not None
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(c)
            return
        c.out = c.out[n:]
        if not c.out:
            self._drop(c, flushed=True)

    def _drop(self, c: _Client, *, flushed: bool = False) -> None:
        self._clients.pop(c.fd, None)
        self._loop.remove(c.fd)
        if flushed:
            # What the client sent after its request, unread, would make close()
            # reset the connection, and a reset can discard the answer in flight.
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_WR)
                while c.sock.recv(4096):
                    pass
        c.sock.close()
        if self._sock is not None and not self._accepting and self._retry_at == math.inf:
            self._listen()
            self._on_listener(selectors.EVENT_READ)

    # -- the timer --------------------------------------------------------------------------------
    def deadline(self) -> float:
        return min([self._retry_at, *(c.deadline for c in self._clients.values())])

    def tick(self, now: float) -> None:
        for c in [c for c in self._clients.values() if c.deadline <= now]:
            log.debug(f"metrics: closed a connection that took over {CLIENT_TIMEOUT:g} s")
            self._drop(c)
        if self._sock is not None and not self._accepting and now >= self._retry_at:
            self._listen()
            self._on_listener(selectors.EVENT_READ)


def _end_of_head(data: bytes) -> int | None:
    """Where the request's line and headers end (a blank line), or None."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else None


def _clear_stale(path: bytes) -> None:
    """Make way for the socket at ``path``: remove a socket nobody answers on; refuse
    a live one and anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    shown = os.fsdecode(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"--metrics unix:{shown}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        log.info(f"removed {shown}: nobody answers on it (left by a hupt that was killed)")
        os.unlink(path)
        return
    except OSError:
        pass  # cannot tell: taken
    finally:
        probe.close()
    raise UsageError(f"--metrics unix:{shown}: in use (something answers on it)")
