"""Exec mode (hupt run --exec, hupt attach) against the fake kernel seam."""

from __future__ import annotations

import os
import selectors
import signal
import socket
from typing import Any

import pytest

from hupt.address import AF_INET, Address
from hupt.command import Change
from hupt.errors import HuptError, InjectionError
from hupt.generations import Generation, State
from hupt.supervisor import Options, Supervisor
from hupt.system import Followed, FollowResult
from tests.fakes import FakeSystem, state_of
from tests.test_supervisor import Recorder

A = Address(AF_INET, "127.0.0.1", 8000)


def make(fake: FakeSystem, **kw: Any) -> Supervisor:
    opts = Options(argv=["server"], env={}, exec_mode=True, **kw)
    sup = Supervisor(fake, opts, control=False)
    sup.start()
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    return sup


def watched_for(sup: Supervisor, fd: int) -> Generation | None:
    """The generation whose event ``fd`` is watched for (its handler is bound to it)."""
    handler = sup.loop.handler(fd)
    args = getattr(handler, "args", ())
    return args[0] if args and isinstance(args[0], Generation) else None


def ready_path(gen: Generation) -> str:
    assert gen.ready_socket is not None
    return gen.ready_socket.path


def answer(sup: Supervisor, fd: int) -> None:
    """The terminal ``fd`` is readable: what the loop does then."""
    handler = sup.loop.handler(fd)
    assert handler is not None
    handler(selectors.EVENT_READ)


def reload_to_exec(sup: Supervisor, fake: FakeSystem) -> Recorder:
    """Request a reload and let the (idle) generation drain and exec."""
    w = Recorder()
    sup.request_reload(w)
    sup.tick()
    return w


def test_reload_drains_then_execs_the_same_pid(fake: FakeSystem) -> None:
    sup = make(fake)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 1
    w = Recorder()
    sup.request_reload(w)
    assert old.state is State.DRAINING and fake.gens[1].paused
    assert fake.lives_on[1] == {old.pid}, "the root is paused to serve again, not to retire"
    sup.tick()
    assert len(sup.gens) == 1, "no exec while a connection is in flight"
    fake.in_flight_by_pid[old.pid] = 0
    sup.tick()
    assert fake.events[-1] == "exec 1 -> 2"
    new = sup.gens[1]
    assert new.pid == old.pid and new.state is State.STARTING
    assert state_of(old) is State.EXITED and old.replaced_by == 2
    assert not fake.signals, "the root process execs: nobody is signalled"
    assert w.result is None and any("execed" in m for m in w.messages)
    fake.listen(2, A)
    sup.on_notify(new)
    assert w.result is not None and w.result[0], w.result
    assert sup.current is new and new.state is State.SERVING


def test_the_notify_fd_follows_the_exec(fake: FakeSystem) -> None:
    sup = make(fake)
    fd = sup.gens[0].notify_fd
    assert fd is not None
    reload_to_exec(sup, fake)
    assert sup.gens[1].notify_fd == fd and sup.gens[0].notify_fd is None
    assert watched_for(sup, fd) is sup.gens[1]


def test_drain_timeout_execs_anyway(fake: FakeSystem) -> None:
    sup = make(fake, drain_timeout=10.0)
    fake.in_flight_by_pid[sup.gens[0].pid] = 3
    sup.request_reload(Recorder())
    fake.advance(9)
    sup.tick()
    assert len(sup.gens) == 1
    fake.advance(2)
    sup.tick()
    assert "exec 1 -> 2" in fake.events and sup.gens[1].state is State.STARTING


def test_failed_exec_resumes_and_reports(fake: FakeSystem) -> None:
    sup = make(fake)
    fake.exec_error = InjectionError("execve", 2)
    w = reload_to_exec(sup, fake)
    assert w.result is not None and not w.result[0]
    assert "could not exec" in w.result[1] and "ENOENT" in w.result[1]
    old = sup.gens[0]
    assert fake.events[-2:] == ["exec 1 -> 2", "resume 1"]
    assert old.state is State.SERVING and sup.current is old and sup.upgrade is None
    assert len(sup.gens) == 1 and not fake.signals
    fake.exec_error = None
    w2 = reload_to_exec(sup, fake)
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert w2.result is not None and w2.result[0]


