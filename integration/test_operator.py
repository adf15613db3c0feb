"""What an operator types (issue 14), against real processes on 127.0.0.1.

Asserted: `hupt run --name` makes `hupt reload/status/stop NAME` work, and a
second instance with that name refuses to start in one line (exit 2) without
starting its server; a stale name of a killed hupt is taken over; `--pidfile
PATH` names the instance for reload, status and stop; `-v` is accepted after
`run` while the server keeps its own `-v`; `hupt --version` and the version
in `hupt status --json`; the systemd units in docs/ pass `systemd-analyze
verify` (the notify-reload one only on systemd >= 253).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, Procs, free_port, hupt_cli, one_line_error, wait_listening
from supervision import start_hupt

from hupt import __version__, control

pytestmark = pytest.mark.root


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _status(target: str, *extra: str) -> dict[str, Any]:
    r = hupt_cli("status", "--json", *extra, *([target] if target else []))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


def test_a_named_instance_is_reloaded_shown_and_stopped_by_name(procs: Procs) -> None:
    name = _unique("web")
    h, _ = start_hupt(procs, "--name", name)
    link = Path(control.name_path(name))
    assert os.readlink(link) == f"{h.pid}.sock"
    r = hupt_cli("reload", name, timeout=30)
    assert r.returncode == 0 and "reload done" in r.stderr, r.stderr
    doc = _status(name)
    (inst,) = doc["instances"]
    assert inst["hupt_pid"] == h.pid and inst["name"] == name
    assert inst["version"] == doc["version"] == control.version()
    assert [g["number"] for g in inst["generations"] if g["state"] == "serving"] == [2]
    # Every instance: this one shows its name.
    r = hupt_cli("status")
    assert r.returncode == 0, r.stderr
    assert f"hupt {h.pid} [{name}]" in r.stdout
    r = hupt_cli("stop", name, timeout=30)
    assert r.returncode == 0 and "stop done" in r.stderr, r.stderr
    assert h.popen.wait(10) == 0
    assert not os.path.lexists(link)
    one_line_error(hupt_cli("reload", name), f"no hupt instance named {name!r}")
    assert hupt_cli("reload", name).returncode == 2


def test_a_second_instance_with_the_same_name_starts_nothing(procs: Procs, tmp_path: Path) -> None:
    name = _unique("api")
    h, _ = start_hupt(procs, "--name", name)
    marker = tmp_path / "started"
    port = free_port()
    code = (f"open({str(marker)!r}, 'w').close(); import socket, time; s = socket.socket(); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)")
    second = procs.hupt("--name", name, cmd=[sys.executable, "-c", code])
    assert second.popen.wait(20) == 2
    err = second.err.read_text()
    assert "Traceback" not in err, err
    (line,) = err.strip().splitlines()  # one line, nothing else: nothing was started
    assert line.startswith("hupt: error: ") and f"the name {name!r} is taken by hupt {h.pid}" \
        in line, err
    assert not marker.exists()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
        pass
    assert os.readlink(control.name_path(name)) == f"{h.pid}.sock"  # still the first's
    assert hupt_cli("reload", name, timeout=30).returncode == 0


def test_a_stale_name_is_taken_over(procs: Procs) -> None:
    name = _unique("stale")
    directory = control.ensure_runtime_dir()
    dead = os.path.join(directory, "999999999.sock")  # beyond pid_max: never a live hupt
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(dead)
    s.close()
    os.symlink("999999999.sock", control.name_path(name))
    try:
        h, _ = start_hupt(procs, "--name", name)
        assert os.readlink(control.name_path(name)) == f"{h.pid}.sock"
        assert not os.path.lexists(dead)  # nobody answered on it: removed
        assert hupt_cli("reload", name, timeout=30).returncode == 0
    finally:
        if os.path.lexists(dead):
            os.unlink(dead)


def test_pidfile_wherever_a_pid_is(procs: Procs, tmp_path: Path) -> None:
    pidfile = tmp_path / "web.pid"
    h, _ = start_hupt(procs, "--pidfile", str(pidfile))
    assert int(pidfile.read_text()) == h.pid
    r = hupt_cli("reload", "--pidfile", str(pidfile), timeout=30)
    assert r.returncode == 0, r.stderr
    (inst,) = _status("", "--pidfile", str(pidfile))["instances"]
    assert inst["hupt_pid"] == h.pid and inst["name"] is None
    one_line_error(hupt_cli("reload", "--pidfile", str(tmp_path / "none.pid")), "does not exist")
    one_line_error(hupt_cli("reload", str(h.pid), "--pidfile", str(pidfile)), "not both")
    r = hupt_cli("stop", "--pidfile", str(pidfile), timeout=30)
    assert r.returncode == 0, r.stderr
    assert h.popen.wait(10) == 0
    assert not pidfile.exists()


def test_verbose_after_the_command_and_the_servers_own_options(procs: Procs,
                                                               tmp_path: Path) -> None:
    port = free_port()
    argv_file = tmp_path / "argv"
    code = (f"import sys, socket, time; open({str(argv_file)!r}, 'w').write(repr(sys.argv[1:])); "
            f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)")
    h = procs.spawn([sys.executable, "-m", "hupt", "run", "-v", "--", sys.executable, "-c", code,
                     "-v", "--name", "x", "--version"], name="hupt")
    wait_listening(("127.0.0.1", port), 20, proc=h)
    assert argv_file.read_text() == repr(["-v", "--name", "x", "--version"])
    assert h.stop() == 0
    assert f"listens on 127.0.0.1:{port}" in h.err.read_text()  # a -v (debug) line


def test_version() -> None:
    r = hupt_cli("--version")
    assert r.returncode == 0 and r.stdout == f"hupt {control.version()}\n", r
    assert control.version() == __version__
    doc = _status("")
    assert doc["version"] == __version__


# -- systemd units ----------------------------------------------------------------------------

UNITS = {"hupt-notify.service": 0, "hupt-notify-reload.service": 253}


def _systemd_version(tool: str) -> int:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.match(r"systemd (\d+)", out)
    assert m, out
    return int(m.group(1))


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    text = (REPO / "docs" / unit).read_text()
    # verify checks that each Exec*= program exists: a stand-in for /usr/local/bin/hupt.
    stub = tmp_path / "hupt"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    assert "/usr/local/bin/hupt " in text
    path = tmp_path / "myapp.service"
    path.write_text(text.replace("/usr/local/bin/hupt ", f"{stub} "))
    r = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    complaints = [line for line in (r.stdout + r.stderr).splitlines()
                  if str(path) in line or "myapp.service" in line]
    assert r.returncode == 0, r.stdout + r.stderr
    version = _systemd_version(tool)
    if version >= UNITS[unit]:
        assert complaints == [], complaints
    else:
        # What the README warns about: an older systemd ignores the Type= line.
        assert len(complaints) == 1 and "notify-reload" in complaints[0], complaints
    for directive in ("KillMode=mixed", "TimeoutStopSec="):
        assert directive in text
    if unit == "hupt-notify.service":
        assert "\nType=notify\n" in text and "\nExecReload=" in text and "$MAINPID" in text
    else:
        assert "\nType=notify-reload\n" in text and "\nExecReload=" not in text
