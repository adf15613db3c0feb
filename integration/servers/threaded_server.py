"""Thread-per-acceptor HTTP/1.1 test server: N threads block in accept().

This is the shape hupt finds hardest to retire: no selector, no epoll, just N
threads parked in accept4() on one shared listening socket. Swapping the fd
under them is not enough (a thread already inside accept keeps the old file);
each thread must be interrupted so the restarted accept looks the fd up again.
So this server deliberately has no event loop.

Each thread serves the connection it accepted to the end (keep-alive, HTTP/1.1)
before accepting again, so there should be more threads than concurrent
keep-alive clients; idle connections are closed after --idle-timeout seconds.

Usage: threaded_server.py ADDRESS [--threads N] [--idle-timeout S]
ADDRESS: 127.0.0.1:PORT | [::1]:PORT | PORT | unix:/path.  Routes: see routes.py.

SIGTERM/SIGINT: exit at once. The listener is closed, never shutdown():
shutdown() would act on the socket every generation shares.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time

from routes import parse_address, respond

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 501: "Not Implemented"}
MAX_HEADER_BYTES = 65536


def listener(arg: str) -> socket.socket:
    kind, address = parse_address(arg)
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET6 if kind == "inet6" else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


def read_head(conn: socket.socket, buf: bytearray) -> bytes | None:
    """One request head (through the blank line) from buf+conn; None at clean EOF."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            return head
        if len(buf) > MAX_HEADER_BYTES:
            raise ValueError("request head too large")
        chunk = conn.recv(65536)
        if not chunk:
            if buf:
                raise ValueError("EOF inside a request head")
            return None
        buf += chunk


def discard_body(conn: socket.socket, buf: bytearray, length: int) -> None:
    while len(buf) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("EOF inside a request body")
        buf += chunk
    del buf[:length]


def serve_connection(conn: socket.socket, idle_timeout: float) -> None:
    conn.settimeout(idle_timeout)
    buf = bytearray()
    while True:
        head = read_head(conn, buf)
        if head is None:
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            return
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        discard_body(conn, buf, int(headers.get("content-length", "0")))
        connection = headers.get("connection", "").lower()
        keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        if method in ("GET", "HEAD"):
            status, body = respond(target)
        else:
            status, body = 501, b"not implemented\n"
        out = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        ).encode()
        conn.sendall(out + (b"" if method == "HEAD" else body))
        if not keep:
            return


def acceptor(sock: socket.socket, idle_timeout: float) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError as e:
            # Not a busy loop if the fd under us turns into something unusable.
            print(f"threaded_server: accept: {e!r}", file=sys.stderr, flush=True)
            time.sleep(0.5)
            continue
        try:
            serve_connection(conn, idle_timeout)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--idle-timeout", type=float, default=15.0)
    args = parser.parse_args()
    sock = listener(args.address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    for _ in range(args.threads):
        threading.Thread(target=acceptor, args=(sock, args.idle_timeout), daemon=True).start()
    print(f"threaded_server pid={os.getpid()} threads={args.threads} listening on {args.address}",
          file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        pass
    # os._exit: no interpreter teardown racing the daemon threads still in accept().
    os._exit(0)


if __name__ == "__main__":
    main()
