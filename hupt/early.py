"""Generation 1 of ``hupt run``, spawned before LinuxSystem exists.

``hupt run`` should add little before the server runs (issue 14).  What the
spawn itself needs is small: the notify filter's program, the process's
cgroup, its environment marker.  What LinuxSystem brings along (the handoff,
the listeners, the tracer's ptrace and sock_diag parts, and dataclasses
under most of them) costs about as much again as the interpreter's own
start, and none of it is needed before the server's first bind() reaches
hupt: that call waits in the filter until hupt answers.  So ``Early`` does
LinuxSystem's spawn of generation 1 with only this module's imports, and
LinuxSystem, built once the server runs, adopts what it made
(``LinuxSystem.adopt_early``): the same filter, group, marker and notify fd
as its own spawn would have given it.
"""

from __future__ import annotations

import contextlib
import os
import select
from typing import NamedTuple

from hupt.command import GEN_ENV
from hupt.errors import HuptError
from hupt.tracer import cgroup
from hupt.tracer.abi import SYS
from hupt.tracer.spawn import notified_calls, spawn


class EarlySpawned(NamedTuple):
    number: int
    pid: int
    notify_fd: int
    joined: bool  # it is in ``group``
    group: str | None
    syscalls: list[SYS]
    epoll: select.epoll  # the notify fd in it: the fd hupt watches


class Early:
    """A System's ``spawn`` for generation 1 alone (hupt/launch.py's Spawner)."""

    def __init__(self, *, exec_mode: bool) -> None:
        self.exec_mode = exec_mode
        self.me = os.getpid()
        self.groups: cgroup.Groups | None = None
        self.no_groups: str | None = None  # why hupt has no cgroups
        self.group_problem: str | None = None  # why generation 1 has no group of its own
        self.spawned: EarlySpawned | None = None

    def spawn(self, number: int, argv: list[str], env: dict[str, str],
              cwd: str | None = None, stdio: tuple[int | None, int | None] = (None, None)
              ) -> tuple[int, int]:
        if self.spawned is not None:
            raise HuptError("Early spawns one generation; the supervisor spawns the others")
        syscalls = notified_calls(unix=self.exec_mode)  # as LinuxSystem.spawn's, no socket held
        env = dict(env)
        env[GEN_ENV] = f"{self.me}.{number}"
        group = None
        try:
            self.groups = cgroup.open_groups(self.me)
        except HuptError as e:
            self.no_groups = str(e)
        if self.groups is not None:
            try:
                group = self.groups.create(number)
            except HuptError as e:
                self.group_problem = str(e)
        try:
            pid, notify_fd, joined = spawn(argv, env, syscalls, cwd=cwd, stdout=stdio[0],
                                           stderr=stdio[1], cgroup=group)
        except BaseException:
            self.close()
            raise
        epoll = select.epoll(flags=select.EPOLL_CLOEXEC)
        epoll.register(notify_fd, select.EPOLLIN)
        self.spawned = EarlySpawned(number, pid, notify_fd, joined, group, syscalls, epoll)
        return pid, epoll.fileno()

    def close(self) -> None:
        """Nobody adopted it (hupt run gave up): its fds and groups go."""
        if self.spawned is not None:
            os.close(self.spawned.notify_fd)
            self.spawned.epoll.close()
            self.spawned = None
        if self.groups is not None:
            with contextlib.suppress(OSError):
                self.groups.close()
            self.groups = None
