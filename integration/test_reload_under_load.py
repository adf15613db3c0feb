"""hupt run + hupt reload under load, for each kind of server: real servers, real kernel.

Stock http.server, node, the static Go server and a threaded Python server are
each reloaded 20 times under fresh-connection, keep-alive and persistent load,
with a 3-second request in flight across the first reloads; nginx (a master
and its workers) 10 times; servers that daemonize (a shell's `&`, a hundred
double forks) 3 times. Asserted: 0 failed requests, the slow request completes
with 200, every generation serves from the very same listening socket (same
inode: the handoff engaged, not a rebind), old generations exit, and nothing is
left behind (the `procs` fixture). Then: two reloads requested at once start
one generation, and hupt itself keeps no fd and little memory per reload.

Persistent clients (load.py) hold one connection for the whole test, as
browsers and connection pools do. Without --drain-signal nothing but the drain
timeout ends such a connection: the old generation keeps answering it until
then, and its stop signal closes it: between two requests for nginx, Go and
node (or node is killed after --kill-timeout); the threaded Python server
exits at once, and a request in flight there sees the connection end before
any byte of its answer and is retried, as HTTP clients do. So these tests use
a drain timeout of a few seconds, longer than the slow request, and wait for
the last generation to be alone while the clients still run: they must be
answered by it then, with no request failed on the way.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from harness import (
    Procs,
    Started,
    fd_targets,
    fds_and_rss,
    free_port,
    listener_inode,
    listener_inodes,
    nginx_cmd,
    ppid,
    serving_pid,
    settled_fds,
    threaded_cmd,
    variant_cmd,
    wait_for,
    wait_gone,
    wait_listening,
)
from load import Load, LoadResult, SlowRequest, Target
from supervision import (
    check_load,
    generations,
    held_by_hupt,
    ping,
    reload_many,
    reload_ok,
    states,
    stop_gracefully,
    wait_single_generation,
)

RELOADS = 20
# Longer than the 3 s request in flight across the first reload, short enough that
# the persistent clients move to the last generation within the test.
DRAIN_TIMEOUT = "5"


@pytest.mark.parametrize("kind", ["http.server", "node", "go", "threaded"])
def test_reloads_under_load(kind: str, procs: Procs,
                            server_cmd: Callable[[str, Target], list[str]]) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    # The threaded server serves a connection per thread to its end: the persistent
    # clients keep two threads for good, the slow request and the keep-alive clients
    # three more, and fresh requests would queue behind them with the usual four.
    cmd = threaded_cmd(target, threads=8) if kind == "threaded" else server_cmd(kind, target)
    h = procs.hupt("--drain-timeout", DRAIN_TIMEOUT, "--kill-timeout", "5", cmd=cmd)
    wait_listening(target, 20, proc=h)
    first = h.descendants()

    with Load(target, fresh=2, keepalive=2, conn_requests=20, persistent=2) as load:
        time.sleep(0.3)
        slow = SlowRequest(target, 3.0).start()
        slow.wait_accepted()  # in flight in generation 1 when the reloads begin
        reloaded = [pids for _, pids in reload_many(h, RELOADS, port, pause=0.15)]
        last_reload = time.monotonic()
        status, elapsed = slow.result()
        wait_single_generation(h, 30)
        alone = time.monotonic()
        time.sleep(0.5)
    res = load.result

    assert res.failed == 0, res.summary()
    assert res.ok > 100, res.summary()
    check_persistent(res, last_reload, alone)
    if kind != "http.server":
        # Its last answer came after the old generations were gone: from the new code.
        assert all(p.answers[-1][1] in reloaded[-1] for p in res.persistent), res.summary()
    assert status == 200 and elapsed >= 2.9, (status, elapsed)
    # Every reload produced a new serving process.
    assert len(reloaded) == RELOADS and not set().union(*reloaded) & first
    if kind != "http.server":  # http.server has no pid route: the others say who answered
        assert len(res.pids) >= RELOADS // 2, res.summary()
    # Old generations exit once drained: the first one and every one reload_many
    # started except the last, which alone serves.
    last = generations(h)[wait_single_generation(h)]
    assert not (last & first)
    assert not wait_gone(first, 1.0)
    old = set().union(*reloaded[:-1])
    assert not (last & old), f"an old generation still serves: {last & old}"
    still = wait_gone(old, 1.0)
    assert not still, f"old generations' processes still alive: {sorted(still)}\n{h.log()}"
    assert last <= reloaded[-1], (last, reloaded[-1])
    # A graceful stop ends hupt with status 0.
    h.signal(signal.SIGTERM)
    assert h.popen.wait(30) == 0, h.log()
    assert not wait_gone(last, 5.0)


def check_persistent(res: LoadResult, last_reload: float, alone: float) -> None:
    """No persistent request failed, and each client was answered after the last
    reload and once the last generation was alone."""
    assert len(res.persistent) == 2 and res.persistent_failed == 0, res.summary()
    for p in res.persistent:
        assert p.answers_after(last_reload) and p.answers_after(alone), res.summary()


# -- nginx: a master and its workers ---------------------------------------------------------



@pytest.mark.root
def test_nginx_reloads_under_load(procs: Procs, tmp_path: Path) -> None:
    """nginx as Debian packages it: its master binds and listens, then forks the workers
    that accept; `daemon off` keeps the master in the foreground, as under any
    supervisor. Stopped gracefully with nginx's own graceful signal, QUIT."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    nginx = nginx_cmd(tmp_path, port)
    h = procs.hupt("--drain-timeout", DRAIN_TIMEOUT, "--kill-timeout", "5",
                   "--stop-signal", "QUIT", "--unlink", str(tmp_path / "nginx.pid"),
                   cmd=nginx)
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    assert inode is not None
    first = h.descendants()
    assert len(first) == 3, "a master and two workers"
    with Load(target, fresh=2, keepalive=2, conn_requests=20, persistent=2) as load:
        time.sleep(0.3)
        slow = SlowRequest(target, 3.0).start()
        slow.wait_accepted()
        seen = set(first)
        for i in range(10):
            r = h.reload()
            assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{h.log()}"
            assert listener_inode(port) == inode, "the listening socket is never replaced"
            time.sleep(0.3)
            new = h.descendants() - seen
            assert any(inode in listener_inodes(p) for p in new), "the new master holds it"
            seen |= new
        last_reload = time.monotonic()
        status, elapsed = slow.result()
        deadline = time.monotonic() + 30
        while len(h.descendants()) != 3:  # the last master and its two workers
            assert time.monotonic() < deadline, (h.descendants(), h.log())
            time.sleep(0.1)
        alone = time.monotonic()
        time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary()
    assert load.result.ok > 100, load.result.summary()
    check_persistent(load.result, last_reload, alone)
    # Each moved to a newer generation at least once: QUIT closed its connection.
    assert all(p.reconnects >= 1 for p in load.result.persistent), load.result.summary()
    assert status == 200 and elapsed >= 2.9, (status, elapsed)
    assert not wait_gone(first, 1.0), "the first master and its workers exited"
    h.signal(signal.SIGTERM)
    assert h.popen.wait(30) == 0, h.log()


