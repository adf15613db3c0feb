"""The sd_notify protocol, both ways.

Facts about sd_notify (systemd's sd_notify(3), the protocol is stable and
documented for reimplementation):

* NOTIFY_SOCKET names a unix datagram socket: a path, or an abstract name
  written with a leading "@".  A message is newline-separated KEY=VALUE
  assignments in one datagram: READY=1, RELOADING=1, STOPPING=1, STATUS=...,
  MAINPID=..., MONOTONIC_USEC=... (required with RELOADING=1 for
  ``Type=notify-reload``: CLOCK_MONOTONIC in microseconds).
* systemd attributes a message to a unit by the sender's credentials, which
  the kernel attaches when the receiver set SO_PASSCRED; so does hupt when it
  is the receiver (``--ready notify``): a READY=1 counts only if its sender
  is a process of the generation being started.

``Notifier`` is hupt speaking to its own supervisor (systemd); ``Listener``
is hupt receiving a generation's READY=1.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterable

_UCRED = struct.Struct("3i")


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """Messages to the service manager named by $NOTIFY_SOCKET (a no-op when unset)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        name = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = _address(name) if name else None
        self._sock: socket.socket | None = None
        if self._addr is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        if self._sock is None or self._addr is None:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        try:
            self._sock.sendto(msg.encode(), self._addr)
        except OSError:
            return False  # the manager went away: nothing useful to do about it
        return True

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status, mainpid=os.getpid())

    def reloading(self, status: str) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(reloading=1, monotonic_usec=usec, status=status)

    def status(self, status: str) -> None:
        self.send(status=status)

    def stopping(self, status: str) -> None:
        self.send(stopping=1, status=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def parse(message: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in message.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value
    return out


class Listener:
    """A datagram socket a generation is told about in its NOTIFY_SOCKET."""

    def __init__(self, directory: str, name: str) -> None:
        self.path = os.path.join(directory, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[tuple[int, dict[str, str]]]:
        """Every pending message as (sender pid, fields)."""
        out: list[tuple[int, dict[str, str]]] = []
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                return out
            pid = 0
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[:_UCRED.size])[0]
            out.append((pid, parse(data)))

    def ready_from(self, pids: Iterable[int]) -> bool:
        """Whether a READY=1 arrived from one of ``pids``."""
        members = set(pids)
        return any(f.get("READY") == "1" and pid in members for pid, f in self.receive())

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
