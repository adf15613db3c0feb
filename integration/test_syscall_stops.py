"""A server's last exit_group turned into an execve (hupt/tracer/syscall_stops.py), real kernel.

Each target runs under a small parent that waits for it and writes what it
saw to a file, as a shell or systemd would: "the parent saw no exit" is read
from there.  The new image (NEW_IMAGE) writes its pid, its fds, its signal mask
and tracer to a report file and waits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Procs, free_port, go_cmd, wait_for, wait_listening
from load import Target

from hupt.tracer import procfs
from hupt.tracer.syscall_stops import ExitToExec, Outcome, Report

pytestmark = pytest.mark.root

# A multi-threaded target: on SIGTERM it starts threads (the drain's clones) and
# calls exit_group(7) from one of them, never from the main thread.  With
# "pending=SIG" it first makes SIG pending in that thread (blocked there).
TARGET = """
import os, signal, sys, threading, time
os.open("/dev/null", os.O_RDONLY)  # an inheritable fd >= 3: the exec must not pass it on
def idle():
    while True:
        time.sleep(0.01)
for _ in range(3):
    threading.Thread(target=idle, daemon=True).start()
def bye():
    for _ in range(3):
        threading.Thread(target=idle, daemon=True).start()
    time.sleep(0.05)
    for arg in sys.argv[1:]:
        sig = getattr(signal, arg.removeprefix("pending="))
        signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
        signal.pthread_kill(threading.get_ident(), sig)
    print("exiting from thread", threading.get_native_id(), flush=True)
    os._exit(7)
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=bye).start())
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""

