"""Soak: many reloads under load, and hupt's own fds and memory stay flat.

The static Go server (servers/goserver: net/http, http.Server.Shutdown on
SIGTERM) runs under `hupt run --drain-signal TERM`: each retiring generation
is asked to drain itself at once, so the persistent clients (one connection
each for the whole test, as browsers and pools hold) are closed at a request
boundary and move to the new generation instead of holding every drain until
its timeout. Fresh clients (a connection per request) catch a listener that
is missing or not accepting at any moment.

FORM.soak_reloads reloads (100 in the short form, 1,000 in the long one,
`HUPT_SOAK_RELOADS=N`) go over the control socket, as `hupt reload` asks
them, a tenth of a second apart; each must succeed. Asserted: 0 failed requests; every
reload served by a new generation from the very same listening socket; one
generation left at the end, answering the persistent clients; hupt's fd
count back to where it was and its RSS grown by less than a bound that a
leak per reload would exceed. Ten reloads warm hupt up before the start is
measured (pyroute2 loaded, the allocator's arenas grown), as in
integration/test_reload_under_load.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from harness import (
    Procs,
    fd_targets,
    fds_and_rss,
    free_port,
    go_cmd,
    listener_inode,
    settled_fds,
    wait_listening,
)
from load import Load, Target
from supervision import generations, held_by_hupt, ping, stop_gracefully, wait_single_generation

from reliability.common import (
    FORM,
    Record,
    cpu_seconds,
    median,
    ms,
    no_traceback,
    reload,
)

WARM_UP = 10
# Between reloads: each generation serves a few dozen requests, persistent ones among
# them, before the next replaces it (a reload itself takes ~30 ms here).
PAUSE = 0.1
CHECK_EVERY = 25  # reloads between the (slower) checks of the listener and the generations
# hupt's RSS may grow by this much over the soak, and no more (KB). Measured once
# warm: +100 to +200 KB over 100 reloads, +140 KB over 400 (the allocator, the short
# history of reloads hupt keeps), and now and then a single step of +1.6 MB of
# anonymous memory, in the warm-up or later, that stays (a high-water mark of the
# heap, not a growth per reload). A buffer or a socket object kept per reload
# (a few KB) shows as megabytes over the long form's thousand.
RSS_BOUND_KB = 4096 + 2 * FORM.soak_reloads


def test_soak_reloads_under_load(procs: Procs, go_server: Path, record: Record) -> None:
    n = FORM.soak_reloads
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--drain-signal", "TERM", "--drain-timeout", "20", "--kill-timeout", "5",
                   cmd=go_cmd(go_server, target))
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    assert inode is not None

    times: list[float] = []
    with Load(target, fresh=2, keepalive=0, persistent=2,
              max_requests=10_000_000) as load:
        for _ in range(WARM_UP):
            reload(h)
        wait_single_generation(h)
        fds0, rss0 = record.start(h.pid)
        cpu0 = cpu_seconds(h.pid)
        first = max(generations(h))
        for i in range(n):
            times.append(reload(h))
            time.sleep(PAUSE)
            if (i + 1) % CHECK_EVERY == 0 or i + 1 == n:
                live = ping(h)
                assert max(live) == first + i + 1, (i, live)
                # Drains end at once (the drain signal): no pile of old generations.
                assert len(live) <= 6, f"after reload {i + 1}: {live}"
                assert listener_inode(port) == inode, "the listening socket was replaced"
                assert held_by_hupt(h) == {inode}, "hupt must keep holding the listener"
        last_reload = time.monotonic()
        last = wait_single_generation(h)
        cpu = cpu_seconds(h.pid) - cpu0
        time.sleep(0.5)  # the persistent clients are answered by the last generation alone
    res = load.result
    record.reloads = WARM_UP + n
    record.load(res)

    _, rss1 = fds_and_rss(h.pid)
    fds1 = settled_fds(h.pid, fds0)
    record.end(fds1, rss1)
    record.note(f"reload median {ms(median(times))}, max {ms(max(times))}; "
                f"hupt CPU {cpu * 1000 / n:.1f} ms per reload; "
                f"longest wait {ms(res.longest_wait)}; "
                f"persistent: {res.persistent_reconnects} reconnects, "
                f"{res.persistent_retries} retried")

    assert res.failed == 0, res.summary()
    assert res.ok >= 10 * n, res.summary()
    assert last == first + n
    for p in res.persistent:
        assert p.answers_after(last_reload), res.summary()
    assert fds1 <= fds0, (f"hupt holds {fds1 - fds0} more fds after {n} reloads: "
                          f"{fd_targets(h.pid)}")
    assert rss1 - rss0 < RSS_BOUND_KB, f"hupt's RSS grew {rss1 - rss0} KB over {n} reloads"
    no_traceback(h)
    stop_gracefully(h)
