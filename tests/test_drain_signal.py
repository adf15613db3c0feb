"""--drain-signal and what holds a drain, against the fake kernel seam.

The signal goes to a generation once it stops accepting for good (promoted
successor, failed reload, hupt stopping), never while a --ready http probe
has merely paused it, never to one that is rolled back; the drain timeout,
the stop signal and SIGKILL still follow.  A slow drain says once what holds
it, in the log, to `hupt stop` and in `hupt status`.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterable
from typing import Any

import pytest

from hupt import cli, status
from hupt.draining import DRAIN_REPORT_AFTER
from hupt.generations import State
from hupt.supervisor import Supervisor
from tests.fakes import FakeSystem, state_of
from tests.test_supervisor import A, Recorder, make
from tests.test_upgrade import answer_probe, http_port, http_sup

__all__ = ["http_port"]  # the fixture, used by name below

QUIT = signal.SIGQUIT
TERM = signal.SIGTERM


class EventfulSystem(FakeSystem):
    """The fake seam, with each signal also in ``events`` (its order against pause/seal)."""

    def signal(self, pids: Iterable[int], sig: int) -> None:
        pids = list(pids)
        super().signal(pids, sig)
        self.events.append(f"signal {signal.Signals(sig).name} {sorted(pids)}")


@pytest.fixture
def efake() -> Any:
    f = EventfulSystem()
    yield f
    f.close()


def reload_to_2(sup: Supervisor, fake: FakeSystem) -> Recorder:
    w = Recorder()
    sup.request_reload(w)
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    return w


def sent(fake: FakeSystem, sig: int) -> set[int]:
    return {p for p, s in fake.signals if s == sig}


def test_drain_signal_goes_to_the_old_generation_at_promotion_only(efake: FakeSystem) -> None:
    sup = make(efake, drain_signal=QUIT)
    old = sup.gens[0]
    worker = efake.fork(1)
    sup.fleet.refresh()
    w = Recorder()
    sup.request_reload(w)
    assert efake.signals == [], "nothing is sent while the new generation starts"
    efake.in_flight_by_pid[old.pid] = 1
    efake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert w.result is not None and w.result[0]
    assert sent(efake, QUIT) == {old.pid, worker}, "every process of the old generation"
    assert efake.events.index("pause 1") < efake.events.index(
        f"signal SIGQUIT {sorted({old.pid, worker})}"), "after it stopped accepting"
    assert sup.gens[1].pid not in {p for p, _ in efake.signals}
    assert old.state is State.DRAINING, "hupt still counts what is in flight"
    sup.tick()
    assert old.state is State.DRAINING and sent(efake, TERM) == set()
    efake.in_flight_by_pid[old.pid] = 0
    efake.advance(0.2)
    sup.tick()
    assert state_of(old) is State.RETIRING and sent(efake, TERM) == {old.pid, worker}, \
        "then the stop signal, as without a drain signal"
    assert [s for _, s in efake.signals].count(QUIT) == 2, "sent once per process"


def test_without_drain_signal_nothing_is_sent_before_the_drain_ends(fake: FakeSystem) -> None:
    sup = make(fake)
    fake.in_flight_by_pid[sup.gens[0].pid] = 1
    reload_to_2(sup, fake)
    sup.tick()
    assert fake.signals == []


def test_http_probe_pauses_without_the_drain_signal_which_comes_after_the_seal(
        efake: FakeSystem, http_port: socket.socket) -> None:
    sup, addr = http_sup(efake, http_port.getsockname()[1], drain_signal=QUIT)
    old = sup.gens[0]
    w = Recorder()
    sup.request_reload(w)
    efake.listen(2, addr)
    sup.on_notify(sup.gens[1])
    assert "pause 1" in efake.events and efake.signals == [], \
        "paused for the probe, maybe to accept again: not asked to drain"
    answer_probe(http_port, "200 OK", sup)
    assert w.result is not None and w.result[0], w.result
    assert sent(efake, QUIT) == {old.pid}
    assert efake.events.index("seal 1") < efake.events.index(f"signal SIGQUIT [{old.pid}]")


def test_a_rolled_back_generation_never_gets_the_drain_signal(
        efake: FakeSystem, http_port: socket.socket) -> None:
    sup, addr = http_sup(efake, http_port.getsockname()[1], drain_signal=QUIT,
                         ready_timeout=5.0)
    old = sup.gens[0]
    w = Recorder()
    sup.request_reload(w)
    efake.listen(2, addr)
    sup.on_notify(sup.gens[1])
    answer_probe(http_port, "503 Service Unavailable", sup)
    efake.advance(5.1)
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert sup.current is old and state_of(old) is State.SERVING
    assert old.pid not in sent(efake, QUIT), "it serves on"
    assert sent(efake, QUIT) == {sup.gens[1].pid}, "the failed one drains itself"


def test_the_drain_timeout_still_ends_a_drain_the_server_does_not_finish(
        fake: FakeSystem) -> None:
    sup = make(fake, drain_signal=QUIT, drain_timeout=10.0, kill_timeout=5.0)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 3
    reload_to_2(sup, fake)
    assert sent(fake, QUIT) == {old.pid}
    fake.advance(9.5)
    sup.tick()
    assert old.state is State.DRAINING
    fake.advance(0.6)
    sup.tick()
    assert state_of(old) is State.RETIRING and sent(fake, TERM) == {old.pid}
    fake.advance(5.1)
    sup.tick()
    assert old.pid in sent(fake, signal.SIGKILL)


def test_a_process_found_after_the_pause_is_asked_to_drain_too(fake: FakeSystem) -> None:
    sup = make(fake, drain_signal=QUIT)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 1
    reload_to_2(sup, fake)
    late = fake.fork(1)
    fake.advance(1.1)  # the next membership scan finds it
    sup.tick()
    assert late in sent(fake, QUIT)
    assert [p for p, s in fake.signals if s == QUIT].count(old.pid) == 1


def test_stop_sends_the_drain_signal_and_its_exit_is_the_one_asked_for(
        fake: FakeSystem) -> None:
    sup = make(fake, drain_signal=QUIT)
    g = sup.gens[0]
    fake.in_flight_by_pid[g.pid] = 1
    sup.request_stop()
    assert sent(fake, QUIT) == {g.pid} and g.state is State.DRAINING
    fake.exit(1, 0)  # it finished its connections and exited
    fake.advance(0.2)
    sup.tick()
    assert state_of(g) is State.EXITED and g.retired_by_hupt
    assert sup.exit_code == 0


def test_a_slow_drain_says_once_what_holds_it(fake: FakeSystem) -> None:
    sup = make(fake)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 2
    reload_to_2(sup, fake)
    stop = Recorder()
    sup.request_stop(waiter=stop)
    for _ in range(int(DRAIN_REPORT_AFTER * 10) + 30):
        fake.advance(0.1)
        sup.tick()
    said = [m for m in stop.messages if "still open" in m]
    assert len(said) == 1, stop.messages
    assert f"{old}: 2 connection(s) still open" in said[0]
    assert "--drain-signal" in said[0]
    doc = sup.status()
    g1 = next(g for g in doc["generations"] if g["number"] == 1)
    assert g1["in_flight"] == 2 and g1["drain_signal"] is None
    assert g1["draining_s"] >= DRAIN_REPORT_AFTER
    assert "(the oldest open for" in said[0], said
    assert g1["oldest_connection_s"] is not None
    assert g1["oldest_connection_s"] >= DRAIN_REPORT_AFTER


def test_the_oldest_connection_is_followed_by_identity(fake: FakeSystem) -> None:
    """A connection that closes and another that opens: the age is the survivor's."""
    sup = make(fake)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 2
    reload_to_2(sup, fake)
    for _ in range(30):
        fake.advance(0.1)
        sup.tick()
    first = next(g for g in sup.status()["generations"] if g["number"] == 1)
    assert first["oldest_connection_s"] >= 2.5
    fake.in_flight_by_pid[old.pid] = 1  # the same first one stays
    fake.advance(1)
    sup.tick()
    later = next(g for g in sup.status()["generations"] if g["number"] == 1)
    assert later["oldest_connection_s"] >= first["oldest_connection_s"] + 0.9
    assert sup.status()["generations"][-1]["oldest_connection_s"] is None  # serving


