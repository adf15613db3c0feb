"""A pre-fork server: the master binds and listens, then forks the workers that accept.

    prefork_server.py HOST:PORT WORKERS

Each worker serves the routes of routes.py, a thread per connection; the
master only waits.  On SIGTERM the master stops its own workers and exits.
Children it does not know (workers of an image it replaced by exec) are
reaped and ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socketserver
import sys
from types import FrameType

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from routes import RoutesHandler, parse_address


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    _, address = parse_address(sys.argv[1])
    assert isinstance(address, tuple), "a TCP address"
    server = Server(address, RoutesHandler)
    workers = []
    for _ in range(int(sys.argv[2])):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
            server.serve_forever()
            os._exit(0)
        workers.append(pid)

    def stop(signum: int, frame: FrameType | None) -> None:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGTERM)
        for w in workers:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w, 0)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            signal.pause()


if __name__ == "__main__":
    main()
