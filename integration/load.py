"""A bounded HTTP load generator that tells a zero-downtime reload from a gap.

Facts and choices this rests on:

- Raw HTTP over sockets, no client library: the generator must see exactly
  what went wrong (refused connect, reset, EOF before the status line, short
  body, wrong status), which libraries blur by retrying or wrapping errors.
- Three client kinds, because a reload breaks them differently. Fresh clients
  open a connection per request ("Connection: close") and catch a listener
  that is missing or not accepting (refused, reset in the accept queue).
  Keep-alive clients reuse a connection for `conn_requests` requests and catch
  a generation retired with connections still open. Persistent clients are
  what browsers, connection pools and load balancers do: ONE connection held
  for the whole run, requests back to back, never closed by the client. A
  keep-alive client that reconnects every few requests lets an old generation
  drain by itself; a persistent one pins it, and shows whether the server (or
  its drain signal) ends the connection at a request boundary.
- A server may close an idle keep-alive connection at any time (RFC 9112
  9.3.1); a request sent on it at that moment dies before any response byte.
  Real clients retry that, once, on a new connection. So does this one, and
  only in that exact case: EOF, ECONNRESET or EPIPE on a REUSED connection
  before the first byte of the response (a connection already seen closed
  before sending counts too). These are counted in `keepalive_retries`, not as
  failures; a retry that fails again is a failure. Everything else is a failure.
- A persistent client opens another connection only when the server closed
  its own: an answer with `Connection: close` (or an HTTP/1.0 one), a
  connection found closed before sending, or one that ended (EOF, reset)
  before ANY byte of the answer to a request sent on it; that request is sent
  once more on the new connection, as HTTP clients do for idempotent
  requests, and counted in the client's `retries`. Each such close counts in
  `reconnects`. A partial answer, a reset mid-answer, a bad status or a
  timeout is a failure, after which the next request needs a new connection
  too. Each answer is recorded with the pid the body names, so a test can
  tell which generation served the client when.
- `longest_wait` is the longest any request answered 200 took from its start
  (connect, or send on a reused connection; a retry included) to the last
  byte of its answer: a reload must not make a client wait, even one that
  gets its answer in the end.
- HTTP/1.0 responses (python -m http.server) close the connection: the client
  reads to EOF when there is no Content-Length and reconnects without counting
  a retry.
- Bounded in time and load: every request has a deadline of `timeout` s
  (connect + send + full response), so stop() returns within timeout + 2 s;
  a total rate limit (default 200 req/s, every client kind included) and a
  total request cap keep the generator from starving the 2-core machine it
  shares with the servers.
- `slow_request` holds one request in flight for a chosen time on ANY server
  (stock http.server has no /slow route): the client trickles its request
  headers, so the server is inside the request from the first byte until the
  blank line, like a slow upload. `HeldRequest` does the same until the test
  releases it: a test that checks something "while a request is in flight"
  holds one for as long as its checks take, on a fast machine or a loaded one,
  instead of racing a timer.
- `wait_accepted` tells when the server has accepted such a request's
  connection: the server's end shows in /proc/net/tcp{,6} with an inode (a
  connection still in the accept queue has none). Only then is the request in
  flight for the server, and for hupt's drain.
"""

from __future__ import annotations

import contextlib
import errno
import re
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

T = TypeVar("T")
Target = tuple[str, int] | str
"""("127.0.0.1", port), ("::1", port) or a unix socket path."""

MAX_HEAD = 65536
MAX_RECORDED = 20
# Errors that mean "the server closed this connection": retryable only on a reused connection
# before any response byte arrived.
CLOSED_ERRNOS = {errno.ECONNRESET, errno.EPIPE}

_TAG_BODY = re.compile(rb"^ok pid=(\d+) tag=(\S*)\n?$")
_PID_BODY = re.compile(rb"^(\d+)\n?$")


class RequestFailed(Exception):
    """One request failed: `kind` classifies it; `before_response`: no response byte came."""

    def __init__(self, kind: str, error: str, before_response: bool) -> None:
        super().__init__(f"{kind}: {error}")
        self.kind = kind
        self.error = error
        self.before_response = before_response


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    reusable: bool


