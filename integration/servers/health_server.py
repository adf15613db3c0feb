"""A small threaded HTTP server for hupt's lifecycle tests.

    health_server.py HOST:PORT [--fail-health-if PATH] [--notify-after S]
                              [--notify-when PATH] [--no-notify-if PATH] [--ignore-term]

/          "ok pid=<pid>"
/healthz   200, or 503 while the file given by --fail-health-if exists
           (decided once, at start: a generation is healthy or not)
/slow?ms=N sleeps N ms first
/exit?code=N answers, stops accepting, lets the other requests in progress
           finish, then exits with status N: a crash between requests

--notify-after S: send READY=1 to $NOTIFY_SOCKET S seconds after listening,
unless the file given by --no-notify-if exists at start.  --notify-when PATH:
send it once PATH exists (the test decides when the server is ready).  Either
way the server accepts only once it has sent READY=1 (connections queue).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
busy = 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("--fail-health-if")
    ap.add_argument("--notify-after", type=float)
    ap.add_argument("--notify-when")
    ap.add_argument("--no-notify-if")
    ap.add_argument("--ignore-term", action="store_true",
                    help="ignore SIGTERM (exit 0 on SIGUSR1 instead)")
    args = ap.parse_args()
    host, _, port = args.address.rpartition(":")
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda *_: os._exit(0))
    unhealthy = bool(args.fail_health_if and os.path.exists(args.fail_health_if))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            exit_code = None
            status, body = 200, f"ok pid={os.getpid()} tag=health\n"
            if url.path == "/healthz" and unhealthy:
                status, body = 503, "unhealthy\n"
            elif url.path == "/exit":
                exit_code = int(urllib.parse.parse_qs(url.query).get("code", ["3"])[0])
                self.close_connection = True
            elif url.path == "/slow":
                ms = int(urllib.parse.parse_qs(url.query).get("ms", ["1000"])[0])
                time.sleep(ms / 1000)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            if exit_code is not None:
                self.wfile.flush()
                threading.Thread(target=crash, args=(exit_code,)).start()

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            global busy
            with lock:
                busy += 1
            try:
                self.answer()
            finally:
                with lock:
                    busy -= 1

    def crash(code: int) -> None:
        server.shutdown()  # no more accepts
        quiet = 0
        while quiet < 20:  # 200 ms without a request in progress (the /exit one included)
            with lock:
                quiet = quiet + 1 if busy == 0 else 0
            time.sleep(0.01)
        os._exit(code)

    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((host, int(port)), Handler)
    notify = args.notify_after is not None or args.notify_when is not None
    if notify and not (args.no_notify_if and os.path.exists(args.no_notify_if)):
        time.sleep(args.notify_after or 0.0)
        while args.notify_when is not None and not os.path.exists(args.notify_when):
            time.sleep(0.02)
        target = os.environ["NOTIFY_SOCKET"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1\nSTATUS=serving", target)
    server.serve_forever()
    threading.Event().wait()  # after /exit: the crash thread ends the process


if __name__ == "__main__":
    main()
