"""`hupt attach --datagram ADDR`: a datagram server started without hupt, taken over
with its datagram socket and reloaded in exec mode.

The socket is named by the user, never guessed (an unconnected datagram socket
may be a client's, and a held address must be bound by every new image before
it counts as ready).  Once taken, it is held like a socket hupt bound itself:
each image exec'd in place gets that very socket, with what queued in it
meanwhile.  Proven with the echo server of test_datagram (UDP and unix
datagram) under its counting client: every datagram answered, none refused,
the server's own socket (inode) in every image, one socket on the address.
And the refusals: a datagram-only server attached without --datagram, an
address it has no socket on, an address that is no datagram one, each one
line, the server untouched.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from datagram_load import DatagramLoad, DgramTarget
from harness import Procs, hupt_cli, one_line_error, socket_inodes, wait_for
from test_attach import attach, untouched_view
from test_datagram import (
    address_of,
    ask,
    check_result,
    datagram_inodes,
    echo_cmd,
    free_udp_port,
)

pytestmark = pytest.mark.root

RELOADS = 6


def _echo_server(procs: Procs, target: DgramTarget) -> int:
    """The echo server, started without hupt, answering on `target`; its PID."""
    s = procs.spawn(echo_cmd(address_of(target)), name="echo")
    wait_for(f"an answer on {target!r}", lambda: ask(target, b"0", timeout=1) is not None, 20)
    return s.pid


def _target(family: str, tmp: Path) -> DgramTarget:
    if family == "unixgram":
        return str(tmp / "dgram.sock")
    return ("127.0.0.1", free_udp_port("127.0.0.1"))


@pytest.mark.parametrize("family", ["udp", "unixgram"])
def test_an_attached_datagram_server_reloads_and_loses_no_datagram(
        procs: Procs, short_tmp: Path, family: str) -> None:
    target = _target(family, short_tmp)
    pid = _echo_server(procs, target)
    (inode,) = datagram_inodes(target)
    assert inode in socket_inodes(pid)
    a = attach(procs, pid, "--datagram", address_of(target))
    assert inode in socket_inodes(a.pid), "hupt holds the server's own socket"
    with DatagramLoad(target) as load:
        wait_for("the client's first answers", lambda: load.answered_so_far() >= 20, 20)
        for i in range(RELOADS):
            r = hupt_cli("reload", str(pid), timeout=60)
            assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{a.log()}"
            assert "execed" in r.stderr, r.stderr
            assert inode in socket_inodes(pid), (
                f"reload {i + 1}: the new image reads the very socket\n{a.log()}")
            assert datagram_inodes(target) == {inode}, "never bound anew"
            time.sleep(0.3)
        time.sleep(0.5)
    res = load.result
    check_result(res, min_sent=200)
    assert set(res.pids) == {pid}, res.summary()
    r = hupt_cli("status", str(pid))
    assert address_of(target) in r.stdout, r.stdout


def test_a_datagram_only_server_is_refused_without_datagram(
        procs: Procs, short_tmp: Path) -> None:
    target = _target("udp", short_tmp)
    pid = _echo_server(procs, target)
    before = untouched_view(pid)
    r = hupt_cli("attach", "--yes", str(pid))
    one_line_error(r, "no listening socket", "--datagram ADDR")
    assert untouched_view(pid) == before


def test_a_datagram_address_the_server_has_no_socket_on_is_refused(
        procs: Procs, short_tmp: Path) -> None:
    target = _target("udp", short_tmp)
    pid = _echo_server(procs, target)
    before = untouched_view(pid)
    other = f"udp:127.0.0.1:{free_udp_port('127.0.0.1')}"
    r = hupt_cli("attach", "--yes", "--datagram", other, str(pid))
    one_line_error(r, f"no datagram socket on {other}", address_of(target))
    assert untouched_view(pid) == before


@pytest.mark.parametrize("bad", ["127.0.0.1:53", "udp:nowhere", "unixgram:", "tcp:1.2.3.4:5"])
def test_a_datagram_option_that_is_no_datagram_address_is_a_usage_error(
        procs: Procs, short_tmp: Path, bad: str) -> None:
    target = _target("udp", short_tmp)
    pid = _echo_server(procs, target)
    r = hupt_cli("attach", "--yes", "--datagram", bad, str(pid))
    assert r.returncode == 2, r.stderr
    assert "not a datagram address" in r.stderr and "Traceback" not in r.stderr, r.stderr
