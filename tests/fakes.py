"""A fake kernel seam for driving the supervisor's logic without root.

It stands in for hupt.linux.LinuxSystem only in unit tests; the real
mechanism is proved against the kernel in integration/.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hupt.address import Address
from hupt.listeners import Listeners
from hupt.system import Attached, Followed, FollowResult, Serviced


@dataclass
class FakeGen:
    number: int
    pid: int
    rfd: int
    wfd: int
    pids: set[int]
    pending_listens: list[Address] = field(default_factory=list)
    hung_up: bool = False
    paused: bool = False


class FakeSystem:
    def __init__(self) -> None:
        self.listeners = Listeners()
        self.clock = 1000.0
        self.gens: dict[int, FakeGen] = {}
        self.next_pid = 100
        self.signals: list[tuple[int, int]] = []
        self.in_flight_by_pid: dict[int, int] = {}
        self.uncountable = False  # the kernel's socket tables cannot be read
        self.sealed: dict[int, set[int]] = {}
        self.execs: list[tuple[list[str], dict[str, str]]] = []  # argv, env of each exec
        self.spawns: list[tuple[list[str], dict[str, str]]] = []  # and of each spawn
        self.cwds: list[str | None] = []  # the directory of each spawn
        self.exec_cwds: list[str | None] = []  # the directory each exec enters (--chdir)
        self.reaped: list[tuple[int, int]] = []
        self.reaped_for: list[tuple[int, set[int]]] = []  # parent, zombies it must reap
        self.spawn_error: Exception | None = None
        self.events: list[str] = []
        # exec mode
        self.program_error: Exception | None = None
        self.exec_error: Exception | None = None
        self.dead: set[int] = set()  # pids that exited (for ``alive``)
        self.lives_on: dict[int, set[int]] = {}  # generation -> pids paused to serve again
        self.paused_pids: dict[int, set[int]] = {}  # generation -> every pid paused
        self.exit_fds: dict[int, tuple[int, int]] = {}  # generation -> attached root's pipe
        # exec mode with --drain-signal: generation -> the number its exec becomes
        self.following: dict[int, int] = {}
        self.follow_results: dict[int, FollowResult] = {}  # what the next poll reports
        self.follow_error: Exception | None = None
        self.pause_problems: list[str] = []  # what every pause reports
        self.holders: dict[int, list[Address]] = {}  # processes holding a listener itself
        self.refused_new = False
        self.abandoned: set[Address] = set()  # held datagram addresses no process has open
        self.exec_under_way = False  # unfollow finds the exec already started
        # pid -> its stdout and stderr (write ends of hupt's pipes), while it lives
        self.stdio: dict[int, tuple[int | None, int | None]] = {}

    # -- test controls ---------------------------------------------------
    def listen(self, number: int, addr: Address) -> None:
        g = self.gens[number]
        g.pending_listens.append(addr)
        if self.listeners.get(addr) is None:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            self.listeners.add(addr, s, 5)

    def exit(self, number: int, status: int = 0) -> None:
        g = self.gens[number]
        self.reaped.append((g.pid, status))
        self.dead |= g.pids
        for p in g.pids:
            self._close_stdio(p)
        g.pids = set()
        g.hung_up = True

    def write(self, pid: int, which: int, data: bytes) -> None:
        """Process ``pid`` writes ``data`` to its stdout (1) or stderr (2)."""
        fd = self.stdio[pid][which - 1]
        assert fd is not None, f"pid {pid}'s fd {which} is hupt's own"
        os.write(fd, data)

    def _close_stdio(self, pid: int) -> None:
        for fd in self.stdio.pop(pid, ()):
            if fd is not None:
                os.close(fd)

    def exit_pid(self, pid: int, status: int | None = None) -> None:
        """One process (a worker) exits; a ``status`` if it is hupt's child (a copy)."""
        if status is not None:
            self.reaped.append((pid, status))
        self.dead.add(pid)
        self._close_stdio(pid)
        for g in self.gens.values():
            g.pids.discard(pid)

    def fork(self, number: int) -> int:
        """Generation ``number``'s root forks a worker; returns its pid."""
        self.next_pid += 1
        self.gens[number].pids.add(self.next_pid)
        return self.next_pid

    def advance(self, seconds: float) -> None:
        self.clock += seconds

    def close(self) -> None:
        for pid in list(self.stdio):
            self._close_stdio(pid)
        fds = {fd for g in self.gens.values() for fd in (g.rfd, g.wfd)}
        fds |= {fd for pair in self.exit_fds.values() for fd in pair}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.listeners.close_all()

    # -- the System protocol ---------------------------------------------
    def now(self) -> float:
        return self.clock

    def spawn(self, number: int, argv: list[str], env: dict[str, str],
              cwd: str | None = None, stdio: tuple[int | None, int | None] = (None, None)
              ) -> tuple[int, int]:
        if self.spawn_error is not None:
            raise self.spawn_error
        self.spawns.append((list(argv), dict(env)))
        self.cwds.append(cwd)
        self.next_pid += 1
        # What the process would write to: its own copies, closed as it exits.
        self.stdio[self.next_pid] = tuple(os.dup(fd) if fd is not None else None
                                          for fd in stdio)  # type: ignore[assignment]
        g = self.gens.get(number)
        if g is not None and not g.hung_up:  # --multi: another copy, same notify group
            g.pids.add(self.next_pid)
            self.events.append(f"spawn {number} copy")
            return self.next_pid, g.rfd
        r, w = os.pipe()
        self.gens[number] = FakeGen(number, self.next_pid, r, w, {self.next_pid})
        self.events.append(f"spawn {number}")
        return self.next_pid, r

    def attach(self, number: int, pid: int) -> Attached:
        r, w = os.pipe()
        self.gens[number] = FakeGen(number, pid, r, w, {pid})
        self.exit_fds[number] = os.pipe()
        self.events.append(f"attach {number}")
        addr = Address(socket.AF_INET, "127.0.0.1", 8000)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.listeners.add(addr, s, 5)
        return Attached(r, self.exit_fds[number][0], [addr], [])

    def find_program(self, argv: list[str], env: dict[str, str], cwd: str | None,
                     path: str | None) -> str:
        if self.program_error is not None:
            raise self.program_error
        return path or f"/bin/{argv[0]}"

    def exec_in_place(self, number: int, new_number: int, pid: int, path: str,
                      argv: list[str], env: dict[str, str], *, cwd: str | None = None) -> None:
        self.events.append(f"exec {number} -> {new_number}")
        self.execs.append((list(argv), dict(env)))
        self.exec_cwds.append(cwd)
        if self.exec_error is not None:
            raise self.exec_error
        old = self.gens[number]
        # The new image is the same process: same notify fd, same process tree.
        self.gens[new_number] = FakeGen(new_number, pid, old.rfd, old.wfd, set(old.pids))
        old.pids = set()
        if number in self.exit_fds:
            self.exit_fds[new_number] = self.exit_fds.pop(number)

    # -- following a root's exit (exec mode with --drain-signal) ----------------
    def follow_exit(self, number: int, new_number: int, pid: int, path: str,
                    argv: list[str], env: dict[str, str], *, cwd: str | None = None) -> None:
        self.events.append(f"follow {number}")
        if self.follow_error is not None:
            raise self.follow_error
        self.following[number] = new_number
        self.execs.append((list(argv), dict(env)))
        self.exec_cwds.append(cwd)

    def exit_followed(self, number: int) -> FollowResult | None:
        got = self.follow_results.pop(number, None)
        if got is None or number not in self.following:
            return None
        self._end_follow(number, got)
        return got

    def unfollow(self, number: int) -> FollowResult | None:
        if number not in self.following:
            return None
        self.events.append(f"unfollow {number}")
        if self.exec_under_way:
            return None
        got = FollowResult(Followed.RELEASED, "released")
        self._end_follow(number, got)
        return got

    def _end_follow(self, number: int, got: FollowResult) -> None:
        new_number = self.following.pop(number)
        if got.outcome is Followed.EXECED:
            old = self.gens[number]
            self.events.append(f"execed {number} -> {new_number}")
            self.gens[new_number] = FakeGen(new_number, old.pid, old.rfd, old.wfd, set(old.pids))
            old.pids = set()
            if number in self.exit_fds:
                self.exit_fds[new_number] = self.exit_fds.pop(number)

    def resume(self, number: int) -> list[str]:
        self.gens[number].paused = False
        self.events.append(f"resume {number}")
        return []

    def alive(self, pids: Iterable[int]) -> set[int]:
        return set(pids) - self.dead

    def service(self, number: int) -> Serviced:
        g = self.gens[number]
        got, g.pending_listens = g.pending_listens, []
        return Serviced(got, g.hung_up)

    def forget(self, number: int) -> None:
        self.events.append(f"forget {number}")

    def reap(self) -> list[tuple[int, int]]:
        out, self.reaped = self.reaped, []
        return out

    def members(self, roots: dict[int, int]) -> dict[int, set[int]]:
        return {n: set(self.gens[n].pids) for n in roots}

    def tracking(self) -> str:
        return "process tree (fake)"

    def close_tracking(self) -> None:
        self.events.append("close tracking")

    def pause(self, number: int, pids: set[int], lives_on: Iterable[int] = ()) -> list[str]:
        self.lives_on[number] = set(lives_on)
        self.paused_pids.setdefault(number, set()).update(pids)
        self.gens[number].paused = True
        self.events.append(f"pause {number}")
        return list(self.pause_problems)

    def seal(self, number: int, pids: set[int]) -> list[str]:
        self.sealed.setdefault(number, set()).update(pids)
        self.events.append(f"seal {number}")
        return []

    def close_idle(self, pids: set[int], addresses: set[Address], idle_ms: int) -> int:
        return 0

    def listener_stats(self) -> list[dict[str, object]]:
        return [{"address": str(h.address), "inode": h.inode, "queued": 0,
                 "backlog": h.backlog} for h in self.listeners]

    def reap_for(self, parent: int, pids: set[int]) -> list[str]:
        self.reaped_for.append((parent, set(pids)))
        return []

    def release_except(self, addresses: set[Address]) -> list[Address]:
        return self.listeners.keep_only(addresses)

    def end_startup(self, number: int) -> None:
        self.events.append(f"end startup {number}")

    def release_abandoned(self, pids: set[int]) -> list[Address]:
        gone = [a for a in self.abandoned if self.listeners.get(a) is not None]
        for a in gone:
            self.listeners.release(a)
        return gone

    def refuse_new(self) -> None:
        self.refused_new = True
        self.listeners.refuse_new()

    def listener_holders(self) -> dict[int, list[Address]]:
        return dict(self.holders)

    def close_listeners(self) -> None:
        self.listeners.close_all()

    def in_flight(self, pids: set[int], addresses: set[Address]) -> int | None:
        if self.uncountable:
            return None
        return sum(self.in_flight_by_pid.get(p, 0) for p in pids)

    def connections(self, pids: set[int], addresses: set[Address]) -> set[int] | None:
        if self.uncountable:
            return None
        return {p * 1000 + i for p in pids for i in range(self.in_flight_by_pid.get(p, 0))}

    def signal(self, pids: Iterable[int], sig: int) -> None:
        for p in pids:
            self.signals.append((p, sig))


def state_of(obj: Any) -> Any:
    """``obj.state``, read afresh: after one assert on it, mypy would take a later
    comparison with another state for one that can never be true."""
    return obj.state
