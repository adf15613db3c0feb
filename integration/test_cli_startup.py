"""A CLI that starts fast (issue 14 item 10), against real processes.

Asserted: `hupt status PID` and `hupt reload PID` talk to a live hupt without
importing rich, pyroute2, python-ptrace, hupt's tracer or supervisor;
`hupt run` starts generation 1 before it imports the supervisor (what it
has imported when it forks the server is bounded), and the server it
started that early is supervised as any other (reloaded, stopped); a TERM
that reaches hupt in that window is a graceful stop, not a dead hupt with a
server nobody answers.  Wall times are bench/bench.py's business.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Procs, Started, free_port, health_cmd, hupt_cli, hupt_env, wait_listening
from load import Target

pytestmark = pytest.mark.root

# Never needed by a control round trip (prefixes).
CONTROL_HEAVY = ("rich", "pyroute2", "ptrace", "ctypes", "importlib.metadata", "hupt.tracer",
                 "hupt.supervisor", "hupt.linux", "hupt.fleet", "hupt.reload")
# Imported by hupt run only once generation 1 has started (hupt/early.py): the
# supervisor, the Linux System and the readiness policies, dataclasses (inspect,
# ast, dis: ~5 ms) that nearly all of them use, and json (1.3 ms: the control
# socket's messages).
AFTER_THE_EXEC = ("rich", "pyroute2", "ptrace", "importlib.metadata", "hupt.supervisor",
                  "hupt.fleet", "hupt.reload", "hupt.upgrade", "hupt.endpoint", "hupt.draining",
                  "hupt.announce", "hupt.hooks", "hupt.revive", "hupt.detach", "hupt.watch",
                  "hupt.snapshot", "hupt.tracer.attach", "hupt.tracer.inject",
                  "hupt.tracer.sockdiag", "hupt.tracer.accepting", "hupt.linux", "hupt.system",
                  "hupt.options", "hupt.readiness", "hupt.handoff", "hupt.listeners",
                  "hupt.tracer.notify", "dataclasses", "inspect", "json")

CLI = """
import json, sys
from hupt import cli
code = cli.main({argv!r})
print("\\n" + json.dumps({{"code": code, "modules": sorted(sys.modules)}}))
"""

# hupt run, recording what it has imported at generation 1's fork (not the output
# keeper's, started before it when hupt's output is not a terminal): os.fork, or
# clone3 into its cgroup (hupt/tracer/clone.py); with TERM, it also sends itself
# SIGTERM right after that fork.
RUN = """
import os, signal, sys
from hupt.tracer import clone
real, real_into = os.fork, clone.fork_into
def recorded(make):
    def fork(*args):
        if sys._getframe(1).f_globals.get("__name__") != "hupt.tracer.spawn":
            return make(*args)
        os.fork, clone.fork_into = real, real_into
        with open({out!r}, "w") as f:
            f.write(" ".join(sorted(sys.modules)))
        pid = make(*args)
        if pid and {term!r}:
            os.kill(os.getpid(), signal.SIGTERM)
        return pid
    return fork
