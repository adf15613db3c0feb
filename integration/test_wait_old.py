"""`hupt reload --wait-old` (issue 14 item 5), with real processes.

Asserted: with a slow request held by the old generation, `hupt reload
--wait-old` returns only once that generation has exited (the request
answered), and prints its drain figures (how long, what ended it, the
connections still open then, how it exited) before its last line; without
--wait-old the same reload returns at once; with --timeout, old generations
still draining make it exit 3 saying the reload itself is done; a drain ended
by --drain-timeout is named, with the connection it cut.
"""

from __future__ import annotations

import re
import time

from harness import (
    Background,
    Procs,
    alive,
    serving_pid,
    wait_for,
)
from load import HeldRequest, SlowRequest
from supervision import start_chatty, states


def test_wait_old_returns_once_the_old_generation_has_exited(procs: Procs) -> None:
    h, target = start_chatty(procs, "--drain-timeout", "30")
    old = serving_pid(target)
    slow = SlowRequest(target, seconds=3.0).start()
    slow.wait_accepted()
    t0 = time.monotonic()
    reload = Background(lambda: h.reload("--wait-old"))
    wait_for("generation 2", lambda: states(h).get(2) == "serving", 10, h)
    assert alive(old) and not reload.done(), "returned while the old generation runs"
    r = reload.result()
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert not alive(old), "returned before the old generation exited"
    assert took >= 2.0, took
    assert slow.result()[0] == 200
    lines = r.stderr.strip().splitlines()
    assert "waiting for generation 1" in r.stderr and "(--wait-old)" in r.stderr, r.stderr
    assert re.match(r"hupt: generation 1 \(pid \d+\): drained \d+\.\d\d s, ended by no "
                    r"connections in flight, 0 connection\(s\) still open then; exited "
                    r"\d+\.\d\d s after the reload began \(", lines[-2]), lines[-2]
    assert lines[-1].startswith("hupt: reload done: generation 2 ") \
        and lines[-1].endswith(f"generation 1 (pid {old}) has exited"), lines[-1]
    drained = float(lines[-2].split("drained ")[1].split(" s")[0])
    assert 1.0 < drained < took, (drained, took)

    # Without --wait-old the same reload returns at once, and with a timeout the
    # reload is told done, but not the old generation's exit: exit status 3.
    held = HeldRequest(target).start()
    try:
        held.wait_accepted()
        t0 = time.monotonic()
        assert h.reload().returncode == 0
        assert time.monotonic() - t0 < 5
        held2 = HeldRequest(target).start()
        held2.wait_accepted()
        r = h.reload("--wait-old", "--timeout", "2")
        assert r.returncode == 3, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("hupt: error: reload: generation 4 ") and "is ready" in last \
            and "had not exited within the timeout" in last, last
        held2.release()
    finally:
        held.release()
    assert h.stop() == 0


def test_wait_old_names_a_drain_timeout(procs: Procs) -> None:
    h, target = start_chatty(procs, "--drain-timeout", "1", "--kill-timeout", "2")
    held = HeldRequest(target, timeout=30).start()  # never released: the timeout ends it
    held.wait_accepted()
    r = h.reload("--wait-old")
    assert r.returncode == 0, r.stderr
    figures = r.stderr.strip().splitlines()[-2]
    assert "ended by the drain timeout, 1 connection(s) still open then" in figures, figures
    assert "(killed by SIGTERM)" in figures or "(exit status 0)" in figures, figures
    held.release()
    assert h.stop() == 0
