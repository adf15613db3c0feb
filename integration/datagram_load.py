"""A counting datagram client: numbered requests, every answer accounted for.

What it measures, and why it cannot hide a loss:

- Each request carries a unique number; an answer names the number it
  answers.  A request is "sent" once send()/sendto() returned: the kernel
  took it.  On loopback the kernel then either queues it on the socket bound
  to the address, or answers ICMP port unreachable (no socket bound: a gap),
  or drops it because that socket's queue is full.  Every sent request must
  be answered: `lost` lists the ones that were not, however they went.
- Nothing is ever sent twice: there is no retry, so a timeout cannot turn a
  loss into a late success.  At stop, sending ends and the client waits up
  to `settle` seconds for the answers still due, then counts.
- Two kinds of client, as for TCP: one persistent client, a socket
  connect()ed to the server for the whole run (it sees ICMP port
  unreachable as ECONNREFUSED, counted in `refused`, and only accepts
  answers from the server's own address, so an answer sent from another
  port is a loss), and fresh clients, a new socket per request.
- A send the kernel refuses (EAGAIN: a unix datagram queue is full, it
  holds net.unix.max_dgram_qlen datagrams) was not taken: it is counted in
  `backpressure` and the same number is sent again shortly, as a blocking
  sender would wait.  Never a datagram the kernel took.
- A window bounds the requests in flight, so the rate (default 400/s)
  cannot overflow the server's receive queue while no generation reads it
  (the queue is sized for far more than a window): a loss is the handoff's,
  not the load's.
- DNS: with `dns_name`, requests are DNS A queries (the number is the query
  id, 16 bits, so a run stays below 65536 requests) and the answer must be
  a NOERROR response with at least one answer record.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

DgramTarget = tuple[str, int] | str  # (host, port) for UDP, a path for a unix datagram socket


@dataclass
class DatagramResult:
    sent: int = 0
    answered: int = 0
    lost: list[int] = field(default_factory=list)
    refused: int = 0  # ECONNREFUSED on the persistent socket: ICMP port unreachable
    errors: list[str] = field(default_factory=list)  # anything else that went wrong
    pids: dict[int, int] = field(default_factory=dict)  # answering pid -> answers
    bad_answers: int = 0
    backpressure: int = 0  # sends the kernel refused with EAGAIN (queue full): not sent

    def summary(self) -> str:
        return (f"sent {self.sent}, answered {self.answered}, lost {len(self.lost)} "
                f"{self.lost[:20]}, refused {self.refused}, bad answers {self.bad_answers}, "
                f"errors {self.errors[:5]}, EAGAIN {self.backpressure}, answering pids {self.pids}")


def dns_query(qid: int, name: str) -> bytes:
    """A DNS query for the A record of ``name``, recursion desired."""
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + qname + struct.pack(">HH", 1, 1)


def dns_answer(data: bytes) -> tuple[int, int, int] | None:
    """(id, rcode, answer count) of a DNS response; None if it is not one."""
    if len(data) < 12:
        return None
    qid, flags, _qd, an, _ns, _ar = struct.unpack(">HHHHHH", data[:12])
    if not flags & 0x8000:
        return None
    return qid, flags & 0xF, an


class DatagramLoad:
    WINDOW = 16

    def __init__(self, target: DgramTarget, *, rate: float = 400.0, fresh_every: int = 4,
                 dns_name: str | None = None, settle: float = 5.0,
                 tmpdir: str | None = None) -> None:
        self.target = target
        self.interval = 1.0 / rate
        self.fresh_every = fresh_every
        self.dns_name = dns_name
        self.settle = settle
        self.tmpdir = tmpdir
        self.result = DatagramResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._due: dict[int, socket.socket] = {}
        self._seq = 0
        self._names: list[str] = []

    # -- sockets -----------------------------------------------------------------------
    def _socket(self) -> socket.socket:
        if isinstance(self.target, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(b"")  # autobind: an abstract name the server can answer to
        else:
            family = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
            s = socket.socket(family, socket.SOCK_DGRAM)
        s.connect(self.target)
        s.setblocking(False)
        return s

    # -- requests and answers --------------------------------------------------------------
    def _request(self, n: int) -> bytes:
        if self.dns_name is not None:
            return dns_query(n, self.dns_name)
        return b"%d" % n

    def _parse(self, data: bytes) -> tuple[int, int] | None:
        """(request number, answering pid or 0) of an answer."""
        if self.dns_name is not None:
            got = dns_answer(data)
            if got is None or got[1] != 0 or got[2] < 1:
                return None
            return got[0], 0
        try:
            n, pid = data.split()
            return int(n), int(pid)
        except ValueError:
            return None

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        persistent = self._socket()
        sel.register(persistent, selectors.EVENT_READ, "persistent")
        limit = 65535 if self.dns_name is not None else 1 << 62
        next_send = time.monotonic()
        deadline: float | None = None
        try:
            while True:
                now = time.monotonic()
                if self._stop.is_set():
                    if deadline is None:
                        deadline = now + self.settle
                    if not self._due or now >= deadline:
                        break
                elif now >= next_send and len(self._due) < self.WINDOW and self._seq < limit:
                    self._send(sel, persistent)
                    next_send = now + self.interval
                for key, _ in sel.select(max(0.0, min(0.05, next_send - now))):
                    self._receive(sel, key.fileobj, key.data)  # type: ignore[arg-type]
        finally:
            self.result.lost = sorted(self._due)
            for s in {*self._due.values(), persistent}:
                if s is not persistent:
                    sel.unregister(s)
                s.close()
            sel.close()

    def _send(self, sel: selectors.BaseSelector, persistent: socket.socket) -> None:
        self._seq += 1
        n = self._seq
        fresh = self.fresh_every and n % self.fresh_every == 0
        s = self._socket() if fresh else persistent
        try:
            s.send(self._request(n))
        except BlockingIOError:
            # The kernel did not take it (a unix datagram socket's queue holds
            # net.unix.max_dgram_qlen datagrams): not sent, so not lost; the
            # same number goes again once the queue has room, as a blocking
            # sender would wait.
            if fresh:
                s.close()
            self._seq -= 1
            self.result.backpressure += 1
            return
        except OSError as e:
            if fresh:
                s.close()
            self._error(e, "send")
            return
        self.result.sent += 1
        self._due[n] = s
        if fresh:
            sel.register(s, selectors.EVENT_READ, "fresh")

    def _receive(self, sel: selectors.BaseSelector, s: socket.socket, kind: str) -> None:
        while True:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                self._error(e, "recv")
                return
            got = self._parse(data)
            if got is None or got[0] not in self._due:
                self.result.bad_answers += 1
                continue
            n, pid = got
            del self._due[n]
            self.result.answered += 1
            self.result.pids[pid] = self.result.pids.get(pid, 0) + 1
            if kind == "fresh":
                sel.unregister(s)
                s.close()
                return

    def _error(self, e: OSError, op: str) -> None:
        if e.errno == errno.ECONNREFUSED:
            self.result.refused += 1
        else:
            self.result.errors.append(f"{op}: {os.strerror(e.errno or 0)}")

    # -- control ---------------------------------------------------------------------------
    def __enter__(self) -> DatagramLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.settle + 10)
        assert not self._thread.is_alive(), "the datagram client did not stop"

    def answered_so_far(self) -> int:
        return self.result.answered