def test_missing_program_fails_before_anything_is_paused(fake: FakeSystem) -> None:
    sup = make(fake)
    fake.program_error = HuptError("'server' not found on PATH")
    w = Recorder()
    sup.request_reload(w)
    assert w.result == (False, "cannot exec: 'server' not found on PATH")
    assert "pause 1" not in fake.events and sup.gens[0].state is State.SERVING


def test_reload_refused_when_the_root_process_is_gone(fake: FakeSystem) -> None:
    sup = make(fake)
    root = sup.gens[0].pid
    fake.fork(1)  # a daemon that lives on after the process hupt started exited
    fake.exit_pid(root)
    w = Recorder()
    sup.request_reload(w)
    assert w.result is not None and not w.result[0] and "daemonize" in w.result[1]
    assert "pause 1" not in fake.events and sup.upgrade is None


def test_image_dying_before_ready_starts_the_command_afresh(fake: FakeSystem) -> None:
    sup = make(fake)
    w = reload_to_exec(sup, fake)
    fake.exit(2, 1)
    fake.advance(1.5)
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert "exited (exit status 1) before it was ready" in w.result[1]
    assert "started the command afresh as generation 3" in w.result[1]
    assert fake.events[-1] == "spawn 3"
    assert len(fake.listeners) == 1, "the sockets stay held while the fresh one starts"
    assert not sup.stopping
    fresh = sup.gens[2]
    assert fresh.state is State.STARTING and fresh.pid != sup.gens[0].pid
    fake.listen(3, A)
    sup.on_notify(fresh)
    assert sup.current is fresh and state_of(fresh) is State.SERVING


def test_fresh_start_dying_too_keeps_the_sockets_and_tries_again(fake: FakeSystem) -> None:
    sup = make(fake)
    w = reload_to_exec(sup, fake)
    fake.exit(2, 1)
    fake.advance(1.5)
    sup.tick()
    assert w.result is not None and not w.result[0]
    fake.exit(3, 4)
    fake.advance(1.5)
    sup.tick()
    assert not sup.stopping, "the service is not taken down"
    assert [state_of(g) for g in sup.gens] == [State.EXITED] * 3
    assert len(fake.listeners) == 1, "the sockets stay held: clients queue"
    assert sup.status()["state"] == "down"
    fake.advance(0.6)
    sup.tick()
    fresh = sup.gens[3]
    assert state_of(fresh) is State.STARTING and fake.events[-1] == "spawn 4"
    fake.exit(4, 4)  # and again: a longer wait, still held
    fake.advance(0.1)
    sup.fleet.rescan_soon()
    sup.tick()
    fake.advance(0.6)
    sup.tick()
    assert len(sup.gens) == 4, "backoff: 1 s the second time"
    fake.advance(0.5)
    sup.tick()
    assert len(sup.gens) == 5
    fake.listen(5, A)
    sup.on_notify(sup.gens[4])
    assert sup.current is sup.gens[4] and state_of(sup.gens[4]) is State.SERVING
    sup.request_stop()
    assert sup.stopping


def test_image_not_ready_in_time_is_drained_and_the_command_started_afresh(
        fake: FakeSystem) -> None:
    sup = make(fake, ready_timeout=5.0)
    w = reload_to_exec(sup, fake)
    fake.advance(6)
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert "not ready after 5 s: it did not listen on 127.0.0.1:8000" in w.result[1]
    stuck = sup.gens[1]
    assert fake.gens[2].paused, "it may have accepted: drained, not killed"
    assert stuck.state is State.RETIRING and (stuck.pid, signal.SIGTERM) in fake.signals
    assert sup.upgrade is not None and sup.upgrade.gen is sup.gens[2] and sup.upgrade.fresh


def test_workers_of_the_old_image_are_retired_after_the_exec(fake: FakeSystem) -> None:
    sup = make(fake, kill_timeout=5.0)
    root = sup.gens[0].pid
    workers = {fake.fork(1), fake.fork(1)}
    fake.advance(2)
    sup.tick()
    assert sup.gens[0].pids == {root} | workers
    reload_to_exec(sup, fake)
    old, new = sup.gens
    assert fake.lives_on[1] == {root}
    assert old.state is State.RETIRING and old.pids == workers
    assert sorted(fake.signals) == sorted((p, signal.SIGTERM) for p in workers)
    fake.advance(2)
    sup.tick()
    assert new.pids == {root}, "the old workers are no members of the new image"
    for p in workers:
        fake.exit_pid(p)
    fake.advance(2)
    sup.tick()
    assert state_of(old) is State.EXITED and new.state is State.STARTING
    assert fake.reaped_for == [(root, workers)], "the root reaps the old image's workers"


def test_workers_forked_since_the_last_scan_are_paused_too(fake: FakeSystem) -> None:
    sup = make(fake)
    root = sup.gens[0].pid
    early = fake.fork(1)  # not yet seen by a membership scan
    fake.in_flight_by_pid[early] = 1
    sup.request_reload(Recorder())
    assert fake.paused_pids[1] == {root, early}, "the reload looks again before pausing"
    late = fake.fork(1)  # forked by a process that was not paused yet
    fake.advance(2)
    sup.tick()
    assert fake.paused_pids[1] == {root, early, late}
    assert fake.lives_on[1] == set(), "only the root lives on, and it was paused already"
    assert len(sup.gens) == 1, "no exec while a worker has a connection in flight"


def test_reload_while_draining_joins_the_same_exec(fake: FakeSystem) -> None:
    sup = make(fake)
    fake.in_flight_by_pid[sup.gens[0].pid] = 1
    w1, w2 = Recorder(), Recorder()
    sup.request_reload(w1)
    sup.request_reload(w2)
    fake.in_flight_by_pid[sup.gens[0].pid] = 0
    sup.tick()
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert w1.result == w2.result and w1.result is not None and w1.result[0]
    assert fake.events.count("exec 1 -> 2") == 1


def test_stop_while_draining_before_the_exec(fake: FakeSystem) -> None:
    sup = make(fake)
    fake.in_flight_by_pid[sup.gens[0].pid] = 1
    w = Recorder()
    sup.request_reload(w)
    sup.request_stop()
    assert w.result == (False, "hupt is stopping")
    fake.in_flight_by_pid[sup.gens[0].pid] = 0
    sup.tick()
    assert not any(e.startswith("exec") for e in fake.events)
    assert sup.gens[0].state is State.RETIRING


def test_attach_supervises_in_exec_mode_and_sees_the_exit_on_the_pidfd(
        fake: FakeSystem) -> None:
    sup = Supervisor(fake, Options(argv=["server"], env={}, exec_mode=True),
                     control=False)
    gen = sup.adopt(4242)
    assert sup.current is gen and gen.state is State.SERVING and gen.listened == {A}
    assert gen.pid == 4242 and 4242 in sup.endpoint.aliases
    exit_r = fake.exit_fds[1][0]
    assert watched_for(sup, exit_r) is gen
    reload_to_exec(sup, fake)
    new = sup.gens[1]
    assert new.pid == 4242 and new.exit_fd == exit_r and watched_for(sup, exit_r) is new
    fake.listen(2, A)
    sup.on_notify(new)
    # The server exits on its own: hupt is not its parent, the pidfd wakes the loop.
    fake.gens[2].pids = set()
    os.write(fake.exit_fds[2][1], b"x")
    sup.step()  # the pidfd is readable
    assert new.state is State.EXITED and sup.exit_code == 1, "status unknown, not asked to go"
    assert sup.loop.handler(exit_r) is None


# --- detaching hupt attach ------------------------------------------------------------


def attached(fake: FakeSystem, **kw: Any) -> Supervisor:
    opts = Options(argv=["server"], env={}, exec_mode=True,
                   detach_on_stop=True, **kw)
    sup = Supervisor(fake, opts, control=False)
    sup.adopt(4242)
    return sup


def signal_(sup: Supervisor, signum: int) -> None:
    sup._signals.append(signum)
    sup._handle_signals()


def test_stopping_hupt_attach_detaches_and_leaves_the_server_running(
        fake: FakeSystem) -> None:
    sup = attached(fake)
    notify_fd, exit_fd = sup.gens[0].notify_fd, sup.gens[0].exit_fd
    signal_(sup, signal.SIGTERM)
    assert sup.detached and not sup.stopping
    sup.fleet.rescan_soon()
    fake.gens[1].pids = set()  # no longer watched: hupt cannot see it any more
    sup.tick()
    assert sup.gens[0].state is State.SERVING and sup.exit_code is None, "not taken for exited"
    assert not fake.signals, "the server is not asked to stop"
    assert "forget 1" in fake.events, "its notify fd and pidfd are closed"
    for fd in (notify_fd, exit_fd):
        assert fd is not None and sup.loop.handler(fd) is None
    assert sup.gens[0].state is State.SERVING


def test_a_detach_during_a_reload_waits_for_its_outcome(fake: FakeSystem) -> None:
    sup = attached(fake)
    fake.in_flight_by_pid[4242] = 1
    w = Recorder()
    sup.request_reload(w)
    signal_(sup, signal.SIGINT)
    assert not sup.detached, "the server is paused: it must accept again first"
    fake.in_flight_by_pid[4242] = 0
    sup.tick()  # drained: execs
    assert not sup.detached
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert w.result is not None and w.result[0]
    sup.tick()
    assert sup.detached and not fake.signals