def test_a_slow_drain_after_the_drain_signal_names_the_signal(fake: FakeSystem) -> None:
    sup = make(fake, drain_signal=QUIT)
    old = sup.gens[0]
    fake.in_flight_by_pid[old.pid] = 1
    reload_to_2(sup, fake)
    stop = Recorder()
    sup.request_stop(waiter=stop)
    for _ in range(int(DRAIN_REPORT_AFTER * 10) + 5):
        fake.advance(0.1)
        sup.tick()
    said = [m for m in stop.messages if "still open" in m]
    assert len(said) == 1 and "after SIGQUIT (--drain-signal)" in said[0], said
    g1 = next(g for g in sup.status()["generations"] if g["number"] == 1)
    assert g1["drain_signal"] == "SIGQUIT"


def test_a_serving_generation_has_no_drain_figures(fake: FakeSystem) -> None:
    sup = make(fake)
    g = sup.status()["generations"][0]
    assert g["draining_s"] is None and g["drain_signal"] is None


def test_status_shows_what_holds_a_slow_drain(capsys: pytest.CaptureFixture[str]) -> None:
    gen = {"number": 1, "pid": 10, "pids": [10], "state": "draining", "age_s": 30.0,
           "ready_ms": 1.0, "in_flight": 2, "draining_s": 12.0, "drain_signal": None,
           "oldest_connection_s": 11.5, "listening": ["127.0.0.1:8000"]}
    inst = {"hupt_pid": 1, "command": ["srv"], "mode": "fork", "state": "running",
            "uptime_s": 40.0, "generations": [gen], "listeners": [], "reloads": []}
    status.render({"schema": 1, "instances": [inst]})
    out = capsys.readouterr().out
    assert "draining 12.0s" in out
    assert ("generation 1 has drained for 12.0s with 2 connection(s) still open, the oldest "
            "for 11.5s") in out
    assert "--drain-signal" in out


def test_drain_signal_goes_with_exec_and_attach() -> None:
    p = cli.build_parser()
    args = p.parse_args(["run", "--exec", "--drain-signal", "TERM", "--", "srv"])
    assert args.exec_mode and args.drain_signal == signal.SIGTERM
    assert p.parse_args(["attach", "--drain-signal", "QUIT", "123"]).drain_signal == QUIT
    assert p.parse_args(["attach", "123"]).drain_signal is None


def test_drain_signal_parses_like_stop_signal() -> None:
    args = cli.build_parser().parse_args(["run", "--drain-signal", "quit", "--", "srv"])
    assert args.drain_signal == QUIT
    assert cli.build_parser().parse_args(["run", "--", "srv"]).drain_signal is None
    assert cli.main(["run", "--drain-signal", "NOPE", "--", "x"]) == cli.EXIT_USAGE