def connect(target: Target, timeout: float) -> socket.socket:
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[str, int] = target
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET)
        address = target
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def host_header(target: Target) -> str:
    if isinstance(target, str):
        return "localhost"
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def request_bytes(target: Target, path: str, keep_alive: bool) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host_header(target)}\r\nUser-Agent: hupt-load\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode()


class Connection:
    """A client socket, its read buffer, and how many requests it has carried."""

    def __init__(self, target: Target, deadline: float) -> None:
        self.sock = _classified(lambda: connect(target, _remaining(deadline)), "connect", True)
        self.buf = bytearray()
        self.used = 0
        self.received = 0

    def close(self) -> None:
        self.sock.close()

    def closed_by_peer(self) -> bool:
        """True if the server already closed (or reset) this idle connection."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def exchange(self, request: bytes, deadline: float) -> Response:
        self.send(request, deadline)
        return self.read_response(deadline)

    def send(self, data: bytes, deadline: float) -> None:
        self.received = 0
        self.sock.settimeout(_remaining(deadline))
        _classified(partial(self.sock.sendall, data), "send", True)

    def read_response(self, deadline: float) -> Response:
        head = self._read_head(deadline)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise RequestFailed("protocol", f"bad status line {lines[0]!r}", False)
        version, status = parts[0], int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        reusable = connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._read_chunked(deadline)
        elif "content-length" in headers:
            body = self._read_exactly(int(headers["content-length"]), deadline)
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:
            body = self._read_to_eof(deadline)
            reusable = False
        self.used += 1
        return Response(status, headers, body, reusable)

    def _recv(self, deadline: float) -> bytes:
        self.sock.settimeout(_remaining(deadline))
        chunk = _classified(lambda: self.sock.recv(65536), "recv", self.received == 0)
        self.received += len(chunk)
        return chunk

    def _read_head(self, deadline: float) -> bytes:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > MAX_HEAD:
                raise RequestFailed("protocol", "response head too large", False)
            chunk = self._recv(deadline)
            if not chunk:
                if self.received == 0:
                    raise RequestFailed("eof", "connection closed before the status line", True)
                partial_head = bytes(self.buf)
                raise RequestFailed("eof", f"EOF inside the response head {partial_head!r}", False)
            self.buf += chunk
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        return head

    def _read_exactly(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            chunk = self._recv(deadline)
            if not chunk:
                raise RequestFailed("short", f"EOF after {len(self.buf)} of {n} body bytes", False)
            self.buf += chunk
        body = bytes(self.buf[:n])
        del self.buf[:n]
        return body

    def _read_line(self, deadline: float) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            chunk = self._recv(deadline)
            if not chunk:
                raise RequestFailed("short", "EOF inside a chunked body", False)
            self.buf += chunk
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _read_chunked(self, deadline: float) -> bytes:
        body = bytearray()
        while True:
            size = int(self._read_line(deadline).split(b";")[0], 16)
            if size == 0:
                while self._read_line(deadline):
                    pass  # trailers
                return bytes(body)
            body += self._read_exactly(size, deadline)
            self._read_exactly(2, deadline)

    def _read_to_eof(self, deadline: float) -> bytes:
        while chunk := self._recv(deadline):
            self.buf += chunk
        body = bytes(self.buf)
        self.buf.clear()
        return body


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RequestFailed("timeout", "request deadline passed", False)
    return left


def _classified(op: Callable[[], T], where: str, before_response: bool) -> T:
    """Run a socket operation, turning its OSError into a classified RequestFailed."""
    try:
        return op()
    except TimeoutError as e:
        raise RequestFailed("timeout", f"{where}: {e!r}", False) from e
    except ConnectionRefusedError as e:
        raise RequestFailed("refused", f"{where}: {e!r}", True) from e
    except OSError as e:
        kind = "reset" if e.errno in CLOSED_ERRNOS else where
        raise RequestFailed(kind, f"{where}: {e!r}", before_response) from e


def request(target: Target, path: str = "/", timeout: float = 5.0) -> Response:
    """One request on a fresh connection ("Connection: close"); raises RequestFailed."""
    deadline = time.monotonic() + timeout
    conn = Connection(target, deadline)
    try:
        return conn.exchange(request_bytes(target, path, keep_alive=False), deadline)
    finally:
        conn.close()


def body_pid(body: bytes) -> int:
    """The pid a test server's body names (/, /slow, /pid); 0 if it names none."""
    if (m := _TAG_BODY.match(body)) or (m := _PID_BODY.match(body)):
        return int(m[1])
    return 0


