"""A WSGI app for gunicorn in the integration tests: "ok pid=<worker pid>\n"."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any],
        start_response: Callable[[str, list[tuple[str, str]]], Any]) -> Iterable[bytes]:
    body = f"ok pid={os.getpid()} tag={os.environ.get('HUPT_TEST_TAG', '')}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