def test_on_a_terminal_a_detach_is_confirmed(fake: FakeSystem,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from hupt import log

    r, w = os.pipe()
    questions: list[str] = []
    monkeypatch.setattr(log, "prompt_fd", lambda: r)
    monkeypatch.setattr(log, "prompt", questions.append)
    try:
        sup = attached(fake, confirm_detach=True)
        signal_(sup, signal.SIGINT)
        assert not sup.detached and sup.loop.handler(r) is not None
        assert "ENOSYS" in questions[0] and questions[0].endswith("Detach? [y/N] ")
        os.write(w, b"n\n")
        answer(sup, r)
        assert not sup.detached and sup.detacher.asking is None
        signal_(sup, signal.SIGTERM)
        os.write(w, b"y\n")
        answer(sup, r)
        assert sup.detached
        sup2 = attached(fake, confirm_detach=True)
        signal_(sup2, signal.SIGINT)
        signal_(sup2, signal.SIGINT)  # a second interrupt while asking: at once
        assert sup2.detached and sup2.detacher.asking is None
    finally:
        os.close(r)
        os.close(w)


def test_without_a_terminal_a_detach_is_not_asked(fake: FakeSystem,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from hupt import log

    monkeypatch.setattr(log, "prompt_fd", lambda: None)
    sup = attached(fake, confirm_detach=True)
    signal_(sup, signal.SIGTERM)
    assert sup.detached


def test_hupt_run_still_stops_on_term(fake: FakeSystem) -> None:
    sup = make(fake)
    signal_(sup, signal.SIGTERM)
    assert sup.stopping and not sup.detached


def test_the_exec_gets_the_environment_a_spawned_generation_gets(
        fake: FakeSystem, tmp_path: object) -> None:
    from pathlib import Path

    from hupt.readiness import Policy

    pidfile = Path(str(tmp_path)) / "server.pid"
    sup = make(fake, ready=Policy("notify"), unlink=[str(pidfile)])
    try:
        (argv1, env1), = fake.spawns
        pidfile.write_text("101\n")  # the running server's own pidfile
        w = reload_to_exec(sup, fake)
        (argv2, env2), = fake.execs
        assert argv2 == argv1 == ["server"]
        # --ready notify: each image is told a socket of hupt's where its READY=1 counts.
        assert env1["NOTIFY_SOCKET"] != env2["NOTIFY_SOCKET"]
        assert env2["NOTIFY_SOCKET"] == ready_path(sup.gens[1])
        assert not pidfile.exists(), "--unlink runs before the exec too"
        fake.listen(2, A)
        sup.on_notify(sup.gens[1])
        assert w.result is None, "listening is not READY=1"
        # A READY=1 from one of its processes (this one, standing in for it).
        fake.gens[2].pids.add(os.getpid())
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", env2["NOTIFY_SOCKET"])
        sup.step()  # its NOTIFY_SOCKET is readable
        assert w.result is not None and w.result[0], w.result
    finally:
        sup.fleet.close()


def test_ending_the_drains_mid_reload_execs_at_once(fake: FakeSystem) -> None:
    sup = make(fake)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 2
    w = Recorder()
    sup.request_reload(w)
    sup.tick()
    assert len(sup.gens) == 1
    sup.end_draining()  # SIGUSR2, hupt stop --now
    assert "exec 1 -> 2" in fake.events and not fake.signals, "not retired: it execs"
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert w.result is not None and w.result[0] and sup.current is sup.gens[1]


B = Address(AF_INET, "127.0.0.1", 8001)


def test_a_new_address_after_an_exec_starts_no_second_copy(fake: FakeSystem) -> None:
    sup = make(fake)
    w = reload_to_exec(sup, fake)
    new = sup.gens[1]
    fake.listen(2, A)
    sup.on_notify(new)
    assert w.result is not None and w.result[0]
    fake.listen(2, B)  # an admin port opened later, on a signal
    sup.on_notify(new)
    fake.advance(5)
    sup.tick()
    assert [e for e in fake.events if e.startswith("spawn")] == ["spawn 1"], fake.events
    assert new.listened == {A, B} and len(fake.spawns) == 1


def test_an_attached_server_listening_on_a_new_address_is_held_like_any_other(
        fake: FakeSystem, capsys: pytest.CaptureFixture[str]) -> None:
    sup = attached(fake)
    gen = sup.gens[0]
    fake.listen(1, B)
    sup.on_notify(gen)
    fake.advance(5)
    sup.tick()
    assert gen.listened == {A, B} and not fake.spawns
    assert "internal error" not in capsys.readouterr().err


# -- --drain-signal: the server's exit becomes the exec ------------------------------------


def reload_followed(fake: FakeSystem, **kw: Any) -> tuple[Supervisor, Recorder]:
    sup = make(fake, drain_signal=signal.SIGTERM, **kw)
    fake.in_flight_by_pid[sup.gens[0].pid] = 2  # persistent clients
    w = Recorder()
    sup.request_reload(w)
    return sup, w


def test_with_a_drain_signal_the_root_is_followed_and_signalled(fake: FakeSystem) -> None:
    sup, w = reload_followed(fake)
    old = sup.gens[0]
    assert fake.events[-1] == "follow 1" and fake.following == {1: 2}
    assert fake.signals == [(old.pid, signal.SIGTERM)], "the root gets it: its exit is the exec"
    assert fake.gens[1].paused and old.state is State.DRAINING
    assert any("its exit becomes the exec" in m for m in w.messages)
    assert fake.execs[-1][0] == ["server"]


def test_the_followed_exit_becomes_the_new_generation(fake: FakeSystem) -> None:
    sup, w = reload_followed(fake)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 0
    sup.tick()
    assert len(sup.gens) == 1 and "unfollow 1" not in fake.events, \
        "drained: the server exits by itself; hupt does not exec it"
    fake.follow_results[1] = FollowResult(Followed.EXECED, "execed server in 2 ms")
    sup.reloader.poll_follow()  # what SIGCHLD does
    new = sup.gens[1]
    assert new.pid == old.pid and new.state is State.STARTING and old.replaced_by == 2
    assert "exec 1 -> 2" not in fake.events, "no second exec injected"
    fake.listen(2, A)
    sup.on_notify(new)
    assert w.result is not None and w.result[0], w.result
    assert sup.current is new


def test_a_drained_server_that_does_not_exit_is_execed_after_the_kill_timeout(
        fake: FakeSystem) -> None:
    sup, _w = reload_followed(fake, kill_timeout=5.0)
    fake.in_flight_by_pid[sup.gens[0].pid] = 0
    sup.tick()
    fake.advance(4)
    sup.tick()
    assert "unfollow 1" not in fake.events
    fake.advance(2)
    sup.tick()
    assert fake.events[-2:] == ["unfollow 1", "exec 1 -> 2"], fake.events
    assert sup.gens[1].state is State.STARTING


def test_the_drain_timeout_lets_go_and_execs(fake: FakeSystem) -> None:
    sup, _w = reload_followed(fake, drain_timeout=10.0)
    fake.advance(11)
    sup.tick()
    assert fake.events[-2:] == ["unfollow 1", "exec 1 -> 2"], fake.events


def test_an_exec_under_way_when_letting_go_is_waited_for(fake: FakeSystem) -> None:
    sup, _w = reload_followed(fake, drain_timeout=10.0)
    fake.exec_under_way = True
    fake.advance(11)
    sup.tick()
    assert "exec 1 -> 2" not in fake.events and sup.upgrade is not None
    assert sup.upgrade.follow is not None
    fake.advance(1)
    sup.tick()  # no busy loop: the loop's invariants hold (HUPT_STRICT)
    fake.follow_results[1] = FollowResult(Followed.EXECED, "execed")
    sup.reloader.poll_follow()
    assert sup.gens[1].state is State.STARTING


def test_a_failed_exec_at_the_exit_starts_the_command_afresh(fake: FakeSystem) -> None:
    sup, w = reload_followed(fake)
    old = sup.gens[0]
    fake.follow_results[1] = FollowResult(Followed.EXEC_FAILED, "execve server failed: ENOENT")
    sup.reloader.poll_follow()
    assert w.result is not None and not w.result[0]
    assert "could not exec at its exit" in w.result[1] and "ENOENT" in w.result[1]
    fresh = sup.gens[-1]
    assert fresh is not old and fresh.pid != old.pid and fresh.state is State.STARTING
    assert fake.listeners.get(A) is not None, "the socket stays held"
    fake.exit_pid(old.pid, 0)
    sup.fleet.refresh()
    sup.loop.run_later()
    fake.listen(fresh.number, A)
    sup.on_notify(fresh)
    assert sup.current is fresh and state_of(fresh) is State.SERVING


def test_the_root_exiting_while_followed_starts_the_command_afresh(fake: FakeSystem) -> None:
    sup, w = reload_followed(fake)
    old = sup.gens[0]
    fake.exit_pid(old.pid, -9)
    sup.fleet.refresh()
    sup.loop.run_later()
    assert w.result is not None and not w.result[0] and "before its exec" in w.result[1]
    assert fake.following == {}, "let go"
    assert sup.gens[-1].state is State.STARTING and sup.gens[-1].pid != old.pid


def test_a_root_killed_by_its_own_drain_signal_is_named_in_the_reason(
        fake: FakeSystem) -> None:
    """uvicorn raises SIGTERM again after its graceful stop: it dies of the signal,
    with no exit to turn into the exec; the reason says so and what to do."""
    sup, w = reload_followed(fake)
    fake.exit_pid(sup.gens[0].pid, -signal.SIGTERM)
    sup.fleet.refresh()
    sup.loop.run_later()
    assert w.result is not None and not w.result[0]
    reason = w.result[1]
    assert "\n" not in reason and "died of its --drain-signal SIGTERM" in reason, reason
    assert "without --drain-signal" in reason, reason


def test_a_root_that_cannot_be_followed_drains_without_the_signal(fake: FakeSystem) -> None:
    fake.follow_error = HuptError("thread 5 did not stop")
    sup, _w = reload_followed(fake)
    assert not fake.signals, "signalled without being followed, its exit would be final"
    fake.in_flight_by_pid[sup.gens[0].pid] = 0
    sup.tick()
    assert fake.events[-1] == "exec 1 -> 2"


def test_stopping_while_followed_lets_go(fake: FakeSystem) -> None:
    sup, w = reload_followed(fake)
    sup.request_stop()
    assert w.result == (False, "hupt is stopping")
    assert "unfollow 1" in fake.events and fake.following == {}


def test_a_failed_exec_at_the_exit_whose_fresh_start_fails_too_keeps_trying(
        fake: FakeSystem) -> None:
    sup, w = reload_followed(fake)
    old = sup.gens[0]
    fake.spawn_error = HuptError("cannot start 'server': exec: No such file or directory")
    fake.follow_results[1] = FollowResult(Followed.EXEC_FAILED, "execve server failed: ENOENT")
    sup.reloader.poll_follow()
    assert w.result is not None and not w.result[0] and "afresh failed" in w.result[1]
    fake.exit_pid(old.pid, 0)
    sup.fleet.refresh()
    sup.loop.run_later()
    assert not sup.stopping and sup.reviver.pending, "no generation serves: tried again"
    assert fake.listeners.get(A) is not None, "the socket stays held"
    fake.spawn_error = None
    fake.advance(60)
    sup.tick()
    fresh = sup.gens[-1]
    assert fresh.state is State.STARTING and fresh.pid != old.pid


def test_a_pause_that_failed_fails_the_exec_reload(fake: FakeSystem) -> None:
    """An orphaned filter (a killed hupt's) answered the injected bind with ENOSYS:
    the server may still accept, so nothing is execed and it serves on."""
    sup = make(fake)
    old = sup.gens[0]
    fake.pause_problems = ["pid 101: injected bind dummy (autobind) failed: ENOSYS"]
    w = reload_to_exec(sup, fake)
    assert w.result is not None and not w.result[0]
    assert "could not stop accepting" in w.result[1] and "ENOSYS" in w.result[1]
    assert not any(e.startswith("exec") for e in fake.events), fake.events
    assert fake.events[-1] == "resume 1"
    assert sup.current is old and old.state is State.SERVING and sup.upgrade is None
    fake.pause_problems = []
    w2 = reload_to_exec(sup, fake)
    assert "exec 1 -> 2" in fake.events and w2.result is None


# --- an attached command that never served is not started again (issue 11.6) -----------


def test_attached_command_that_fails_at_its_first_exec_is_not_started_again(
        fake: FakeSystem) -> None:
    sup = Supervisor(fake, Options(argv=["server", "--title-only"], env={}, exec_mode=True),
                     control=False)
    sup.adopt(4242)
    assert sup.fleet.last_serving == {A}, "what a generation started while none serves takes"
    w = reload_to_exec(sup, fake)
    assert fake.events[-1] == "exec 1 -> 2"
    fake.exit(2, 1)  # the exec'd image: the recorded command without its options
    fake.advance(1.5)
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert "has never served under hupt" in w.result[1]
    assert "hupt reload" in w.result[1] and "-- CMD ARGS" in w.result[1]
    assert not any(e.startswith("spawn") for e in fake.events), "the failed argv not retried"
    fake.advance(30)  # no backoff retry either, however long
    sup.tick()
    assert not any(e.startswith("spawn") for e in fake.events)
    assert not sup.stopping, "the service is not taken down"
    assert len(fake.listeners) == 1, "the sockets stay held: clients queue"
    assert sup.status()["state"] == "down"
    # The operator gives the real command: started on the held sockets, kept.
    w2 = Recorder()
    sup.request_reload(w2, change=Change(["server", "--config", "real.conf"]))
    assert fake.spawns[-1][0] == ["server", "--config", "real.conf"]
    fresh = sup.gens[-1]
    fake.listen(fresh.number, A)
    sup.on_notify(fresh)
    assert w2.result is not None and w2.result[0], w2.result
    assert sup.current is fresh and sup.opts.argv == ["server", "--config", "real.conf"]
    assert sup.fleet.command_served


def test_a_command_that_served_is_started_afresh_when_its_image_fails(
        fake: FakeSystem) -> None:
    """hupt run's command has served: a failed exec starts it afresh (item 5)."""
    sup = make(fake)
    assert sup.fleet.command_served
    reload_to_exec(sup, fake)
    fake.exit(2, 1)
    fake.advance(1.5)
    sup.tick()
    assert fake.events[-1] == "spawn 3"
