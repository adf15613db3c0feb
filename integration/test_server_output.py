"""The server's output through hupt (issue 14 item 4), with real processes.

hupt's stdout and stderr are files here (not terminals). Asserted: each line a
generation writes reaches hupt's own with "[gen N] " before it, the two
generations of a reload told apart, hupt's own lines left as they are; with
--no-prefix-output the server gets hupt's stdout and stderr themselves; a
reload whose new generation exits at start prints that generation's last 20
stderr lines (a partial last line included), then the one-line error; in exec
mode the same process's lines are labelled with the image it runs; hupt
SIGKILLed leaves a server that writes without pause serving, neither blocked
nor killed by SIGPIPE, its lines still reaching hupt's stdout through the
output keeper, which is not in hupt's process tree and goes once the server
has.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest
from harness import (
    HuptProcess,
    Procs,
    alive,
    http_get,
    serving_pid,
    wait_for,
    wait_gone,
)
from load import HeldRequest
from supervision import ping, start_chatty, states


def pid_of(h: HuptProcess, number: int) -> int:
    pid = ping(h)[number]["pid"]
    assert isinstance(pid, int)
    return pid


def test_each_line_carries_its_generation(procs: Procs) -> None:
    h, target = start_chatty(procs, "--drain-timeout", "30")
    first = serving_pid(target)
    held = HeldRequest(target).start()  # generation 1 drains while 2 serves
    try:
        held.wait_accepted()
        assert h.reload().returncode == 0
        wait_for("generation 1 to drain", lambda: states(h).get(1) == "draining", 10, h)
        second = serving_pid(target)
        assert second != first
        http_get(target, "/after")
    finally:
        held.release()
    held.result()
    # serving_pid's request and the held one, answered while generation 1 drained.
    wait_for("the lines", lambda: h.out.read_text().count(f"[gen 1] GET / pid={first}") == 2,
             10, h)
    out = h.out.read_text().splitlines()
    assert f"[gen 1] started pid={first}" in out and f"[gen 2] started pid={second}" in out
    assert f"[gen 2] GET /after pid={second}" in out
    assert all(re.match(r"\[gen [12]\] ", line) for line in out), out
    err = h.err.read_text().splitlines()
    assert f"[gen 1] starting pid={first}" in err and f"[gen 2] starting pid={second}" in err
    # hupt's own lines are its own: timestamped, never prefixed.
    assert any(re.match(rf"\d\d:\d\d:\d\d hupt\[{h.pid}\]: ", line) for line in err), err
    assert h.stop() == 0


def test_no_prefix_output_hands_the_server_hupts_own_stdout_and_stderr(procs: Procs) -> None:
    h, target = start_chatty(procs, "--no-prefix-output")
    pid = serving_pid(target)
    for fd in (1, 2):  # the very files hupt writes to, not pipes of hupt's
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == os.readlink(f"/proc/{h.pid}/fd/{fd}")
    wait_for("the server's line", lambda: f"started pid={pid}" in h.out.read_text(), 10, h)
    assert h.out.read_text().splitlines()[0] == f"started pid={pid}"
    assert h.stop() == 0


def test_a_failed_generations_last_stderr_lines_come_with_the_reason(procs: Procs,
                                                                    tmp_path: Path) -> None:
    fail = tmp_path / "fail"
    h, _ = start_chatty(procs, server=["--fail-if", str(fail)])
    fail.touch()
    r = h.reload()
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("hupt: error: reload failed: generation 2 (pid ")
    assert "exited (exit status 3) before it was ready" in lines[-1]
    head = next(i for i, line in enumerate(lines) if "wrote to stderr" in line)
    assert re.match(r"hupt: generation 2 \(pid \d+\) wrote to stderr \(last 20 line\(s\)\):$",
                    lines[head]), lines[head]
    tail = lines[head + 1:-1]
    assert tail == [f"  | config error {i}: bad value on line {i}" for i in range(12, 31)] \
        + ["  | giving up"], r.stderr
    # In hupt's log, all of it, labelled; the old generation serves on.
    err = h.err.read_text()
    assert "[gen 2] config error 1: bad value on line 1\n" in err
    assert "[gen 2] giving up\n" in err
    assert states(h) == {1: "serving"}
    fail.unlink()
    assert h.reload().returncode == 0
    assert h.stop() == 0


def test_exec_mode_labels_the_lines_with_the_image_that_runs(procs: Procs) -> None:
    h, target = start_chatty(procs, "--exec")
    pid = serving_pid(target)
    assert h.reload().returncode == 0
    assert serving_pid(target) == pid  # the same process runs generation 2
    wait_for("generation 2's line", lambda: f"[gen 2] started pid={pid}" in h.out.read_text(),
             10, h)
    assert h.out.read_text().splitlines()[0] == f"[gen 1] started pid={pid}"
    assert h.stop() == 0


def test_the_server_outlives_a_killed_hupt_without_blocking_on_its_output(procs: Procs) -> None:
    h, target = start_chatty(procs, server=["--chatter", "1"])
    server = pid_of(h, 1)
    keeper = next(p for p in _pids() if f"hupt-output-keeper:{h.pid}" in _cmdline(p))
    assert keeper not in h.descendants(), "the keeper is not in hupt's process tree"
    h.signal(signal.SIGKILL)
    h.popen.wait(10)
    before = int(http_get(target, "/count")[1])
    # Far more than a pipe holds: nobody but the keeper reads it now.
    deadline = time.monotonic() + 30
    while int(http_get(target, "/count")[1]) < before + 3000:
        assert time.monotonic() < deadline, "the server's output stalled"
        assert alive(server), "the server died (SIGPIPE?)"
        time.sleep(0.2)
    assert http_get(target, "/")[0] == 200
    wait_for("the lines written after hupt's death",
             lambda: f"[gen 1] chatter {before + 2000} pid={server}" in h.out.read_text(), 10)
    os.kill(server, signal.SIGKILL)
    assert not wait_gone([server], 5)
    assert not wait_gone([keeper], 5), "the keeper outlived the last writer"


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.parametrize("shell", [True, False], ids=["through-sh", "forked"])
def test_the_keeper_waits_outside_hupt_s_tree_with_none_of_its_fds(
        monkeypatch: pytest.MonkeyPatch, shell: bool) -> None:
    """start_keeper as `hupt run` calls it, in this process: through /bin/sh where
    there is one, a double fork of hupt where there is none."""
    from hupt import output

    if not shell:
        monkeypatch.setattr(output, "_SH", "/nonexistent/sh")
    stray_r, stray_w = os.pipe()  # inheritable, as an fd hupt was given could be
    os.set_inheritable(stray_r, True)
    stray = os.readlink(f"/proc/self/fd/{stray_r}")
    label = f"hupt-output-keeper:{os.getpid()}"
    before = {p for p in _pids() if label in _cmdline(p)}

    def keepers() -> set[int]:
        return {p for p in _pids() if label in _cmdline(p)} - before

    started = output.start_keeper()
    assert started is not None
    chan, hold = started
    try:
        if shell:  # waiting in sh: the channel (3), the hold (4), nothing else of ours
            waiting, = keepers()
            assert _cmdline(waiting).startswith("sh -c ")
            assert stray not in _links(waiting)
            assert {3, 4} <= set(_fds(waiting))
        os.close(hold)  # released: it execs its interpreter
        wait_for("the keeper's interpreter", lambda: any(
            "import keeper_main" in _cmdline(p) for p in keepers()), 10)
        keeper, = keepers()
        if shell:
            assert keeper == waiting
        assert os.getsid(keeper) != os.getsid(0), "a session of its own"
        assert _ppid(keeper) != os.getpid(), "re-parented: not a child of hupt"
        # stdin (/dev/null), the stdout and stderr it forwards to, the channel.
        wait_for("nothing else of hupt's", lambda: len(_fds(keeper)) == 4, 10)
        assert stray not in _links(keeper)
        assert Path(f"/proc/{keeper}/fd/0").resolve() == Path(os.devnull)
    finally:
        os.close(stray_r)
        os.close(stray_w)
        chan.close()  # hupt gone: with no pipe to forward, it exits
    assert not wait_gone([keeper], 10), "the keeper outlived hupt's channel"


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _fds(pid: int) -> list[int]:
    try:
        return [int(fd) for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return []


def _links(pid: int) -> set[str]:
    out = set()
    for fd in _fds(pid):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out
