"""`hupt signal` (issue 14 item 3), with real processes.

Asserted: USR1 by the instance's name reaches the serving generation's
process and the command says which generation and pid got it; after a reload
with the old generation still draining, a signal goes to the new one only,
`--all` (a signal by number) to both; HUP, which reloads when sent to hupt,
goes to the server and reloads nothing; a bad signal and an unknown name are
one-line errors with exit status 2.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from harness import (
    Procs,
    hupt_cli,
    one_line_error,
    serving_pid,
    wait_for,
)
from load import HeldRequest
from supervision import start_chatty, states


def test_signal_reaches_the_serving_generation_and_all_of_them(procs: Procs,
                                                               tmp_path: Path) -> None:
    got = tmp_path / "signals"
    name = f"sig-{os.getpid()}"
    h, target = start_chatty(procs, "--name", name, "--drain-timeout", "30",
                      server=["--signals", str(got)])
    first = serving_pid(target)
    r = hupt_cli("signal", name, "USR1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == f"hupt: signal done: SIGUSR1 sent to generation 1 (pid {first})"
    wait_for("USR1", lambda: got.exists() and f"SIGUSR1 {first}" in got.read_text(), 10, h)

    held = HeldRequest(target).start()
    try:
        held.wait_accepted()
        assert h.reload().returncode == 0
        second = serving_pid(target)
        got.unlink()
        r = hupt_cli("signal", str(h.pid), "SIGWINCH")
        assert r.returncode == 0 and f"generation 2 (pid {second})" in r.stderr, r.stderr
        wait_for("WINCH", lambda: got.exists() and "SIGWINCH" in got.read_text(), 10, h)
        r = hupt_cli("signal", "--all", name, str(int(signal.SIGUSR2)))
        assert r.returncode == 0, r.stderr
        assert f"SIGUSR2 sent to generation 1 (pid {first}); generation 2 (pid {second})" \
            in r.stderr, r.stderr
        wait_for("USR2 in both", lambda: got.read_text().count("SIGUSR2") == 2, 10, h)
        # HUP, which reloads when sent to hupt, goes to the server as asked.
        assert hupt_cli("signal", name, "HUP").returncode == 0
        wait_for("HUP", lambda: "SIGHUP" in got.read_text(), 10, h)
    finally:
        held.release()
    held.result()
    assert sorted(got.read_text().splitlines()) == sorted(
        [f"SIGWINCH {second}", f"SIGUSR2 {first}", f"SIGUSR2 {second}", f"SIGHUP {second}"])
    assert max(states(h)) == 2, "a signal through hupt signal never reloads"
    assert "SIGUSR1 (hupt signal): sent to generation 1" in h.log()

    one_line_error(hupt_cli("signal", name, "NOPE"), "unknown signal: 'NOPE'")
    assert hupt_cli("signal", name, "NOPE").returncode == 2
    missing = hupt_cli("signal", f"none-{os.getpid()}", "USR1")
    one_line_error(missing, "no hupt instance named")
    assert missing.returncode == 2
    assert h.stop() == 0
