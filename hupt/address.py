"""Listening addresses: what a server bound, as hupt compares and prints them.

An address is the key hupt holds a socket under.  Families are matched exactly
(an AF_INET socket is never handed to an AF_INET6 bind: see kernel-facts 2),
and a unix path is stored resolved against the binding process's cwd so two
generations that bind "./app.sock" from the same directory meet.  The socket
type is part of the key: a UDP socket and a TCP listener on the same port
(or a datagram and a stream unix socket, which can never share a path) are
different addresses, each handed only to a bind of its own type.  Datagram
addresses print as ``udp:HOST:PORT`` and ``unixgram:PATH``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, replace

from hupt.errors import UsageError

AF_UNIX = socket.AF_UNIX
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
SOCK_STREAM = socket.SOCK_STREAM
SOCK_DGRAM = socket.SOCK_DGRAM

# struct sockaddr_in  { sa_family_t family; __be16 port; struct in_addr addr; char zero[8]; };
# (family is host-endian, port network-endian: decoded field by field below)
# struct sockaddr_in6 { sa_family_t family; __be16 port; __be32 flowinfo;
#                       struct in6_addr addr; __u32 scope_id; };
# struct sockaddr_un  { sa_family_t family; char sun_path[108]; };
SUN_PATH_MAX = 108


@dataclass(frozen=True, order=True)
class Address:
    """A held address: TCP or UDP v4/v6 (host, port) or unix (path), stream or datagram."""

    family: int
    host: str = ""
    port: int = 0
    # Unix: the filesystem path (absolute) or an abstract name starting with "\0".
    path: bytes = b""
    kind: int = SOCK_STREAM  # SOCK_STREAM or SOCK_DGRAM

    @property
    def is_datagram(self) -> bool:
        return self.kind == SOCK_DGRAM

    @property
    def is_unix(self) -> bool:
        return self.family == AF_UNIX

    @property
    def is_abstract(self) -> bool:
        return self.is_unix and self.path.startswith(b"\0")

    @property
    def chosen(self) -> bool:
        """Whether the server chose this address (port 0 / autobind are the kernel's choice)."""
        if self.is_unix:
            return bool(self.path)
        return self.port != 0

    def __str__(self) -> str:
        if self.is_unix:
            scheme = "unixgram:" if self.is_datagram else "unix:"
            if self.is_abstract:
                return scheme + "@" + self.path[1:].decode(errors="replace")
            return scheme + self.path.decode(errors="replace")
        scheme = "udp:" if self.is_datagram else ""
        if self.family == AF_INET6:
            return f"{scheme}[{self.host}]:{self.port}"
        return f"{scheme}{self.host}:{self.port}"

    def sockaddr(self) -> bytes:
        """The raw sockaddr bytes (for injection into a tracee)."""
        if self.is_unix:
            return struct.pack("<H", AF_UNIX) + self.path + (b"" if self.is_abstract else b"\0")
        if self.family == AF_INET:
            return (struct.pack("<H", AF_INET) + struct.pack(">H", self.port)
                    + socket.inet_pton(AF_INET, self.host) + b"\0" * 8)
        return (struct.pack("<H", AF_INET6) + struct.pack(">HI", self.port, 0)
                + socket.inet_pton(AF_INET6, self.host) + struct.pack("<I", 0))

    def pyaddr(self) -> str | tuple[str, int] | bytes:
        """The address in the form Python's socket module takes."""
        if self.is_unix:
            return self.path
        return (self.host, self.port)


def parse_sockaddr(raw: bytes, cwd: str | None = None) -> Address | None:
    """Decode a sockaddr as a process passed it to bind(); None for families hupt ignores.

    ``cwd`` resolves a relative unix path (the binding process's working directory).
    """
    if len(raw) < 2:
        return None
    (family,) = struct.unpack_from("<H", raw)
    if family == AF_INET and len(raw) >= 8:
        (port,) = struct.unpack_from(">H", raw, 2)
        return Address(AF_INET, socket.inet_ntop(AF_INET, raw[4:8]), port)
    if family == AF_INET6 and len(raw) >= 24:
        (port,) = struct.unpack_from(">H", raw, 2)
        return Address(AF_INET6, socket.inet_ntop(AF_INET6, raw[8:24]), port)
    if family == AF_UNIX:
        path = raw[2:]
        if not path:
            return Address(AF_UNIX)  # autobind: the kernel picks an abstract name
        if path.startswith(b"\0"):
            return Address(AF_UNIX, path=path)
        path = path.split(b"\0", 1)[0]
        if cwd is not None and not path.startswith(b"/"):
            path = os.path.normpath(os.path.join(os.fsencode(cwd), path))
        return Address(AF_UNIX, path=path)
    return None


def from_socket_name(family: int, name: object) -> Address:
    """An Address from ``socket.getsockname()`` output."""
    if family == AF_UNIX:
        if isinstance(name, str):
            name = os.fsencode(name)
        assert isinstance(name, bytes)
        return Address(AF_UNIX, path=name)
    assert isinstance(name, tuple)
    return Address(family, str(name[0]), int(name[1]))


def parse_datagram_address(text: str) -> Address:
    """Parse "udp:HOST:PORT", "udp:[V6]:PORT", "unixgram:PATH" or "unixgram:@NAME"
    (the forms hupt prints datagram addresses in)."""
    try:
        if text.startswith("udp:") and not text.startswith("udp:unix:"):
            return replace(parse_user_address(text[4:]), kind=SOCK_DGRAM)
        if text.startswith("unixgram:"):
            return replace(parse_user_address("unix:" + text[9:]), kind=SOCK_DGRAM)
    except UsageError:
        pass
    raise UsageError(f"not a datagram address: {text!r} (expected udp:HOST:PORT, "
                     "udp:[V6]:PORT, unixgram:PATH or unixgram:@NAME)")


def parse_user_address(text: str) -> Address:
    """Parse "HOST:PORT", "[V6]:PORT", "unix:PATH" or "unix:@NAME" as a user typed it."""
    if text.startswith("unix:"):
        rest = text[5:]
        if rest.startswith("@"):
            return Address(AF_UNIX, path=b"\0" + rest[1:].encode())
        if not rest:
            raise UsageError(f"empty unix socket path in {text!r}")
        return Address(AF_UNIX, path=os.fsencode(os.path.abspath(rest)))
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or not (0 < int(port_s) < 65536):
        raise UsageError(f"not an address: {text!r} (expected HOST:PORT, [V6]:PORT or unix:PATH)")
    host = host.strip("[]") or "0.0.0.0"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as e:
        raise UsageError(f"not an IP address: {host!r}") from e
    return Address(AF_INET6 if ip.version == 6 else AF_INET, str(ip), int(port_s))
