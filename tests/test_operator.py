"""Operator conventions (issue 14): instance names, PIDs from pidfiles, --version,
global options after the command, the version and name in `hupt status`."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hupt import __version__, cli, control, status
from hupt.errors import ControlTimeout, NotUnderHupt, UsageError

# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web", "api-2", "a", "web.prod", "x_y@z+1", "n" * 64, "0web"])
def test_valid_names(name: str) -> None:
    assert control.check_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "../x", "n" * 65, "a b", "é",
                                  "a\nb", "123", "web\x00"])
def test_invalid_names_are_one_line(name: str) -> None:
    with pytest.raises(UsageError) as e:
        control.check_name(name)
    assert "\n" not in str(e.value)


@pytest.fixture
def rundir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private runtime directory in place of /run/hupt (short: socket paths fit)."""
    d = Path(f"/tmp/hupt-t{os.getpid()}-{os.urandom(3).hex()}")
    d.mkdir(mode=0o700)
    monkeypatch.setattr(control, "runtime_dir", lambda uid=None: str(d))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _dead_socket(path: Path) -> None:
    """A socket file nobody listens on: what a killed hupt leaves."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def test_a_name_is_a_symlink_to_the_socket_and_goes_at_close(rundir: Path) -> None:
    a = control.ControlServer(pid=4000001)
    try:
        a.claim_name("web")
        link = rundir / "web.name"
        assert os.readlink(link) == "4000001.sock"
        assert control.find_named("web") == 4000001
        assert control.names() == {4000001: "web"}
    finally:
        a.close()
    assert not os.path.lexists(rundir / "web.name")
    with pytest.raises(NotUnderHupt, match="no hupt instance named 'web'"):
        control.find_named("web")


def test_a_live_name_is_refused_to_a_second_instance(rundir: Path) -> None:
    a = control.ControlServer(pid=4000001)
    b = control.ControlServer(pid=4000002)
    try:
        a.claim_name("web")
        with pytest.raises(UsageError, match="taken by hupt 4000001") as e:
            b.claim_name("web")
        assert "\n" not in str(e.value)
        b.close()  # must not remove a's name
        assert os.readlink(rundir / "web.name") == "4000001.sock"
    finally:
        a.close()
        b.close()


def test_a_stale_name_is_taken_over(rundir: Path) -> None:
    b = control.ControlServer(pid=4000002)
    try:
        # Made after b's start (which cleans stale entries): the claim itself must see it.
        _dead_socket(rundir / "4000001.sock")
        os.symlink("4000001.sock", rundir / "web.name")
        b.claim_name("web")
        assert os.readlink(rundir / "web.name") == "4000002.sock"
    finally:
        b.close()


def test_a_stale_name_is_no_instance_and_is_removed(rundir: Path) -> None:
    _dead_socket(rundir / "4000001.sock")
    os.symlink("4000001.sock", rundir / "web.name")
    with pytest.raises(NotUnderHupt, match="'web'"):
        control.find_named("web")
    assert not os.path.lexists(rundir / "web.name")
    assert not os.path.lexists(rundir / "4000001.sock")


def test_clean_stale_removes_dangling_names(rundir: Path) -> None:
    os.symlink("4000009.sock", rundir / "gone.name")
    assert control.clean_stale(str(rundir)) == [str(rundir / "gone.name")]


def test_something_else_in_the_names_place_is_refused(rundir: Path) -> None:
    (rundir / "web.name").write_text("not a link")
    b = control.ControlServer(pid=4000002)
    try:
        with pytest.raises(UsageError, match="not a name link"):
            b.claim_name("web")
    finally:
        b.close()


# -- pidfiles ---------------------------------------------------------------------------------


def test_read_pidfile(tmp_path: Path) -> None:
    p = tmp_path / "web.pid"
    p.write_text("1234\n")
    assert control.read_pidfile(str(p)) == 1234
    p.write_text("  77  \nrest\n")
    assert control.read_pidfile(str(p)) == 77


@pytest.mark.parametrize("content", ["", "abc\n", "-3\n", "0\n", "12 34\n"])
def test_a_pidfile_without_a_pid_is_one_line(tmp_path: Path, content: str) -> None:
    p = tmp_path / "web.pid"
    p.write_text(content)
    with pytest.raises(UsageError, match="does not hold a PID"):
        control.read_pidfile(str(p))


def test_a_missing_pidfile_or_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        control.read_pidfile(str(tmp_path / "nope.pid"))
    with pytest.raises(UsageError, match="is a directory"):
        control.read_pidfile(str(tmp_path))


# -- the command line -------------------------------------------------------------------------


def test_global_options_before_or_after_the_command() -> None:
    for argv, verbose in [(["run", "--", "srv"], False), (["-v", "run", "--", "srv"], True),
                          (["run", "-v", "--", "srv"], True),
                          (["run", "--verbose", "--", "srv"], True)]:
        args = cli.build_parser().parse_args(argv)
        assert args.verbose is verbose, argv
        assert args.cmd[-1] == "srv"
    for cmd in (["reload", "-v", "web"], ["stop", "web", "-v"], ["status", "-v"],
                ["-v", "status"]):
        assert cli.build_parser().parse_args(cmd).verbose is True, cmd
    assert cli.build_parser().parse_args(["status"]).verbose is False


def test_the_servers_own_options_are_left_alone() -> None:
    args = cli.build_parser().parse_args(["run", "-v", "--", "srv", "-v", "--name", "x"])
    assert args.verbose is True and args.name is None
    assert args.cmd == ["--", "srv", "-v", "--name", "x"]
    args = cli.build_parser().parse_args(["run", "--name", "web", "srv", "-v", "--version"])
    assert args.verbose is False and args.name == "web"
    assert args.cmd == ["srv", "-v", "--version"]


def test_targets_are_pids_or_names() -> None:
    p = cli.build_parser()
    assert p.parse_args(["reload", "123"]).target == 123
    assert p.parse_args(["reload", "web"]).target == "web"
    assert p.parse_args(["stop", "--pidfile", "/run/web.pid"]).pidfile == "/run/web.pid"
    assert p.parse_args(["status"]).target is None
    with pytest.raises(UsageError, match="invalid name"):
        p.parse_args(["reload", "a/b"])
    with pytest.raises(UsageError, match="invalid name"):
        p.parse_args(["run", "--name", ".x", "--", "srv"])


def test_a_target_and_a_pidfile_do_not_go_together(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["reload", "123", "--pidfile", str(tmp_path / "p")])
    with pytest.raises(UsageError, match="not both"):
        cli.resolve(args)
    args = cli.build_parser().parse_args(["reload"])
    with pytest.raises(UsageError, match="which instance"):
        cli.resolve(args)
    assert cli.resolve(cli.build_parser().parse_args(["status"]), required=False) is None


def test_a_pidfile_names_the_pid(tmp_path: Path) -> None:
    p = tmp_path / "web.pid"
    p.write_text("4321\n")
    args = cli.build_parser().parse_args(["reload", "--pidfile", str(p)])
    assert cli.resolve(args) == 4321


def test_errors_exit_2_in_one_line(capsys: pytest.CaptureFixture[str], rundir: Path) -> None:
    assert cli.main(["reload", "nosuch"]) == cli.EXIT_USAGE
    assert cli.main(["status", "--pidfile", "/nonexistent/x.pid"]) == cli.EXIT_USAGE
    assert cli.main(["stop"]) == cli.EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(x.startswith("hupt: error: ") for x in lines), lines


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"hupt {control.version()}\n"
    assert control.version() == __version__  # the metadata and the tree agree


def test_version_without_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    control.version.cache_clear()
    try:
        assert control.version() == __version__
    finally:
        control.version.cache_clear()


def test_status_names_instances_and_says_its_version(
        capsys: pytest.CaptureFixture[str], rundir: Path) -> None:
    doc = status.collect(None)
    assert doc == {"schema": 1, "version": control.version(), "instances": [],
                   "unanswered": []}
    inst = {"hupt_pid": 99, "name": "web", "version": "0.1.0", "command": ["srv"],
            "mode": "fork", "state": "running", "uptime_s": 1.0, "generations": [],
            "listeners": [], "reloads": []}
    status.render({"schema": 1, "instances": [inst]})
    assert capsys.readouterr().out.splitlines()[0].startswith("hupt 99 [web] (fork")
    with contextlib.suppress(KeyError):
        del inst["name"]  # an older hupt: no name key
    status.render({"schema": 1, "instances": [inst]})
    assert capsys.readouterr().out.splitlines()[0].startswith("hupt 99 (fork")


def test_an_instance_that_does_not_answer_hides_no_other(
        capsys: pytest.CaptureFixture[str], rundir: Path) -> None:
    """A stuck hupt (its socket accepts, nobody reads: what SIGSTOP gives) is named
    apart, and the instances that answer are listed; asked by PID, it is the error."""
    stuck = subprocess.Popen(["sleep", "60"])
    answering = subprocess.Popen(["sleep", "60"])
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(rundir / f"{stuck.pid}.sock"))
    mute.listen(4)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(rundir / f"{answering.pid}.sock"))
    live.listen(4)
    inst = {"hupt_pid": answering.pid, "name": None, "command": ["srv"], "mode": "fork",
            "state": "running", "uptime_s": 1.0, "generations": [], "reloads": [],
            "listeners": []}

    def answer() -> None:  # every connection: clean_stale's probes too
        while True:
            try:
                conn, _ = live.accept()
            except OSError:
                return  # closed: the test is over
            with conn, contextlib.suppress(OSError):
                if conn.recv(65536):
                    conn.sendall(json.dumps({"event": "result", "ok": True,
                                             "status": inst}).encode() + b"\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        doc = status.collect(None, timeout=0.5)
        assert doc["instances"] == [inst]
        (silent,) = doc["unanswered"]
        assert silent["hupt_pid"] == stuck.pid
        assert silent["reason"] == f"hupt {stuck.pid} gave no result within 0.5 s"
        status.render(doc)
        out, err = capsys.readouterr()
        assert out.startswith(f"hupt {answering.pid} (fork")
        assert err.startswith(f"hupt: warning: hupt {stuck.pid} gave no result"), err
        with pytest.raises(ControlTimeout):
            status.collect(stuck.pid, timeout=0.5)
    finally:
        mute.close()
        live.shutdown(socket.SHUT_RDWR)
        live.close()
        t.join(5)
        for p in (stuck, answering):
            p.kill()
            p.wait()


def test_status_shows_a_listener_the_kernel_did_not_describe(
        capsys: pytest.CaptureFixture[str]) -> None:
    inst = {"hupt_pid": 99, "name": None, "command": ["srv"], "mode": "fork",
            "state": "running", "uptime_s": 1.0, "generations": [], "reloads": [],
            "listeners": [{"address": "unix:/x", "inode": 1, "queued": None, "backlog": None}]}
    status.render({"schema": 1, "instances": [inst]})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("hupt 99 (fork")
    assert out[1].split() == ["listener", "unix:/x", "queued", "-", "backlog", "-"]


def test_of_processes_racing_for_a_name_one_gets_it(rundir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Racing over a stale name: exactly one wins, the others are refused, none
    removes the winner's name (the directory lock).  Judging a name stale is
    slowed down, so that without the lock two would win."""
    answers = control._answers

    def slow_answers(path: str, kind: int) -> bool | None:
        time.sleep(random.uniform(0, 0.1))
        return answers(path, kind)

    monkeypatch.setattr(control, "_answers", slow_answers)
    n = 6
    ready_r, ready_w = os.pipe()
    results_r, results_w = os.pipe()
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    children = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                random.seed(i)
                server = control.ControlServer(pid=4100000 + i)  # cleans stale names
                os.write(ready_w, b"r")
                os.read(go_r, 1)  # all start together
                try:
                    server.claim_name("web")
                    os.write(results_w, b"W")
                except UsageError:
                    os.write(results_w, b"R")
                os.read(done_r, 1)  # stay up (answering) until every claim is made
                server.close()
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    try:
        ready = b""
        while len(ready) < n:
            ready += os.read(ready_r, n)
        _dead_socket(rundir / "4000000.sock")  # a killed hupt's name, after every start
        os.symlink("4000000.sock", rundir / "web.name")
        os.write(go_w, b"g" * n)
        got = b""
        while len(got) < n:
            got += os.read(results_r, n)
        assert sorted(got) == sorted(b"W" + b"R" * (n - 1)), got
        target = os.readlink(rundir / "web.name")
        assert target != "4000000.sock" and (rundir / target).exists()
    finally:
        os.write(done_w, b"d" * n)
        codes = [os.waitpid(pid, 0)[1] for pid in children]
        for fd in (ready_r, ready_w, results_r, results_w, go_r, go_w, done_r, done_w):
            os.close(fd)
    assert codes == [0] * n
    assert not os.path.lexists(rundir / "web.name")  # the winner removed it at close
