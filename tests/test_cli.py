"""The command line: every subcommand parses and explains itself; bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from hupt import cli


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["reload", "--help"],
                                  ["stop", "--help"], ["attach", "--help"], ["status", "--help"],
                                  ["completion", "--help"]])
def test_help_for_every_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    assert "usage: hupt" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "needle"), [
    (["run"], "missing the server command"),
    (["run", "--"], "missing the server command"),
    (["run", "--drain-timeout", "-1", "--", "x"], "positive number of seconds"),
    (["run", "--ready", "bogus", "--", "x"], "unknown --ready policy"),
    (["run", "--ready", "delay:-2", "--", "x"], "non-negative"),
    (["run", "--close-idle", "0", "--", "x"], "milliseconds"),
    (["run", "--stop-signal", "NOPE", "--", "x"], "unknown signal"),
    (["reload", "abc"], "not a PID"),
    (["reload"], "required"),
    (["frobnicate"], "invalid choice"),
    (["run", "--metrics", "9100", "--", "x"], "not an address"),
    (["run", "--metrics", "example.com:9100", "--", "x"], "not an IP address"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], needle: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("hupt: error:") and needle in err
    assert len(err.strip().splitlines()) == 1


def test_policies_reach_the_options() -> None:
    args = cli.build_parser().parse_args(
        ["run", "--ready", "http:/healthz", "--revive", "--close-idle", "250",
         "--unlink", "/tmp/a", "--unlink", "/tmp/b", "--watch", "src", "--", "srv", "-x"])
    assert str(args.ready) == "http:/healthz" and args.revive and args.close_idle == 250
    assert args.unlink == ["/tmp/a", "/tmp/b"] and args.watch == ["src"]
    assert args.cmd[-2:] == ["srv", "-x"]


def test_a_rewritten_command_line_is_told_from_a_command(tmp_path: Path) -> None:
    from hupt.cli import rewritten

    env = {"PATH": "/usr/bin:/bin"}
    assert rewritten(["sh", "-c", "true"], env, str(tmp_path)) is None
    assert rewritten(["/bin/sh"], env, str(tmp_path)) is None
    why = rewritten(["nginx: master process /usr/sbin/nginx -g daemon off;"], env, "/")
    assert why is not None and "one string with spaces" in why
    why = rewritten(["my-node-title"], env, "/")  # node's process.title
    assert why is not None and "not an executable file" in why


def test_attach_takes_a_command_after_the_pid() -> None:
    p = cli.build_parser()
    args = p.parse_args(["attach", "--yes", "123", "--", "nginx", "-c", "/etc/nginx.conf"])
    assert args.pid == 123 and args.cmd == ["nginx", "-c", "/etc/nginx.conf"]
    assert p.parse_args(["attach", "123"]).cmd == []


def test_attach_options_after_the_pid_are_refused_not_run(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["attach", "123", "--yes"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("hupt: error:") and "before the PID" in err
    assert len(err.strip().splitlines()) == 1
