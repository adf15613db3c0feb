"""Deploys that change what runs (issue 14 item 2), against real processes on 127.0.0.1.

Asserted: with `hupt run --chdir DIR` a symlink-swap deploy (`current ->
releases/r2`) reloads into r2: its directory, its files and its program
(`./server`, looked up in the new release), in fork mode and in exec mode
(the same PID enters r2 and execs r2's program, with and without
--drain-signal); `hupt reload --env/--unset-env/-- ARGV` change the command
of the new generation and of later ones, shown in `hupt status`; a new
command that cannot start, or exits before it is ready, fails the reload,
the old generation serves on and the command stays as it was; --env-file is
read again at every reload, and a malformed or missing one fails the reload
in one line with nothing started.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from harness import SERVERS, HuptProcess, Procs, free_port, http_get, hupt_cli, wait_listening
from load import Target

pytestmark = pytest.mark.root


def whoami(target: Target) -> dict[str, Any]:
    status, body = http_get(target, "/whoami")
    assert status == 200, body
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return doc


def status_of(name: str) -> dict[str, Any]:
    r = hupt_cli("status", "--json", name)
    assert r.returncode == 0, r.stderr
    (inst,) = json.loads(r.stdout)["instances"]
    assert isinstance(inst, dict)
    return inst


def reload(name: str, *args: str) -> None:
    r = hupt_cli("reload", name, *args, timeout=60)
    assert r.returncode == 0 and "reload done" in r.stderr, r.stderr


def failed_reload(name: str, *args: str) -> str:
    """The one error line of a reload that failed (exit status 1)."""
    r = hupt_cli("reload", name, *args, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("hupt: error: reload failed: "), r.stderr
    return last


def releases(tmp_path: Path) -> Path:
    """releases/r1 and r2, each with its own ./server program and RELEASE file, and
    current -> releases/r1."""
    for r in ("r1", "r2"):
        d = tmp_path / "releases" / r
        d.mkdir(parents=True)
        (d / "RELEASE").write_text(f"{r}\n")
        program = d / "server"
        program.write_text(f"#!/bin/sh\nDEPLOY_PROGRAM={r} exec {sys.executable} "
                           f"{SERVERS / 'variant_server.py'} \"$@\"\n")
        program.chmod(0o755)
    current = tmp_path / "current"
    current.symlink_to("releases/r1")
    return current


def swap(current: Path, release: str) -> None:
    """The deploy: current -> releases/RELEASE, atomically (rename over the old link)."""
    tmp = current.with_name(f".current.{uuid.uuid4().hex[:6]}")
    tmp.symlink_to(f"releases/{release}")
    os.replace(tmp, current)


def start(procs: Procs, *opts: str, cmd: list[str], cwd: Path | None = None,
          env: dict[str, str] | None = None) -> tuple[HuptProcess, str]:
    name = f"deploy-{uuid.uuid4().hex[:8]}"
    h = procs.hupt("--name", name, *opts, cmd=cmd, cwd=cwd, env=env)
    return h, name


@pytest.mark.parametrize("mode", ["fork", "exec", "exec-drain-signal"])
def test_a_symlink_swap_deploy_reloads_into_the_new_release(
        procs: Procs, tmp_path: Path, mode: str) -> None:
    current = releases(tmp_path)
    target = ("127.0.0.1", free_port())
    opts = {"fork": [], "exec": ["--exec"],
            "exec-drain-signal": ["--exec", "--drain-signal", "TERM"]}[mode]
    # Started from inside the release, as a deploy script would: `cd current && hupt
    # run --chdir . ...` follows the link ($PWD), not the directory it resolved to.
    h, name = start(procs, "--chdir", ".", *opts, cmd=["./server", f"127.0.0.1:{target[1]}"],
                    cwd=current, env={"PWD": str(current)})
    wait_listening(target, 20, proc=h)
    first = whoami(target)
    assert first["release"] == "r1" and first["env"]["DEPLOY_PROGRAM"] == "r1"
    assert first["cwd"] == str(tmp_path / "releases" / "r1")
    swap(current, "r2")
    reload(name)
    now = whoami(target)
    assert now["release"] == "r2", now
    assert now["env"]["DEPLOY_PROGRAM"] == "r2", "r2's ./server ran, looked up in r2"
    assert now["cwd"] == str(tmp_path / "releases" / "r2")
    if mode == "fork":
        assert now["pid"] != first["pid"]
    else:
        assert now["pid"] == first["pid"], "exec mode: the same process entered r2"
    assert status_of(name)["chdir"] == str(current)
    # And back: a rollback deploy is a swap too.
    swap(current, "r1")
    reload(name)
    assert whoami(target)["release"] == "r1"
    # A release directory that is gone fails the reload before anything is paused.
    dangling = tmp_path / "releases" / "r3"
    swap(current, "r3")
    line = failed_reload(name)
    assert f"--chdir {current}: no such directory; nothing was started" in line, line
    assert not dangling.exists()
    assert whoami(target)["release"] == "r1", "the old generation serves on"


def test_reload_changes_the_command_for_this_and_later_generations(
        procs: Procs, tmp_path: Path) -> None:
    target = ("127.0.0.1", free_port())
    server = [sys.executable, str(SERVERS / "variant_server.py"), f"127.0.0.1:{target[1]}"]
    env_file = tmp_path / "app.env"
    env_file.write_text("# deploy settings\nDEPLOY_FILE=1\n\nexport DEPLOY_SHARED=file\n")
    h, name = start(procs, "--env-file", str(env_file), cmd=server,
                    env={"DEPLOY_BASE": "base", "DEPLOY_SHARED": "base"})
    wait_listening(target, 20, proc=h)
    assert whoami(target)["env"] == {"DEPLOY_BASE": "base", "DEPLOY_FILE": "1",
                                     "DEPLOY_SHARED": "file"}

    reload(name, "--env", "DEPLOY_NEW=a b=c", "--unset-env", "DEPLOY_BASE",
           "--env", "DEPLOY_SHARED=mine")
    assert whoami(target)["env"] == {"DEPLOY_FILE": "1", "DEPLOY_NEW": "a b=c",
                                     "DEPLOY_SHARED": "mine"}
    inst = status_of(name)
    assert inst["env_changes"] == {"DEPLOY_BASE": None, "DEPLOY_NEW": "a b=c",
                                   "DEPLOY_SHARED": "mine"}
    assert inst["command"] == server and inst["env_file"] == str(env_file)

    new = [*server, "--port0"]
    reload(name, "--", *new)
    me = whoami(target)
    assert me["argv"] == new[1:] and me["env"]["DEPLOY_NEW"] == "a b=c"
    inst = status_of(name)
    assert inst["command"] == new
    serving = [g for g in inst["generations"] if g["state"] == "serving"]
    assert [g["command"] for g in serving] == [new]
    plain = hupt_cli("status", name)
    assert "env changed: DEPLOY_BASE" not in plain.stdout  # set order: as given
    assert "unset DEPLOY_BASE" in plain.stdout and "DEPLOY_NEW=a b=c" in plain.stdout

    # Later reloads keep the changed command; the env file is read again each time.
    env_file.write_text("DEPLOY_FILE=2\n")
    reload(name)
    me = whoami(target)
    assert me["argv"] == new[1:] and me["env"] == {"DEPLOY_FILE": "2",
                                                      "DEPLOY_NEW": "a b=c",
                                                      "DEPLOY_SHARED": "mine"}


def test_a_failing_new_command_rolls_back_to_the_old_command(procs: Procs,
                                                             tmp_path: Path) -> None:
    target = ("127.0.0.1", free_port())
    server = [sys.executable, str(SERVERS / "variant_server.py"), f"127.0.0.1:{target[1]}"]
    h, name = start(procs, "--ready-timeout", "10", cmd=server)
    wait_listening(target, 20, proc=h)
    pid = whoami(target)["pid"]

    # Cannot start at all.
    line = failed_reload(name, "--env", "DEPLOY_X=1", "--", str(tmp_path / "nosuch"))
    assert "No such file or directory" in line and line.endswith("the command is unchanged")
    # Starts, then exits before it is ready.
    line = failed_reload(name, "--", sys.executable, "-c", "import sys; sys.exit(3)")
    assert "exited (exit status 3) before it was ready" in line, line
    assert line.endswith("the command is unchanged"), line
    assert whoami(target)["pid"] == pid, "the old generation serves on"
    inst = status_of(name)
    assert inst["command"] == server and inst["env_changes"] == {}
    assert [r["ok"] for r in inst["reloads"]] == [False, False]

    reload(name)
    me = whoami(target)
    assert me["pid"] != pid and me["argv"] == server[1:] and me["env"] == {}


def test_a_missing_or_malformed_env_file_fails_the_reload_in_one_line(
        procs: Procs, tmp_path: Path) -> None:
    target = ("127.0.0.1", free_port())
    env_file = tmp_path / "app.env"
    env_file.write_text("DEPLOY_FILE=1\n")
    h, name = start(procs, "--env-file", str(env_file),
                    cmd=[sys.executable, str(SERVERS / "variant_server.py"),
                         f"127.0.0.1:{target[1]}"])
    wait_listening(target, 20, proc=h)
    pid = whoami(target)["pid"]
    generations = len(status_of(name)["generations"])

    env_file.write_text("DEPLOY_FILE=2\nDEPLOY_TOKEN secret-value\n")
    line = failed_reload(name)
    assert line == (f"hupt: error: reload failed: --env-file {env_file} line 2: expected "
                    f"KEY=VALUE; nothing was started"), line
    env_file.unlink()
    line = failed_reload(name)
    assert line.endswith(f"--env-file {env_file}: no such file; nothing was started"), line
    me = whoami(target)
    assert me["pid"] == pid and me["env"] == {"DEPLOY_FILE": "1"}
    assert len(status_of(name)["generations"]) == generations, "nothing was started"

    env_file.write_text("DEPLOY_FILE=3\n")
    reload(name)
    assert whoami(target)["env"] == {"DEPLOY_FILE": "3"}


def test_hupt_run_refuses_a_bad_chdir_or_env_file_and_starts_nothing(
        procs: Procs, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    (tmp_path / "bad.env").write_text("=x\n")
    for opts, needle in ((["--chdir", str(tmp_path / "nosuch")], "no such directory"),
                         (["--env-file", str(tmp_path / "bad.env")], "line 1"),
                         (["--env-file", str(tmp_path / "none.env")], "no such file")):
        h = procs.hupt(*opts, cmd=cmd)
        assert h.popen.wait(20) == 2
        err = h.err.read_text().strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hupt: error: --") and needle in err[0], err
    assert not marker.exists()


def test_exec_mode_reload_with_a_changed_environment(procs: Procs) -> None:
    target = ("127.0.0.1", free_port())
    server = [sys.executable, str(SERVERS / "variant_server.py"), f"127.0.0.1:{target[1]}"]
    h, name = start(procs, "--exec", cmd=server)
    wait_listening(target, 20, proc=h)
    pid = whoami(target)["pid"]
    reload(name, "--env", "DEPLOY_LEVEL=debug")
    me = whoami(target)
    assert me["pid"] == pid and me["env"] == {"DEPLOY_LEVEL": "debug"}
    # An exec of a program that is not there: the server runs on, the command as it was.
    line = failed_reload(name, "--", "/nonexistent/server")
    assert "the command is unchanged" in line, line
    assert whoami(target)["pid"] == pid
    assert status_of(name)["command"] == server
    h.signal(signal.SIGTERM)
    assert h.popen.wait(20) == 0
