"""The routes every hupt test server answers, shared by the Python servers.

    /           "ok pid=<pid> tag=<$HUPT_TEST_TAG>\\n"   (which generation served)
    /pid        "<pid>\\n"
    /slow?ms=N  sleep N ms, then answer like "/"       (an in-flight request)
    /whoami     JSON: pid, cwd, argv, the DEPLOY_* environment variables and the
                contents of ./RELEASE (null if none): what a deploy changed

The pid is read per request, not at import, so a forked or re-executed
generation reports itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

# A typo in a test must not pin a generation for hours.
MAX_SLOW_MS = 600_000


def ok_body() -> bytes:
    return f"ok pid={os.getpid()} tag={os.environ.get('HUPT_TEST_TAG', '')}\n".encode()


def respond(target: str) -> tuple[int, bytes]:
    """(status, body) for a request target such as "/slow?ms=200"."""
    url = urlsplit(target)
    if url.path == "/":
        return 200, ok_body()
    if url.path == "/pid":
        return 200, f"{os.getpid()}\n".encode()
    if url.path == "/whoami":
        try:
            with open("RELEASE") as f:
                release: str | None = f.read().strip()
        except OSError:
            release = None
        return 200, json.dumps({
            "pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv, "release": release,
            "env": {k: v for k, v in os.environ.items() if k.startswith("DEPLOY_")}}).encode()
    if url.path == "/slow":
        try:
            ms = int(parse_qs(url.query).get("ms", ["0"])[0])
        except ValueError:
            return 400, b"bad ms\n"
        if ms < 0:
            return 400, b"bad ms\n"
        time.sleep(min(ms, MAX_SLOW_MS) / 1000)
        return 200, ok_body()
    return 404, b"not found\n"


def parse_address(arg: str) -> tuple[str, str | tuple[str, int]]:
    """"127.0.0.1:P", "[::1]:P", "P" (127.0.0.1) or "unix:/path" -> (kind, address)."""
    if arg.startswith("unix:"):
        return "unix", arg[len("unix:"):]
    if arg.isdigit():
        return "inet", ("127.0.0.1", int(arg))
    host, _, port = arg.rpartition(":")
    if host.startswith("["):
        return "inet6", (host[1:-1], int(port))
    return "inet", (host, int(port))


class RoutesHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive) answers of ``respond``, without access logs."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.reply(*respond(self.path))

    def reply(self, status: int, body: bytes) -> None:
        """A whole response; wfile is unbuffered, so it is on the wire on return."""
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass
