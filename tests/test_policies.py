"""Parsing of --ready policies, sd_notify messages and file-change debouncing (no kernel)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from hupt import sdnotify, watch
from hupt.address import AF_INET, AF_INET6, AF_UNIX, Address
from hupt.errors import UsageError
from hupt.readiness import Policy, parse_policy, probe_target


@pytest.mark.parametrize(("text", "policy"), [
    ("listen", Policy("listen")),
    ("notify", Policy("notify")),
    ("delay:1.5", Policy("delay", delay=1.5)),
    ("http:/healthz", Policy("http", path="/healthz")),
    ("http://127.0.0.1:8080/ready?x=1", Policy("http", path="/ready?x=1", host="127.0.0.1",
                                               port=8080)),
])
def test_ready_policies(text: str, policy: Policy) -> None:
    assert parse_policy(text) == policy


@pytest.mark.parametrize("text", ["", "delay:", "delay:-1", "delay:inf", "http:healthz",
                                  "https://x:1/", "http://nohost/", "http://example.com:80/",
                                  "tcp", "delay:abc"])
def test_bad_ready_policies_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_policy(text)


def test_probe_target_prefers_tcp_and_matches_port() -> None:
    a = Address(AF_INET, "127.0.0.1", 8000)
    b = Address(AF_INET, "0.0.0.0", 9000)
    u = Address(AF_UNIX, path=b"/run/app.sock")
    assert probe_target(Policy("http"), {u, a, b}) == a
    assert probe_target(parse_policy("http://127.0.0.1:9000/"), {a, b}) == Address(
        AF_INET, "127.0.0.1", 9000)
    assert probe_target(parse_policy("http://127.0.0.1:1/"), {a, b}) is None
    # The URL's host counts: a listener there, or a wildcard one of that port.
    assert probe_target(parse_policy("http://127.0.0.2:8000/"), {a, b}) is None
    assert probe_target(parse_policy("http://127.0.0.2:9000/"), {a, b}) == Address(
        AF_INET, "127.0.0.2", 9000)
    assert probe_target(parse_policy("http://localhost:8000/"), {a, b}) == a
    v6only = Address(AF_INET6, "::1", 3000)
    assert probe_target(parse_policy("http://localhost:3000/"), {v6only}) == v6only
    assert probe_target(parse_policy("http://[0::1]:3000/"), {v6only}) == v6only
    v6 = Address(AF_INET6, "::", 8000)
    assert probe_target(parse_policy("http://127.0.0.1:8000/"), {v6}) == a
    assert probe_target(parse_policy("http://[::1]:8000/"), {a}) is None
    assert probe_target(parse_policy("http://[::1]:8000/"), {v6}) == Address(
        AF_INET6, "::1", 8000)
    assert probe_target(Policy("http"), {u}) == u


def test_sd_notify_parse_and_round_trip(tmp_path: Path) -> None:
    assert sdnotify.parse(b"READY=1\nSTATUS=up = and running\nbogus") == {
        "READY": "1", "STATUS": "up = and running"}
    listener = sdnotify.Listener(str(tmp_path), "n.sock")
    try:
        n = sdnotify.Notifier({"NOTIFY_SOCKET": listener.path})
        n.reloading("reloading")
        n.ready("serving")
        got = listener.receive()
        assert [pid for pid, _ in got] == [os.getpid(), os.getpid()]
        assert got[0][1]["RELOADING"] == "1" and int(got[0][1]["MONOTONIC_USEC"]) > 0
        assert got[1][1]["READY"] == "1" and got[1][1]["MAINPID"] == str(os.getpid())
        n.ready("again")
        assert listener.ready_from({os.getpid()})
        n.ready("again")
        assert not listener.ready_from({1})  # only the generation's own processes count
        n.close()
    finally:
        listener.close()


def test_notifier_abstract_and_disabled() -> None:
    assert not sdnotify.Notifier({}).enabled
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0hupt-test-" + str(os.getpid()).encode())
    try:
        n = sdnotify.Notifier({"NOTIFY_SOCKET": "@hupt-test-" + str(os.getpid())})
        assert n.send(status="x")
        assert s.recv(100) == b"STATUS=x"
    finally:
        s.close()


def test_watcher_debounces(tmp_path: Path) -> None:
    f = tmp_path / "app.py"
    f.write_text("1")
    w = watch.Watcher([str(tmp_path)], now=0.0)
    assert not w.poll(1.0)
    f.write_text("22")
    assert not w.poll(2.0)  # change seen: quiet period starts
    (tmp_path / "b.py").write_text("3")
    assert not w.poll(2.5)  # another change restarts the quiet period
    assert w.poll(2.5 + watch.DEBOUNCE + 0.01)
    assert str(f) not in w.changed and str(tmp_path / "b.py") in w.changed
    assert not w.poll(10.0)


def test_a_burst_spanning_a_poll_gives_one_reload(tmp_path: Path) -> None:
    # POLL > DEBOUNCE: the quiet period must be looked at, not assumed.
    f = tmp_path / "app.py"
    f.write_text("1")
    w = watch.Watcher([str(tmp_path)], now=0.0)
    t, fired = 0.5, 0
    for i in range(6):  # a write every 0.3 s for 1.8 s
        f.write_text("x" * (i + 2))
        for _ in range(3):
            fired += w.poll(t)
            t += 0.1
    while t < 5.0:
        fired += w.poll(t)
        t += 0.1
    assert fired == 1
