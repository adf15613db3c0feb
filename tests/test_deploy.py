"""Deploys that change what runs (issue 14 item 2), against the fake kernel seam:
--chdir, --env-file, and reloads that change the command (hupt/command.py)."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from hupt import cli
from hupt.address import AF_INET, Address
from hupt.command import Change, environment, logical_dir, read_env_file
from hupt.errors import HuptError, InjectionError, UsageError
from hupt.generations import State
from hupt.supervisor import Options, Supervisor
from hupt.system import Followed, FollowResult
from tests.fakes import FakeSystem
from tests.test_supervisor import Recorder

A = Address(AF_INET, "127.0.0.1", 8000)


def make(fake: FakeSystem, **kw: Any) -> Supervisor:
    kw.setdefault("env", {"BASE": "1"})
    sup = Supervisor(fake, Options(argv=["server", "--old"], **kw), control=False)
    sup.start()
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    return sup


def reload(sup: Supervisor, fake: FakeSystem, change: Change | None = None) -> Recorder:
    """A fork-mode reload whose new generation listens (if it was started)."""
    w = Recorder()
    n = len(sup.gens)
    sup.request_reload(w, change=change)
    if len(sup.gens) > n and sup.gens[-1].state is State.STARTING:
        fake.listen(sup.gens[-1].number, A)
        sup.on_notify(sup.gens[-1])
    return w


def last_spawn(fake: FakeSystem) -> tuple[list[str], dict[str, str]]:
    argv, env = fake.spawns[-1]
    return argv, {k: v for k, v in env.items() if k in ("BASE", "A", "B", "FILE", "NEW")}


# -- --chdir --------------------------------------------------------------------------------

def test_every_generation_starts_in_the_chdir_path_not_a_resolved_one(
        fake: FakeSystem, tmp_path: Path) -> None:
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    current = tmp_path / "current"
    current.symlink_to("r1")
    sup = make(fake, chdir=str(current))
    current.unlink()
    current.symlink_to("r2")  # the deploy
    assert reload(sup, fake).result == (True, sup.history[-1].reason)
    # The path, symlink and all: the child's chdir() follows it to r2 each time.
    assert fake.cwds == [str(current), str(current)]


def test_a_chdir_that_is_gone_fails_the_reload_before_anything_starts(
        fake: FakeSystem, tmp_path: Path) -> None:
    d = tmp_path / "current"
    d.mkdir()
    sup = make(fake, chdir=str(d))
    d.rmdir()
    w = reload(sup, fake)
    assert w.result is not None and not w.result[0]
    assert f"--chdir {d}: no such directory; nothing was started" in w.result[1]
    assert len(fake.spawns) == 1 and sup.current is sup.gens[0]


def test_logical_dir_keeps_symlinks_and_follows_pwd(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "r1").mkdir()
    (tmp_path / "current").symlink_to("r1")
    monkeypatch.chdir(tmp_path / "current")
    monkeypatch.setenv("PWD", str(tmp_path / "current"))
    assert logical_dir(".") == str(tmp_path / "current"), "$PWD names this directory"
    assert logical_dir("sub/../x") == str(tmp_path / "current" / "x")
    assert logical_dir("/a/b/../c") == "/a/c"
    monkeypatch.setenv("PWD", "/")  # stale: not this directory
    assert logical_dir(".") == os.getcwd() == str(tmp_path / "r1")


# -- hupt reload --env / --unset-env / -- ARGV ----------------------------------------------

def test_a_changed_command_runs_now_and_in_every_later_generation(fake: FakeSystem) -> None:
    sup = make(fake)
    w = reload(sup, fake, Change(["server", "--new"], {"A": "1"}, ["BASE"]))
    assert w.result is not None and w.result[0], w.result
    assert "the command is changed (command server --new, A=1, unset BASE)" in w.result[1]
    assert last_spawn(fake) == (["server", "--new"], {"A": "1"})
    assert sup.opts.argv == ["server", "--new"]
    assert sup.opts.env_changes == {"A": "1", "BASE": None}
    assert reload(sup, fake).result is not None
    assert last_spawn(fake) == (["server", "--new"], {"A": "1"}), "kept for later reloads"
    # Changes add up; setting a variable again undoes its unset.
    reload(sup, fake, Change(env={"BASE": "2", "B": "x"}, unset=["A"]))
    assert last_spawn(fake) == (["server", "--new"], {"BASE": "2", "B": "x"})
    doc = sup.status()
    assert doc["command"] == ["server", "--new"]
    assert doc["env_changes"] == {"A": None, "BASE": "2", "B": "x"}
    assert doc["chdir"] is None and doc["env_file"] is None
    assert [g["command"] for g in doc["generations"]][-3:] == [["server", "--new"]] * 3


def test_status_names_the_command_of_a_generation_started_before_the_change(
        fake: FakeSystem) -> None:
    sup = make(fake)
    fake.in_flight_by_pid[sup.gens[0].pid] = 1  # the old generation drains on
    reload(sup, fake, Change(["server", "--new"]))
    gens = {g["number"]: g["command"] for g in sup.status()["generations"]}
    assert gens == {1: ["server", "--old"], 2: ["server", "--new"]}


def test_a_new_command_that_fails_rolls_back_to_the_old_command(fake: FakeSystem) -> None:
    sup = make(fake)
    w = Recorder()
    sup.request_reload(w, change=Change(["broken"], {"A": "1"}))
    assert fake.spawns[-1][0] == ["broken"]
    fake.exit(2, 1)
    fake.advance(1.5)
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert w.result[1].endswith("exited (exit status 1) before it was ready; the command is "
                                "unchanged"), w.result
    assert sup.current is sup.gens[0] and sup.gens[0].state is State.SERVING
    assert sup.opts.argv == ["server", "--old"] and sup.opts.env_changes == {}
    assert reload(sup, fake).result is not None
    assert last_spawn(fake) == (["server", "--old"], {"BASE": "1"}), "the old command again"
    assert sup.status()["command"] == ["server", "--old"]


def test_a_new_command_that_cannot_start_keeps_the_old_one(fake: FakeSystem) -> None:
    from hupt.tracer.spawn import SpawnError

    sup = make(fake)
    fake.spawn_error = SpawnError("cannot start 'nosuch': exec: No such file or directory")
    w = reload(sup, fake, Change(["nosuch"]))
    assert w.result is not None and not w.result[0]
    assert "No such file" in w.result[1] and "the command is unchanged" in w.result[1]
    assert sup.opts.argv == ["server", "--old"] and sup.current is sup.gens[0]


def test_a_change_never_joins_a_reload_in_progress(fake: FakeSystem) -> None:
    sup = make(fake)
    first = Recorder()
    sup.request_reload(first)
    w = Recorder()
    sup.request_reload(w, change=Change(env={"A": "1"}))
    assert w.result is not None and not w.result[0]
    assert "needs a reload of its own" in w.result[1]
    assert len(fake.spawns) == 2 and first.result is None
    # A plain reload joins one with a change, and shares its outcome.
    sup2 = make(FakeSystem())
    try:
        a, b = Recorder(), Recorder()
        sup2.request_reload(a, change=Change(env={"A": "1"}))
        sup2.request_reload(b)
        assert len(sup2.gens) == 2
    finally:
        sup2.sys.close()  # type: ignore[attr-defined]


def test_revive_and_copies_use_the_command_of_their_generation(fake: FakeSystem) -> None:
    sup = make(fake, multi=2, revive=True)
    w = Recorder()
    sup.request_reload(w, change=Change(["server", "--new"]))
    for _ in range(2):  # every copy listens
        fake.listen(2, A)
    sup.on_notify(sup.gens[-1])
    assert w.result is not None and w.result[0], w.result
    cur = sup.current
    assert cur is not None and len(cur.copies) == 2
    fake.exit_pid(cur.copies[1], 1)
    sup.fleet.refresh()
    sup.loop.run_later()
    fake.advance(1)
    sup.tick()
    assert fake.spawns[-1][0] == ["server", "--new"]


# -- --env-file -----------------------------------------------------------------------------

def test_the_env_file_is_read_again_at_every_reload(fake: FakeSystem, tmp_path: Path) -> None:
    f = tmp_path / "app.env"
    f.write_text("FILE=1\nBASE=from-file\n")
    sup = make(fake, env_file=str(f))
    assert last_spawn(fake)[1] == {"FILE": "1", "BASE": "from-file"}
    f.write_text("# a comment\n\nFILE=2\n")
    reload(sup, fake)
    assert last_spawn(fake)[1] == {"FILE": "2", "BASE": "1"}
    # The operator's --env/--unset-env win over the file.
    reload(sup, fake, Change(env={"FILE": "mine"}))
    assert last_spawn(fake)[1] == {"FILE": "mine", "BASE": "1"}
    f.write_text("FILE=3\nNEW=x\n")
    reload(sup, fake, Change(unset=["NEW"]))
    assert last_spawn(fake)[1] == {"FILE": "mine", "BASE": "1"}
    assert sup.status()["env_file"] == str(f)


@pytest.mark.parametrize("content, why", [
    (None, "no such file"),
    (b"FILE=1\nnot a pair\n", "line 2: expected KEY=VALUE"),
    (b"1BAD=x\n", "line 1: expected KEY=VALUE (invalid name '1BAD')"),
])
def test_a_missing_or_malformed_env_file_fails_the_reload_and_starts_nothing(
        fake: FakeSystem, tmp_path: Path, content: bytes | None, why: str) -> None:
    f = tmp_path / "app.env"
    f.write_text("FILE=1\n")
    sup = make(fake, env_file=str(f))
    if content is None:
        f.unlink()
    else:
        f.write_bytes(content)
    w = reload(sup, fake, Change(env={"A": "1"}))
    assert w.result is not None and not w.result[0]
    assert w.result[1] == (f"--env-file {f} {why}" if content else f"--env-file {f}: {why}") \
        + "; nothing was started; the command is unchanged"
    assert len(fake.spawns) == 1 and sup.current is sup.gens[0]
    assert sup.opts.env_changes == {}


def test_a_revive_with_a_broken_env_file_is_tried_again(fake: FakeSystem,
                                                        tmp_path: Path) -> None:
    f = tmp_path / "app.env"
    f.write_text("FILE=1\n")
    sup = make(fake, env_file=str(f), revive=True)
    f.write_text("garbage\n")
    fake.exit(1, 1)
    fake.advance(1)
    sup.tick()
    fake.advance(1)
    sup.tick()
    assert len(fake.spawns) == 1 and sup.reviver.pending, "failed, and scheduled again"
    f.write_text("FILE=2\n")
    for _ in range(20):
        if len(fake.spawns) == 2:
            break
        fake.advance(1)
        sup.tick()
    assert len(fake.spawns) == 2 and fake.spawns[-1][1]["FILE"] == "2"


def test_env_file_syntax(tmp_path: Path) -> None:
    f = tmp_path / "e"
    f.write_bytes(b"A=1\r\n  # comment\n\nexport B=two words = x\nC=\nD='quoted'\n")
    assert read_env_file(str(f)) == {"A": "1", "B": "two words = x", "C": "",
                                     "D": "'quoted'"}
    f.write_bytes(b"SECRET hunter2\n")
    with pytest.raises(HuptError) as e:
        read_env_file(str(f))
    assert "hunter2" not in str(e.value), "an error never shows a value"
    with pytest.raises(HuptError, match="a directory"):
        read_env_file(str(tmp_path))
    assert environment({"A": "0", "B": "0"}, None, {"A": None, "C": "3"}) == {"B": "0",
                                                                            "C": "3"}


# -- exec mode ------------------------------------------------------------------------------

def test_exec_mode_execs_the_changed_command_in_the_chdir(fake: FakeSystem,
                                                          tmp_path: Path) -> None:
    sup = make(fake, exec_mode=True, chdir=str(tmp_path))
    w = Recorder()
    sup.request_reload(w, change=Change(["server", "--new"], {"A": "1"}))
    sup.tick()
    argv, env = fake.execs[-1]
    assert argv == ["server", "--new"] and env["A"] == "1"
    assert fake.exec_cwds == [str(tmp_path)], "entered afresh by the exec too"
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert w.result is not None and w.result[0], w.result
    assert sup.opts.argv == ["server", "--new"]


def test_exec_mode_without_chdir_enters_no_directory(fake: FakeSystem) -> None:
    sup = make(fake, exec_mode=True)
    sup.request_reload(Recorder())
    sup.tick()
    assert fake.exec_cwds == [None]


def test_exec_mode_a_failed_exec_of_a_new_command_keeps_the_old(fake: FakeSystem) -> None:
    sup = make(fake, exec_mode=True)
    fake.exec_error = InjectionError("execve", 2)
    w = Recorder()
    sup.request_reload(w, change=Change(["nosuch"]))
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert "the command is unchanged" in w.result[1]
    assert sup.opts.argv == ["server", "--old"] and sup.gens[0].state is State.SERVING
    fake.exec_error = None
    sup.request_reload(Recorder())
    sup.tick()
    assert fake.execs[-1][0] == ["server", "--old"]


def test_exec_mode_a_new_image_that_dies_restarts_the_old_command(fake: FakeSystem) -> None:
    sup = make(fake, exec_mode=True)
    w = Recorder()
    sup.request_reload(w, change=Change(["server", "--crashes"]))
    sup.tick()
    fake.exit(2, 1)
    fake.advance(1.5)
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert "started the command afresh" in w.result[1]
    assert "the command is unchanged" in w.result[1]
    assert fake.spawns[-1][0] == ["server", "--old"], "afresh: the command as it was"


def test_exec_mode_the_program_of_the_new_command_is_looked_up(fake: FakeSystem) -> None:
    sup = make(fake, exec_mode=True, program="/opt/attached/bin/srv")
    sup.request_reload(Recorder(), change=Change(["other"]))
    sup.tick()
    assert fake.events[-1] == "exec 1 -> 2"
    # The fake's find_program: the given path, else /bin/argv[0].
    sup.request_reload(Recorder())
    assert sup.upgrade is not None and sup.upgrade.launch is not None
    assert sup.upgrade.launch.program is None


def test_exec_mode_with_drain_signal_follows_with_the_changed_command(
        fake: FakeSystem, tmp_path: Path) -> None:
    sup = make(fake, exec_mode=True, drain_signal=signal.SIGTERM, chdir=str(tmp_path))
    w = Recorder()
    sup.request_reload(w, change=Change(env={"A": "1"}))
    assert fake.events[-1] == "follow 1"
    assert fake.execs[-1][1]["A"] == "1" and fake.exec_cwds == [str(tmp_path)]
    fake.follow_results[1] = FollowResult(Followed.EXECED, "execed")
    sup.reloader.poll_follow()
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert w.result is not None and w.result[0], w.result
    assert sup.opts.env_changes == {"A": "1"}


# -- the wire and the command line ----------------------------------------------------------

def test_a_change_on_the_wire_is_checked() -> None:
    c = Change(["a", "b"], {"K": "v"}, ["U"])
    assert Change.from_wire(c.wire()) == c
    bads: list[dict[str, object]] = [
        {"argv": "a b"}, {"argv": []}, {"env": {"K": 1}}, {"env": {"1K": "v"}},
        {"unset_env": ["A B"]}, {"env": {"K": "v"}, "unset_env": ["K"]}, {"env": {"K": "a\0b"}}]
    for bad in bads:
        with pytest.raises(UsageError):
            Change.from_wire(bad)
    assert not Change.from_wire({})


def reload_args(*argv: str) -> argparse.Namespace:
    args = cli.build_parser("reload").parse_args(["reload", *argv])
    args.new_argv = None
    return args


def test_hupt_reload_builds_a_change_request() -> None:
    assert cli._reload_request(reload_args("web")) == {"cmd": "reload"}
    args = reload_args("web", "--env", "A=1=2", "--unset-env", "B", "--env", "C=")
    args.new_argv = ["./server", "--port", "80"]
    assert cli._reload_request(args) == {
        "cmd": "change", "argv": ["./server", "--port", "80"], "env": {"A": "1=2", "C": ""},
        "unset_env": ["B"]}
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        reload_args("web", "--env", "novalue")
    with pytest.raises(UsageError, match="not a variable name"):
        reload_args("web", "--unset-env", "A-B")
    args = reload_args("web", "--env", f"BIG={'x' * 5000}")
    with pytest.raises(UsageError, match="too long for one request"):
        cli._reload_request(args)


def test_hupt_reload_splits_the_new_argv_at_the_double_dash(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[argparse.Namespace] = []
    def fake_reload(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(cli, "cmd_reload", fake_reload)
    assert cli.main(["reload", "web", "--env", "A=1", "--", "srv", "--env", "x", "--"]) == 0
    assert seen[0].new_argv == ["srv", "--env", "x", "--"] and seen[0].env == [("A", "1")]
    assert cli.main(["reload", "web", "--"]) == cli.EXIT_USAGE
    assert "nothing after `--`" in capsys.readouterr().err


def test_an_older_hupt_is_explained() -> None:
    assert "older version" in cli._explain("unknown command 'change'")
    assert cli._explain("boom") == "boom"


def test_hupt_run_checks_chdir_and_env_file_before_starting_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--chdir", str(tmp_path / "nosuch"), "--", "true"]) == \
        cli.EXIT_USAGE
    (tmp_path / "bad.env").write_text("oops\n")
    assert cli.main(["run", "--env-file", str(tmp_path / "bad.env"), "--", "true"]) == \
        cli.EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert err == [f"hupt: error: --chdir {tmp_path / 'nosuch'}: no such directory",
                   f"hupt: error: --env-file {tmp_path / 'bad.env'} line 1: expected "
                   "KEY=VALUE"]
