"""Hardening against hostile users, stray signals and bad options (issue 13), for real.

- Runtime directory: as a non-root user without XDG_RUNTIME_DIR, hupt uses
  /tmp/hupt-UID, a name anyone can take first. Taken as a symlink, or as a
  directory of someone else's, `hupt run` refuses in one line (exit 2) and
  starts nothing, and `hupt reload` does not believe a fake socket there.
  A fake socket in a directory that passes (the user's own, 0700) but answered
  by another uid is refused too (SO_PEERCRED). The non-root user is an unused
  uid the test switches to (setresuid in the child): no account is needed.
- Signals: USR1 to hupt reaches the server (which logs it); hupt serves on.
- A hupt SIGKILLed leaves its control socket: `hupt status` and the next hupt
  to start remove such sockets.
- Control requests: a megabyte without a newline is answered and hung up on;
  hupt serves on.
- --pidfile in a missing directory: one line, exit 2, nothing running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    Procs,
    alive,
    free_port,
    hupt_cli,
    hupt_env,
    one_line_error,
    wait_for,
    wait_gone,
    wait_listening,
)
from load import Target

from hupt import control

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switches users: needs root")


# The interpreter may live where another uid cannot read (/root/.pyenv): hupt's
# modules are imported as root, then the child becomes ``uid`` and runs the CLI.
AS_USER = """
import os, sys
# What the commands import lazily too (argparse's gettext needs locale):
import argparse, gettext, json, locale, signal, socket, struct
import hupt.cli, hupt.control, hupt.status, hupt.supervisor, hupt.linux, hupt.sdnotify
import hupt.launch, hupt.command
uid = int(sys.argv[1])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
os.chdir("/")
sys.exit(hupt.cli.main(sys.argv[2:]))
"""


def hupt_as(uid: int, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`hupt ARGS` as ``uid``, XDG_RUNTIME_DIR unset: the /tmp/hupt-UID case."""
    env = hupt_env(os.environ)
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.run([sys.executable, "-c", AS_USER, str(uid), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def victim() -> Iterator[tuple[int, Path]]:
    """An unused uid and its runtime directory's name (absent), removed afterwards."""
    uid = 40000 + os.getpid() % 20000
    path = Path(f"/tmp/hupt-{uid}")
    assert not os.path.lexists(path), f"{path} exists already"
    yield uid, path
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def fake_hupt(path: Path, as_uid: int) -> Iterator[None]:
    """A socket at ``path`` that answers any request "done", listening as ``as_uid``."""
    code = textwrap.dedent(f"""
        import os, socket, sys
        s = socket.socket(socket.AF_UNIX)
        s.bind({str(path)!r})
        os.chmod({str(path)!r}, 0o777)
        os.setresgid({as_uid}, {as_uid}, {as_uid})
        os.setresuid({as_uid}, {as_uid}, {as_uid})
        s.listen(8)
        print("ready", flush=True)
        while True:
            c, _ = s.accept()
            c.recv(4096)
            c.sendall(b'{{"event": "result", "ok": true, "reason": "reloaded (not really)"}}\\n')
            c.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield
    finally:
        p.kill()
        p.wait(10)


def test_a_symlinked_runtime_dir_is_refused_and_not_followed(
        victim: tuple[int, Path], tmp_path: Path) -> None:
    uid, rt = victim
    theirs = tmp_path / "theirs"  # the attacker's directory (another uid), 0755
    theirs.mkdir()
    os.chown(theirs, uid + 1, uid + 1)
    os.chmod(theirs, 0o755)
    os.chmod(tmp_path, 0o755)
    rt.symlink_to(theirs)
    flag = tmp_path / "started"
    r = hupt_as(uid, "run", "--", "sh", "-c", f"touch {flag}; sleep 30")
    assert r.returncode == 2, r.stderr
    one_line_error(r, str(rt), "symlink")
    assert not flag.exists(), "the server was started"
    assert stat_mode(theirs) == 0o755 and not list(theirs.iterdir()), "the symlink was followed"
    # The attack in full: a fake socket behind the symlink that says "done".
    with fake_hupt(theirs / f"{os.getpid()}.sock", uid + 1):
        r = hupt_as(uid, "reload", str(os.getpid()))
        assert r.returncode == 2, r.stderr
        one_line_error(r, "symlink")
        assert "done" not in r.stderr


def stat_mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


@pytest.mark.parametrize("kind", ["other-0700", "own-0777", "file"])
def test_a_runtime_dir_taken_first_is_refused(victim: tuple[int, Path], tmp_path: Path,
                                              kind: str) -> None:
    uid, rt = victim
    if kind == "file":
        rt.write_text("")
    else:
        rt.mkdir()
        owner = uid + 1 if kind == "other-0700" else uid
        os.chown(rt, owner, owner)
        os.chmod(rt, 0o700 if kind == "other-0700" else 0o777)
    flag = tmp_path / "started"
    os.chmod(tmp_path, 0o777)
    r = hupt_as(uid, "run", "--", "sh", "-c", f"touch {flag}; sleep 30")
    assert r.returncode == 2, r.stderr
    one_line_error(r, str(rt), "refusing")
    assert not flag.exists(), "the server was started"


def test_the_cli_does_not_believe_another_users_socket(victim: tuple[int, Path]) -> None:
    uid, rt = victim
    rt.mkdir()
    os.chown(rt, uid, uid)
    os.chmod(rt, 0o700)  # the victim's own directory, as it should be
    # Root put a socket there and handed it to another uid before listen().
    with fake_hupt(rt / f"{os.getpid()}.sock", uid + 1):
        r = hupt_as(uid, "reload", str(os.getpid()))
    assert r.returncode == 2, r.stderr
    one_line_error(r, f"runs as uid {uid + 1}", "refusing to believe it")


USR1_SERVER = """
import http.server, os, signal, sys
port, log = int(sys.argv[1]), sys.argv[2]
def on_signal(sig, frame):
    with open(log, "a") as f:
        f.write(f"{signal.Signals(sig).name} {os.getpid()}\\n")
for s in (signal.SIGUSR1, signal.SIGWINCH):
    signal.signal(s, on_signal)
http.server.ThreadingHTTPServer(("127.0.0.1", port),
                                http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def test_usr1_is_forwarded_to_the_server_and_hupt_serves_on(procs: Procs,
                                                             tmp_path: Path) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    got = tmp_path / "signals"
    h = procs.hupt(cmd=[sys.executable, "-c", USR1_SERVER, str(port), str(got)])
    wait_listening(target, 20, proc=h)
    [server] = h.descendants()
    for sig in (signal.SIGUSR1, signal.SIGUSR1, signal.SIGWINCH):
        h.signal(sig)
        time.sleep(0.2)  # two USR1 at once may merge into one pending signal
    wait_for("the server to log the signals",
             lambda: got.exists() and len(got.read_text().splitlines()) == 3, 10, h)
    assert got.read_text().splitlines() == [f"SIGUSR1 {server}", f"SIGUSR1 {server}",
                                            f"SIGWINCH {server}"]
    assert h.poll() is None and h.descendants() == {server}, h.log()
    assert "SIGUSR1: forwarded to generation 1" in h.log()
    assert hupt_cli("reload", str(h.pid)).returncode == 0, h.log()
    assert h.stop() == 0, h.log()


def test_a_stale_control_socket_is_removed_by_status_and_by_the_next_start(
        procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt(cmd=[sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)])
    wait_listening(target, 20, proc=h)
    path = control.socket_path(h.pid)
    servers = h.descendants()
    h.signal(signal.SIGKILL)
    h.popen.wait(10)
    for p in servers:  # the server serves on unsupervised: not this test's subject
        os.kill(p, signal.SIGKILL)
    assert not wait_gone(servers, 5)
    assert os.path.exists(path), "hupt SIGKILLed left no socket behind: nothing to test"
    r = hupt_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    assert h.pid not in [i["hupt_pid"] for i in json.loads(r.stdout)["instances"]]
    assert not os.path.exists(path), "hupt status left the stale socket"

    # A stale socket found by the next hupt to start (this one never listened).
    stale = os.path.join(control.runtime_dir(), f"{2**22 + os.getpid()}.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(stale)
    h2 = procs.hupt(cmd=[sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                         str(port)])
    wait_listening(target, 20, proc=h2)
    assert not os.path.exists(stale), h2.log()
    assert "nobody answers on it" in h2.log()
    assert h2.stop() == 0


def test_an_endless_control_request_is_cut_short(procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt(cmd=[sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)])
    wait_listening(target, 20, proc=h)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(control.socket_path(h.pid))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"x" * (8 << 20))  # 8 MB, no newline: hupt hangs up well before
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(4096):
                answer += chunk
    msg = json.loads(answer.splitlines()[0])
    assert msg["ok"] is False and "too large" in msg["reason"], answer
    for msg in control.request(h.pid, [1, 2], timeout=10):  # type: ignore[arg-type]
        assert msg["ok"] is False and "JSON object" in msg["reason"]
    assert h.poll() is None and hupt_cli("reload", str(h.pid)).returncode == 0, h.log()
    assert h.log().count("refused a control request over") == 1
    assert h.stop() == 0


def test_a_pidfile_in_a_missing_directory_starts_nothing(tmp_path: Path) -> None:
    flag = tmp_path / "started"
    for pidfile in (tmp_path / "missing" / "hupt.pid", tmp_path):
        r = hupt_cli("run", "--pidfile", str(pidfile), "--", "sh", "-c",
                     f"touch {flag}; sleep 30", timeout=30)
        assert r.returncode == 2, r.stderr
        one_line_error(r, "--pidfile", str(pidfile))
        assert not flag.exists()
    assert not any(alive(p) for p in _children_of_nobody(flag))


def _children_of_nobody(flag: Path) -> list[int]:
    """Processes whose command line names ``flag`` (a server that should not exist)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if str(flag).encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    out.append(int(d))
    return out
