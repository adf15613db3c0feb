"""A pre-fork server that shards its port with SO_REUSEPORT, as nginx's
`reuseport` or many Go and Rust servers do: one listening socket per worker.

    reuseport_server.py HOST:PORT WORKERS

The master creates and binds every worker's socket first, then forks the
workers, each of which listens on its own socket and serves (a thread per
connection) on the routes of routes.py.  Binding all before any listen() is
the order that matters to hupt: nothing is held yet when the later binds come.
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


def main() -> None:
    _, address = parse_address(sys.argv[1])
    assert isinstance(address, tuple)
    socks = []
    for _ in range(int(sys.argv[2])):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(address)
        socks.append(s)
    workers = []
    for s in socks:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
            s.listen(128)
            server = Server(address, RoutesHandler, bind_and_activate=False)
            server.socket.close()
            server.socket = s
            server.serve_forever()
            os._exit(0)
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
