"""`hupt completion bash|zsh`: the scripts complete what the parser defines.

bash: the script is sourced and its completion function called as bash calls
it (COMP_LINE, COMP_POINT), its COMPREPLY read back.  zsh (when installed):
an interactive zsh on a pseudo-terminal loads the script from $fpath, a TAB
runs the real completion system, and a compadd wrapper prints each match.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hupt import cli, completion, control
from hupt.clispec import hupt_commands

BASH_DRIVER = r"""
source "$1"; shift
[[ -n ${RUNTIME_DIR-} ]] && _hupt_runtime_dir() { echo "$RUNTIME_DIR"; }
for line in "$@"; do
    COMP_LINE=$line COMP_POINT=${#line} COMPREPLY=()
    _hupt 2>/dev/null
    printf '%s\n' "${COMPREPLY[*]}"
done
"""


@pytest.fixture
def bash_script(tmp_path: Path) -> Path:
    path = tmp_path / "hupt.bash"
    path.write_text(completion.bash())
    return path


def complete_bash(script: Path, *lines: str, cwd: Path | None = None,
                  runtime_dir: Path | None = None) -> list[list[str]]:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd or "/")}
    if runtime_dir is not None:
        env["RUNTIME_DIR"] = str(runtime_dir)
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", BASH_DRIVER, "driver",
                        str(script), *lines], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")[:-1]
    assert len(out) == len(lines), r.stdout
    return [x.split() for x in out]


def test_the_bash_script_is_valid_and_knows_every_option(bash_script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(bash_script)]).returncode == 0
    root = hupt_commands()
    got = complete_bash(bash_script, *(f"hupt {c.name} -" for c in root.commands))
    for cmd, replies in zip(root.commands, got, strict=True):
        assert sorted(replies) == sorted(s for o in cmd.options for s in o.strings), cmd.name


def test_bash_completes_commands_options_and_values(bash_script: Path, tmp_path: Path) -> None:
    (tmp_path / "server.py").write_text("")
    (tmp_path / "metrics.sock").write_text("")
    cases = {
        "hupt ": ["run", "reload", "stop", "attach", "status", "signal", "completion"],
        "hupt re": ["reload"],
        "hupt -": ["-h", "--help", "-v", "--verbose", "--version"],
        "hupt -v st": ["stop", "status"],
        "hupt run --dr": ["--drain-timeout", "--drain-signal"],
        "hupt run --metrics-": ["--metrics-allow-remote"],
        "hupt run --stop-signal q": ["QUIT"],
        "hupt attach --drain-signal WI": ["WINCH"],
        "hupt run --ready ": ["listen", "notify", "delay:", "http:"],
        "hupt run --metrics ": ["127.0.0.1:", "[::1]:", "localhost:", "unix:"],
        # bash inserts what follows the word's last colon (COMP_WORDBREAKS).
        f"hupt run --metrics unix:{tmp_path}/met": [f"{tmp_path}/metrics.sock"],
        "hupt run --drain-timeout 5 --ex": ["--exec"],  # 5 is a value, not the command
        "hupt run --pidfile ser": ["server.py"],
        "hupt run --unlink a --unlink ser": ["server.py"],
        "hupt run -- python3 ser": ["server.py"],
        "hupt run python3 ser": ["server.py"],
        "hupt attach 123 -- sh ser": ["server.py"],
        "hupt stop --now --p": ["--pidfile"],
        "hupt signal --a": ["--all"],
        "hupt completion ": ["bash", "zsh"],
        "hupt run --name ": [],  # free text
    }
    got = complete_bash(bash_script, *cases, cwd=tmp_path)
    for (line, wanted), replies in zip(cases.items(), got, strict=True):
        assert sorted(replies) == sorted(wanted), (line, replies)
    # The first word of the server's command is a command.
    for replies in complete_bash(bash_script, "hupt run -- bas", "hupt attach 1 -- bas"):
        assert "bash" in replies


def test_bash_completes_instances_from_the_runtime_directory(
        bash_script: Path, tmp_path: Path) -> None:
    rd = tmp_path / "rt"
    rd.mkdir()
    (rd / "web.name").symlink_to("123.sock")
    (rd / "123.sock").write_text("")
    (rd / "456.sock").symlink_to("123.sock")  # an attached server's alias
    (rd / ".123.sock.ab12").write_text("")  # a socket not yet renamed into place
    (rd / "789.ns4026532999.sock").write_text("")  # a hupt of another PID namespace
    (rd / "lock").write_text("")
    for line in ("hupt reload ", "hupt stop ", "hupt status "):
        (replies,) = complete_bash(bash_script, line, runtime_dir=rd)
        assert sorted(replies) == ["123", "456", "web"], (line, replies)
    (replies,) = complete_bash(bash_script, "hupt reload w", runtime_dir=rd)
    assert replies == ["web"]
    # And the directory is found as hupt finds it.
    r = subprocess.run(["bash", "-c", f'source {bash_script}; _hupt_runtime_dir'],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == control.runtime_dir()


def test_the_completion_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["completion", "bash"]) == 0
    assert capsys.readouterr().out == completion.bash()
    assert cli.main(["completion", "zsh"]) == 0
    assert capsys.readouterr().out.startswith("#compdef hupt\n")
    assert cli.main(["completion", "fish"]) == cli.EXIT_USAGE
    assert "invalid choice" in capsys.readouterr().err


# -- zsh -------------------------------------------------------------------------------------

ZSHRC = r"""
PS1='' PROMPT='' RPROMPT=''
fpath=({fn} $fpath)
autoload -U compinit && compinit -u -D
zstyle ':completion:*' list-grouped false
compadd() {{
  if [[ ${{@[1,(i)(-|--)]}} == *-(O|A|D)\ * ]]; then
    builtin compadd "$@"
    return $?
  fi
  local -a __hits
  builtin compadd -A __hits "$@"
  local -A apre hpre
  zparseopts -E P:=apre p:=hpre 2>/dev/null
  local h
  for h in $__hits; do print -r -- "MATCH:$IPREFIX${{apre[-P]}}${{hpre[-p]}}$h"; done
}}
_hupt_capture() {{ print -r -- BEGIN; _main_complete; print -r -- END; }}
zle -C hupt-capture complete-word _hupt_capture
bindkey '^I' hupt-capture
"""


def complete_zsh(home: Path, line: str, cwd: Path) -> list[str]:
    """The matches an interactive zsh offers for a TAB at the end of ``line``."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: an interactive zsh with only our .zshrc
        os.chdir(cwd)
        os.environ.update(ZDOTDIR=str(home), TERM="dumb")
        os.execvp("zsh", ["zsh", "-d", "-i"])
    try:
        def read_until(marker: bytes, timeout: float = 20.0) -> bytes:
            buf = b""
            deadline = time.monotonic() + timeout
            while marker not in buf:
                assert time.monotonic() < deadline, f"no {marker!r} from zsh: {buf!r}"
                if select.select([fd], [], [], 0.1)[0]:
                    try:
                        buf += os.read(fd, 65536)
                    except OSError:
                        break
            return buf

        os.write(fd, b"print -r -- READY\n")
        read_until(b"READY\r\n")
        os.write(fd, line.encode() + b"\t")
        out = read_until(b"END\r\n").decode(errors="replace")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    out = out[out.rindex("BEGIN"):]
    return [x.split("MATCH:", 1)[1].strip() for x in out.splitlines() if "MATCH:" in x]


@pytest.fixture
def zsh_home(tmp_path: Path) -> Path:
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed")
    home, fn = tmp_path / "zdot", tmp_path / "zdot" / "fn"
    fn.mkdir(parents=True)
    (fn / "_hupt").write_text(completion.zsh())
    (home / ".zshrc").write_text(ZSHRC.format(fn=fn))
    return home


def test_the_zsh_script_is_valid(zsh_home: Path) -> None:
    r = subprocess.run(["zsh", "-n", str(zsh_home / "fn" / "_hupt")], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_zsh_completes_commands_options_and_values(zsh_home: Path, tmp_path: Path) -> None:
    (tmp_path / "server.py").write_text("")
    cases = {
        "hupt ": ["run", "reload", "stop", "attach", "status", "signal", "completion"],
        "hupt -": ["-h", "--help", "-v", "--verbose", "--version"],
        "hupt run --dr": ["--drain-timeout", "--drain-signal"],
        "hupt run --stop-signal Q": ["QUIT"],
        "hupt run --ready ": ["listen", "notify", "delay:", "http:"],
        "hupt run --metrics ": ["127.0.0.1:", "\\[::1\\]:", "localhost:", "unix:"],
        "hupt run --metrics unix:ser": ["unix:server.py"],
        "hupt run --drain-timeout 5 --ex": ["--exec"],
        "hupt run --pidfile ser": ["server.py"],
        "hupt run -- cat ser": ["server.py"],
        "hupt attach 123 -- cat ser": ["server.py"],
        "hupt completion ": ["bash", "zsh"],
    }
    for line, wanted in cases.items():
        got = complete_zsh(zsh_home, line, tmp_path)
        assert sorted(set(got)) == sorted(wanted), (line, got)
    for line in ("hupt run -- zs", "hupt attach 1 -- zs", "hupt run zs"):
        assert "zsh" in complete_zsh(zsh_home, line, tmp_path), line