def response_key(body: bytes) -> str:
    """Which generation answered: "tag=T pid=N" for the test servers' bodies, else "other"."""
    if m := _TAG_BODY.match(body):
        return f"tag={m[2].decode()} pid={int(m[1])}"
    if m := _PID_BODY.match(body):
        return f"pid={int(m[1])}"
    return "other"


Event = tuple[float, str, str]
"""(time.monotonic() when it happened, kind, error repr)."""


Answer = tuple[float, int]
"""(time.monotonic() when the answer was complete, body_pid of its body)."""


@dataclass
class PersistentStats:
    """What one persistent client saw (see the module doc)."""

    ok: int = 0
    retries: int = 0
    """Requests sent again because their connection ended before any byte of the answer."""
    reconnects: int = 0
    """Connections the server closed (retries included); each time the client opened a new one."""
    failed: int = 0
    answers: list[Answer] = field(default_factory=list)

    def answers_after(self, after: float) -> list[Answer]:
        return [a for a in self.answers if a[0] > after]

    def old_answers(self, after: float, current: int) -> int:
        """Answers after `after` from any process but `current`."""
        return sum(1 for t, pid in self.answers if t > after and pid != current)


@dataclass
class LoadResult:
    """Counts of every client kind together, and the persistent clients' own apart.

    `ok`, `failed`, `failures` and `responses` cover every request, so a test
    that asserts `failed == 0` covers the persistent clients too.
    """

    ok: int = 0
    failed: int = 0
    failures: list[Event] = field(default_factory=list)
    """The first MAX_RECORDED failures (a persistent client's error says which client)."""
    keepalive_retries: int = 0
    retry_events: list[Event] = field(default_factory=list)
    """The first MAX_RECORDED retries: kind "closed-before-send", "eof", "reset" or "send"."""
    responses: Counter[str] = field(default_factory=Counter)
    """Successful responses by response_key(body)."""
    started: float = 0.0
    stopped: float = 0.0
    persistent: list[PersistentStats] = field(default_factory=list)
    """One entry per persistent client."""
    longest_wait: float = 0.0
    """Seconds: the longest any request answered 200 took, start to last byte (module doc)."""
    longest_wait_at: float = 0.0
    """time.monotonic() when that request was answered."""

    @property
    def duration(self) -> float:
        return self.stopped - self.started

    @property
    def persistent_ok(self) -> int:
        return sum(p.ok for p in self.persistent)

    @property
    def persistent_retries(self) -> int:
        return sum(p.retries for p in self.persistent)

    @property
    def persistent_reconnects(self) -> int:
        return sum(p.reconnects for p in self.persistent)

    @property
    def persistent_failed(self) -> int:
        return sum(p.failed for p in self.persistent)

    @property
    def persistent_answers(self) -> list[Answer]:
        """Every persistent client's answers, in time order."""
        return sorted(a for p in self.persistent for a in p.answers)

    @property
    def pids(self) -> set[int]:
        """Pids of the processes that answered (from /, /slow and /pid bodies)."""
        return {int(p[4:]) for key in self.responses for p in key.split() if p.startswith("pid=")}

    @property
    def tags(self) -> Counter[str]:
        tags: Counter[str] = Counter()
        for key, n in self.responses.items():
            for part in key.split():
                if part.startswith("tag="):
                    tags[part[4:]] += n
        return tags

    def summary(self) -> str:
        def events(evs: list[Event]) -> str:
            return "".join(f"\n    +{t - self.started:.3f}s {k}: {e}" for t, k, e in evs)

        persistent = (
            f"; {len(self.persistent)} persistent clients: {self.persistent_ok} ok,"
            f" {self.persistent_failed} failed, {self.persistent_retries} retries,"
            f" {self.persistent_reconnects} reconnects" if self.persistent else "")
        longest = (f"; longest wait {self.longest_wait:.3f}s"
                   f" (answered at +{self.longest_wait_at - self.started:.3f}s)"
                   if self.longest_wait_at else "")
        return (
            f"load: {self.ok} ok, {self.failed} failed, {self.keepalive_retries} keep-alive retries"
            f" in {self.duration:.2f}s{persistent}{longest}; responses {dict(self.responses)}"
            + (f"\n  failures:{events(self.failures)}" if self.failures else "")
            + (f"\n  retries:{events(self.retry_events)}" if self.retry_events else "")
        )

    __str__ = summary