os.fork, clone.fork_into = recorded(real), recorded(real_into)
from hupt import cli
sys.exit(cli.main({argv!r}))
"""


def heavy(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in names)]


def cli_modules(*argv: str) -> tuple[int, list[str]]:
    r = subprocess.run([sys.executable, "-c", CLI.format(argv=list(argv))], capture_output=True,
                       text=True, timeout=60, env=hupt_env(os.environ), stdin=subprocess.DEVNULL)
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    return int(doc["code"]), list(doc["modules"])


def start_recorded(procs: Procs, tmp_path: Path, *,
                   term: bool = False) -> tuple[Started, Target, Path]:
    target: Target = ("127.0.0.1", free_port())
    out = tmp_path / "modules.txt"
    argv = ["run", "--", *health_cmd(target)]
    h = procs.spawn([sys.executable, "-c", RUN.format(out=str(out), term=term, argv=argv)],
                    name="hupt")
    return h, target, out


def test_hupt_run_starts_the_server_before_it_imports_the_supervisor(
        procs: Procs, tmp_path: Path) -> None:
    h, target, out = start_recorded(procs, tmp_path)
    wait_listening(target, 20, proc=h)
    before = out.read_text().split()
    assert heavy(before, AFTER_THE_EXEC) == [], "imported before generation 1's exec"
    assert "hupt.tracer.spawn" in before
    # Supervised as any generation: reloaded, shown, stopped.
    pid = h.pid
    code, modules = cli_modules("reload", str(pid))
    assert code == 0
    assert heavy(modules, CONTROL_HEAVY) == [], "hupt reload PID"
    code, modules = cli_modules("status", str(pid))
    assert code == 0
    assert heavy(modules, CONTROL_HEAVY) == [], "hupt status PID"
    r = hupt_cli("status", "--json", str(pid))
    (inst,) = json.loads(r.stdout)["instances"]
    assert [g["state"] for g in inst["generations"]][-1] == "serving"
    assert [r["ok"] for r in inst["reloads"]] == [True]
    r = hupt_cli("stop", str(pid), timeout=30)
    assert r.returncode == 0, r.stderr
    assert h.popen.wait(10) == 0


def test_a_term_while_hupt_run_is_still_starting_is_a_graceful_stop(
        procs: Procs, tmp_path: Path) -> None:
    h, _target, _out = start_recorded(procs, tmp_path, term=True)
    assert h.popen.wait(20) == 0
    err = h.err.read_text()
    assert "Traceback" not in err, err
    assert "stopping" in err, err  # and the server stopped with it: procs.finish checks


def _script(path: Path, says: str, mode: int = 0o755) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {says} > \"$OUT\"\n")
    path.chmod(mode)


@pytest.mark.parametrize("case", ["absolute", "relative-entry", "slash", "refused-first"])
def test_the_spawn_runs_what_execvpe_would(tmp_path: Path, case: str) -> None:
    """hupt looks a bare name up on the server's PATH itself (hupt/tracer/spawn.py);
    what runs is what execvpe() in the child would have run."""
    from hupt.tracer import spawn
    from hupt.tracer.abi import SYS

    out = tmp_path / "out"
    _script(tmp_path / "a" / "prog", "not-executable", mode=0o644)
    _script(tmp_path / "b" / "prog", "b")
    _script(tmp_path / "cwd" / "bin" / "prog", "relative")
    path, argv, expect = {
        "absolute": (f"{tmp_path}/a:{tmp_path}/b", ["prog"], "b"),
        "relative-entry": ("bin", ["prog"], "relative"),  # the child's working directory
        "slash": (f"{tmp_path}/b", ["bin/prog"], "relative"),
        # Executable, but no format execve() knows (ENOEXEC): execvpe goes on to b.
        "refused-first": (f"{tmp_path}/c:{tmp_path}/b", ["prog"], "b"),
    }[case]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "prog").write_bytes(b"\x00\x01 not a program\n")
    (tmp_path / "c" / "prog").chmod(0o755)
    env = {"PATH": path, "OUT": str(out)}
    assert (spawn._on_path(argv[0], env) is not None) == (case in ("absolute", "refused-first"))
    pid, notify, _ = spawn.spawn(argv, env, [SYS.bind, SYS.listen], cwd=str(tmp_path / "cwd"))
    os.close(notify)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert out.read_text().strip() == expect


def test_a_name_found_nowhere_is_the_child_s_error_as_before(tmp_path: Path) -> None:
    from hupt.tracer import spawn
    from hupt.tracer.abi import SYS

    with pytest.raises(spawn.SpawnError, match=r"'nosuch-prog'.*exec: No such file"):
        spawn.spawn(["nosuch-prog"], {"PATH": str(tmp_path)}, [SYS.bind])
