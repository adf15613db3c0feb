"""A threaded HTTP/1.1 test server that talks: it records the signals it gets and
writes to its stdout and stderr, for the tests of hupt's output handling and
`hupt signal`.

    chatty_server.py HOST:PORT [--signals PATH] [--chatter MS] [--fail-if PATH]

At start: "started pid=<pid>" on stdout and "starting pid=<pid>" on stderr, and
one stdout line per request ("GET /path pid=<pid>").  Routes of routes.py
(/, /pid, /slow?ms=N).

--signals PATH: every USR1, USR2, WINCH, HUP and QUIT it receives is appended
to PATH as "<NAME> <pid>" (it does not stop on any of them).
--chatter MS: a thread writes "chatter <n> pid=<pid>" to stdout every MS
milliseconds, for ever (a server whose output must never block it: /count
answers how many lines it has written).
--fail-if PATH: if PATH exists at start, write 30 numbered lines to stderr
("config error <i>: ...") and a last one without a newline, and exit 3
before listening: a new generation that fails at start.

SIGTERM/SIGINT: exit 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from types import FrameType

from routes import RoutesHandler, parse_address, respond

written = 0


class Handler(RoutesHandler):
    def do_GET(self) -> None:
        print(f"GET {self.path} pid={os.getpid()}", flush=True)
        if self.path == "/count":
            self.reply(200, f"{written}\n".encode())
            return
        self.reply(*respond(self.path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("--signals")
    ap.add_argument("--chatter", type=float)
    ap.add_argument("--fail-if")
    args = ap.parse_args()
    pid = os.getpid()
    if args.fail_if and os.path.exists(args.fail_if):
        print(f"starting pid={pid}", file=sys.stderr, flush=True)
        for i in range(1, 31):
            print(f"config error {i}: bad value on line {i}", file=sys.stderr)
        sys.stderr.write("giving up")
        sys.stderr.flush()
        os._exit(3)
    if args.signals:
        path = args.signals

        def record(sig: int, frame: FrameType | None) -> None:
            with open(path, "a") as f:
                f.write(f"{signal.Signals(sig).name} {os.getpid()}\n")

        for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGHUP,
                  signal.SIGQUIT):
            signal.signal(s, record)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    _, address = parse_address(args.address)
    assert isinstance(address, tuple)
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(address, Handler)
    print(f"started pid={pid}", flush=True)
    print(f"starting pid={pid}", file=sys.stderr, flush=True)
    if args.chatter:
        interval = args.chatter / 1000

        def chatter() -> None:
            global written
            n = 0
            while True:
                n += 1
                print(f"chatter {n} pid={pid} " + "." * 200, flush=True)
                written = n
                time.sleep(interval)

        threading.Thread(target=chatter, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
