"""Datagram addresses above the seam: kept apart from stream ones, no backlog, no
connections to count, a short grace before a datagram generation is retired or
exec'd.  The kernel side (holding at bind, the dummy) is integration/test_datagram.py."""

from __future__ import annotations

import os
import select
import signal
import socket
from collections.abc import Iterator

import pytest

from hupt.address import AF_INET, AF_INET6, AF_UNIX, Address
from hupt.draining import DATAGRAM_GRACE
from hupt.fleet import DATAGRAM_STARTUP
from hupt.generations import State
from hupt.listeners import Listeners
from hupt.readiness import Policy, probe_target
from hupt.supervisor import Options, Supervisor
from tests.fakes import FakeSystem
from tests.test_supervisor import Recorder

TCP = Address(AF_INET, "127.0.0.1", 5353)
UDP = Address(AF_INET, "127.0.0.1", 5353, kind=socket.SOCK_DGRAM)


def test_a_udp_and_a_tcp_socket_on_one_port_are_two_addresses() -> None:
    assert TCP != UDP and len({TCP, UDP}) == 2
    assert str(TCP) == "127.0.0.1:5353" and str(UDP) == "udp:127.0.0.1:5353"
    assert str(Address(AF_INET6, "::1", 53, kind=socket.SOCK_DGRAM)) == "udp:[::1]:53"
    assert str(Address(AF_UNIX, path=b"/run/x.sock", kind=socket.SOCK_DGRAM)) == \
        "unixgram:/run/x.sock"
    assert str(Address(AF_UNIX, path=b"\0log", kind=socket.SOCK_DGRAM)) == "unixgram:@log"
    assert UDP.is_datagram and not TCP.is_datagram


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield s
    s.close()


def test_a_held_datagram_socket_has_no_backlog(udp: socket.socket) -> None:
    listeners = Listeners()
    addr = Address(AF_INET, "127.0.0.1", udp.getsockname()[1], kind=socket.SOCK_DGRAM)
    held = listeners.add(addr, socket.socket(fileno=udp.detach()), 0)  # no listen(): EOPNOTSUPP
    assert listeners.get(addr) is held and held.backlog == 0
    listeners.close_all()


def test_refusing_new_clients_leaves_datagram_sockets_readable_by_nobody(
        udp: socket.socket) -> None:
    """shutdown() of a datagram socket would make every recvfrom() return at once."""
    listeners = Listeners()
    addr = Address(AF_INET, "127.0.0.1", udp.getsockname()[1], kind=socket.SOCK_DGRAM)
    listeners.add(addr, socket.socket(fileno=os.dup(udp.fileno())), 0)
    listeners.refuse_new()
    p = select.poll()
    p.register(udp, select.POLLIN)
    assert p.poll(100) == [], "a held datagram socket must not wake its readers"
    listeners.close_all()


def test_an_http_probe_never_targets_a_datagram_address() -> None:
    assert probe_target(Policy("http", path="/"), {UDP}) is None
    assert probe_target(Policy("http", path="/"), {UDP, TCP}) == TCP


def make(fake: FakeSystem, addr: Address, **kw: object) -> Supervisor:
    sup = Supervisor(fake, Options(argv=["server"], env={}, **kw), control=False)  # type: ignore[arg-type]
    sup.start()
    fake.listen(1, addr)
    sup.on_notify(sup.gens[0])
    return sup


@pytest.mark.parametrize("addr", [TCP, UDP], ids=["stream", "datagram"])
def test_a_datagram_generation_answers_what_it_read_before_it_is_retired(
        fake: FakeSystem, addr: Address) -> None:
    sup = make(fake, addr)
    old = sup.gens[0]
    w = Recorder()
    sup.request_reload(w)
    fake.listen(2, addr)
    sup.on_notify(sup.gens[1])
    assert w.result is not None and w.result[0]
    sup.tick()
    if addr.is_datagram:
        assert old.state is State.DRAINING and not fake.signals, (
            "retired at once: a request it read just before the pause goes unanswered")
        fake.advance(DATAGRAM_GRACE + 0.01)
        sup.tick()
    assert old.state is State.RETIRING
    assert fake.signals == [(old.pid, signal.SIGTERM)]


def test_exec_mode_waits_the_datagram_grace_before_the_exec(fake: FakeSystem) -> None:
    sup = make(fake, UDP, exec_mode=True)
    sup.request_reload(Recorder())
    sup.tick()
    assert len(sup.gens) == 1, "exec'd at once: a datagram in hand would be lost"
    fake.advance(DATAGRAM_GRACE + 0.01)
    sup.tick()
    assert fake.events[-1] == "exec 1 -> 2"


QUERY = Address(AF_INET, "0.0.0.0", 40123, kind=socket.SOCK_DGRAM)


def test_a_reload_ends_the_start_up_of_both_generations(fake: FakeSystem) -> None:
    """Past its start-up, a generation's datagram binds of new addresses go unheld."""
    sup = make(fake, UDP)
    w = Recorder()
    sup.request_reload(w)
    assert "end startup 1" in fake.events, "the old generation has long started"
    assert "end startup 2" not in fake.events, "the new one binds its sockets now"
    fake.listen(2, UDP)
    sup.on_notify(sup.gens[1])
    assert w.result is not None and w.result[0]
    assert "end startup 2" in fake.events


def test_the_first_generation_starts_up_for_a_while(fake: FakeSystem) -> None:
    sup = make(fake, UDP)
    fake.advance(DATAGRAM_STARTUP - 1)
    sup.tick()
    assert "end startup 1" not in fake.events
    fake.advance(20)
    sup.tick()
    assert "end startup 1" in fake.events


def test_a_query_port_closed_since_is_released_and_not_waited_for(fake: FakeSystem) -> None:
    sup = make(fake, UDP)
    fake.listen(1, QUERY)  # a query port bound during its start-up, held
    sup.on_notify(sup.gens[0])
    assert sup.gens[0].listened == {UDP, QUERY}
    fake.abandoned = {QUERY}  # the server closed it
    w = Recorder()
    sup.request_reload(w)
    fake.listen(2, UDP)
    sup.on_notify(sup.gens[1])
    assert w.result is not None and w.result[0], "the new generation waits for no query port"
    assert fake.listeners.get(QUERY) is None and fake.listeners.get(UDP) is not None


def test_abandoned_datagram_sockets_are_released_at_idle_scans(fake: FakeSystem) -> None:
    sup = make(fake, UDP)
    fake.listen(1, QUERY)
    sup.on_notify(sup.gens[0])
    fake.abandoned = {QUERY}
    fake.advance(60)
    sup.tick()
    assert fake.listeners.get(QUERY) is None and sup.gens[0].listened == {UDP}