# -- servers that daemonize ------------------------------------------------------------------


def _daemon_cmd(style: str, target: Target) -> list[str]:
    if style == "sh-background":
        return ["sh", "-c", f"{shlex.join(threaded_cmd(target, threads=4))} & exit 0"]
    # A hundred double forks in a row: each intermediate process exits while hupt may
    # be scanning /proc, the moment its child, the generation's only other process, is
    # either still recorded under it or not listed yet. A single double fork lost the
    # generation (taken for exited, its notify fd closed) in about 1 start in 10; this
    # made it certain.
    return variant_cmd(target, "--daemonize", "100")


@pytest.mark.parametrize("style", ["sh-background", "double-fork"])
def test_daemonizing_server_is_supervised_and_reloads(style: str, procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--drain-timeout", "20", "--kill-timeout", "5", cmd=_daemon_cmd(style, target))
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    assert inode is not None and held_by_hupt(h) == {inode}

    def daemon_of(gen: int) -> int | None:
        """The serving process of generation `gen` once it is alone and re-parented to hupt."""
        procs_of_gen = generations(h).get(gen, set())
        if len(procs_of_gen) != 1:
            return None
        (p,) = procs_of_gen
        return p if ppid(p) == h.pid and inode in listener_inodes(p) else None

    daemon = wait_for("generation 1's daemon under hupt", lambda: daemon_of(1), 10, h)
    assert ping(h)[1]["pid"] != daemon, "the daemon is not the process hupt started"
    # The generation's first process exited: hupt must go on supervising the daemon.
    time.sleep(1.5)
    assert h.poll() is None and "exited on its own" not in h.log(), h.log()
    assert serving_pid(target) == daemon

    daemons = [daemon]
    with Load(target, fresh=2, keepalive=2) as load:
        time.sleep(0.3)
        for gen in (2, 3, 4):
            reload_ok(h)
            new = wait_for(f"generation {gen}'s daemon under hupt", partial(daemon_of, gen), 10, h)
            assert held_by_hupt(h) == {inode}
            assert not wait_gone([daemons[-1]], 10), f"generation {gen - 1}'s daemon still runs"
            daemons.append(new)
            time.sleep(0.2)
        time.sleep(0.3)
    check_load(load.result)
    assert load.result.pids <= set(daemons), load.result.summary()
    assert len(load.result.pids) >= 3, load.result.summary()
    assert states(h) == {4: "serving"}
    stop_gracefully(h)
    assert not wait_gone([daemons[-1]], 5)


# -- two reloads at once ---------------------------------------------------------------------


def _asked(client: Started) -> bool:
    """A `hupt reload` client got its first answer from hupt (or ended)."""
    err = client.err.read_text()
    return ("started generation" in err or "joining the reload" in err
            or client.poll() is not None)


def test_two_reloads_at_once_start_one_generation(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    hold = tmp_path / "HOLD"
    # A generation started while HOLD exists listens only once the test removes it:
    # both requests reach hupt while the first reload's generation is starting.
    h = procs.hupt("--drain-timeout", "20", "--kill-timeout", "5",
                   cmd=variant_cmd(target, "--wait-while", str(hold)))
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    argv = [sys.executable, "-m", "hupt", "reload", str(h.pid)]
    with Load(target, fresh=2, keepalive=2) as load:
        time.sleep(0.3)
        hold.touch()
        clients = [procs.spawn(argv, name="reload") for _ in range(2)]
        for c in clients:
            wait_for("both reload requests to reach hupt", partial(_asked, c), 30, h)
        hold.unlink()
        outcomes = [(c.popen.wait(30), c.err.read_text()) for c in clients]
        for code, err in outcomes:
            assert code == 0 and "reload done" in err, (code, err, h.log())
        joined = [err for _, err in outcomes if "joining the reload" in err]
        assert len(joined) == 1, outcomes
        assert "generation 2" in joined[0]
        assert max(states(h)) == 2 and max(generations(h)) == 2, (states(h), generations(h))
        assert wait_single_generation(h) == 2
        assert h.log().count("started generation") == 1, h.log()
        assert listener_inode(port) == inode and held_by_hupt(h) == {inode}
        time.sleep(0.3)
    check_load(load.result, 100)
    assert set(generations(h)) == {2}
    stop_gracefully(h)


# -- nothing of hupt's own grows with the number of reloads ---------------------------------


def test_hupt_keeps_no_fd_and_little_memory_per_reload(procs: Procs, go_server: Path) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--drain-timeout", "5", "--kill-timeout", "2",
                   cmd=[str(go_server), f"127.0.0.1:{port}"])
    wait_listening(target, 20, proc=h)
    with Load(target, fresh=2, keepalive=1, conn_requests=20) as load:
        for _ in range(10):  # warm up: pyroute2 loaded, the allocator's arenas grown
            reload_ok(h)
        wait_single_generation(h)
        fds0, rss0 = fds_and_rss(h.pid)
        for _ in range(60):
            reload_ok(h)
        wait_single_generation(h)
        _, rss1 = fds_and_rss(h.pid)
        fds1 = settled_fds(h.pid, fds0)
        after = fd_targets(h.pid)
    check_load(load.result)
    assert fds1 <= fds0, f"hupt holds {fds1 - fds0} more fds after 60 reloads: {after}"
    # Measured here: +20 to +140 KB over 60 reloads once warm (the allocator, and
    # the last few exited generations hupt keeps for its history); a buffer or a
    # socket object leaked per reload shows as megabytes.
    assert rss1 - rss0 < 1024, f"hupt's RSS grew {rss1 - rss0} KB over 60 reloads"
    stop_gracefully(h)
