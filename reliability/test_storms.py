"""Storms: signals and control clients by the hundred, and reloads that meet a stop.

- A SIGHUP storm: bursts of SIGHUPs (6 of 100 in the short form), as fast as
  kill() goes or a millisecond apart, while reloads requested over the control
  socket run back to back. A SIGHUP that comes while a reload is in progress
  joins it, so the storm coalesces into a few reloads; hupt answers its
  control socket within milliseconds all along, its log does not grow with
  every signal, no request fails, and one generation is left in the end.
- Concurrent `hupt reload` clients: rounds of six started at once. Each exits
  0 with "reload done"; those that came while a reload was starting joined it.
- A reload meeting a stop: `hupt reload` clients and `hupt stop` at once
  while a reload is starting and a request is in flight, then more reloads
  and SIGHUPs while the stop drains. The reloads fail with "hupt is stopping"
  (none starts a generation), the request in flight is answered, and hupt
  exits 0 with nothing left behind.
- More clients than hupt's control backlog while hupt is frozen for a moment:
  a `hupt status` among them waits for its answer (its connect() used to fail
  with EAGAIN at once).

The static Go server runs with `--drain-signal TERM` (see test_soak.py) where
the test is about hupt; the reload meeting a stop needs a generation that
gets ready only when the test says so (servers/variant_server.py --wait-while).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from harness import (
    Background,
    HuptProcess,
    Procs,
    fd_targets,
    fds_and_rss,
    free_port,
    go_cmd,
    hupt_cli,
    settled_fds,
    variant_cmd,
    wait_for,
    wait_listening,
)
from load import HeldRequest, Load, Target
from supervision import (
    generations,
    hupt_status,
    ping,
    stop_gracefully,
    wait_single_generation,
)

from hupt import control
from reliability.common import (
    FORM,
    Record,
    median,
    ms,
    no_traceback,
    ping_seconds,
    reload,
)

# hupt answers its control socket within this long, storm or not (seconds; a reload
# step in the loop takes milliseconds, a /proc scan on a loaded machine a little more:
# measured, 30 ms at most).
RESPONSIVE = 2.0
REPEATED = re.compile(r"repeated (\d+) times")


def _go_hupt(procs: Procs, go_server: Path) -> tuple[HuptProcess, Target]:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--drain-signal", "TERM", "--drain-timeout", "20", "--kill-timeout", "5",
                   cmd=go_cmd(go_server, target))
    wait_listening(target, 20, proc=h)
    return h, target


def test_sighup_storm_coalesces_while_reloads_run(procs: Procs, go_server: Path,
                                                  record: Record) -> None:
    h, target = _go_hupt(procs, go_server)
    bursts, per_burst = FORM.sighup_bursts, FORM.sighups_per_burst
    with Load(target, fresh=2, keepalive=0, persistent=2, max_requests=10_000_000) as load:
        for _ in range(3):  # warm up, as the soak does
            reload(h)
        wait_single_generation(h)
        fds0, _ = record.start(h.pid)
        first = max(generations(h))

        storming = threading.Event()
        storming.set()

        def reloads() -> list[float]:
            """Reloads over the control socket, back to back, as long as the storm lasts."""
            times = []
            while storming.is_set():
                times.append(reload(h))
                time.sleep(0.02)
            return times

        reloader = Background(reloads)
        pings = []
        for burst in range(bursts):
            # As fast as kill() goes (the kernel merges a SIGHUP sent while one is
            # pending: hupt sees a few), then a millisecond apart (hupt sees most).
            pace = 0.001 if burst % 2 else 0.0
            for _ in range(per_burst):
                os.kill(h.pid, signal.SIGHUP)
                if pace:
                    time.sleep(pace)
            pings.append(ping_seconds(h))
            time.sleep(0.2)
        storming.clear()
        times = reloader.result(120)
        last = wait_single_generation(h)
        time.sleep(0.3)
    res = load.result
    sighups = bursts * per_burst
    new = last - first
    record.reloads = 3 + new
    record.load(res)
    _, rss1 = fds_and_rss(h.pid)
    fds1 = settled_fds(h.pid, fds0)
    record.end(fds1, rss1)
    lines = [line for line in h.err.read_text().splitlines() if "SIGHUP: reloading" in line]
    repeated = [int(m[1]) for line in lines if (m := REPEATED.search(line))]
    logged = len(lines)
    # Those the log counted; those of its last window may not be counted yet.
    delivered = logged - len(repeated) + sum(repeated)
    record.note(f"{sighups} SIGHUPs sent in {bursts} bursts, at least {delivered} received, "
                f"+ {len(times)} reloads over the control socket: {new} generations; "
                f"ping median {ms(median(pings))}, max {ms(max(pings))}; "
                f"{logged} 'SIGHUP' log lines")

    assert res.failed == 0, res.summary()
    assert h.poll() is None, h.log()
    # Every reload succeeded, those the signals started too (hupt/tracer/notify.py:
    # a signal during NOTIF_ADDFD once failed the bind that should get the socket).
    assert "reload failed" not in h.log(), h.log()[-3000:]
    assert max(pings) < RESPONSIVE, pings
    assert len(times) >= 2, "the reloads did not run along the storm"
    # Coalesced: a SIGHUP that comes while a reload is in progress joins it, and
    # one sent while another is pending is merged by the kernel. Measured: 600 sent,
    # 120 to 150 received, 10 generations on top of the 28 reloads asked; 10,000,
    # over 2,000, 120 on top of 160.
    assert len(times) <= new <= len(times) + sighups // 10, (new, h.log()[-3000:])
    # The log grows with the reloads, not with the signals: "SIGHUP: reloading" a few
    # times per window (log.py), then how many times it was repeated. A line that
    # repeats makes way once 64 other lines have come (each reload writes a few), so
    # it comes back a few times per reload storm, never once per signal.
    assert logged <= new + 10, (logged, delivered)
    assert fds1 <= fds0, f"hupt holds {fds1 - fds0} more fds: {fd_targets(h.pid)}"
    no_traceback(h)
    stop_gracefully(h)


def _reload_argv(pid: int) -> list[str]:
    return [sys.executable, "-m", "hupt", "reload", str(pid)]


def test_concurrent_reload_clients(procs: Procs, go_server: Path, record: Record) -> None:
    h, target = _go_hupt(procs, go_server)
    rounds, clients = FORM.reload_rounds, FORM.reload_clients
    outcomes: list[tuple[int, str]] = []
    with Load(target, fresh=2, keepalive=0, persistent=2, max_requests=10_000_000) as load:
        reload(h)
        wait_single_generation(h)
        fds0, _ = record.start(h.pid)
        first = max(generations(h))
        for _ in range(rounds):
            started = [procs.spawn(_reload_argv(h.pid), name="reload") for _ in range(clients)]
            outcomes += [(c.popen.wait(60), c.err.read_text()) for c in started]
            assert ping_seconds(h) < RESPONSIVE
        last = wait_single_generation(h)
        time.sleep(0.3)
    res = load.result
    joined = sum("joining the reload" in err for _, err in outcomes)
    new = last - first
    record.reloads = 1 + new
    record.load(res)
    _, rss1 = fds_and_rss(h.pid)
    fds1 = settled_fds(h.pid, fds0)
    record.end(fds1, rss1)
    record.note(f"{rounds} rounds of {clients} `hupt reload` at once: {new} generations, "
                f"{joined} clients joined a reload in progress")

    for rc, err in outcomes:
        assert rc == 0 and "reload done" in err, (rc, err, h.log()[-3000:])
    assert res.failed == 0, res.summary()
    # Every client got its own reload or joined one: none started a second at once.
    assert new + joined == rounds * clients, (new, joined)
    assert rounds <= new <= rounds * clients
    assert fds1 <= fds0, f"hupt holds {fds1 - fds0} more fds: {fd_targets(h.pid)}"
    no_traceback(h)
    stop_gracefully(h)


def test_reloads_meeting_a_stop(procs: Procs, tmp_path: Path, record: Record) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    hold = tmp_path / "HOLD"
    # A generation started while HOLD exists listens only once the test removes it.
    h = procs.hupt("--drain-timeout", "30", "--kill-timeout", "5",
                   cmd=variant_cmd(target, "--wait-while", str(hold)))
    wait_listening(target, 20, proc=h)
    record.start(h.pid)
    with Load(target, fresh=2, keepalive=1) as load:
        reload(h)
        wait_single_generation(h)
        time.sleep(0.3)
    # The load ends here: at a stop hupt refuses new clients at once, by design.
    held = HeldRequest(target).start()
    try:
        held.wait_accepted()
        hold.touch()
        # A reload starting (its generation waits for HOLD), clients joining it,
        # and a stop, all at once.
        reloads = [procs.spawn(_reload_argv(h.pid), name="reload") for _ in range(4)]
        wait_for("the reload to start its generation",
                 lambda: "started generation 3" in h.log(), 30, h)
        stopper = procs.spawn([sys.executable, "-m", "hupt", "stop", str(h.pid)], name="stop")
        wait_for("hupt to stop", lambda: "stopping: no more accepts" in h.log(), 30, h)
        outcomes = [(r.popen.wait(30), r.err.read_text()) for r in reloads]
        # While the stop drains (the request is still in flight): more reloads, SIGHUPs.
        late = [hupt_cli("reload", str(h.pid), timeout=30) for _ in range(3)]
        for _ in range(100):
            os.kill(h.pid, signal.SIGHUP)
        inst = hupt_status(h)
        assert inst["state"] == "stopping", inst
        assert max(ping(h)) <= 3, ping(h)  # generation 3 failed; none started since
        assert stopper.poll() is None, "`hupt stop` returned with a request in flight"
    finally:
        hold.unlink(missing_ok=True)
        held.release()
    status, _ = held.result()
    stop_code = stopper.popen.wait(30)
    code = h.popen.wait(30)
    record.reloads = 1
    record.load(load.result)
    record.note(f"{len(reloads)} `hupt reload` + `hupt stop` at once, then {len(late)} "
                f"reloads and 100 SIGHUPs while stopping: every reload refused, "
                f"the request in flight answered")

    assert load.result.failed == 0, load.result.summary()
    for rc, err in outcomes:
        assert rc == 1 and "hupt is stopping" in err, (rc, err, h.log())
    for r in late:
        assert r.returncode == 1 and "hupt is stopping" in r.stderr, (r.returncode, r.stderr)
    assert status == 200
    assert stop_code == 0, stopper.log()
    assert code == 0, h.log()
    assert "started generation 4" not in h.log(), h.log()
    no_traceback(h)


# -- more clients than hupt's control backlog ----------------------------------------------

BACKLOG = 16  # hupt/control.py: ControlServer listens with this backlog


def test_cli_waits_while_the_control_backlog_is_full(procs: Procs, go_server: Path) -> None:
    """hupt frozen for a moment (SIGSTOP: a loaded machine, a long step of its loop)
    while more clients than its listen backlog arrive: a `hupt status` among them
    is answered once hupt runs again, within its own timeout (5 s)."""
    h, _ = _go_hupt(procs, go_server)
    path = control.socket_path(h.pid)
    waiting: list[socket.socket] = []
    os.kill(h.pid, signal.SIGSTOP)
    try:
        for _ in range(BACKLOG + 8):  # as many as the backlog takes, and then some
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            waiting.append(s)
        status = Background(lambda: hupt_cli("status", str(h.pid), timeout=30))
        time.sleep(1.0)
    finally:
        os.kill(h.pid, signal.SIGCONT)
    for s in waiting:
        s.close()
    r = status.result(30)
    assert r.returncode == 0, r.stderr
    stop_gracefully(h)
