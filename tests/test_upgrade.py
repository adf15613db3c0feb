"""The upgrade state machine, the loop's invariants, --ready http and READY=1 races,
against the fake kernel seam (real sockets on 127.0.0.1 for the probes)."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from hupt.address import AF_INET, Address
from hupt.generations import Generation, State
from hupt.loop import InvariantViolation, Loop
from hupt.readiness import Policy
from hupt.supervisor import Options, Supervisor
from hupt.upgrade import ALLOWED, Phase, TransitionRefused, Upgrade
from tests.fakes import FakeSystem, state_of
from tests.test_supervisor import Recorder, RecordingNotifier

# -- the transition table -----------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [(s, d) for s, ds in ALLOWED.items() for d in ds],
                         ids=lambda p: str(p.value))
def test_every_allowed_transition(src: Phase, dst: Phase) -> None:
    up = Upgrade(0.0, [], phase=src)
    up.to(dst)
    assert up.phase is dst


@pytest.mark.parametrize(("src", "dst"), [(s, d) for s in Phase for d in Phase
                                          if d not in ALLOWED[s]],
                         ids=lambda p: str(p.value))
def test_every_other_transition_is_refused(src: Phase, dst: Phase) -> None:
    up = Upgrade(0.0, [], phase=src)
    with pytest.raises(TransitionRefused, match=f"{src.value} -> {dst.value}"):
        up.to(dst)
    assert up.phase is src


def test_every_phase_can_end_and_the_ends_are_final() -> None:
    for phase in Phase:
        if phase in (Phase.DONE, Phase.FAILED):
            assert not ALLOWED[phase]
        else:
            assert Phase.FAILED in ALLOWED[phase], phase
    assert {p for p, nxt in ALLOWED.items() if Phase.DONE in nxt} == {Phase.CONFIRMING}, \
        "an upgrade is done only once its new generation is confirmed"


def test_a_refused_transition_leaves_the_upgrade_as_it_was(fake: FakeSystem) -> None:
    sup = make(fake)
    sup.request_reload(Recorder())
    up = sup.upgrade
    assert up is not None and up.phase is Phase.LISTENING
    with pytest.raises(TransitionRefused):
        up.to(Phase.DONE)  # not confirmed
    assert up.phase is Phase.LISTENING


# -- the loop's invariants --------------------------------------------------------------

A = Address(AF_INET, "127.0.0.1", 8000)


def make(fake: FakeSystem, **kw: Any) -> Supervisor:
    sup = Supervisor(fake, Options(argv=["server"], env={}, **kw),
                     control=False)
    sup.start()
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    return sup


def test_the_test_suites_run_the_loop_strict() -> None:
    assert Loop(lambda: 0.0).strict, "HUPT_STRICT=1: a violated invariant fails the test"


def test_two_starting_generations_violate_the_invariant(fake: FakeSystem) -> None:
    sup = make(fake)
    sup.request_reload(Recorder())
    stray = Generation(99, 4242, fake.now())  # STARTING, and not the upgrade's
    sup.gens.append(stray)
    with pytest.raises(InvariantViolation, match="2 generations are starting"):
        sup.tick()


def test_a_starting_generation_outside_an_upgrade_violates_the_invariant(
        fake: FakeSystem) -> None:
    sup = make(fake)
    sup.gens.append(Generation(99, 4242, fake.now()))
    with pytest.raises(InvariantViolation, match="not as the upgrade's"):
        sup.tick()


class StuckTimer:
    """A timer whose deadline its tick never moves: the selector would spin."""

    def __init__(self) -> None:
        self.ticks = 0

    def deadline(self) -> float:
        return 0.0

    def tick(self, now: float) -> None:
        self.ticks += 1


def test_a_timer_still_due_after_its_tick_is_a_busy_loop() -> None:
    loop = Loop(lambda: 10.0, strict=True)
    stuck = StuckTimer()
    loop.add_timer("stuck", stuck)
    with pytest.raises(InvariantViolation, match="busy loop: stuck"):
        loop.tick()
    assert stuck.ticks == 3, "ticked again while due, a bounded number of times"


def test_outside_the_tests_a_violation_is_logged_and_the_loop_goes_on(
        capsys: pytest.CaptureFixture[str]) -> None:
    loop = Loop(lambda: 10.0, strict=False)
    loop.add_timer("stuck", StuckTimer())
    loop.tick()
    assert "invariant violated: busy loop: stuck" in capsys.readouterr().err
    assert loop.violations


def test_a_timer_due_again_after_another_ticked_is_ticked_in_the_same_step() -> None:
    class Once:
        def __init__(self) -> None:
            self.at = math.inf
            self.fired = 0

        def deadline(self) -> float:
            return self.at

        def tick(self, now: float) -> None:
            if now >= self.at:
                self.at, self.fired = math.inf, self.fired + 1

    class Arms:
        def __init__(self, other: Once) -> None:
            self.other = other

        def deadline(self) -> float:
            return math.inf

        def tick(self, now: float) -> None:
            self.other.at = now  # due at once

    loop = Loop(lambda: 5.0, strict=True)
    once = Once()
    loop.add_timer("once", once)
    loop.add_timer("arms", Arms(once))
    loop.tick()
    assert once.fired == 1


# -- READY=1 and an exit between two scans ------------------------------------------------


def test_ready_then_exit_before_the_next_scan_is_no_internal_error(
        fake: FakeSystem, capsys: pytest.CaptureFixture[str]) -> None:
    """The scan the READY=1 handler runs finds the generation gone: what that sets
    off (the upgrade failed, its NOTIFY_SOCKET closed) waits until the handler has
    read the socket."""
    sup = make(fake, ready=Policy("notify"))
    try:
        w = Recorder()
        fake.next_pid = os.getpid() - 1  # generation 2's root: this process stands in
        sup.request_reload(w)
        g2 = sup.gens[1]
        assert g2.pid == os.getpid() and g2.ready_socket is not None
        fake.listen(2, A)
        sup.on_notify(g2)
        assert sup.upgrade is not None and sup.upgrade.phase is Phase.CONFIRMING
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", g2.ready_socket.path)
        fake.exit(2, 0)  # and exits at once, before any scan saw it
        sup.step()
        err = capsys.readouterr().err
        assert "internal error" not in err, err
        assert g2.sent_ready and state_of(g2) is State.EXITED
        assert w.result is not None and not w.result[0]
        assert "exited (exit status 0) before it was ready" in w.result[1]
        assert sup.current is sup.gens[0] and not sup.stopping
        assert g2.ready_socket is None, "its NOTIFY_SOCKET is closed once it is gone"
    finally:
        sup.fleet.close()


# -- --ready http ----------------------------------------------------------------------------


@pytest.fixture
def http_port() -> Iterator[socket.socket]:
    """A listening socket on 127.0.0.1 that the test answers by hand, as the new
    generation would: the probe connects to the held address's port."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


