"""`hupt signal` against the fake kernel seam, its control request and its command
line."""

from __future__ import annotations

import signal
from typing import Any, cast

import pytest

from hupt import cli, log
from hupt.address import AF_INET, Address
from hupt.control import Peer
from hupt.endpoint import ControlEndpoint
from hupt.generations import State
from hupt.supervisor import Options, Supervisor
from tests.fakes import FakeSystem, state_of
from tests.test_supervisor import Recorder

A = Address(AF_INET, "127.0.0.1", 8000)


def make(fake: FakeSystem, **kw: Any) -> Supervisor:
    sup = Supervisor(fake, Options(argv=["server"], env={}, **kw), control=False)
    sup.start()
    fake.listen(1, A)
    sup.on_notify(sup.gens[0])
    return sup


def reload(sup: Supervisor, fake: FakeSystem, w: Recorder, **kw: Any) -> None:
    """A reload whose new generation takes the held address at once."""
    sup.request_reload(w, **kw)
    new = sup.gens[-1]
    fake.listen(new.number, A)
    sup.on_notify(new)


# -- sending -------------------------------------------------------------------------------


def test_a_signal_goes_to_the_serving_generation_and_says_where(fake: FakeSystem) -> None:
    sup = make(fake)
    reload(sup, fake, Recorder())
    old, new = sup.gens
    fake.in_flight_by_pid[old.pid] = 1  # still draining
    sup.tick()
    ok, reason, sent = sup.send_signal(signal.SIGUSR1)
    assert ok and reason == f"SIGUSR1 sent to generation 2 (pid {new.pid})"
    assert sent == [{"generation": 2, "state": "serving", "pids": [new.pid]}]
    assert fake.signals == [(new.pid, signal.SIGUSR1)]


def test_all_reaches_every_live_generation(fake: FakeSystem) -> None:
    sup = make(fake)
    reload(sup, fake, Recorder())
    old, serving = sup.gens
    fake.in_flight_by_pid[old.pid] = 1
    sup.tick()
    sup.request_reload(Recorder())  # a third one, still starting
    starting = sup.gens[2]
    worker = fake.fork(2)  # not a main process: not signalled
    sup.settle()
    fake.signals.clear()
    ok, reason, sent = sup.send_signal(signal.SIGHUP, every=True)
    assert ok, reason
    assert [(s["generation"], s["state"]) for s in sent] == [
        (1, "draining"), (2, "serving"), (3, "starting")]
    assert {p for p, _ in fake.signals} == {old.pid, serving.pid, starting.pid}
    assert worker not in {p for p, _ in fake.signals}
    assert state_of(sup.gens[1]) is State.SERVING, "hupt's own use of HUP is not involved"


def test_each_copy_alive_gets_it_and_a_daemonized_generation_in_every_process(
        fake: FakeSystem) -> None:
    sup = make(fake, multi=2)
    fake.advance(1)
    sup.tick()
    g = sup.gens[0]
    a, b = g.copies
    _, _, sent = sup.send_signal(signal.SIGUSR1)
    assert sent[0]["pids"] == [a, b]
    # Both started processes gone, their daemons serve on.
    d1, d2 = fake.fork(1), fake.fork(1)
    fake.exit_pid(a, 0)
    fake.exit_pid(b, 0)
    sup.settle()
    _, reason, sent = sup.send_signal(signal.SIGUSR1)
    assert sent[0]["pids"] == [d1, d2] and f"pids {d1}, {d2}" in reason


def test_nothing_serving_is_a_failure(fake: FakeSystem) -> None:
    sup = Supervisor(fake, Options(argv=["server"], env={}), control=False)
    ok, reason, sent = sup.send_signal(signal.SIGUSR1)
    assert not ok and reason == "no generation serves: SIGUSR1 not sent" and sent == []
    assert sup.send_signal(signal.SIGUSR1, every=True)[1].startswith("no generation is alive")
    assert fake.signals == []


def test_exec_mode_signals_the_root_once(fake: FakeSystem) -> None:
    sup = make(fake, exec_mode=True)
    worker = fake.fork(1)
    sup.settle()
    fake.in_flight_by_pid[worker] = 1  # the old image's worker drains after the exec
    sup.request_reload(Recorder())
    fake.in_flight_by_pid[worker] = 0
    sup.tick()
    assert sup.gens[-1].number == 2
    fake.signals.clear()
    _, _, sent = sup.send_signal(signal.SIGUSR1, every=True)
    root = sup.gens[-1].pid
    # The old generation keeps only its worker: its root is the new image's.
    assert (root, signal.SIGUSR1) in fake.signals
    assert [s["generation"] for s in sent if root in s["pids"]] == [2]


class FakePeer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.finished = False

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)

    def finish(self) -> None:
        self.finished = True


@pytest.mark.parametrize("value", ["USR1", 0, 99999, True, None])
def test_the_control_request_refuses_what_is_not_a_signal(fake: FakeSystem, value: object) -> None:
    sup = make(fake)
    peer = FakePeer()
    sup.endpoint._on_message(cast(Peer, peer), {"cmd": "signal", "signal": value})
    assert peer.finished and peer.sent[-1]["ok"] is False
    assert peer.sent[-1]["reason"] == f"not a signal: {value!r}"
    assert fake.signals == []


def test_the_control_request_sends_and_reports(fake: FakeSystem) -> None:
    sup = make(fake)
    peer = FakePeer()
    ControlEndpoint._on_message(sup.endpoint, cast(Peer, peer),
                                {"cmd": "signal", "signal": int(signal.SIGUSR1), "all": True})
    (result,) = peer.sent
    assert result["event"] == "result" and result["ok"] is True
    assert result["sent"] == [{"generation": 1, "state": "serving", "pids": [sup.gens[0].pid]}]


# -- the command line ------------------------------------------------------------------------------


def test_signal_command_line() -> None:
    p = cli.build_parser()
    args = p.parse_args(["signal", "web", "USR1"])
    assert args.target == "web" and args.sig == signal.SIGUSR1 and not args.all
    args = p.parse_args(["signal", "--all", "--pidfile", "/run/x.pid", "SIGHUP"])
    assert args.target is None and args.pidfile == "/run/x.pid" and args.sig == signal.SIGHUP
    assert args.all
    assert p.parse_args(["signal", "123", "10"]).sig == 10


@pytest.mark.parametrize(("argv", "needle"), [
    (["signal", "web", "NOPE"], "unknown signal: 'NOPE'"),
    (["signal", "web", "0"], "unknown signal"),
    (["signal", "USR1"], "which instance?"),
    (["signal", "web"], "unknown signal: 'web'"),  # one word: the signal
    (["signal", "--pidfile", "/nonexistent/x.pid", "USR1"], "does not exist"),
])
def test_bad_signal_input_is_one_line(argv: list[str], needle: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    log.flush()  # repeats counted by earlier tests
    capsys.readouterr()
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("hupt: error:") and needle in err, err
    assert len(err.strip().splitlines()) == 1


def test_signal_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["signal", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: hupt signal" in out and "--all" in out and "USR1" in out