class Load:
    """Fresh, keep-alive and persistent client threads hitting `target` until stop().

    with Load(("127.0.0.1", port)) as load: ...  ->  load.result

    `persistent` clients each hold one connection for the whole run (module doc);
    so_far() shows what they saw while the load still runs. They are paced like
    the others, under max_rate, unless `persistent_pause` is given: then each
    waits that long after an answer before its next request, whatever the rate
    (a connection idle for a known time between requests, e.g. for --close-idle).
    """

    def __init__(
        self,
        target: Target,
        fresh: int = 2,
        keepalive: int = 2,
        conn_requests: int = 20,
        timeout: float = 10.0,
        path: str = "/",
        max_rate: float = 200.0,
        max_requests: int = 100_000,
        persistent: int = 0,
        persistent_pause: float | None = None,
    ) -> None:
        if min(fresh, keepalive, persistent) < 0 or fresh + keepalive + persistent < 1:
            raise ValueError("need at least one client and no negative count")
        if conn_requests < 1 or max_rate <= 0 or (persistent_pause or 0.0) < 0:
            raise ValueError("need conn_requests >= 1, max_rate > 0 and no negative pause")
        self.target = target
        self.fresh = fresh
        self.keepalive = keepalive
        self.persistent = persistent
        self.persistent_pause = persistent_pause
        self.conn_requests = conn_requests
        self.timeout = timeout
        self.path = path
        self.max_requests = max_requests
        # Each thread paces itself so that all together stay under max_rate.
        paced = fresh + keepalive + (persistent if persistent_pause is None else 0)
        self.interval = paced / max_rate
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._issued = 0
        self._threads: list[tuple[threading.Thread, PersistentStats | None]] = []
        self._result = LoadResult(persistent=[PersistentStats() for _ in range(persistent)])
        self._final: LoadResult | None = None

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def result(self) -> LoadResult:
        if self._final is None:
            raise RuntimeError("Load.result before stop()")
        return self._final

    def snapshot(self) -> tuple[int, int]:
        """(ok, failed) so far, to wait for progress while running."""
        with self._lock:
            return self._result.ok, self._result.failed

    def so_far(self) -> LoadResult:
        """A copy of the result so far, `stopped` being now: to look while running."""
        with self._lock:
            copy = self._copy()
        copy.stopped = time.monotonic()
        return copy

    def start(self) -> Load:
        if self._threads:
            raise RuntimeError("Load already started")
        self._result.started = time.monotonic()
        clients: list[tuple[str, Callable[[], None], PersistentStats | None]] = []
        clients += [("fresh", self._fresh_client, None)] * self.fresh
        clients += [("keepalive", self._keepalive_client, None)] * self.keepalive
        for j, own in enumerate(self._result.persistent):
            clients.append(("persistent", partial(self._persistent_client, own,
                                                  f"persistent client {j}"), own))
        for i, (kind, client, stats) in enumerate(clients):
            thread = threading.Thread(target=self._guard, args=(client, stats),
                                      name=f"load-{kind}-{i}", daemon=True)
            self._threads.append((thread, stats))
        for t, _ in self._threads:
            t.start()
        return self

    def stop(self) -> LoadResult:
        """Stop the clients and return the result; returns within timeout + 2 s."""
        if self._final is not None:
            return self._final
        self._stop.set()
        # In-flight requests finish (their deadline is at most `timeout` away) and count.
        join_until = time.monotonic() + self.timeout + 1.5
        for t, _ in self._threads:
            t.join(max(0.0, join_until - time.monotonic()))
        with self._lock:
            for t, stats in self._threads:
                if t.is_alive():
                    self._fail("hung", f"{t.name} still running at stop()", stats)
            self._result.stopped = time.monotonic()
            self._final = self._copy()
        return self._final

    def _copy(self) -> LoadResult:
        """A copy that the running clients do not change; the caller holds self._lock."""
        r = self._result
        return replace(r, failures=list(r.failures), retry_events=list(r.retry_events),
                       responses=Counter(r.responses),
                       persistent=[replace(p, answers=list(p.answers)) for p in r.persistent])

    # -- client threads ------------------------------------------------------------------

    def _guard(self, client: Callable[[], None], stats: PersistentStats | None) -> None:
        try:
            client()
        except BaseException as e:  # a bug in the generator must show up as a failure
            with self._lock:
                self._fail("client-bug", repr(e), stats)

    def _slots(self, pause: float | None = None) -> Iterator[None]:
        """One iteration per request: every self.interval s, or `pause` s after each."""
        next_at = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                if self._issued >= self.max_requests:
                    return
                self._issued += 1
            yield
            if pause is not None:
                next_at = time.monotonic() + pause
            else:
                next_at = max(next_at + self.interval, time.monotonic())
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return

    def _fresh_client(self) -> None:
        request = request_bytes(self.target, self.path, keep_alive=False)
        for _ in self._slots():
            started = time.monotonic()
            deadline = started + self.timeout
            try:
                conn = Connection(self.target, deadline)
                try:
                    self._answered(conn.exchange(request, deadline), started)
                finally:
                    conn.close()
            except RequestFailed as f:
                with self._lock:
                    self._fail(f.kind, f.error)

    def _keepalive_client(self) -> None:
        request = request_bytes(self.target, self.path, keep_alive=True)
        conn: Connection | None = None
        try:
            for _ in self._slots():
                started = time.monotonic()
                deadline = started + self.timeout
                if conn is not None and conn.used >= self.conn_requests:
                    conn.close()
                    conn = None
                try:
                    conn = self._keepalive_request(conn, request, started, deadline)
                except RequestFailed as f:
                    conn = None
                    with self._lock:
                        self._fail(f.kind, f.error)
        finally:
            if conn is not None:
                conn.close()

    def _keepalive_request(self, conn: Connection | None, request: bytes, started: float,
                           deadline: float) -> Connection | None:
        """One request, on `conn` if given; returns the connection to reuse next, if any."""
        if conn is not None and conn.closed_by_peer():
            self._retried("closed-before-send", "server closed the idle connection")
            conn.close()
            conn = None
        if conn is not None:
            try:
                response = conn.exchange(request, deadline)
            except RequestFailed as f:
                conn.close()
                if not (f.before_response and f.kind in ("eof", "reset")):
                    raise
                self._retried(f.kind, f.error)
            else:
                return self._finish(conn, response, started)
        conn = Connection(self.target, deadline)
        try:
            response = conn.exchange(request, deadline)
        except BaseException:
            conn.close()
            raise
        return self._finish(conn, response, started)

    def _persistent_client(self, stats: PersistentStats, name: str) -> None:
        request = request_bytes(self.target, self.path, keep_alive=True)
        conn: Connection | None = None
        try:
            for _ in self._slots(self.persistent_pause):
                started = time.monotonic()
                deadline = started + self.timeout
                try:
                    conn = self._persistent_request(conn, request, started, deadline, stats,
                                                    name)
                except RequestFailed as f:
                    conn = None  # closed already: after a failure its state is unknown
                    with self._lock:
                        self._fail(f.kind, f"{name}: {f.error}", stats)
        finally:
            if conn is not None:
                conn.close()

    def _persistent_request(self, conn: Connection | None, request: bytes, started: float,
                            deadline: float, stats: PersistentStats,
                            name: str) -> Connection | None:
        """One request, on `conn` if the server has not closed it; returns the connection
        for the next one, None once the server closed it."""
        if conn is not None and conn.closed_by_peer():
            conn.close()
            conn = None
            with self._lock:
                stats.reconnects += 1
        if conn is not None:
            try:
                response = conn.exchange(request, deadline)
            except RequestFailed as f:
                conn.close()
                # "send": an error other than EPIPE/ECONNRESET from a socket the server
                # closed meanwhile; nothing of an answer came either way.
                if not (f.before_response and f.kind in ("eof", "reset", "send")):
                    raise
                self._retried(f.kind, f"{name}: {f.error}", stats)
            else:
                return self._finish(conn, response, started, stats)
        conn = Connection(self.target, deadline)
        try:
            response = conn.exchange(request, deadline)
        except BaseException:
            conn.close()
            raise
        return self._finish(conn, response, started, stats)

    def _finish(self, conn: Connection, response: Response, started: float,
                stats: PersistentStats | None = None) -> Connection | None:
        try:
            self._answered(response, started, stats)
        except BaseException:
            conn.close()
            raise
        if response.reusable:
            return conn
        conn.close()
        if stats is not None:
            with self._lock:
                stats.reconnects += 1
        return None

    def _answered(self, response: Response, started: float,
                  stats: PersistentStats | None = None) -> None:
        if response.status != 200:
            raise RequestFailed("status", f"HTTP {response.status} {response.body[:80]!r}", False)
        now = time.monotonic()
        with self._lock:
            r = self._result
            r.ok += 1
            r.responses[response_key(response.body)] += 1
            if now - started > r.longest_wait:
                r.longest_wait, r.longest_wait_at = now - started, now
            if stats is not None:
                stats.ok += 1
                stats.answers.append((now, body_pid(response.body)))

    def _retried(self, kind: str, error: str, stats: PersistentStats | None = None) -> None:
        """A keep-alive retry, or a persistent client's (which also means a reconnect)."""
        with self._lock:
            if stats is None:
                self._result.keepalive_retries += 1
            else:
                stats.retries += 1
                stats.reconnects += 1
            if len(self._result.retry_events) < MAX_RECORDED:
                self._result.retry_events.append((time.monotonic(), kind, error))

    def _fail(self, kind: str, error: str, stats: PersistentStats | None = None) -> None:
        """Record a failure; the caller holds self._lock."""
        self._result.failed += 1
        if stats is not None:
            stats.failed += 1
        if len(self._result.failures) < MAX_RECORDED:
            self._result.failures.append((time.monotonic(), kind, error))


