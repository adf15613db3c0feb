"""When a new generation counts as ready (--ready), and what happens when it never does.

A reload fails, and the old generation serves on untouched, when the new one
exits before it is ready or does not listen within --ready-timeout (the
failure names the address it did not take). `--ready delay:S` waits S more
seconds, `--ready notify` waits for the server's READY=1, `--ready http:PATH`
waits for a 2xx/3xx probe; a probe that never succeeds rolls back: the old
generation accepts again, its listener back at the same fd and its epoll
registrations (events, flags, data) exactly as they were, which is what an
epoll server needs to ever wake up for it again. Asserted under load: 0 failed
requests.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    Procs,
    free_port,
    health_cmd,
    http_get,
    serving_pid,
    wait_gone,
    wait_listening,
)
from load import Load, Target
from snapshots import server_state
from supervision import hupt_status, start_hupt

STARTED = re.compile(r"started generation (\d+) \(pid (\d+)\)")


def _switchable(tmp: Path, target: Target) -> tuple[list[str], Path, Path]:
    """A server command that exits at once while FAIL exists and never listens while HANG does."""
    fail, hang = tmp / "FAIL", tmp / "HANG"
    assert isinstance(target, tuple)
    script = (f'if [ -e {fail} ]; then echo failing >&2; exit 3; fi; '
              f'if [ -e {hang} ]; then exec sleep 60; fi; '
              f'exec {sys.executable} -m http.server {target[1]} --bind {target[0]}')
    return ["sh", "-c", script], fail, hang


def test_new_generation_exiting_fails_the_reload_old_keeps_serving(
        procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    cmd, fail, _ = _switchable(tmp_path, target)
    h = procs.hupt(cmd=cmd)
    wait_listening(target, 20, proc=h)
    first = h.descendants()
    with Load(target, fresh=2, keepalive=1) as load:
        fail.touch()
        r = h.reload()
        assert r.returncode == 1, r.stderr
        assert "exited (exit status 3) before it was ready" in r.stderr
        assert len(r.stderr.strip().splitlines()[-1]) < 300
        time.sleep(0.5)
        assert h.descendants() == first, "the old generation keeps serving, untouched"
        fail.unlink()
        r = h.reload()
        assert r.returncode == 0, r.stderr
    assert load.result.failed == 0, load.result.summary()
    assert load.result.ok > 20


def test_not_ready_in_time_names_the_missing_address(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    cmd, _, hang = _switchable(tmp_path, target)
    h = procs.hupt("--ready-timeout", "2", "--kill-timeout", "2", cmd=cmd)
    wait_listening(target, 20, proc=h)
    first = h.descendants()
    with Load(target, fresh=2, keepalive=1) as load:
        hang.touch()
        t0 = time.monotonic()
        r = h.reload()
        took = time.monotonic() - t0
        assert r.returncode == 1, r.stderr
        assert f"did not listen on 127.0.0.1:{port}" in r.stderr
        assert 1.5 < took < 15
        # The failed generation (sleep) is stopped; the old one still serves.
        deadline = time.monotonic() + 10
        while h.descendants() != first:
            assert time.monotonic() < deadline, (h.descendants(), first)
            time.sleep(0.1)
    assert load.result.failed == 0, load.result.summary()
    assert http_get(target)[0] == 200


def test_ready_delay_waits_before_switching(procs: Procs) -> None:
    h, target = start_hupt(procs, "--ready", "delay:1.5")
    old = serving_pid(target)
    with Load(target, fresh=2, keepalive=1) as load:
        t0 = time.monotonic()
        r = h.reload()
        took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took >= 1.5, took
    assert serving_pid(target) != old
    assert load.result.failed == 0, load.result.summary()


def test_ready_notify_requires_ready_1(procs: Procs, tmp_path: Path) -> None:
    silent = tmp_path / "SILENT"
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h, _ = start_hupt(procs, "--ready", "notify", "--ready-timeout", "3",
                      cmd=health_cmd(target, "--notify-after", "0.8", "--no-notify-if",
                                     str(silent)),
                      target=target)
    old = serving_pid(target)
    with Load(target, fresh=2, keepalive=1) as load:
        t0 = time.monotonic()
        r = h.reload()
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 >= 0.8
        new = serving_pid(target)
        assert new != old
        silent.touch()  # the next generation listens but never says READY=1
        r = h.reload()
        assert r.returncode == 1 and "--ready notify not satisfied" in r.stderr, r.stderr
        time.sleep(0.5)
        assert serving_pid(target) == new
    assert load.result.failed == 0, load.result.summary()


def test_ready_http_rolls_back_an_unhealthy_generation(procs: Procs, tmp_path: Path) -> None:
    sick = tmp_path / "SICK"
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h, _ = start_hupt(procs, "--ready", "http:/healthz", "--ready-timeout", "2",
                      cmd=health_cmd(target, "--fail-health-if", str(sick)), target=target)
    with Load(target, fresh=2, keepalive=2) as load:
        assert h.reload().returncode == 0
        healthy = serving_pid(target)
        sick.touch()
        r = h.reload()
        assert r.returncode == 1, r.stderr
        assert "503" in r.stderr and "rolled back" in r.stderr, r.stderr
        started = STARTED.search(r.stderr)
        assert started is not None, r.stderr
        number, unhealthy = int(started[1]), int(started[2])
        assert unhealthy != healthy
        time.sleep(1.0)
        # The old generation accepts again: it alone answers now.
        assert {serving_pid(target) for _ in range(10)} == {healthy}
        # The unhealthy generation is stopped after the rollback.
        assert not wait_gone({unhealthy}, 15), f"pid {unhealthy} still alive\n{h.log()}"
        assert unhealthy not in h.descendants()
        assert f"generation {number} (pid {unhealthy}) exited" in h.log(), h.log()
        gens = hupt_status(h)["generations"]
        assert [(g["number"], g["state"]) for g in gens] == [(2, "serving")], gens
        sick.unlink()
        assert h.reload().returncode == 0
    assert load.result.failed == 0, load.result.summary()
    assert healthy in load.result.pids


@pytest.mark.root
@pytest.mark.parametrize("kind", ["node", "go"])
def test_rollback_restores_an_epoll_server_exactly(
        kind: str, procs: Procs, server_cmd: Callable[[str, Target], list[str]]) -> None:
    """While hupt probes a new generation it has paused the old one: the listener taken
    out of every epoll set that watched it and a dummy in its place. A probe that never
    succeeds (a path the server answers with 404) rolls back, repeatedly, under load:
    the old process alone serves after each, its state identical; the failed
    generations are stopped."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--ready", "http:/no-such-page", "--ready-timeout", "1.5",
                   "--drain-timeout", "10", "--kill-timeout", "3", cmd=server_cmd(kind, target))
    wait_listening(target, 20, proc=h)
    (old,) = h.descendants()
    before = server_state(old, port)
    assert any(before.regs.values()), f"{kind} watches its listener with epoll"
    failed: list[int] = []
    with Load(target, fresh=2, keepalive=2) as load:
        for i in range(3):
            r = h.reload()
            assert r.returncode == 1, r.stderr
            assert "rolled back" in r.stderr and "404" in r.stderr, r.stderr
            m = STARTED.search(r.stderr)
            assert m is not None, r.stderr
            failed.append(int(m.group(2)))
            # Only the old process answers: it accepts again, the new one is paused.
            for _ in range(20):
                status, body = http_get(target, "/pid")
                assert status == 200 and int(body) == old, (i, body)
            assert server_state(old, port) == before, f"rollback {i + 1} changed the server"
            time.sleep(0.2)
    assert load.result.failed == 0, load.result.summary()
    # While it was probed the new generation alone accepted: clients reached it too.
    assert load.result.pids <= {old, *failed}, load.result.summary()
    assert not wait_gone(set(failed), 15), "the generations that failed are stopped"
    h.signal(signal.SIGTERM)
    assert h.popen.wait(20) == 0, h.log()
