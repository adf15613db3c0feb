"""A Python HTTP/1.1 test server in the unusual shapes hupt must still handle.

One program switched by options, so each shape is one flag away from a plain
server (socketserver + BaseHTTPRequestHandler, keep-alive, a thread per
connection):

    ADDRESS          127.0.0.1:P | [::1]:P | [::]:P (dual stack, IPV6_V6ONLY off)
                     | unix:PATH (a relative PATH is bound as given: against the cwd)
                     | unix:@NAME (an abstract name: no file, nothing to unlink)
    --daemonize N    fork, setsid, fork again before binding, N times over (default once
                     with the bare option): every intermediate process exits, so the one
                     that serves is an orphan re-parented to the nearest child subreaper
                     (hupt), and hupt sees process after process of the generation go
    --port0          also listen on 127.0.0.1:0 (a port the kernel chooses), served by a
                     thread; GET /port0 answers that port
    --start-delay S  sleep S seconds before binding (a generation slow to get ready)
    --wait-while PATH  before binding, wait as long as PATH exists (a generation that
                     gets ready when the test says so)
    --nonblock-if PATH  the listener is made non-blocking (O_NONBLOCK) before bind() if
                     PATH exists at start, blocking otherwise, and never changed after:
                     each generation asks for its own mode (accept tolerates both, as
                     socketserver ignores a failed accept after select)

Routes: those of routes.py, plus /port0, /exit?code=N (answer, then _exit(N)) and
/kill?sig=N (answer, then kill itself with signal N): a server that dies on its own.

SIGTERM/SIGINT: stop serving, close (never shutdown()) the listeners, exit 0.
shutdown() would act on the socket every generation shares.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from types import FrameType
from urllib.parse import parse_qs, urlsplit

from routes import RoutesHandler, parse_address, respond

# Set in main(): the port of the --port0 listener, 0 without one.
extra_port = 0
# Set in main(): --nonblock-if's choice for the main listener.
nonblocking = False


class Handler(RoutesHandler):
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        after: Callable[[], None] | None = None
        if url.path == "/port0":
            status, body = 200, f"{extra_port}\n".encode()
        elif url.path == "/exit":
            code = int(query.get("code", ["0"])[0])
            status, body, after = 200, f"exiting {code}\n".encode(), partial(os._exit, code)
        elif url.path == "/kill":
            sig = int(query.get("sig", [str(int(signal.SIGKILL))])[0])
            status, body = 200, f"killing myself with {sig}\n".encode()
            after = partial(os.kill, os.getpid(), sig)
        else:
            status, body = respond(self.path)
        self.reply(status, body)  # on the wire before `after` runs
        if after is not None:
            after()

    def address_string(self) -> str:
        return str(self.client_address[0]) if isinstance(self.client_address, tuple) else "unix"


class QuietAboutClients(socketserver.ThreadingMixIn):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that goes away mid keep-alive is no server error; anything else is.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[misc]


class TCPServer(QuietAboutClients, socketserver.TCPServer):
    allow_reuse_address = True
    main_listener = True

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Dual stack on "::" whatever net.ipv6.bindv6only says.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if nonblocking and self.main_listener:
            self.socket.setblocking(False)  # before bind(): what hupt's handoff mirrors
        super().server_bind()


class Port0Server(TCPServer):
    main_listener = False


class TCP6Server(TCPServer):
    address_family = socket.AF_INET6


class UnixServer(QuietAboutClients, socketserver.UnixStreamServer):
    def server_bind(self) -> None:
        if nonblocking:
            self.socket.setblocking(False)
        super().server_bind()


def make_server(arg: str) -> socketserver.BaseServer:
    kind, address = parse_address(arg)
    if isinstance(address, str):
        if address.startswith("@"):
            address = "\0" + address[1:]
        return UnixServer(address, Handler)
    return (TCP6Server if kind == "inet6" else TCPServer)(address, Handler)


def daemonize() -> None:
    """The classic double fork: the caller returns in a grandchild whose parent has exited."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)


def stop_on_signals(server: socketserver.BaseServer) -> None:
    """SIGTERM/SIGINT end serve_forever.

    Not by raising from the handler: raised in the main thread, the exception
    may land inside a request's thread start-up, where socketserver swallows
    it.  shutdown() waits for serve_forever, so it runs in a thread of its own.
    """
    def on_signal(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def main() -> None:
    global extra_port, nonblocking
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--daemonize", type=int, nargs="?", const=1, default=0, metavar="N")
    parser.add_argument("--port0", action="store_true")
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--wait-while", metavar="PATH")
    parser.add_argument("--idle-timeout", type=float, default=15.0)
    parser.add_argument("--nonblock-if", metavar="PATH")
    args = parser.parse_args()
    nonblocking = bool(args.nonblock_if and os.path.exists(args.nonblock_if))
    Handler.timeout = args.idle_timeout
    for _ in range(args.daemonize):
        daemonize()
    time.sleep(args.start_delay)
    while args.wait_while and os.path.exists(args.wait_while):
        time.sleep(0.02)
    server = make_server(args.address)
    stop_on_signals(server)
    extra = None
    if args.port0:
        extra = Port0Server(("127.0.0.1", 0), Handler)
        extra_port = extra.server_address[1]
        threading.Thread(target=extra.serve_forever, args=(0.5,), daemon=True).start()
    print(f"variant_server pid={os.getpid()} listening on {args.address}"
          + (f" and 127.0.0.1:{extra_port}" if extra else "")
          + (" (non-blocking listener)" if nonblocking else ""), file=sys.stderr, flush=True)
    server.serve_forever(poll_interval=0.5)
    server.server_close()
    if extra is not None:
        extra.server_close()
    # No interpreter teardown racing the daemon threads still serving connections.
    os._exit(0)


if __name__ == "__main__":
    main()