# -- a request held in flight by the client ------------------------------------------------

TCP_ESTABLISHED = 0x01


def server_accepted(server_port: int, client_port: int) -> bool:
    """Whether the server on `server_port` has accepted the connection from `client_port`.

    Its end of the connection (local port server_port, remote port client_port) is in
    /proc/net/tcp or tcp6 with a non-zero inode once a process holds it; in the accept
    queue it has inode 0.
    """
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if (int(local.rsplit(":", 1)[1], 16) == server_port
                        and int(remote.rsplit(":", 1)[1], 16) == client_port
                        and int(fields[3], 16) == TCP_ESTABLISHED):
                    return int(fields[9]) != 0
    return False


class _InFlight:
    """A request sent from a thread; what SlowRequest and HeldRequest share."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.client_port = 0
        self._sent = threading.Event()
        self._thread = threading.Thread(target=self._run, name="in-flight", daemon=True)
        self._outcome: tuple[int, float] | None = None
        self._error: BaseException | None = None

    def _exchange(self) -> tuple[int, float]:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            self._outcome = self._exchange()
        except BaseException as e:
            self._error = e
        finally:
            self._sent.set()

    def _opened(self, conn: Connection) -> None:
        """The request line is out: the server may now be inside the request."""
        name = conn.sock.getsockname()
        if isinstance(name, tuple):
            self.client_port = name[1]
        self._sent.set()

    def _start(self) -> None:
        """Start the thread; return once the request line is sent (or the request failed)."""
        self._thread.start()
        self._sent.wait(self.timeout)

    def wait_accepted(self, timeout: float = 10.0) -> None:
        """Wait until the server has accepted this request's connection (TCP targets)."""
        if isinstance(self.target, str):
            raise ValueError("wait_accepted needs a TCP target")
        deadline = time.monotonic() + timeout
        while not (self.client_port and server_accepted(self.target[1], self.client_port)):
            if self._error is not None:
                raise self._error
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not accept the request within {timeout}s")
            time.sleep(0.01)

    def result(self) -> tuple[int, float]:
        """(status, elapsed); re-raises the request's failure. Bounded by the request timeout."""
        self._thread.join(self.timeout + 2.0)
        if self._thread.is_alive():
            raise TimeoutError("request still running past its timeout")
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome


def slow_request(target: Target, seconds: float = 3.0, path: str = "/",
                 timeout: float | None = None,
                 on_open: Callable[[Connection], None] | None = None) -> tuple[int, float]:
    """GET `path`, trickling the request headers over `seconds`; returns (status, elapsed).

    The request line goes out at once, one header line every ~0.25 s, the blank line
    at `seconds`: the server holds a half-read request for that long. `timeout`
    (default seconds + 15) bounds the whole exchange. `on_open(conn)` is called once
    the request line is sent. Raises RequestFailed.
    """
    timeout = seconds + 15.0 if timeout is None else timeout
    started = time.monotonic()
    deadline = started + timeout
    conn = Connection(target, deadline)
    try:
        conn.send(f"GET {path} HTTP/1.1\r\nHost: {host_header(target)}\r\n".encode(), deadline)
        if on_open is not None:
            on_open(conn)
        steps = max(1, round(seconds / 0.25))
        for i in range(steps):
            time.sleep(max(0.0, started + seconds * (i + 1) / steps - time.monotonic()))
            last = i == steps - 1
            conn.send(b"Connection: close\r\n\r\n" if last else b"X-Trickle: .\r\n", deadline)
        response = conn.read_response(deadline)
        return response.status, time.monotonic() - started
    finally:
        conn.close()


