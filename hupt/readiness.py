"""When is a new generation ready to take over?  The ``--ready`` policies.

listen (default)
    It listened on every address the serving generation holds.
delay:SECONDS
    listen, then SECONDS more (for servers that warm up after listen()).
notify
    listen, and it sent READY=1 over the sd_notify socket hupt gave it in
    NOTIFY_SOCKET (a server written for systemd's Type=notify).
http:PATH or http://HOST:PORT/PATH
    listen, then an HTTP GET answered with a 2xx/3xx.  A relative PATH is
    asked of the first held TCP address.  The probe reaches the shared
    socket, so either generation may answer it; hupt therefore probes only
    while the old generation is paused, and rolls back (the old one accepts
    again) if no probe succeeds before the ready timeout.

Probes are non-blocking and driven by the supervisor's loop: ``HttpProbe``
is a small state machine stepped whenever its socket is ready.
``ReadinessCheck`` applies a policy to one generation; reloads and
generation 1's READY=1 both use it.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import math
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from hupt.address import AF_INET, AF_INET6, Address
from hupt.errors import UsageError

if TYPE_CHECKING:
    from hupt.loop import Loop


@dataclass(frozen=True)
class Policy:
    kind: str  # "listen" | "delay" | "notify" | "http"
    delay: float = 0.0
    path: str = "/"
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.kind == "delay":
            return f"delay:{self.delay:g}"
        if self.kind == "http":
            where = f"http://{self.host}:{self.port}" if self.host else "http:"
            return where + self.path
        return self.kind


def parse_policy(text: str) -> Policy:
    if text == "listen":
        return Policy("listen")
    if text == "notify":
        return Policy("notify")
    if text.startswith("delay:"):
        try:
            d = float(text[6:])
        except ValueError:
            d = -1.0
        if not d >= 0 or d == float("inf"):
            raise UsageError(f"--ready delay:SECONDS needs a non-negative number, not {text!r}")
        return Policy("delay", delay=d)
    if text.startswith(("http://", "https://")):
        u = urlsplit(text)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise UsageError(f"--ready {text!r}: only http://HOST:PORT/PATH on a held address")
        host = u.hostname
        if host != "localhost":
            try:
                host = str(ipaddress.ip_address(host))  # one spelling: [0::1] is ::1
            except ValueError:
                # Probes run in the supervisor's loop: no blocking name lookup there.
                raise UsageError(f"--ready {text!r}: HOST must be an IP address or localhost"
                                 ) from None
        return Policy("http", path=(u.path or "/") + (f"?{u.query}" if u.query else ""),
                      host=host, port=u.port)
    if text.startswith("http:"):
        path = text[5:] or "/"
        if not path.startswith("/"):
            raise UsageError(f"--ready http:PATH needs an absolute path, not {path!r}")
        return Policy("http", path=path)
    raise UsageError(f"unknown --ready policy {text!r} (listen, delay:S, notify, http:PATH)")


def probe_target(policy: Policy, held: set[Address]) -> Address | None:
    """The address an http probe connects to."""
    held = {a for a in held if not a.is_datagram}  # http is spoken over streams only
    tcp = sorted((a for a in held if not a.is_unix), key=lambda a: (a.port, a.family, a.host))
    if policy.host is not None and policy.port is not None:
        # The URL's own host, if a held listener answers there: the same
        # address, or a wildcard one of the port (a dual-stack [::] takes v4
        # too).  localhost is whichever loopback the server listens on.
        hosts = ["127.0.0.1", "::1"] if policy.host == "localhost" else [policy.host]
        for host in hosts:
            family = AF_INET6 if ":" in host else AF_INET
            for a in tcp:
                if a.port == policy.port and (
                        _same_ip(a.host, host) or a.host == "::"
                        or (a.host == "0.0.0.0" and family == AF_INET)):
                    return Address(family, host, a.port)
        return None
    unix = sorted(a for a in held if a.is_unix)
    return tcp[0] if tcp else (unix[0] if unix else None)


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _connect_host(a: Address) -> str:
    """Where to connect to reach a listener (a wildcard means "this host")."""
    if a.host == "0.0.0.0":
        return "127.0.0.1"
    if a.host == "::":
        return "::1"
    return a.host


class HttpProbe:
    """One non-blocking GET; ``step()`` when the socket is ready; ``outcome`` when done."""

    def __init__(self, target: Address, path: str) -> None:
        self.target = target
        self.outcome: bool | None = None
        self.detail = ""
        self._buf = b""
        self._req = (f"GET {path} HTTP/1.1\r\nHost: hupt-ready-probe\r\n"
                     "User-Agent: hupt\r\nConnection: close\r\n\r\n").encode()
        self.sock = socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.writing = True
        addr = target.path if target.is_unix else (_connect_host(target), target.port)
        err = self.sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._finish(False, f"connect: {errno.errorcode.get(err, err)}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def step(self) -> None:
        if self.outcome is not None:
            return
        try:
            if self.writing:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._finish(False, f"connect: {errno.errorcode.get(err, err)}")
                    return
                n = self.sock.send(self._req)
                self._req = self._req[n:]
                self.writing = bool(self._req)
                return
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._finish(False, f"{e.strerror}")
            return
        self._buf += data
        if b"\r\n" in self._buf or not data:
            line = self._buf.split(b"\r\n", 1)[0].decode(errors="replace")
            parts = line.split()
            ok = len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1][:1] in ("2", "3")
            self._finish(ok, line or "connection closed without a response")

    def _finish(self, ok: bool, detail: str) -> None:
        self.outcome = ok
        self.detail = detail
        self.sock.close()

    def close(self) -> None:
        if self.outcome is None:
            self._finish(False, "abandoned")


PROBE_INTERVAL = 0.2


class ReadinessCheck:
    """One generation's --ready policy, from the moment it listened until it is met.

    Used for a reload's new generation (which then takes over) and for
    generation 1 (which then is announced READY=1 to the service manager).
    ``met`` says how it was met, once it is; ``on_met`` is called then.  A
    "listen" policy is met at once.  ``deadline``/``tick`` drive the delay
    and the probes; ``notified`` is READY=1 from one of the generation's
    processes.  The caller decides what the ready timeout means.
    """

    def __init__(self, policy: Policy, held: Callable[[], set[Address]], loop: Loop,
                 on_met: Callable[[str], None] | None = None) -> None:
        self.policy = policy
        self._held = held
        self._loop = loop
        self.on_met = on_met
        self.met: str | None = None
        self.last_probe = ""
        self._probe: HttpProbe | None = None
        now = loop.now()
        self._at = now + policy.delay if policy.kind == "delay" else math.inf
        self._next_probe = now if policy.kind == "http" else math.inf
        if policy.kind == "listen":
            self.met = "it listened"

    def deadline(self) -> float:
        if self.met is not None:
            return math.inf
        return min(self._at, self._next_probe if self._probe is None else math.inf)

    def tick(self, now: float) -> None:
        if self.met is not None:
            return
        if now >= self._at:
            self._meet(f"--ready {self.policy}")
        elif self._probe is None and now >= self._next_probe:
            self._start_probe(now)

    def notified(self) -> None:
        if self.policy.kind == "notify" and self.met is None:
            self._meet("it sent READY=1")

    def retry(self) -> None:
        """A probe's answer does not count (it may have reached another generation)."""
        if self.policy.kind == "http":
            self.met = None
            self._next_probe = self._loop.now() + PROBE_INTERVAL

    def close(self) -> None:
        if self._probe is not None:
            self._drop(self._probe, self._probe.fileno())

    def _meet(self, how: str) -> None:
        self.met = how
        if self.on_met is not None:
            self.on_met(how)

    def _start_probe(self, now: float) -> None:
        target = probe_target(self.policy, self._held())
        if target is None:
            self.last_probe, self._next_probe = "no held address to probe", now + PROBE_INTERVAL
            return
        probe = self._probe = HttpProbe(target, self.policy.path)
        if probe.outcome is not None:
            self._probe_done(probe)
            return
        self._loop.add(probe.fileno(), functools.partial(self._on_probe, probe),
                       selectors.EVENT_WRITE)

    def _on_probe(self, probe: HttpProbe, mask: int) -> None:
        writing, fd = probe.writing, probe.fileno()
        probe.step()
        if probe.outcome is not None:
            # Unregistered by the number it had: the probe closed its socket
            # already, and the number may be reused by the next accept.
            self._loop.remove(fd)
            self._probe_done(probe)
        elif writing and not probe.writing:
            self._loop.modify(fd, selectors.EVENT_READ)

    def _probe_done(self, probe: HttpProbe) -> None:
        self._probe, self.last_probe = None, probe.detail
        if probe.outcome:
            self._meet(f"ready probe answered: {probe.detail}")
        else:
            self._next_probe = self._loop.now() + PROBE_INTERVAL

    def _drop(self, probe: HttpProbe, fd: int) -> None:
        self._loop.remove(fd)
        probe.close()
        self._probe = None