NEW_IMAGE = """
import json, os, sys, time
status = open("/proc/self/status").read()
field = lambda k: status.split(k + ":")[1].split()[0]
fds = {}
for f in os.listdir("/proc/self/fd"):
    try:
        fds[int(f)] = os.readlink("/proc/self/fd/" + f)
    except OSError:
        pass  # the listing's own fd
json.dump({"pid": os.getpid(), "fds": fds,
           "sigblk": field("SigBlk"), "sigpnd": field("SigPnd"), "shdpnd": field("ShdPnd"),
           "tracer": int(field("TracerPid")), "argv": sys.argv,
           "env": os.environ.get("HUPT_TEST_IMAGE")}, open(sys.argv[1] + ".tmp", "w"))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""

# The parent: starts the target, writes its pid, then how it ended.
PARENT = """
import subprocess, sys
child = subprocess.Popen(sys.argv[2:])
open(sys.argv[1], "w").write(f"{child.pid}\\n")
rc = child.wait()
open(sys.argv[1], "a").write(f"exited {rc}\\n")
"""


class Parented:
    def __init__(self, procs: Procs, tmp: Path, cmd: list[str]) -> None:
        self.record = tmp / "parent.txt"
        self.parent = procs.spawn([sys.executable, "-c", PARENT, str(self.record), *cmd],
                                  name="parent")
        self.pid = int(wait_for("the child's pid", lambda: self._lines()[:1] or None)[0])

    def _lines(self) -> list[str]:
        try:
            text = self.record.read_text()
        except FileNotFoundError:
            return []
        return text.splitlines() if text.endswith("\n") else []

    def exits(self) -> list[str]:
        return self._lines()[1:]


def image(tmp: Path) -> tuple[Path, list[bytes]]:
    report = tmp / "image.json"
    script = tmp / "image.py"
    script.write_text(NEW_IMAGE)
    return report, [b"python3", os.fsencode(script), os.fsencode(report)]


def run_until_over(trap: ExitToExec, timeout: float = 10.0) -> Report:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = trap.pump()
        if report is not None:
            return report
        time.sleep(0.002)
    raise AssertionError(f"no report in {timeout}s (phase {trap.phase.value})")


def started(procs: Procs, tmp: Path, *extra: str) -> Parented:
    target = tmp / "target.py"
    target.write_text(TARGET)
    p = Parented(procs, tmp, [sys.executable, str(target), *extra])
    wait_for("the target's threads", lambda: len(procfs.threads(p.pid)) >= 4)
    return p


def exits_into_the_image(p: Parented, tmp: Path) -> dict[str, Any]:
    """Follow ``p``, SIGTERM it: its exit becomes NEW_IMAGE, same PID, no exit seen."""
    report_path, argv = image(tmp)
    trap = ExitToExec(p.pid, os.fsencode(sys.executable), argv, [])
    trap.arm()
    os.kill(p.pid, signal.SIGTERM)
    report = run_until_over(trap)
    assert report.outcome is Outcome.EXECED, report
    got: dict[str, Any] = wait_for("the new image's report", lambda: report_path.exists()
                                   and json.loads(report_path.read_text()))
    assert got["pid"] == p.pid
    time.sleep(0.3)
    assert p.exits() == []
    return got


def kill_and_see_it(p: Parented) -> None:
    os.kill(p.pid, signal.SIGKILL)
    wait_for("the parent to see the exit", lambda: p.exits() or None)


def untraced(pid: int) -> bool:
    return all(int(procfs.status_fields(t)["TracerPid"]) == 0 for t in procfs.threads(pid))


def test_exit_group_from_a_thread_becomes_the_exec(procs: Procs, tmp_path: Path) -> None:
    p = started(procs, tmp_path)
    report_path, argv = image(tmp_path)
    trap = ExitToExec(p.pid, os.fsencode(sys.executable), argv, [b"HUPT_TEST_IMAGE=yes"])
    trap.arm()
    assert not untraced(p.pid)
    os.kill(p.pid, signal.SIGTERM)
    report = run_until_over(trap)
    assert report.outcome is Outcome.EXECED, report
    got: dict[str, Any] = wait_for("the new image's report",
                                   lambda: report_path.exists() and json.loads(
                                       report_path.read_text()))
    assert got["pid"] == p.pid  # the same process runs the new program
    assert got["env"] == "yes" and got["argv"][1:] == [str(report_path)]
    assert got["sigblk"] == "0000000000000000"  # a fresh program's mask, not the blocked one
    assert got["tracer"] == 0
    fds = {int(fd): link for fd, link in got["fds"].items()}
    assert {0, 1, 2} <= set(fds)  # stdio passed on
    assert "/dev/null" not in [link for fd, link in fds.items() if fd >= 3]  # nothing else
    assert trap.stops > 0
    time.sleep(0.3)
    assert p.exits() == []  # the parent never saw an exit
    # The exiting thread was not the leader (the target's stdout is the parent's).
    line = next(x for x in p.parent.out.read_text().splitlines() if x.startswith("exiting"))
    assert int(line.split()[-1]) != p.pid
    os.kill(p.pid, signal.SIGKILL)
    wait_for("the parent to see the exit", lambda: p.exits() or None)


def test_a_failed_execve_lets_the_exit_happen(procs: Procs, tmp_path: Path) -> None:
    p = started(procs, tmp_path)
    trap = ExitToExec(p.pid, b"/nonexistent/program", [b"program"], [])
    trap.arm()
    os.kill(p.pid, signal.SIGTERM)
    report = run_until_over(trap)
    assert report.outcome is Outcome.EXEC_FAILED and report.exec_errno == 2, report
    assert wait_for("the parent to see the exit", lambda: p.exits() or None) == ["exited 7"]


def test_a_pending_request_to_end_lets_the_exit_happen(procs: Procs, tmp_path: Path) -> None:
    p = started(procs, tmp_path, "pending=SIGHUP")
    report_path, argv = image(tmp_path)
    trap = ExitToExec(p.pid, os.fsencode(sys.executable), argv, [])
    trap.arm()
    os.kill(p.pid, signal.SIGTERM)
    report = run_until_over(trap)
    assert report.outcome is Outcome.EXEC_FAILED and "SIGHUP pending" in report.detail, report
    assert wait_for("the parent to see the exit", lambda: p.exits() or None) == ["exited 7"]
    assert not report_path.exists()


def test_a_pending_signal_of_the_old_machinery_is_discarded(procs: Procs,
                                                            tmp_path: Path) -> None:
    """SIGIO, timers, USR1/2 pending at the exit (nginx's master had SIGIO pending)
    would kill the new image, whose handlers are gone: discarded, and the exec goes on."""
    p = started(procs, tmp_path, "pending=SIGUSR1", "pending=SIGIO")
    got = exits_into_the_image(p, tmp_path)
    assert got["sigpnd"] == got["shdpnd"] == "0000000000000000", got
    kill_and_see_it(p)


def test_released_server_runs_and_exits_untraced(procs: Procs, tmp_path: Path) -> None:
    p = started(procs, tmp_path)
    _, argv = image(tmp_path)
    trap = ExitToExec(p.pid, os.fsencode(sys.executable), argv, [])
    trap.arm()
    time.sleep(0.2)
    trap.release()
    report = trap.pump()
    assert trap.over and report is not None and report.outcome is Outcome.RELEASED
    assert trap.pump() is None  # said once
    assert untraced(p.pid)
    os.kill(p.pid, signal.SIGTERM)
    assert wait_for("the parent to see the exit", lambda: p.exits() or None) == ["exited 7"]


def test_a_killed_tracer_leaves_a_server_that_exits(procs: Procs, tmp_path: Path) -> None:
    """No PTRACE_O_EXITKILL, no seccomp trap on exit_group: the server just exits."""
    p = started(procs, tmp_path)
    tracer = procs.spawn([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from hupt.tracer.syscall_stops import ExitToExec
        t = ExitToExec({p.pid}, sys.executable.encode(), [b"python3", b"-c", b"pass"], [])
        t.arm()
        print("armed", flush=True)
        time.sleep(60)
    """)], name="tracer")
    wait_for("the tracer to arm", lambda: "armed" in tracer.out.read_text(), timeout=20)
    assert not untraced(p.pid)
    os.kill(tracer.pid, signal.SIGKILL)
    tracer.popen.wait(5)
    wait_for("the threads to be let go", lambda: untraced(p.pid))
    os.kill(p.pid, signal.SIGTERM)
    assert wait_for("the parent to see the exit", lambda: p.exits() or None) == ["exited 7"]


def test_static_go_server_exits_into_the_exec(procs: Procs, tmp_path: Path,
                                              go_server: Path) -> None:
    """Go calls exit_group from a non-main thread after http.Server.Shutdown; SIGURG
    preemption and clones happen meanwhile."""
    target: Target = ("127.0.0.1", free_port())
    p = Parented(procs, tmp_path, go_cmd(go_server, target))
    wait_listening(target, 20)
    exits_into_the_image(p, tmp_path)
    kill_and_see_it(p)


def test_arming_on_a_root_that_already_exited_fails_at_once(procs: Procs) -> None:
    """A root that exited before its exit could be followed (haproxy -W's master exits
    with its last worker, which --drain-signal stopped first) is a zombie: seizing
    it is refused. arm() must say it has no thread, not seize it again for ever."""
    import subprocess

    from harness import Background

    from hupt.errors import HuptError

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_for("the child to be a zombie",
                 lambda: procfs.parse_stat(Path(f"/proc/{child.pid}/stat").read_bytes())
                 .state == "Z", 10)
        trap = ExitToExec(child.pid, os.fsencode(sys.executable), [b"python3"], [])
        armed = Background(trap.arm)
        with pytest.raises(HuptError):
            armed.result(10)
    finally:
        child.wait(10)
