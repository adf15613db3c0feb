"""The seam between the supervisor's logic and the kernel.

``System`` is everything the supervisor asks of the operating system, in the
supervisor's own terms (generations, addresses, process sets).  ``LinuxSystem``
(hupt/linux.py) implements it with the modules of ``hupt.tracer``; unit tests drive the
supervisor with a fake that needs no root and no kernel (tests/fakes.py).

A generation is started (``spawn``, hupt's child) or taken over (``attach``,
someone else's child, watched through a pidfd).  In exec mode its root
process outlives it: ``exec_in_place`` hands the root, its notify fds and its
pidfd to the next generation number, and ``members`` is then asked only about
the newest generation of a root, while the older one's leftover processes are
followed by pid (``alive``).

Nothing above this module imports ``hupt.tracer``: the few kernel facts the
command line and the control socket need besides a ``System`` (becoming a
subreaper, a pidfd to wait on, a parent pid, inspecting a server before
``hupt attach``) are small functions at the end of this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from hupt.address import Address
from hupt.command import GEN_ENV as GEN_ENV
from hupt.errors import HuptError

if TYPE_CHECKING:
    from hupt.tracer.attach import AttachRefused as AttachRefused
    from hupt.tracer.attach import Server as Server


@dataclass(frozen=True)
class Serviced:
    listened: list[Address]
    hung_up: bool  # no process uses the filter any more


@dataclass(frozen=True)
class Attached:
    """A running server taken over as a generation."""

    notify_fd: int  # to watch for its notifications
    exit_fd: int  # readable once its root process has exited (it is not hupt's child)
    listened: list[Address]  # the listeners hupt now holds
    problems: list[str]  # processes of the server that could not be filtered


class Followed(Enum):
    """How following a draining root's exit ended (exec mode with --drain-signal)."""

    EXECED = "execed"  # its exit became the exec: the root runs the program again
    EXEC_FAILED = "exec failed"  # the exec could not happen: the root exits after all
    EXITED = "exited"  # the root is gone without an exit to catch (crashed, killed)
    RELEASED = "released"  # hupt let go before the exit: the old program runs on


@dataclass(frozen=True)
class FollowResult:
    outcome: Followed
    detail: str


class System(Protocol):
    def now(self) -> float: ...

    def spawn(self, number: int, argv: list[str], env: dict[str, str],
              cwd: str | None = None, stdio: tuple[int | None, int | None] = (None, None)
              ) -> tuple[int, int]:
        """Start a generation; return (pid, fd to watch for its notifications).

        ``stdio``: what its stdout and stderr are (fds of hupt's, copied onto
        1 and 2), None for each it inherits from hupt.
        """

    def attach(self, number: int, pid: int) -> Attached:
        """Take over running process ``pid`` and its descendants as generation ``number``."""

    def find_program(self, argv: list[str], env: dict[str, str], cwd: str | None,
                     path: str | None) -> str:
        """The file an exec of ``argv`` runs now (``path``, or argv[0] on env's PATH).

        Raises HuptError if there is no such executable file.
        """

    def exec_in_place(self, number: int, new_number: int, pid: int, path: str,
                      argv: list[str], env: dict[str, str], *, cwd: str | None = None) -> None:
        """Make ``pid``, the root of generation ``number``, execve ``path`` in place
        (after a chdir to ``cwd``, if given: --chdir, entered afresh by its path).

        On success its notify fd belongs to generation ``new_number``.  On
        failure (HuptError) it runs the old program on, in its old working
        directory, its listeners still paused.
        """

    def service(self, number: int) -> Serviced: ...

    def forget(self, number: int) -> None:
        """The generation is gone: drop its notify fd."""

    def reap(self) -> list[tuple[int, int]]:
        """(pid, exit code) of every exited child; a code -N means killed by signal N."""

    def members(self, roots: dict[int, int]) -> dict[int, set[int]]:
        """Live processes of each generation, given generation -> root pid.

        A generation lives on after its root exits as long as any process it
        made runs (a server that daemonized: its launcher exited 0)."""

    def tracking(self) -> str:
        """How ``members`` tells a generation's processes: "cgroup PATH", or "process
        tree" (with why no cgroup could be used)."""

    def close_tracking(self) -> None:
        """hupt exits: remove what it made to track the generations (their cgroups)."""

    def alive(self, pids: Iterable[int]) -> set[int]:
        """Those of ``pids`` that still run (zombies do not)."""

    def pause(self, number: int, pids: set[int], lives_on: Iterable[int] = ()) -> list[str]:
        """Make these processes stop accepting on every held listener; return problems.

        ``lives_on``: those that will serve again (exec mode: the root, which
        execs or resumes), as opposed to retiring ones.
        """

    def resume(self, number: int) -> list[str]:
        """Undo every ``pause`` of generation ``number``; return problems."""

    def follow_exit(self, number: int, new_number: int, pid: int, path: str,
                    argv: list[str], env: dict[str, str], *, cwd: str | None = None) -> None:
        """Follow ``pid``, the root of generation ``number``, until it exits: its exit
        becomes an execve of ``path`` (after a chdir to ``cwd``, if given; as
        ``exec_in_place``, the root then belongs to ``new_number``).  The server
        runs on meanwhile.

        Raises HuptError if it cannot be followed (then nothing changed).
        """

    def exit_followed(self, number: int) -> FollowResult | None:
        """What the followed root did since last asked: None while it runs on,
        the result once (hupt follows it no more)."""

    def unfollow(self, number: int) -> FollowResult | None:
        """Stop following now.  None if its exec is already under way (the result
        comes from ``exit_followed``); RELEASED if the old program runs on."""

    def seal(self, number: int, pids: set[int]) -> list[str]:
        """These paused processes retire after all (a --ready http probe succeeded):
        what ``pause`` does for retiring ones and not for ``lives_on``."""

    def in_flight(self, pids: set[int], addresses: set[Address]) -> int | None:
        """Accepted connections of these processes on these addresses still open;
        None when the kernel's tables could not be read (not the same as 0)."""

    def connections(self, pids: set[int], addresses: set[Address]) -> set[int] | None:
        """What ``in_flight`` counts, one socket inode each (the same connection keeps
        its inode: how long one has been open is followed from poll to poll)."""

    def close_idle(self, pids: set[int], addresses: set[Address], idle_ms: int) -> int:
        """Close (FIN) the idle keep-alive connections of these processes; return how many."""

    def listener_stats(self) -> list[dict[str, object]]:
        """Each held listener: address, inode, accept-queue length, backlog."""

    def reap_for(self, parent: int, pids: set[int]) -> list[str]:
        """Make ``parent`` reap those of ``pids`` that are its zombie children (an
        exec'd image's predecessors' workers, which it does not know); return problems."""

    def release_except(self, addresses: set[Address]) -> list[Address]:
        """Close the held sockets of every other address; return those released."""

    def end_startup(self, number: int) -> None:
        """Generation ``number`` has started: from now on its datagram bind() of an
        address hupt does not hold goes through as its own, unheld (a resolver's
        query port, bound while it serves, is not a service address)."""

    def release_abandoned(self, pids: set[int]) -> list[Address]:
        """Release the held datagram sockets none of ``pids`` has open any more (a
        query port the server closed); return their addresses.  Read from /proc."""

    def refuse_new(self) -> None:
        """hupt stops: clients connecting from now on are refused, not queued."""

    def listener_holders(self) -> dict[int, list[Address]]:
        """Processes (other than hupt) whose fd table holds a held listening socket
        itself, not a paused stand-in: pid -> the addresses.  Read from /proc."""

    def close_listeners(self) -> None:
        """hupt exits: close every held socket (unix paths removed)."""

    def signal(self, pids: Iterable[int], sig: int) -> None: ...


