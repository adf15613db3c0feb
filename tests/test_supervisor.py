"""The reload state machine against a fake kernel seam (no root, no kernel)."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from hupt.address import AF_INET, Address
from hupt.generations import State
from hupt.supervisor import Options, Supervisor, Waiter
from hupt.upgrade import Phase
from tests.fakes import FakeSystem, state_of

A = Address(AF_INET, "127.0.0.1", 8000)
B = Address(AF_INET, "127.0.0.1", 8001)


class Recorder(Waiter):
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.result: tuple[bool, str] | None = None

    def progress(self, message: str) -> None:
        self.messages.append(message)

    def done(self, ok: bool, reason: str) -> None:
        assert self.result is None, "a waiter is told the outcome once"
        self.result = (ok, reason)


def make(fake: FakeSystem, **kw: Any) -> Supervisor:
    sup = Supervisor(fake, Options(argv=["server"], env={}, **kw), control=False)
    sup.start()
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    return sup


def test_first_generation_serves_and_records_its_listeners(fake: FakeSystem) -> None:
    sup = make(fake)
    assert sup.current is sup.gens[0]
    assert sup.gens[0].state is State.SERVING
    assert sup.gens[0].listened == {A}


def test_reload_ready_when_all_held_addresses_taken(fake: FakeSystem) -> None:
    sup = make(fake)
    fake.listen(1, B)
    sup.on_notify(sup.gens[0])
    w = Recorder()
    sup.request_reload(w)
    g2 = sup.gens[1]
    assert g2.state is State.STARTING and w.result is None
    fake.listen(2, A)
    sup.on_notify(g2)
    assert w.result is None, "not ready until every held address is taken"
    assert not fake.gens[1].paused, "the old generation accepts until the new one is ready"
    fake.listen(2, B)
    sup.on_notify(g2)
    assert w.result is not None and w.result[0]
    assert sup.current is g2
    assert sup.gens[0].state is State.DRAINING
    assert fake.events.index("pause 1") > fake.events.index("spawn 2")


def test_old_generation_retired_when_drained_then_killed_after_grace(fake: FakeSystem) -> None:
    sup = make(fake, kill_timeout=5.0)
    sup.request_reload(Recorder())
    fake.listen(2, A)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 2
    sup.on_notify(sup.gens[1])
    sup.tick()
    assert old.state is State.DRAINING and not fake.signals
    fake.in_flight_by_pid[old.pid] = 0
    sup.tick()
    assert state_of(old) is State.RETIRING
    assert fake.signals == [(old.pid, signal.SIGTERM)]
    fake.advance(5.1)
    sup.tick()
    assert (old.pid, signal.SIGKILL) in fake.signals
    fake.exit(1, 0)
    fake.advance(2)
    sup.tick()
    assert state_of(old) is State.EXITED


def test_drain_timeout_retires_with_connections_open(fake: FakeSystem) -> None:
    sup = make(fake, drain_timeout=10.0)
    sup.request_reload(Recorder())
    fake.listen(2, A)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 1
    sup.on_notify(sup.gens[1])
    fake.advance(9)
    sup.tick()
    assert old.state is State.DRAINING
    fake.advance(2)
    sup.tick()
    assert state_of(old) is State.RETIRING


def test_new_generation_exiting_fails_reload_and_old_keeps_serving(fake: FakeSystem) -> None:
    sup = make(fake)
    w = Recorder()
    sup.request_reload(w)
    fake.exit(2, 3)
    fake.advance(1.5)
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert "exited (exit status 3) before it was ready" in w.result[1]
    assert sup.current is sup.gens[0] and sup.gens[0].state is State.SERVING
    assert not fake.gens[1].paused
    assert not sup.stopping


def test_ready_timeout_names_missing_addresses_and_drains_the_failed_one(fake: FakeSystem) -> None:
    sup = make(fake, ready_timeout=30.0)
    fake.listen(1, B)
    sup.on_notify(sup.gens[0])
    w = Recorder()
    sup.request_reload(w)
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    fake.in_flight_by_pid[sup.gens[1].pid] = 1
    fake.advance(31)
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert "127.0.0.1:8001" in w.result[1] and "127.0.0.1:8000" not in w.result[1]
    assert sup.gens[1].state is State.DRAINING, "it may have accepted: drained, not killed"
    assert fake.gens[2].paused and not fake.gens[1].paused
    assert sup.current is sup.gens[0]


def test_second_request_while_starting_waits_for_the_same_outcome(fake: FakeSystem) -> None:
    sup = make(fake)
    w1, w2 = Recorder(), Recorder()
    sup.request_reload(w1)
    sup.request_reload(w2)
    assert len(sup.gens) == 2, "at most one generation is starting"
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert w1.result == w2.result and w1.result is not None and w1.result[0]


def test_reload_while_older_generation_drains(fake: FakeSystem) -> None:
    sup = make(fake)
    fake.in_flight_by_pid[sup.gens[0].pid] = 1
    for n in (2, 3):
        w = Recorder()
        sup.request_reload(w)
        fake.listen(n, A)
        sup.on_notify(sup.gens[n - 1])
        assert w.result is not None and w.result[0]
    assert [g.state for g in sup.gens] == [State.DRAINING, State.DRAINING, State.SERVING]


def test_spawn_failure_reports_and_keeps_old(fake: FakeSystem) -> None:
    from hupt.tracer.spawn import SpawnError

    sup = make(fake)
    fake.spawn_error = SpawnError("cannot start 'server': exec: No such file or directory")
    w = Recorder()
    sup.request_reload(w)
    assert w.result is not None and not w.result[0] and "No such file" in w.result[1]
    assert sup.upgrade is None and sup.current is sup.gens[0]


def test_stop_drains_everything_and_exit_status(fake: FakeSystem) -> None:
    sup = make(fake)
    sup.request_stop()
    assert sup.gens[0].state is State.DRAINING and fake.gens[1].paused
    sup.tick()
    assert state_of(sup.gens[0]) is State.RETIRING
    fake.reaped.append((sup.gens[0].pid, -signal.SIGTERM))  # died of the stop signal
    fake.gens[1].pids = set()
    fake.advance(2)
    sup.tick()
    assert sup.exit_code == 0


def test_server_exiting_on_its_own_stops_hupt_with_its_status(fake: FakeSystem) -> None:
    sup = make(fake)
    fake.exit(1, 7)
    fake.advance(2)
    sup.tick()
    assert sup.exit_code == 7 and sup.stopping


def test_reload_refused_while_stopping(fake: FakeSystem) -> None:
    sup = make(fake)
    sup.request_stop()
    w = Recorder()
    sup.request_reload(w)
    assert w.result == (False, "hupt is stopping")


def test_no_busy_loop_after_a_retired_generation_exits(fake: FakeSystem) -> None:
    """An exited generation's kill deadline must not keep the loop's timeout at 0."""
    sup = make(fake, kill_timeout=5.0)
    sup.request_reload(Recorder())
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    sup.tick()
    assert sup.gens[0].state is State.RETIRING
    fake.exit(1, 0)
    fake.advance(1)
    sup.tick()
    assert state_of(sup.gens[0]) is State.EXITED
    fake.advance(10)  # long past the old kill deadline
    sup.tick()
    assert sup.loop.timeout() > 0.1


def test_ready_delay_waits_after_listening(fake: FakeSystem) -> None:
    from hupt.readiness import Policy

    sup = make(fake, ready=Policy("delay", delay=2.0))
    w = Recorder()
    sup.request_reload(w)
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert w.result is None and sup.gens[1].state is State.STARTING
    fake.advance(1.0)
    sup.tick()
    assert w.result is None
    fake.advance(1.1)
    sup.tick()
    assert w.result is not None and w.result[0] and sup.current is sup.gens[1]


def test_revive_restarts_with_backoff_and_holds_the_addresses(fake: FakeSystem) -> None:
    sup = make(fake, revive=True)
    fake.exit(1, 1)
    fake.advance(2)
    sup.tick()
    assert not sup.stopping and sup.current is None
    assert len(sup.gens) == 1, "not before the backoff"
    fake.advance(0.6)
    sup.tick()
    assert len(sup.gens) == 2
    assert sup.upgrade is not None and sup.upgrade.target == {A}
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert sup.current is sup.gens[1] and sup.gens[1].state is State.SERVING
    # A second crash right away waits longer (exponential backoff).
    fake.exit(2, 1)
    sup.fleet.rescan_soon()  # what its SIGCHLD does
    fake.advance(2)
    sup.tick()  # the crash is seen: next start in 1 s
    assert len(sup.gens) == 2
    fake.advance(0.6)
    sup.tick()
    assert len(sup.gens) == 2, "0.5 s is not enough the second time"
    fake.advance(0.5)
    sup.tick()
    assert len(sup.gens) == 3


def test_membership_is_polled_seldom_in_steady_state_and_often_in_motion(
        fake: FakeSystem) -> None:
    sup = make(fake)
    scans: list[float] = []
    members = fake.members

    def counting(roots: dict[int, int]) -> dict[int, set[int]]:
        scans.append(fake.clock)
        return members(roots)

    fake.members = counting  # type: ignore[method-assign]
    for _ in range(30):
        fake.advance(1)
        sup.tick()
    assert len(scans) == 3, "steady state: every 10 s (SIGCHLD and pidfds report exits)"
    worker = fake.fork(1)
    sup.request_reload(Recorder())
    assert len(scans) == 4 and worker in sup.gens[0].pids, "a reload looks first"
    for _ in range(5):
        fake.advance(1)
        sup.tick()
    assert len(scans) == 9, "a reload in progress: every second"
    sup.fleet.rescan_soon()  # SIGCHLD
    sup.tick()
    assert len(scans) == 10


def multi(fake: FakeSystem, **kw: Any) -> Supervisor:
    """A first generation of three --multi copies, all serving."""
    sup = make(fake, multi=3, **kw)
    fake.advance(1)
    sup.tick()  # the other copies start once the first has listened
    gen = sup.gens[0]
    assert len(gen.copies) == 3 and gen.pids == set(gen.copies)
    return sup


def test_multi_revive_replaces_a_crashed_copy_alone(fake: FakeSystem) -> None:
    sup = multi(fake, revive=True)
    gen = sup.gens[0]
    crashed = gen.copies[1]
    fake.exit_pid(crashed, 1)
    sup.fleet.rescan_soon()
    sup.tick()
    assert crashed not in gen.copies and len(gen.copies) == 2
    assert sup.current is gen and gen.state is State.SERVING and len(sup.gens) == 1
    fake.advance(0.6)
    sup.tick()
    assert len(gen.copies) == 3 and crashed not in gen.copies, "a new copy, same generation"
    assert fake.events.count("spawn 1 copy") == 3
    # The first copy (the generation's root pid) may crash too: the rest serve on.
    fake.exit_pid(gen.pid, 1)
    fake.advance(0.1)
    sup.fleet.rescan_soon()
    sup.tick()
    fake.advance(1.1)  # right after the last crash: twice the backoff
    sup.tick()
    assert len(gen.copies) == 3 and gen.state is State.SERVING and not sup.stopping


def test_multi_without_revive_serves_on_with_fewer_copies(fake: FakeSystem) -> None:
    sup = multi(fake)
    gen = sup.gens[0]
    fake.exit_pid(gen.copies[2], 1)
    sup.fleet.rescan_soon()
    sup.tick()
    fake.advance(5)
    sup.tick()
    assert len(gen.copies) == 2 and gen.state is State.SERVING and not sup.stopping


def test_copies_of_a_replaced_generation_are_not_revived(fake: FakeSystem) -> None:
    sup = multi(fake, revive=True)
    old = sup.gens[0]
    sup.request_reload(Recorder())
    for _ in range(3):
        fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    fake.advance(1)
    sup.tick()
    assert sup.current is sup.gens[1] and old.state in (State.DRAINING, State.RETIRING)
    fake.exit_pid(old.copies[0], 1)
    sup.fleet.rescan_soon()
    sup.tick()
    fake.advance(5)
    sup.tick()
    assert fake.events.count("spawn 1 copy") == 2, "no copy started for a generation on its way out"


def test_a_copy_exiting_0_is_not_a_crash(fake: FakeSystem) -> None:
    # It may have daemonized: its server lives on below hupt, under the same marker.
    sup = multi(fake, revive=True)
    gen = sup.gens[0]
    fake.exit_pid(gen.copies[1], 0)
    sup.fleet.rescan_soon()
    sup.tick()
    fake.advance(5)
    sup.tick()
    assert len(gen.copies) == 3 and fake.events.count("spawn 1 copy") == 2


def test_reload_history_and_status(fake: FakeSystem) -> None:
    sup = make(fake)
    sup.request_reload(Recorder())
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    fake.spawn_error = __import__("hupt.tracer.spawn", fromlist=["SpawnError"]).SpawnError("nope")
    sup.request_reload(Recorder())
    doc = sup.status()
    assert [r["ok"] for r in doc["reloads"]] == [True, False]
    assert doc["reloads"][1]["reason"] == "nope"
    assert [g["state"] for g in doc["generations"]] == ["draining", "serving"]
    assert doc["listeners"][0]["address"] == "127.0.0.1:8000"


def test_a_bug_in_a_handler_does_not_take_the_supervisor_down(
        fake: FakeSystem, capsys: pytest.CaptureFixture[str]) -> None:
    import os as _os

    sup = make(fake)

    def broken(number: int) -> None:
        raise RuntimeError("boom")

    fake.service = broken  # type: ignore[assignment, method-assign]
    _os.write(fake.gens[1].wfd, b"x")  # the generation's notify fd is readable
    sup.step()
    assert "internal error handling notify" in capsys.readouterr().err
    assert sup.current is sup.gens[0] and not sup.stopping


class RecordingNotifier:
    """What hupt tells its service manager (sd_notify), in order."""

    def __init__(self) -> None:
        self.said: list[str] = []

    def ready(self, status: str) -> None:
        self.said.append("READY")

    def reloading(self, status: str) -> None:
        self.said.append("RELOADING")

    def stopping(self, status: str) -> None:
        self.said.append("STOPPING")

    def status(self, status: str) -> None:
        self.said.append(f"STATUS={status}")


def make_notified(fake: FakeSystem, **kw: Any) -> tuple[Supervisor, RecordingNotifier]:
    n = RecordingNotifier()
    sup = Supervisor(fake, Options(argv=["server"], env={}, **kw),
                     control=False, notifier=n)
    sup.start()
    return sup, n


def test_first_generation_is_announced_ready_by_the_ready_policy(fake: FakeSystem) -> None:
    from hupt.readiness import Policy

    sup, n = make_notified(fake, ready=Policy("delay", delay=2.0))
    sup.tick()
    assert n.said == [], "not ready before it listened"
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    assert sup.gens[0].state is State.SERVING, "it serves at once: there is nobody else"
    assert n.said == [], "--ready delay:2 is readiness, not the first listen()"
    assert 1.9 < sup.loop.timeout() <= 2.0, "the loop wakes up for it"
    fake.advance(1.0)
    sup.tick()
    assert n.said == []
    fake.advance(1.1)
    sup.tick()
    assert n.said == ["READY"]
    sup.tick()
    assert n.said == ["READY"], "said once"


def test_first_generation_not_yet_ready_is_announced_by_the_reload_that_replaces_it(
        fake: FakeSystem) -> None:
    from hupt.readiness import Policy

    sup, n = make_notified(fake, ready=Policy("delay", delay=5.0))
    sup.request_reload(Recorder())  # before generation 1 has even listened
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    fake.advance(2)
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])  # its own delay would end at 7 s
    fake.advance(3.1)
    sup.tick()
    assert sup.current is sup.gens[1]
    assert n.said == ["RELOADING", "READY"], n.said
    fake.advance(10)
    sup.tick()
    assert n.said == ["RELOADING", "READY"], "generation 1's delay no longer counts"


def test_no_ready_after_stopping_and_no_reloading_for_a_revive(fake: FakeSystem) -> None:
    sup, n = make_notified(fake, revive=True)
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    assert n.said == ["READY"]
    fake.exit(1, 1)
    fake.advance(2)
    sup.tick()
    fake.advance(0.6)
    sup.tick()
    assert sup.upgrade is not None and sup.upgrade.revive
    assert n.said == ["READY"], "a revive is no reload to the service manager"
    sup.request_stop()
    assert n.said == ["READY", "STOPPING"], "the revive given up says no READY=1 after STOPPING"


def test_a_generation_whose_connections_cannot_be_counted_drains_until_the_timeout(
        fake: FakeSystem) -> None:
    sup = make(fake, drain_timeout=10.0)
    sup.request_reload(Recorder())
    fake.listen(2, A)
    old = sup.gens[0]
    fake.uncountable = True
    sup.on_notify(sup.gens[1])
    fake.advance(5)
    sup.tick()
    assert old.state is State.DRAINING, "unknown is not 0 in flight"
    fake.advance(5.1)
    sup.tick()
    assert state_of(old) is State.RETIRING


def test_busy_loop_free_while_a_before_reload_hook_outlives_the_ready_timeout(
        fake: FakeSystem, tmp_path: object) -> None:
    sup = make(fake, ready_timeout=1.0, before_reload="sleep 30")
    sup.request_reload(Recorder())
    try:
        fake.advance(5)
        sup.tick()
        assert sup.upgrade is not None and sup.upgrade.phase is Phase.BEFORE
        assert sup.loop.timeout() > 0.05, "the ready deadline does not count while the hook runs"
    finally:
        assert sup.upgrade is not None and sup.upgrade.hook is not None
        sup.upgrade.hook.kill()


def test_a_daemons_crash_is_the_generations_exit_status(fake: FakeSystem) -> None:
    sup = make(fake)
    root = sup.gens[0].pid
    daemon = fake.fork(1)
    sup.settle()
    fake.exit_pid(root, 0)  # the root daemonized: exits 0, its child serves on
    sup.settle()
    assert sup.current is sup.gens[0] and not sup.stopping
    fake.exit_pid(daemon, 6)  # a subreaper's orphan: hupt reaps it
    sup.fleet.rescan_soon()  # its SIGCHLD
    fake.advance(2)
    sup.tick()
    assert sup.stopping and sup.exit_code == 6


def test_exited_generations_are_not_kept_forever(fake: FakeSystem) -> None:
    from hupt.supervisor import KEEP_EXITED

    sup = make(fake)
    for n in range(2, 40):
        sup.request_reload(Recorder())
        fake.listen(n, A)
        sup.on_notify(sup.gens[-1])
        fake.exit(n - 1, 0)
        fake.advance(1.1)
        sup.tick()
    assert sup.current is not None and sup.current.number == 39, "numbers go on"
    assert len(sup.gens) <= KEEP_EXITED + 1
    assert [g.number for g in sup.gens] == list(range(39 - KEEP_EXITED, 40))


def test_generation_1_is_not_announced_during_a_reload_or_after_stopping(
        fake: FakeSystem) -> None:
    from hupt.readiness import Policy

    sup, n = make_notified(fake, ready=Policy("delay", delay=2.0))
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    sup.request_reload(Recorder())  # generation 2 never listens: the reload fails
    fake.advance(2.5)
    sup.tick()
    assert n.said == ["RELOADING"], "no READY=1 of generation 1's in the middle of a reload"
    assert sup.loop.timeout() > 0.05, "and no busy loop meanwhile"
    fake.advance(30)
    sup.tick()
    assert sup.upgrade is None and sup.current is sup.gens[0]
    assert n.said == ["RELOADING", "READY"], n.said  # the failed reload's end
    sup.request_stop()
    fake.advance(5)
    sup.tick()
    assert n.said == ["RELOADING", "READY", "STOPPING"], n.said


def test_a_failed_exec_ends_the_reload_for_the_service_manager(fake: FakeSystem) -> None:
    from hupt.errors import InjectionError

    n = RecordingNotifier()
    sup = Supervisor(fake, Options(argv=["server"], env={}, exec_mode=True),
                     control=False, notifier=n)
    sup.start()
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    fake.exec_error = InjectionError("execve", 2)
    sup.request_reload(Recorder())
    sup.tick()
    assert n.said == ["READY", "RELOADING", "READY"], n.said


def test_exec_reloads_keep_no_bookkeeping_of_replaced_generations(fake: FakeSystem) -> None:
    from hupt.supervisor import KEEP_EXITED

    sup = Supervisor(fake, Options(argv=["server"], env={}, exec_mode=True),
                     control=False)
    sup.start()
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    for n in range(2, 40):
        w = Recorder()
        sup.request_reload(w)
        sup.tick()
        fake.listen(n, A)
        sup.on_notify(sup.gens[-1])
        assert w.result is not None and w.result[0], w.result
    assert sup.current is not None and sup.current.number == 39
    assert len(sup.gens) <= KEEP_EXITED + 1
    assert {g.number for g in sup.gens if g.env is not None} == {39}


def test_a_new_generation_dying_while_the_old_one_drains_rolls_back_to_it(
        fake: FakeSystem) -> None:
    sup = make(fake)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 1  # still draining when the new one dies
    w = Recorder()
    sup.request_reload(w)
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert w.result is not None and w.result[0] and state_of(old) is State.DRAINING
    fake.exit(2, 1)
    sup.fleet.rescan_soon()
    fake.advance(0.5)
    sup.tick()
    assert sup.current is old and state_of(old) is State.SERVING
    assert not sup.stopping and sup.exit_code is None
    assert "resume 1" in fake.events
    assert not fake.gens[1].paused, "it accepts again"
    fake.advance(120)  # far past the drain timeout it had
    sup.tick()
    assert state_of(old) is State.SERVING and not fake.signals


def test_no_roll_back_to_a_generation_that_never_served(fake: FakeSystem) -> None:
    sup = make(fake, ready_timeout=5.0)
    sup.request_reload(Recorder())  # generation 2 never listens: failed, drained
    fake.in_flight_by_pid[sup.gens[1].pid] = 1
    fake.advance(6)
    sup.tick()
    assert state_of(sup.gens[1]) is State.DRAINING
    fake.exit(1, 3)  # the serving one dies
    sup.fleet.rescan_soon()
    sup.tick()
    assert sup.stopping and sup.exit_code == 3


def test_stop_refuses_new_connections_unless_a_process_still_holds_a_listener(
        fake: FakeSystem, capsys: pytest.CaptureFixture[str]) -> None:
    sup = make(fake)
    fake.holders = {4242: [A]}  # its pause failed: it holds the real listener
    sup.request_stop()
    assert not fake.refused_new, "a shut-down listener would spin its accept()"
    err = capsys.readouterr().err
    assert "pid 4242" in err and "still holds 127.0.0.1:8000" in err, err
    sup2_fake = FakeSystem()
    try:
        sup2 = make(sup2_fake)
        sup2.request_stop()
        assert sup2_fake.refused_new
    finally:
        sup2_fake.close()
