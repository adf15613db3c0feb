"""Around a reload: --before-reload and --after-reload hooks, --watch, --pidfile and --unlink.

A failing --before-reload aborts the reload with its output as the reason;
--after-reload runs once a reload succeeded (with HUPT_GENERATION), its failure
reported, not fatal. --watch reloads once for a burst of changes. --pidfile
holds hupt's own PID while it runs; --unlink removes a server's own pidfile
before each generation starts, so a server that refuses to start while it
exists can be reloaded.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from harness import Procs, free_port, health_cmd, serving_pid
from load import Target
from supervision import start_hupt


def test_before_reload_failure_aborts_with_its_output(procs: Procs, tmp_path: Path) -> None:
    flag = tmp_path / "BROKEN"
    hook = f"if [ -e {flag} ]; then echo 'config test failed: line 3'; exit 4; fi; echo ok"
    h, target = start_hupt(procs, "--before-reload", hook)
    old = serving_pid(target)
    flag.touch()
    r = h.reload()
    assert r.returncode == 1
    assert "config test failed: line 3" in r.stderr and "exit status 4" in r.stderr
    assert serving_pid(target) == old and len(h.descendants()) == 1, "no generation started"
    flag.unlink()
    assert h.reload().returncode == 0
    assert serving_pid(target) != old


def test_after_reload_runs_and_its_failure_is_reported(procs: Procs, tmp_path: Path) -> None:
    out = tmp_path / "warmed"
    h, _ = start_hupt(procs, "--after-reload",
                      f'echo "gen $HUPT_GENERATION" >> {out}; test -e {tmp_path}/FAIL && exit 2;'
                      " true")
    assert not out.exists()
    r = h.reload()
    assert r.returncode == 0 and out.read_text() == "gen 2\n"
    (tmp_path / "FAIL").touch()
    r = h.reload()
    assert r.returncode == 0, r.stderr
    assert "--after-reload command failed (exit status 2)" in r.stderr


def test_watch_reloads_on_change_debounced(procs: Procs, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "app.py").write_text("1")
    h, target = start_hupt(procs, "--watch", str(src))
    first = serving_pid(target)
    time.sleep(1.0)
    assert serving_pid(target) == first, "no change, no reload"
    for i in range(4):  # a burst of writes: one reload
        (src / "app.py").write_text(str(i))
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while serving_pid(target) == first:
        assert time.monotonic() < deadline, h.log()
        time.sleep(0.1)
    time.sleep(1.5)
    assert h.log().count("files changed") == 1, h.log()


def test_pidfile_and_unlink(procs: Procs, tmp_path: Path) -> None:
    hupt_pidfile = tmp_path / "hupt.pid"
    app_pid = tmp_path / "app.pid"
    port = free_port()
    target: Target = ("127.0.0.1", port)
    # A server that refuses to start while its pidfile exists: only --unlink makes a
    # second generation possible.
    cmd = ["sh", "-c", f"test -e {app_pid} && exit 9; echo $$ > {app_pid}; "
                       f"exec {' '.join(health_cmd(target))}"]
    h, _ = start_hupt(procs, "--pidfile", str(hupt_pidfile), "--unlink", str(app_pid), cmd=cmd,
                      target=target)
    assert hupt_pidfile.read_text().strip() == str(h.pid)
    for _ in range(2):
        r = h.reload()
        assert r.returncode == 0, r.stderr
        assert app_pid.read_text().strip() == str(serving_pid(target))
    h.signal(signal.SIGTERM)
    assert h.popen.wait(30) == 0
    assert not hupt_pidfile.exists()
