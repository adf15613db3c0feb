"""A pre-fork server that shards its port with SO_REUSEPORT, as nginx's
`reuseport` or many Go and Rust servers do: one listening socket per worker.

    reuseport_server.py HOST:PORT WORKERS [bind-first|bind-together]

bind-first (the default): the master creates and binds every worker's
socket, then forks the workers, each of which listens on its own socket and
serves (a thread per connection) on the routes of routes.py.  Binding all
before any listen() is the order that matters to hupt: nothing is held yet
when the later binds come.  bind-together: the workers are forked first and
each binds its own socket, all released at once, so that their binds race.
On SIGTERM the master stops its workers and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from routes import RoutesHandler, parse_address


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True


def reuseport_socket(address: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return s


def serve(s: socket.socket, address: tuple[str, int]) -> None:
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    s.listen(128)
    server = Server(address, RoutesHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = s
    server.serve_forever()
    os._exit(0)


def main() -> None:
    _, address = parse_address(sys.argv[1])
    assert isinstance(address, tuple)
    n = int(sys.argv[2])
    together = sys.argv[3:] == ["bind-together"]
    workers = []
    if together:
        go_r, go_w = os.pipe()
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                os.close(go_w)
                s = reuseport_socket(address)
                os.read(go_r, 1)  # the same moment for every worker
                s.bind(address)
                serve(s, address)
            workers.append(pid)
        os.write(go_w, b"x" * n)
    else:
        socks = []
        for _ in range(n):
            s = reuseport_socket(address)
            s.bind(address)
            socks.append(s)
        for s in socks:
            pid = os.fork()
            if pid == 0:
                serve(s, address)
            workers.append(pid)
        for s in socks:
            s.close()

    def stop(*_: object) -> None:
        for w in workers:
            os.kill(w, signal.SIGTERM)
        for w in workers:
            os.waitpid(w, 0)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
