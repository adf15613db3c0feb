"""``--watch PATH...``: reload when files change (a development convenience).

The supervisor polls: every POLL seconds it stats the watched files (walking
watched directories, hidden entries and __pycache__ skipped, at most
MAX_FILES files) and compares (mtime, size, inode).  A change starts a quiet
period; the reload fires once nothing changed for DEBOUNCE seconds, so an
editor's save-rename-chmod dance or a build writing many files gives one
reload.  Polling a few hundred stats per second costs nothing measurable and
needs no kernel watch descriptors, which also behave badly on network file
systems.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

POLL = 0.5
DEBOUNCE = 0.4
MAX_FILES = 10_000

Snapshot = dict[str, tuple[int, int, int]]


def _walk(path: str) -> Iterator[str]:
    if not os.path.isdir(path):
        yield path
        return
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for f in files:
            if not f.startswith("."):
                yield os.path.join(root, f)


def snapshot(paths: Sequence[str]) -> Snapshot:
    snap: Snapshot = {}
    for p in paths:
        for f in _walk(p):
            if len(snap) >= MAX_FILES:
                return snap
            try:
                st = os.stat(f)
            except OSError:
                continue
            snap[f] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return snap


class Watcher:
    def __init__(self, paths: Sequence[str], now: float) -> None:
        self.paths = list(paths)
        self._snap = snapshot(self.paths)
        self._next_poll = now + POLL
        self._changed_at: float | None = None
        self.changed: list[str] = []

    def deadline(self) -> float:
        if self._changed_at is not None:
            return min(self._next_poll, self._changed_at + DEBOUNCE)
        return self._next_poll

    def poll(self, now: float) -> bool:
        """Whether a debounced change is due now.

        The quiet period is checked by a fresh look at its end, not assumed:
        a burst of writes that spans a poll (POLL > DEBOUNCE) then restarts
        it, and gives one reload, not one per poll it straddles.
        """
        quiet_over = self._changed_at is not None and now >= self._changed_at + DEBOUNCE
        if now < self._next_poll and not quiet_over:
            return False
        self._next_poll = now + POLL
        snap = snapshot(self.paths)
        if snap != self._snap:
            self.changed = sorted(k for k in snap.keys() | self._snap.keys()
                                  if snap.get(k) != self._snap.get(k))
            self._snap = snap
            self._changed_at = now
            return False
        if quiet_over:
            self._changed_at = None
            return True
        return False
