"""What a person or a script sees: `hupt status`, `hupt reload`'s progress, hupt's
messages, errors on bad input, and the control socket's refusal of other users.

Asserted: `hupt status --json` has every documented key with its type, and
describes generations (a draining one with its connections in flight), the
listeners and the reloads (a failed one too); `hupt reload` reports each step
with its time (started, listened on the held socket, ready, draining N in
flight, done), on a terminal as well as captured; `hupt status` prints tables
on a terminal and plain lines otherwise; hupt's own log lines carry a
timestamp and pid when captured and colour (ANSI escapes) on a terminal; a bad
command line is one "hupt: error:" line; only root or hupt's own user may
reload (SO_PEERCRED).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    Procs,
    free_port,
    health_cmd,
    http_server_cmd,
    hupt_cli,
    hupt_env,
    listener_inode,
    serving_pid,
    threaded_cmd,
    wait_gone,
    wait_listening,
)
from load import Target
from supervision import hupt_status, keepalive_connection, reload_ok, start_hupt, states

from hupt import cli, control

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
NOBODY = 65534


# -- hupt status --json -----------------------------------------------------------------------


def test_status_json_describes_a_running_instance(procs: Procs) -> None:
    h, target = start_hupt(procs)
    assert isinstance(target, tuple)
    assert h.reload().returncode == 0
    assert h.reload().returncode == 0
    r = hupt_cli("status", "--json", str(h.pid))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1 and len(doc["instances"]) == 1
    inst = doc["instances"][0]
    assert inst["hupt_pid"] == h.pid and inst["mode"] == "fork" and inst["state"] == "running"
    serving = [g for g in inst["generations"] if g["state"] == "serving"]
    assert len(serving) == 1 and serving[0]["number"] == 3
    assert serving[0]["pid"] == serving_pid(target)
    assert serving[0]["listening"] == [f"127.0.0.1:{target[1]}"]
    assert serving[0]["in_flight"] == 0
    (listener,) = inst["listeners"]
    assert listener["address"] == f"127.0.0.1:{target[1]}"
    assert listener["backlog"] >= 1024 and listener["queued"] == 0
    assert [r["ok"] for r in inst["reloads"]] == [True, True]
    assert all(r["duration_ms"] > 0 for r in inst["reloads"])
    # Without a PID: every instance of this user, this one among them.
    r = hupt_cli("status", "--json")
    assert h.pid in [i["hupt_pid"] for i in json.loads(r.stdout)["instances"]]
    # The human form names the generation and the listener.
    r = hupt_cli("status", str(h.pid))
    assert "generation 3" in r.stdout and "backlog" in r.stdout


def test_status_json_while_draining_and_after_a_failed_reload(
        procs: Procs, tmp_path: Path) -> None:
    """Every documented key with its type; a draining generation with a connection in
    flight shows as "draining" with in_flight >= 1; a failed reload is recorded."""
    fail = tmp_path / "FAIL"
    port = free_port()
    target: Target = ("127.0.0.1", port)
    cmd = ["sh", "-c", f"test -e {fail} && exit 3; exec {' '.join(health_cmd(target))}"]
    h, _ = start_hupt(procs, "--drain-timeout", "30", cmd=cmd, target=target)
    t_start = time.time()
    assert h.reload().returncode == 0
    draining = serving_pid(target)  # generation 2
    conn, _ = keepalive_connection(target)  # an open keep-alive connection pins generation 2
    r = h.reload()
    assert r.returncode == 0, r.stderr
    assert "draining 1 in flight" in r.stderr, r.stderr
    serving = serving_pid(target)  # generation 3
    assert serving != draining
    fail.touch()  # generation 4 exits before it is ready: the reload fails
    r = h.reload()
    assert r.returncode == 1, r.stderr
    assert "exit status 3" in r.stderr, r.stderr

    inst = hupt_status(h)
    assert inst["hupt_pid"] == h.pid and inst["command"] == cmd
    assert inst["mode"] == "fork" and inst["state"] == "running"
    assert 0 < inst["uptime_s"] < time.time() - t_start + 30
    gens = {g["number"]: g for g in inst["generations"]}
    assert set(gens) == {2, 3}, inst["generations"]
    old, new = gens[2], gens[3]
    assert old["state"] == "draining", old
    assert old["pid"] == draining and draining in old["pids"], old
    assert isinstance(old["in_flight"], int) and old["in_flight"] >= 1, old
    assert new["state"] == "serving" and new["pid"] == serving and serving in new["pids"], new
    assert new["in_flight"] == 0, new
    assert old["age_s"] > new["age_s"], (old, new)
    for g in (old, new):
        assert g["listening"] == [f"127.0.0.1:{port}"], g
        assert g["ready_ms"] is not None and 0 < g["ready_ms"] <= g["age_s"] * 1000, g
    (listener,) = inst["listeners"]
    assert listener["address"] == f"127.0.0.1:{port}"
    assert listener["inode"] == listener_inode(port), (listener, listener_inode(port))
    assert listener["queued"] == 0 and listener["backlog"] >= 1024, listener
    reloads = inst["reloads"]
    assert [x["ok"] for x in reloads] == [True, True, False], reloads
    assert [x["generation"] for x in reloads] == [2, 3, 4], reloads
    failed = reloads[-1]
    assert "generation 4" in failed["reason"] and "exit status 3" in failed["reason"], failed
    assert all(t_start - 1 <= x["at"] <= time.time() + 1 for x in reloads), reloads
    assert [x["at"] for x in reloads] == sorted(x["at"] for x in reloads), "oldest first"
    assert all(x["duration_ms"] > 0 for x in reloads), reloads
    assert "is ready" in reloads[0]["reason"] and "is ready" in reloads[1]["reason"], reloads

    # Once its last connection closes, the draining generation exits and leaves the list.
    conn.close()
    assert not wait_gone({draining}, 10), h.log()
    deadline = time.monotonic() + 10
    while (numbers := [g["number"] for g in hupt_status(h)["generations"]]) != [3]:
        assert time.monotonic() < deadline, numbers
        time.sleep(0.1)


# -- on a terminal and captured ---------------------------------------------------------------


def on_terminal(argv: list[str], timeout: float = 30.0) -> tuple[int, bytes]:
    """Run argv with stdout and stderr on a new pseudo-terminal; (status, all it wrote)."""
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


@pytest.mark.root
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
    assert re.search(r"gen\s+state\s+pid\s+processes\s+age\s+in flight\s+draining\s+listening",
                     text), text
    assert re.search(r"3\s+serving\s+\d+\s+1\s+", text), text
    assert re.search(rf"127\.0\.0\.1:{port}\s+0\s+1024", text), text
    h.signal(signal.SIGTERM)
    assert h.popen.wait(20) == 0, h.log()


@pytest.mark.root
def test_hupt_messages_are_coloured_on_a_terminal() -> None:
    # hupt run with its stderr on a terminal; the server exits at once, and so does hupt.
    code, out = on_terminal([sys.executable, "-m", "hupt", "run", "--", sys.executable, "-c",
                             "import sys; sys.exit(3)"])
    assert code == 3, out
    assert ANSI.search(out), out
    text = ANSI.sub(b"", out).decode(errors="replace")
    assert "hupt: generation 1 (pid" in text and "exited on its own (exit status 3)" in text
    assert not re.search(r"\d\d:\d\d:\d\d hupt\[", text), "no log prefix on a terminal"


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "code", "says"), [
    (["run"], 2, "missing the server command"),
    (["run", "--"], 2, "missing the server command"),
    (["run", "--", "/nonexistent/prog"], 1, "cannot start '/nonexistent/prog'"),
    (["reload", "notapid"], 2, "not a PID"),
    (["reload", "999999"], 2, "no process with PID 999999"),
    (["run", "--drain-timeout", "-1", "--", "x"], 2, "must be a positive number"),
    (["run", "--stop-signal", "NOPE", "--", "x"], 2, "unknown signal"),
])
def test_bad_input_is_one_line_error(args: list[str], code: int, says: str,
                                     procs: Procs) -> None:
    assert not os.path.exists("/proc/999999")
    p = procs.spawn([sys.executable, "-m", "hupt", *args], name="hupt")
    got = p.popen.wait(20)
    err = p.err.read_text()
    errors = [line for line in err.splitlines() if line.startswith("hupt: error:")]
    assert got == code, err
    assert len(errors) == 1 and says in errors[0], err
    assert err.rstrip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    assert not os.path.exists(control.socket_path(p.pid)), "control socket left behind"


def test_reload_of_unknown_pid_is_a_clear_error(procs: Procs) -> None:
    sleeper = procs.spawn(["sleep", "30"])
    r = hupt_cli("reload", str(sleeper.pid), timeout=30)
    assert r.returncode == 2
    assert r.stderr.startswith("hupt: error:") and "not under hupt" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- the control socket's credential check ----------------------------------------------------


def as_nobody(body: Callable[[int], int], *, fsuid_root: bool = False) -> tuple[int, bytes]:
    """Run body(out_fd) in a forked child running as nobody; (its exit code, what it wrote).

    A forked child and not a new program: the interpreter may live where nobody cannot
    read it, and execve resets the filesystem uid. With `fsuid_root` the child keeps
    filesystem uid 0 (saved uid 0 allows setfsuid(0)) while its real and effective uids
    are nobody's: path permissions then let it reach a 0700 directory of root's, but
    SO_PEERCRED reports the effective uid at connect(), nobody.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 100
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, 0 if fsuid_root else NOBODY)
            if fsuid_root:
                libc.setfsuid(0)
            code = body(w)
        except BaseException as e:
            os.write(w, f"child failed: {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


def cli_as_nobody(*args: str) -> tuple[int, str]:
    """`hupt ARGS` run as nobody: (exit status, stderr)."""
    def run(out: int) -> int:
        sys.stderr = open(out, "w")  # noqa: SIM115 - the child exits right after
        code = cli.main(list(args))
        sys.stderr.flush()
        return code

    code, err = as_nobody(run)
    return code, err.decode(errors="replace")


def control_as_nobody(hupt_pid: int, msg: dict[str, object]) -> bytes:
    """Send msg to hupt's control socket as euid nobody (fsuid root); return its answer."""
    def talk(out: int) -> int:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(control.socket_path(hupt_pid, uid=0))
        os.write(out, b"connected\n")
        with contextlib.suppress(OSError):
            s.sendall(json.dumps(msg).encode() + b"\n")
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                os.write(out, chunk)
        return 0

    code, out = as_nobody(talk, fsuid_root=True)
    assert code == 0 and out.startswith(b"connected\n"), (code, out)
    return out[len(b"connected\n"):]


def test_other_users_cannot_reload(procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt(cmd=threaded_cmd(target, threads=2))
    wait_listening(target, 20, proc=h)
    first = h.descendants()
    assert states(h) == {1: "serving"}

    # `hupt reload` as nobody: a clear one-line error, nothing reloaded.
    code, err = cli_as_nobody("reload", str(h.pid))
    assert code != 0, err
    assert err.startswith("hupt: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err

    # Past the directory permissions, straight to the socket: hupt checks SO_PEERCRED.
    got = control_as_nobody(h.pid, {"cmd": "reload"})
    answers = [json.loads(line) for line in got.splitlines()]
    assert len(answers) == 1 and answers[0]["event"] == "result", answers
    assert answers[0]["ok"] is False and "permission denied: uid 65534" in answers[0]["reason"]
    assert "refused a control connection" in h.log()

    time.sleep(1.0)
    assert states(h) == {1: "serving"}, "a reload happened"
    assert h.descendants() == first
    assert "started generation" not in h.log()
    # Root may: the next generation is number 2, so none was started in between.
    reload_ok(h)
    assert 2 in states(h)
