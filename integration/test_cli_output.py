"""What a person sees: hupt's messages and `hupt reload`/`hupt status` output,
plain when captured (logs, journals) and formatted with rich on a terminal.

Asserted: `hupt reload` reports each step with its time (started, listened on
the held socket, ready, draining N in flight, done), on a terminal as well as
captured; `hupt status` prints tables on a terminal and plain lines otherwise;
hupt's own log lines carry a timestamp and pid when captured and colour (ANSI
escapes) on a terminal.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Procs, free_port, http_server_cmd, hupt_env, wait_listening

pytestmark = pytest.mark.root

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def on_terminal(argv: list[str], timeout: float = 30.0) -> tuple[int, bytes]:
    """Run argv with stdout and stderr on a new pseudo-terminal; (status, all it wrote)."""
    import pty

    primary, secondary = pty.openpty()
    env = hupt_env(os.environ)
    env.update(TERM="xterm-256color", COLUMNS="160")
    env.pop("NO_COLOR", None)
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary,
                         env=env)
    os.close(secondary)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([primary], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: every writer has gone
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
        return p.wait(10), out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        os.close(primary)


def test_reload_progress_and_status_plain_and_on_a_terminal(procs: Procs,
                                                             tmp_path: Path) -> None:
    port = free_port()
    h = procs.hupt(cmd=http_server_cmd(port, bind="127.0.0.1"))
    wait_listening(("127.0.0.1", port), 20, proc=h)

    r = h.reload()  # captured: plain lines, each with its time since the request
    assert r.returncode == 0, r.stderr
    steps = [r"^\s*\d+ ms started generation 2 \(pid \d+\), waiting for it to listen on "
             rf"127\.0\.0\.1:{port}$",
             rf"^\s*\d+ ms generation 2 \(pid \d+\) listens on 127\.0\.0\.1:{port}, "
             r"the held socket \(1/1\)$",
             r"^\s*\d+ ms generation 2 \(pid \d+\) is ready in \d+ ms$",
             r"^\s*\d+ ms generation 1 \(pid \d+\) stopped accepting; draining \d+ in flight$",
             r"^hupt: reload done: generation 2 \(pid \d+\) is ready in \d+ ms$"]
    lines = r.stderr.splitlines()
    assert len(lines) == len(steps), r.stderr
    for line, step in zip(lines, steps, strict=True):
        assert re.match(step, line), (line, step)
    assert not ANSI.search(r.stderr.encode()), "no escapes in captured output"

    code, out = on_terminal([sys.executable, "-m", "hupt", "reload", str(h.pid)])
    text = ANSI.sub(b"", out).decode(errors="replace")
    assert code == 0, text
    for step in ("started generation 3", "listens on", "is ready in",
                 "stopped accepting; draining", "reload done"):
        assert step in text, text
    assert re.search(r"\d+ ms started generation 3", text), text

    # hupt's own log: timestamped plain lines when captured...
    log = h.err.read_text()
    assert re.search(rf"^\d\d:\d\d:\d\d hupt\[{h.pid}\]: info: started generation 2", log,
                     re.M), log

    # `hupt status`: plain lines captured, a table (and colour) on a terminal.
    r = subprocess.run([sys.executable, "-m", "hupt", "status", str(h.pid)],
                       capture_output=True, text=True, env=hupt_env(os.environ), timeout=30)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^  generation 3\s+serving\s+pid \d+", r.stdout, re.M), r.stdout
    assert re.search(rf"^  listener 127\.0\.0\.1:{port}\s+queued 0\s+backlog 1024", r.stdout,
                     re.M), r.stdout
    code, out = on_terminal([sys.executable, "-m", "hupt", "status", str(h.pid)])
    assert code == 0, out
    assert ANSI.search(out), "colour on a terminal"
    text = ANSI.sub(b"", out).decode(errors="replace")
    assert re.search(r"gen\s+state\s+pid\s+processes\s+age\s+in flight\s+listening", text), text
    assert re.search(r"3\s+serving\s+\d+\s+1\s+", text), text
    assert re.search(rf"127\.0\.0\.1:{port}\s+0\s+1024", text), text
    h.signal(signal.SIGTERM)
    assert h.popen.wait(20) == 0, h.log()


def test_hupt_messages_are_coloured_on_a_terminal() -> None:
    # hupt run with its stderr on a terminal; the server exits at once, and so does hupt.
    code, out = on_terminal([sys.executable, "-m", "hupt", "run", "--", sys.executable, "-c",
                             "import sys; sys.exit(3)"])
    assert code == 3, out
    assert ANSI.search(out), out
    text = ANSI.sub(b"", out).decode(errors="replace")
    assert "hupt: generation 1 (pid" in text and "exited on its own (exit status 3)" in text
    assert not re.search(r"\d\d:\d\d:\d\d hupt\[", text), "no log prefix on a terminal"
