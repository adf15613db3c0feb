"""Each generation's view of a held listener's O_NONBLOCK (listeners.Held).

The flag is one for every holder of the socket (integration/test_blocking_mode.py
proves that on the kernel): hupt records, at each handoff and resume, which
generation's mode the socket has and what the others had, so that pausing one
gives its stand-in that generation's own mode.  A real socket, no process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from hupt.address import parse_user_address
from hupt.listeners import KEEP_VIEWS, Held, Listeners


@pytest.fixture
def held() -> Iterator[Held]:
    listeners = Listeners()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    addr = parse_user_address(f"127.0.0.1:{sock.getsockname()[1]}")
    h = listeners.add(addr, sock, 16)
    yield h
    listeners.close_all()


def hand(h: Held, number: int, nonblock: bool) -> None:
    """What the handoff does at generation ``number``'s bind()."""
    was = h.nonblock()
    os.set_blocking(h.fileno(), not nonblock)
    h.set_by(number, was, nonblock)


def test_each_generation_keeps_its_own_mode_across_reloads(held: Held) -> None:
    held.setter = 1  # generation 1 listened on it, blocking
    assert held.nonblock_of(1) is False
    hand(held, 2, True)
    assert (held.nonblock_of(1), held.nonblock_of(2)) == (False, True)
    hand(held, 3, False)
    assert [held.nonblock_of(n) for n in (1, 2, 3)] == [False, True, False]


def test_the_last_setter_is_read_live(held: Held) -> None:
    """A generation may change the flag itself after its bind (setblocking after listen)."""
    held.setter = 1
    os.set_blocking(held.fileno(), False)
    assert held.nonblock_of(1) is True
    hand(held, 2, False)
    assert held.nonblock_of(1) is True, "what generation 1 had set when it changed hands"


def test_a_resume_gives_the_socket_back_and_the_failed_one_keeps_its_mode(held: Held) -> None:
    held.setter = 1
    hand(held, 2, True)  # generation 2 is not ready: rolled back
    os.set_blocking(held.fileno(), True)  # what resuming generation 1 does in it
    held.set_by(1, True, False)
    assert held.nonblock_of(1) is False
    assert held.nonblock_of(2) is True, "the failed generation, paused next, in its own mode"
    hand(held, 3, True)
    assert [held.nonblock_of(n) for n in (1, 2, 3)] == [False, True, True]


def test_an_adopted_socket_gives_older_generations_the_mode_it_had(held: Held) -> None:
    """hupt attach / exec mode: hupt holds a socket a generation it did not hand it to made."""
    os.set_blocking(held.fileno(), False)
    hand(held, 5, False)
    assert [held.nonblock_of(n) for n in (3, 4, 5)] == [True, True, False]


def test_views_are_bounded(held: Held) -> None:
    held.setter = 1
    for n in range(2, 100):
        hand(held, n, bool(n % 2))
    assert len(held.views) == KEEP_VIEWS
    assert held.nonblock_of(98) is False and held.nonblock_of(99) is True