def answer_probe(server: socket.socket, status: str, sup: Supervisor) -> str:
    """Step the loop until the probe has connected and asked, then answer it."""
    for _ in range(50):
        sup.step()
        try:
            conn, _ = server.accept()
        except BlockingIOError:
            continue
        with conn:
            conn.setblocking(False)
            request = ""
            for _ in range(50):
                sup.step()  # the probe writes its request when the loop runs
                try:
                    request += conn.recv(4096).decode()
                except BlockingIOError:
                    continue
                if request.endswith("\r\n\r\n"):
                    break
            conn.setblocking(True)
            conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
        for _ in range(20):
            sup.step()
            if sup.upgrade is None or sup.upgrade.check is None or \
                    sup.upgrade.check.last_probe:
                break
        return request
    raise AssertionError("no probe came")


def http_sup(fake: FakeSystem, port: int, **kw: Any) -> tuple[Supervisor, Address]:
    addr = Address(AF_INET, "127.0.0.1", port)
    sup = Supervisor(fake, Options(argv=["server"], env={},
                                   ready=Policy("http", path="/healthz"), **kw),
                     control=False)
    sup.start()
    fake.listen(1, addr)
    sup.on_notify(sup.gens[0])
    return sup, addr


def test_ready_http_pauses_the_old_generation_probes_and_takes_over(
        fake: FakeSystem, http_port: socket.socket) -> None:
    sup, addr = http_sup(fake, http_port.getsockname()[1])
    w = Recorder()
    sup.request_reload(w)
    fake.listen(2, addr)
    sup.on_notify(sup.gens[1])
    assert "pause 1" in fake.events, "only the new generation may answer the probe"
    assert fake.lives_on[1] == {sup.gens[0].pid}, "paused to serve again if it fails"
    assert "seal 1" not in fake.events
    request = answer_probe(http_port, "200 OK", sup)
    assert request.startswith("GET /healthz HTTP/1.1\r\n")
    assert w.result is not None and w.result[0], w.result
    assert any("ready probe answered: HTTP/1.1 200 OK" in m for m in w.messages)
    assert sup.current is sup.gens[1]
    assert state_of(sup.gens[0]) in (State.DRAINING, State.RETIRING)
    assert fake.events.count("pause 1") == 1, "paused once per reload"
    assert "seal 1" in fake.events, "sealed as a retiring generation once the probe succeeded"


def test_ready_http_never_answered_2xx_rolls_the_old_generation_back(
        fake: FakeSystem, http_port: socket.socket) -> None:
    sup, addr = http_sup(fake, http_port.getsockname()[1], ready_timeout=5.0)
    w = Recorder()
    sup.request_reload(w)
    fake.listen(2, addr)
    sup.on_notify(sup.gens[1])
    answer_probe(http_port, "503 Service Unavailable", sup)
    assert w.result is None, "a failed probe is tried again until the ready timeout"
    fake.advance(5.1)
    sup.tick()
    assert w.result is not None and not w.result[0]
    assert "--ready http:/healthz not satisfied (last probe: HTTP/1.1 503" in w.result[1]
    assert fake.events.index("resume 1") < fake.events.index("pause 2")
    assert any("rolled back: generation 1" in m for m in w.messages)
    assert sup.current is sup.gens[0] and state_of(sup.gens[0]) is State.SERVING
    assert state_of(sup.gens[1]) in (State.DRAINING, State.RETIRING), \
        "it may have accepted: drained, not killed"
    assert "seal 1" not in fake.events


def test_generation_1_is_announced_ready_when_its_http_probe_answers(
        fake: FakeSystem, http_port: socket.socket) -> None:
    n = RecordingNotifier()
    port = http_port.getsockname()[1]
    sup = Supervisor(fake, Options(argv=["server"], env={},
                                   ready=Policy("http", path="/")),
                     control=False, notifier=n)
    sup.start()
    fake.listen(1, Address(AF_INET, "127.0.0.1", port))
    sup.on_notify(sup.gens[0])
    assert n.said == []
    answer_probe(http_port, "500 Internal Server Error", sup)
    assert n.said == [], "a 5xx is not ready"
    for _ in range(3):
        fake.advance(0.3)
        sup.tick()
    answer_probe(http_port, "204 No Content", sup)
    assert n.said == ["READY"]
    assert "pause 1" not in fake.events, "generation 1 is probed as it serves"