class SlowRequest(_InFlight):
    """slow_request in a thread: start(), do something, then result().

    start() returns once the request line is sent; wait_accepted() once the server
    has the connection.
    """

    def __init__(self, target: Target, seconds: float = 3.0, path: str = "/",
                 timeout: float | None = None) -> None:
        super().__init__(target, seconds + 15.0 if timeout is None else timeout)
        self.seconds = seconds
        self.path = path

    def _exchange(self) -> tuple[int, float]:
        return slow_request(self.target, self.seconds, self.path, self.timeout, self._opened)

    def start(self) -> SlowRequest:
        self._start()
        return self


class HeldRequest(_InFlight):
    """A GET kept in flight until release(): the server is inside it as long as the test wants.

    The request line goes out at start(), then a header line every `interval` s
    (the server sees a request still arriving, never an idle connection), and the
    blank line that completes it only at release(). result() gives (status,
    seconds from the request line to the response). Never released, the request
    completes by itself after `timeout` s and result() raises AssertionError: a
    test that forgets to release still ends.
    """

    def __init__(self, target: Target, path: str = "/", timeout: float = 60.0,
                 interval: float = 1.0) -> None:
        super().__init__(target, timeout + 15.0)
        self.path = path
        self.hold_max = timeout
        self.interval = interval
        self._release = threading.Event()
        self.expired = False

    def start(self) -> HeldRequest:
        self._start()
        return self

    def release(self) -> None:
        self._release.set()

    def _exchange(self) -> tuple[int, float]:
        started = time.monotonic()
        deadline = started + self.timeout
        conn = Connection(self.target, deadline)
        try:
            conn.send(f"GET {self.path} HTTP/1.1\r\nHost: {host_header(self.target)}\r\n"
                      .encode(), deadline)
            self._opened(conn)
            hold_until = started + self.hold_max
            while not self._release.wait(max(0.0, min(self.interval,
                                                      hold_until - time.monotonic()))):
                if time.monotonic() >= hold_until:
                    self.expired = True
                    break
                conn.send(b"X-Held: .\r\n", deadline)
            conn.send(b"Connection: close\r\n\r\n", deadline)
            response = conn.read_response(deadline)
            if self.expired:
                raise AssertionError(f"held request never released in {self.hold_max}s")
            return response.status, time.monotonic() - started
        finally:
            conn.close()
