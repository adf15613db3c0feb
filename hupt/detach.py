"""Detaching hupt attach from the server it took over.

A server hupt attached to was started by someone else: stopping ``hupt
attach`` (TERM/INT) leaves it running rather than taking it down (``hupt
stop`` does that).  What it loses is irreversible -- the filter stays, and
with nobody reading its notify fd the kernel fails the filtered calls with
ENOSYS -- so a person at the terminal confirms first.  A detach asked for
during a reload waits for its outcome: the server may be paused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from hupt import log
from hupt.address import Address
from hupt.announce import Announcer
from hupt.fleet import Fleet
from hupt.loop import Loop


def filtered_calls(addresses: set[Address]) -> str:
    """The calls an attached server's filter hands to hupt (unlink too once it holds a
    unix path, as LinuxSystem.attach installs it)."""
    if any(a.is_unix for a in addresses):
        return "bind(), listen() and unlink()"
    return "bind() and listen()"


class Detacher:
    def __init__(self, fleet: Fleet, announcer: Announcer, loop: Loop, *,
                 confirm: bool, reloading: Callable[[], bool]) -> None:
        self.fleet = fleet
        self.announcer = announcer
        self.loop = loop
        self.confirm = confirm
        self._reloading = reloading
        self.asking: int | None = None  # the terminal fd a question waits on
        self.wanted = False  # asked during a reload: detach when it has ended
        self.detached = False

    def stop_requested(self) -> None:
        """TERM or INT: ask first on a terminal; a second signal while asking detaches."""
        if self.asking is not None or not self.confirm:
            self.request()
            return
        fd = log.prompt_fd()
        if fd is None:  # no terminal to ask on (a background job, a closed tty)
            self.request()
            return
        self.asking = fd
        self.loop.add(fd, self._on_answer)
        pids = ", ".join(str(p) for p in self.fleet.served_pids()) or "the server"
        log.prompt(f"hupt attach was asked to stop. Detaching leaves pid {pids} running "
                   f"without hupt; from then on its {filtered_calls(self.fleet.served_addresses())}"
                   f" calls fail (ENOSYS), as the filter cannot be removed. To stop the server "
                   f"instead: hupt stop {os.getpid()}.\nDetach? [y/N] ")

    def _on_answer(self, mask: int) -> None:
        assert self.asking is not None
        try:
            answer = os.read(self.asking, 1024)
        except OSError:
            answer = b""
        self._drop_question()
        if answer.strip().lower() in (b"y", b"yes"):
            self.request()
        else:
            log.info("not detaching: still supervising")

    def _drop_question(self) -> None:
        if self.asking is not None:
            self.loop.remove(self.asking)
            self.asking = None

    def request(self) -> None:
        """Let the server run on without hupt (once a reload in progress has ended)."""
        self._drop_question()
        if self._reloading():
            if not self.wanted:
                log.info("detaching once the reload in progress has ended")
            self.wanted = True
            return
        self._detach()

    def _detach(self) -> None:
        self.wanted = False
        pids = self.fleet.served_pids()
        calls = filtered_calls(self.fleet.served_addresses())
        for g in self.fleet.alive():
            self.fleet.unwatch(g)
        self.fleet.detached = True
        self.detached = True
        self.announcer.stopping("detached")
        log.warn(f"detached: pid {', '.join(map(str, pids)) or '(none)'} runs on without hupt; "
                 f"its {calls} calls fail (ENOSYS) from now on")

    def deadline(self) -> float:
        return -math.inf if self.wanted and not self._reloading() else math.inf

    def tick(self, now: float) -> None:
        if self.wanted and not self._reloading():
            self._detach()