def become_subreaper() -> None:
    """Make hupt the child subreaper of everything it starts (for its whole life).

    A server that daemonizes then stays hupt's descendant: ``members`` finds
    it by walking down from hupt's children, and ``hupt reload PID`` finds
    hupt by walking up from any of the server's processes.
    """
    from hupt.tracer import subreaper

    subreaper.become_subreaper()


def watch_exit(pid: int) -> int:
    """A pidfd on ``pid``, to poll: readable once that process has exited.

    Unlike the pid it never names a process that reused it.  The caller closes
    it; HuptError if ``pid`` is gone or not ours to watch.
    """
    from hupt.tracer import pidfd

    return pidfd.pidfd_open(pid)


def procname(pid: int) -> str:
    """The command name of ``pid`` (its comm), or "?" if it is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return os.fsdecode(f.read().strip()) or "?"
    except OSError:
        return "?"


def parent_of(pid: int) -> int:
    """The parent process id of ``pid``; HuptError if it cannot be read (gone)."""
    from hupt.tracer import procfs

    return procfs.ppid_of(pid)


def inspect_server(pid: int, datagrams: frozenset[Address] = frozenset()) -> Server:
    """What ``hupt attach`` would take over in ``pid``, without changing anything:
    its command, environment, processes, listening sockets and the ``datagrams``.

    Raises AttachRefused if it cannot be taken over (gone, traced by someone
    else, no listening socket, no permission).
    """
    from hupt.tracer import attach

    return attach.inspect(pid, datagrams)


def __getattr__(name: str) -> object:
    # AttachRefused and Server (the type inspect_server returns) live in
    # hupt.tracer.attach, which imports pyroute2 (a few hundred ms): loaded
    # when first asked for, not by every importer of this module.
    if name in ("AttachRefused", "Server"):
        from hupt.tracer import attach

        return getattr(attach, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def find_program(name: str, path_var: str | None, cwd: str | None) -> str:
    """The executable file ``name`` means, looked up the way execvpe() does.

    A name with a slash is a path (relative to ``cwd``); a bare name is searched
    in ``path_var`` (the server's PATH, or the default search path), relative
    entries again against ``cwd``.  Looked up at each reload, so that a binary
    replaced on disk, or one earlier on the PATH, is what runs.
    """
    base = cwd if cwd is not None else os.getcwd()
    if "/" in name:
        found = os.path.join(base, name)
        if not os.path.isfile(found) or not os.access(found, os.X_OK):
            raise HuptError(f"{found} is not an executable file")
        return found
    for d in (path_var if path_var is not None else os.defpath).split(os.pathsep):
        candidate = os.path.join(base, d or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise HuptError(f"{name!r} not found on PATH")
