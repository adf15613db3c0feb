"""http.server on a unix stream socket, unlinking its path like gunicorn does.

socketserver.UnixStreamServer + a BaseHTTPRequestHandler speaking HTTP/1.1
(keep-alive), one thread per connection. Like gunicorn it unlinks a stale
socket file before bind() and its own file at exit: exactly the behaviour that
makes the path vanish under a shared listener unless hupt answers those
unlink()s itself.

Usage: unix_server.py PATH [--idle-timeout S]   Routes: see routes.py.
SIGTERM/SIGINT: stop serving, close (never shutdown()) the listener, unlink PATH.
"""

from __future__ import annotations

import argparse
import os
import signal
import socketserver
import stat
import sys
import threading
from types import FrameType

from routes import RoutesHandler


class Handler(RoutesHandler):
    def address_string(self) -> str:
        return "unix"


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--idle-timeout", type=float, default=15.0)
    args = parser.parse_args()
    path = args.path.removeprefix("unix:")
    Handler.timeout = args.idle_timeout
    unlink_socket(path)
    server = Server(path, Handler)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Not an exception: raised in the main thread, it may land inside a
        # request's thread start-up, where socketserver swallows it.
        # shutdown() waits for serve_forever, so it runs in a thread of its own.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"unix_server pid={os.getpid()} listening on unix:{path}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        unlink_socket(path)


if __name__ == "__main__":
    main()
