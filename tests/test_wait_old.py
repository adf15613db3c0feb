"""`hupt reload --wait-old` against the fake kernel seam, and its command line."""

from __future__ import annotations

import signal

import pytest

from hupt import cli
from hupt.generations import State
from tests.fakes import FakeSystem, state_of
from tests.test_output import Detailed
from tests.test_signal import A, make, reload
from tests.test_supervisor import Recorder

# -- waiting --------------------------------------------------------------------


def test_wait_old_answers_once_the_old_generation_has_exited(fake: FakeSystem) -> None:
    sup = make(fake, kill_timeout=5.0)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 2
    w = Detailed()
    reload(sup, fake, w, wait_old=True)
    assert w.result is None, "not before the old generation is gone"
    assert any("waiting for generation 1" in m for m in w.messages), w.messages
    fake.advance(3)
    fake.in_flight_by_pid[old.pid] = 0
    sup.tick()  # drained: retired (stop signal)
    assert state_of(old) is State.RETIRING and w.result is None
    fake.advance(0.5)
    fake.exit(1, 0)
    fake.advance(1)
    sup.tick()
    assert w.result is not None and w.result[0], w.result
    assert "is ready" in w.result[1] and "generation 1 (pid 101) has exited" in w.result[1]
    (fig,) = w.details["old_generations"]
    assert fig["generation"] == 1 and fig["drain_end"] == "drained"
    assert fig["open_at_end"] == 0 and fig["drain_s"] == pytest.approx(3.0)
    assert fig["exit"] == "exit status 0" and not fig["killed"]
    assert fig["exited_after_s"] == pytest.approx(4.5)
    assert "ended by no connections in flight" in fig["summary"]


def test_wait_old_reports_a_drain_timeout_and_a_kill(fake: FakeSystem) -> None:
    sup = make(fake, drain_timeout=10.0, kill_timeout=2.0)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 3
    w = Detailed()
    reload(sup, fake, w, wait_old=True)
    fake.advance(10.5)
    sup.tick()  # drain timeout: stop signal
    fake.advance(2.5)
    sup.tick()  # kill timeout: SIGKILL
    assert (old.pid, signal.SIGKILL) in fake.signals
    fake.exit(1, -9)
    fake.advance(1)
    sup.tick()
    assert w.result is not None and w.result[0]
    (fig,) = w.details["old_generations"]
    assert fig["drain_end"] == "timeout" and fig["open_at_end"] == 3 and fig["killed"]
    assert fig["exit"] == "killed by SIGKILL"
    assert "ended by the drain timeout, 3 connection(s) still open" in fig["summary"]


def test_wait_old_waits_for_every_older_generation(fake: FakeSystem) -> None:
    sup = make(fake)
    first = sup.gens[0]
    fake.in_flight_by_pid[first.pid] = 1
    reload(sup, fake, Recorder())  # generation 1 drains on
    second = sup.gens[1]
    w = Detailed()
    reload(sup, fake, w, wait_old=True)
    fake.exit(2, 0)
    fake.advance(1.5)
    sup.tick()
    assert w.result is None, "generation 1 still runs"
    fake.exit(1, 0)
    fake.advance(1.5)
    sup.tick()
    assert w.result is not None and w.result[0]
    assert [f["generation"] for f in w.details["old_generations"]] == [first.number,
                                                                        second.number]
    assert f"{first} exited (exit status 0)" in w.messages


def test_wait_old_reports_a_failed_reload_at_once(fake: FakeSystem) -> None:
    sup = make(fake)
    w = Detailed()
    sup.request_reload(w, wait_old=True)
    fake.exit(2, 3)
    fake.advance(1.5)
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert "exited (exit status 3) before it was ready" in w.result[1]
    assert "old_generations" not in w.details


def test_wait_old_after_a_rollback_is_a_failure(fake: FakeSystem) -> None:
    sup = make(fake)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 1
    w = Detailed()
    reload(sup, fake, w, wait_old=True)
    fake.exit(2, 1)  # the new generation dies while the old one drains
    fake.advance(1.5)
    sup.tick()
    assert sup.current is old
    assert w.result is not None and not w.result[0]
    assert "generation 1 (pid 101) serves again" in w.result[1]


def test_wait_old_in_exec_mode_is_over_at_the_exec(fake: FakeSystem) -> None:
    sup = make(fake, exec_mode=True)
    w = Detailed()
    sup.request_reload(w, wait_old=True)
    sup.tick()  # nothing in flight: exec
    new = sup.gens[-1]
    fake.listen(new.number, A)
    sup.on_notify(new)
    assert w.result is not None and w.result[0], w.result
    (fig,) = w.details["old_generations"]
    assert fig["exit"] == "its root process runs generation 2"


def test_wait_old_when_hupt_exits_first(fake: FakeSystem) -> None:
    sup = make(fake)
    fake.in_flight_by_pid[sup.gens[0].pid] = 1
    w = Detailed()
    reload(sup, fake, w, wait_old=True)
    for old in sup._old_waiters:
        old.abandon("hupt exited")
    assert w.result is not None and not w.result[0]
    assert "hupt exited before generation 1 (pid 101) exited" in w.result[1]


# -- the command line ------------------------------------------------------------------------------


def test_reload_takes_wait_old() -> None:
    p = cli.build_parser()
    assert p.parse_args(["reload", "--wait-old", "web"]).wait_old
    assert not p.parse_args(["reload", "web"]).wait_old


def test_the_old_generations_figures_come_before_the_outcome(
        capsys: pytest.CaptureFixture[str]) -> None:
    cli._print_details({"old_generations": [{"summary": "generation 3 (pid 8): drained"},
                                            {"summary": "generation 2 (pid 7): drained"}]})
    assert capsys.readouterr().err.splitlines() == [
        "hupt: generation 3 (pid 8): drained", "hupt: generation 2 (pid 7): drained"]
