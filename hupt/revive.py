"""--revive and --multi: bringing back what is missing.

A serving generation that dies on its own is started again (with --revive)
after a backoff, the sockets still held, so clients queue meanwhile.  A
--multi generation short of a copy gets one again the same way.  One
backoff serves both: 0.5 s doubling to 30 s, back to 0.5 s once what was
revived has lived 10 s.

The first generation's other --multi copies also start here, a moment
after the first copy has listened: their binds are then handoffs of its
socket, not EADDRINUSE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from hupt import log
from hupt.fleet import Fleet
from hupt.generations import Generation, State, describe
from hupt.loop import Loop

if TYPE_CHECKING:
    from hupt.options import Options

COPIES_SETTLE = 0.3
LIVED = 10.0


class Backoff:
    def __init__(self, first: float = 0.5, most: float = 30.0) -> None:
        self.first, self.most = first, most
        self.delay = first

    def next(self) -> float:
        """The delay to wait now; the next one is twice as long."""
        d = self.delay
        self.delay = min(d * 2, self.most)
        return d

    def reset(self) -> None:
        self.delay = self.first


class Reviver:
    def __init__(self, options: Options, fleet: Fleet, loop: Loop, *,
                 request_reload: Callable[[], None], stopping: Callable[[], bool]) -> None:
        self.opts = options
        self.fleet = fleet
        self.loop = loop
        self._request_reload = request_reload
        self._stopping = stopping
        self.backoff = Backoff()
        self.revive_at: float | None = None
        self.copies_at: float | None = None
        self._last_copy_exit = -math.inf

    @property
    def pending(self) -> bool:
        return self.revive_at is not None

    def cancel(self) -> None:
        self.revive_at = None

    def generation_died(self, gen: Generation) -> None:
        """The serving generation exited on its own: start it again after the backoff."""
        if self.loop.now() - (gen.ready_at or gen.started_at) > LIVED:
            self.backoff.reset()
        self.schedule()

    def schedule(self) -> None:
        delay = self.backoff.next()
        self.revive_at = self.loop.now() + delay
        log.warn(f"nothing serves: starting the command again in {delay:g} s; the sockets "
                 "stay held, clients queue")

    def first_listened(self, gen: Generation) -> None:
        # Copies are processes hupt started with the command: an image exec'd
        # in place or an attached server has none, and gets none.
        if gen.copies and len(gen.copies) < self.opts.multi:
            self.copies_at = self.loop.now() + COPIES_SETTLE

    def copy_exited(self, gen: Generation, pid: int, status: int) -> None:
        """One of --multi's copies died while the others run on.

        The serving generation is then short of a copy; with --revive it gets
        one again, else it serves on with fewer.  Only a crash counts (a
        signal or a non-zero status): a copy that exits 0 may have
        daemonized, its server living on below hupt.  A generation being
        replaced or stopped is left alone: its copies are meant to go.  When
        the last copy goes the generation has exited, which is another event.
        """
        if (self.opts.multi == 1 or status == 0 or gen is not self.fleet.current
                or gen.state is not State.SERVING or self._stopping() or gen.retired_by_hupt):
            return
        others = [c for c in gen.copies if c != pid]
        if not self.fleet.still_running(others):
            return
        gen.copies = others
        now = self.loop.now()
        log.error(f"{gen}: copy pid {pid} exited on its own ({describe(status)}); "
                  f"{len(gen.copies)} of {self.opts.multi} copies serve")
        if not self.opts.revive:
            return
        if now - self._last_copy_exit > LIVED:
            self.backoff.reset()
        self._last_copy_exit = now
        delay = self.backoff.next()
        self.copies_at = now + delay
        log.warn(f"--revive: starting a copy again in {delay:g} s")

    def deadline(self) -> float:
        return min(t for t in (self.revive_at, self.copies_at, math.inf) if t is not None)

    def tick(self, now: float) -> None:
        if self.copies_at is not None and now >= self.copies_at:
            self.copies_at = None
            cur = self.fleet.current
            if cur is not None and cur.state is State.SERVING and not self._stopping():
                self.fleet.start_copies(cur, self.opts.multi - len(cur.copies))
        if self.revive_at is not None and now >= self.revive_at:
            self.revive_at = None
            if not self._stopping():
                log.info("reviving the server")
                self._request_reload()

