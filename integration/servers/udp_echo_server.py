"""A datagram echo server: UDP (v4, v6) or unix SOCK_DGRAM, one socket, one thread.

Every datagram is answered, to its sender, with the datagram itself followed
by " PID": a counting client can tell which request each answer is for and
which generation answered it.  A unix path is unlinked before bind() and at
exit, as servers do.

Usage: udp_echo_server.py ADDRESS [--bind-delay S] [--reply-delay S]
ADDRESS: udp:HOST:PORT | udp:[V6]:PORT | unixgram:PATH
--bind-delay: sleep before bind() (a server that reads its config first).
--reply-delay: hold each datagram that long before answering it (work in hand
when the generation is paused: its answer leaves after the pause).
--query-ports: per datagram, bind a socket to a random port of its own choice
and close it after answering, as DNS resolvers do for each upstream query
(dnsmasq, unbound): a client socket, not a service address.
SIGTERM/SIGINT: answer the datagram in hand, then exit (what real servers do
on their graceful-stop signal: dnsmasq handles signals in its main loop).
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import selectors
import signal
import socket
import stat
import time
from types import FrameType

stopping = False


def on_stop(signum: int, frame: FrameType | None) -> None:
    global stopping
    stopping = True


def parse(arg: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    if arg.startswith("unixgram:"):
        return socket.AF_UNIX, arg[len("unixgram:"):]
    if not arg.startswith("udp:"):
        raise SystemExit(f"not an address: {arg!r}")
    host, _, port = arg[len("udp:"):].rpartition(":")
    if host.startswith("["):
        return socket.AF_INET6, (host.strip("[]"), int(port))
    return socket.AF_INET, (host, int(port))


def unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def query_socket(family: socket.AddressFamily) -> socket.socket | None:
    """A socket bound to a random port chosen here (not the kernel's port 0)."""
    if family == socket.AF_UNIX:
        return None
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    s = socket.socket(family, socket.SOCK_DGRAM)
    for _ in range(20):
        try:
            s.bind((host, random.randrange(20000, 60000)))
            return s
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    s.close()
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("--bind-delay", type=float, default=0.0)
    ap.add_argument("--reply-delay", type=float, default=0.0)
    ap.add_argument("--query-ports", action="store_true")
    args = ap.parse_args()
    family, addr = parse(args.address)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    time.sleep(args.bind_delay)
    if isinstance(addr, str):
        unlink_socket(addr)
    sock.bind(addr)
    print(f"udp_echo_server {os.getpid()} bound {args.address}", flush=True)
    pid = f" {os.getpid()}".encode()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    answered = 0
    while not stopping:
        if not sel.select(0.2):
            continue
        try:
            data, peer = sock.recvfrom(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue  # another generation read it first
        query = query_socket(family) if args.query_ports else None
        if args.reply_delay:
            time.sleep(args.reply_delay)  # a signal meanwhile: the sleep goes on (PEP 475)
        try:
            sock.sendto(data + pid, peer)
            answered += 1
        except OSError as e:  # a unix client gone meanwhile
            print(f"udp_echo_server {os.getpid()}: sendto {peer!r}: {e}", flush=True)
        if query is not None:
            query.close()
    print(f"udp_echo_server {os.getpid()} answered {answered}", flush=True)
    if isinstance(addr, str):
        unlink_socket(addr)


if __name__ == "__main__":
    main()
