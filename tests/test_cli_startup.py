"""A CLI that starts fast (issue 14 item 10): what a control command imports.

Wall time depends on the machine (bench/bench.py measures it); what a command
imports does not.  Each command runs in a fresh interpreter with an empty
runtime directory of its own, and reports ``sys.modules`` at its end: a
control round trip needs neither rich (tables), nor pyroute2 (sock_diag),
nor python-ptrace, nor hupt's tracer (ctypes), nor the supervisor's parts,
nor importlib.metadata (the version).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# The code path of a control command must not reach these (prefixes).
HEAVY = ("rich", "pyroute2", "ptrace", "ctypes", "importlib.metadata", "hupt.tracer",
         "hupt.supervisor", "hupt.linux", "hupt.fleet", "hupt.reload", "hupt.readiness",
         "hupt.snapshot", "hupt.output", "hupt.waitold", "dataclasses")
# Generous: status needs 8 of hupt's own today.
MAX_HUPT_MODULES = 12

CHILD = """
import json, sys
import hupt.control as control
control.runtime_dir = lambda uid=None: {directory!r}
from hupt import cli
code = cli.main({argv!r})
print("\\n" + json.dumps({{"code": code, "modules": sorted(sys.modules)}}))
"""


def run_cli(tmp_path: Path, *argv: str) -> dict[str, Any]:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", CHILD.format(directory=str(directory),
                                                           argv=list(argv))],
                       capture_output=True, text=True, env=env, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert isinstance(doc, dict)
    return doc


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


@pytest.mark.parametrize("argv, code", [
    (["status"], 0),
    (["status", "--json"], 0),
    (["reload", "nosuch"], 2),  # everything up to its connect: the name's lookup fails
    (["reload", "nosuch", "--env", "A=1", "--", "srv"], 2),
    (["reload", "--wait-old", "nosuch"], 2),
    (["stop", "nosuch"], 2),
    (["signal", "nosuch", "USR1"], 2),
])
def test_a_control_command_imports_only_what_it_needs(tmp_path: Path, argv: list[str],
                                                      code: int) -> None:
    doc = run_cli(tmp_path, *argv)
    assert doc["code"] == code
    assert heavy(doc["modules"]) == []
    ours = [m for m in doc["modules"] if m == "hupt" or m.startswith("hupt.")]
    assert len(ours) <= MAX_HUPT_MODULES, ours


def test_the_parser_builds_only_the_command_being_run() -> None:
    from hupt import cli

    def commands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        sub = next(a for a in p._actions if a.dest == "command")
        return dict(getattr(sub, "choices", {}))

    only = commands(cli.build_parser("status"))
    assert list(only) == ["status"], "no other command's parser is built"
    assert "json" in [a.dest for a in only["status"]._actions]
    assert set(commands(cli.build_parser())) == set(cli.COMMANDS)
    assert cli.command_of(["-v", "status", "run"]) == "status"
    assert cli.command_of(["--version"]) is None
    assert cli.command_of(["nosuch"]) is None


@pytest.mark.parametrize("argv, listed", [
    (["--help"], True), (["--help", "run"], True), (["-v", "-h", "status"], True),
    (["run", "--help"], False)])
def test_help_lists_every_command_when_it_is_hupt_s_own(argv: list[str], listed: bool) -> None:
    r = subprocess.run([sys.executable, "-m", "hupt", *argv], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    shown = [c for c in cli_commands() if f"\n    {c} " in r.stdout]
    assert shown == (cli_commands() if listed else []), r.stdout


def cli_commands() -> list[str]:
    from hupt import cli

    return list(cli.COMMANDS)


def test_generation_1_started_before_the_supervisor_is_supervised_as_any(
        tmp_path: Path) -> None:
    import signal

    from hupt.address import AF_INET, Address
    from hupt.generations import State
    from hupt.launch import FirstRun, start_first
    from hupt.supervisor import Options, Supervisor
    from tests.fakes import FakeSystem

    fake = FakeSystem()
    pidfile = tmp_path / "hupt.pid"
    opts = Options(argv=["server"], env={"A": "1"}, pidfile=str(pidfile))
    plan = FirstRun(argv=["server"], env={"A": "1"}, cwd=None, pidfile=str(pidfile), unlink=[],
                    notify_ready=False)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        first = start_first(fake, plan, control=False)
        assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []), \
            "blocked until the supervisor's handlers are in place"
        assert first.mask == before and first.pidfile == str(pidfile)
        assert pidfile.read_text().strip() == str(os.getpid())
        (argv, env), = fake.spawns
        assert argv == ["server"] and env["A"] == "1"
        sup = Supervisor(fake, opts, control=False, first=first)
        sup.start()
        assert len(fake.spawns) == 1, "not started twice"
        gen = sup.current
        assert gen is not None and gen.pid == first.started.pid and gen.argv == ["server"]
        fake.listen(1, Address(AF_INET, "127.0.0.1", 8000))
        sup.on_notify(gen)
        assert gen.state is State.SERVING and gen.listened
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        fake.close()


def test_a_first_generation_that_cannot_start_leaves_nothing(tmp_path: Path) -> None:
    import signal

    from hupt.launch import FirstRun, start_first
    from hupt.tracer.spawn import SpawnError
    from tests.fakes import FakeSystem

    fake = FakeSystem()
    fake.spawn_error = SpawnError("cannot start 'server': exec: No such file or directory")
    pidfile = tmp_path / "hupt.pid"
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        with pytest.raises(SpawnError):
            start_first(fake, FirstRun(argv=["server"], env={}, cwd=None, pidfile=str(pidfile),
                                       unlink=[], notify_ready=False), control=False)
        assert not pidfile.exists()
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        fake.close()

