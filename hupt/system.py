"""The seam between the supervisor's logic and the kernel.

``System`` is everything the supervisor asks of the operating system, in the
supervisor's own terms (generations, addresses, process sets).  ``LinuxSystem``
implements it with the modules of ``hupt.tracer``; unit tests drive the
supervisor with a fake that needs no root and no kernel (tests/fakes.py).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from hupt import log
from hupt.address import Address
from hupt.errors import HuptError, KernelError, NoSuchProcess
from hupt.handoff import Handoff
from hupt.listeners import Listeners
from hupt.tracer import procfs
from hupt.tracer.abi import SYS
from hupt.tracer.spawn import spawn

if TYPE_CHECKING:
    from hupt.tracer.accepting import PausedListeners
    from hupt.tracer.sockdiag import SockDiag

if TYPE_CHECKING:
    from hupt.tracer.accepting import PausedListeners
    from hupt.tracer.sockdiag import SockDiag

GEN_ENV = "HUPT_GEN"


@dataclass(frozen=True)
class Serviced:
    listened: list[Address]
    hung_up: bool  # no process uses the filter any more


class System(Protocol):
    listeners: Listeners

    def now(self) -> float: ...

    def spawn(self, number: int, argv: list[str], env: dict[str, str]) -> tuple[int, int]:
        """Start a generation; return (pid, fd to watch for its notifications)."""

    def service(self, number: int) -> Serviced: ...

    def forget(self, number: int) -> None:
        """The generation is gone: drop its notify fd."""

    def reap(self) -> list[tuple[int, int]]:
        """(pid, exit code) of every exited child; a code -N means killed by signal N."""

    def members(self, roots: dict[int, int]) -> dict[int, set[int]]:
        """Live processes of each generation, given generation -> root pid."""

    def pause(self, number: int, pids: set[int]) -> list[str]:
        """Make these processes stop accepting on every held listener; return problems."""

    def resume(self, number: int) -> list[str]:
        """Undo pause(): the generation accepts again, epoll registrations as they were."""

    def in_flight(self, pids: set[int], addresses: set[Address]) -> int: ...

    def close_idle(self, pids: set[int], addresses: set[Address], idle_ms: int) -> int:
        """Close (FIN) the idle keep-alive connections of these processes; return how many."""

    def listener_stats(self) -> list[dict[str, object]]:
        """Each held listener: address, inode, accept-queue length, backlog."""

    def signal(self, pids: Iterable[int], sig: int) -> None: ...


class LinuxSystem:
    def __init__(self) -> None:
        self.listeners = Listeners()
        self._handoffs: dict[int, Handoff] = {}
        self._paused: dict[int, list[PausedListeners]] = {}
        # Generations whose filter notifies unlink/unlinkat (those spawned while
        # hupt held a unix socket path).
        self._unlink_covered: set[int] = set()
        self._diag: SockDiag | None = None
        self._me = os.getpid()

    def now(self) -> float:
        return time.monotonic()

    def spawn(self, number: int, argv: list[str], env: dict[str, str]) -> tuple[int, int]:
        syscalls = [SYS.bind, SYS.listen]
        if self.listeners.has_unix:
            syscalls += [SYS.unlink, SYS.unlinkat]
            self._unlink_covered.add(number)
        env = dict(env)
        env[GEN_ENV] = f"{self._me}.{number}"
        pid, notify = spawn(argv, env, syscalls)
        notify.enable_sync_wakeup()
        self._handoffs[number] = Handoff(number, notify, self.listeners)
        return pid, notify.fileno()

    def service(self, number: int) -> Serviced:
        h = self._handoffs.get(number)
        if h is None:
            return Serviced([], True)
        listened = h.service()
        p = select.poll()
        p.register(h.notify.fileno(), select.POLLIN)
        hung = any(ev & select.POLLHUP and not ev & select.POLLIN for _, ev in p.poll(0))
        return Serviced(listened, hung)

    def forget(self, number: int) -> None:
        self._unlink_covered.discard(number)
        h = self._handoffs.pop(number, None)
        if h is not None:
            h.notify.close()
        self._paused.pop(number, None)

    def reap(self) -> list[tuple[int, int]]:
        # waitid(WEXITED) and not waitpid(-1): hupt is also the ptrace tracer of
        # its children during an injection, and waitpid(-1) would steal (and
        # misreport) their trap stops.  CLD_TRAPPED/STOPPED entries are skipped.
        out: list[tuple[int, int]] = []
        while True:
            try:
                r = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                return out
            if r is None or r.si_pid == 0:
                return out
            if r.si_code == os.CLD_EXITED:
                out.append((r.si_pid, r.si_status))
            elif r.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
                out.append((r.si_pid, -r.si_status))

    def members(self, roots: dict[int, int]) -> dict[int, set[int]]:
        parents = procfs.parent_map()
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        by_root = {pid: n for n, pid in roots.items()}
        out: dict[int, set[int]] = {n: set() for n in roots}
        prefix = f"{GEN_ENV}={self._me}.".encode()
        for pid in children.get(self._me, []):
            n = by_root.get(pid)
            if n is None:
                n = _marker(pid, prefix)  # an orphan that came back to us (subreaper)
            if n is None or n not in out:
                continue
            stack = [pid]
            while stack:
                p = stack.pop()
                out[n].add(p)
                stack.extend(children.get(p, []))
        return out

    def pause(self, number: int, pids: set[int]) -> list[str]:
        from hupt.tracer import accepting  # ptrace machinery: only needed at a reload


        problems: list[str] = []
        inodes = self.listeners.inodes()
        for pid in sorted(pids):
            try:
                fds = [fd for fd, ino in procfs.socket_inodes(pid).items() if ino in inodes]
                if fds:
                    rec = accepting.pause_listeners(pid, fds)
                    self._paused.setdefault(number, []).append(rec)
                if self.listeners.unix_paths() and number not in self._unlink_covered:
                    accepting.inject_filter(pid, _noop_unlink_filter(), listener=False)
            except NoSuchProcess:
                continue
            except HuptError as e:
                problems.append(f"pid {pid}: {e}")
        return problems

    def resume(self, number: int) -> list[str]:
        from hupt.tracer import accepting

        problems: list[str] = []
        for rec in reversed(self._paused.pop(number, [])):
            try:
                skipped = accepting.resume_listeners(rec.pid, rec)
                if skipped:
                    problems.append(f"pid {rec.pid}: fds {skipped} were replaced meanwhile")
            except NoSuchProcess:
                continue
            except HuptError as e:
                problems.append(f"pid {rec.pid}: {e}")
        return problems

    def _sockdiag(self) -> SockDiag:
        from hupt.tracer import sockdiag  # pyroute2 is slow to import: not before the exec

        if self._diag is None:
            self._diag = sockdiag.SockDiag()
        return self._diag

    def close_idle(self, pids: set[int], addresses: set[Address], idle_ms: int) -> int:
        from hupt import drain

        try:
            idle = drain.idle_connections(self._sockdiag(), addresses, pids, idle_ms)
        except KernelError as e:
            log.warn(f"looking for idle connections: {e}")
            return 0
        return sum(1 for c in idle if drain.close_connection(c))

    def listener_stats(self) -> list[dict[str, object]]:
        diag = self._sockdiag()
        out: list[dict[str, object]] = []
        for held in self.listeners:
            a = held.address
            queued: int | None = None
            backlog: int | None = held.backlog
            try:
                if a.is_unix:
                    rows = [(u.inode, u.queued, u.backlog) for u in diag.unix_listeners()]
                else:
                    rows = [(t.inode, t.queued, t.backlog)
                            for t in diag.tcp_listeners(a.family, a.port)]
            except KernelError:
                rows = []
            for inode, q, b in rows:
                if inode == held.inode:
                    queued, backlog = q, b
            out.append({"address": str(a), "inode": held.inode, "queued": queued,
                        "backlog": backlog})
        return out

    def in_flight(self, pids: set[int], addresses: set[Address]) -> int:
        from hupt.tracer import sockdiag

        try:
            return sockdiag.in_flight(self._sockdiag(), addresses, pids)
        except KernelError as e:
            log.warn(f"counting connections: {e}")
            return 0

    def signal(self, pids: Iterable[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            except PermissionError as e:
                log.warn(f"cannot signal {pid}: {e}")


def _noop_unlink_filter() -> bytes:
    from hupt.tracer import bpf, seccomp

    return bpf.pack(seccomp.build_noop_filter([SYS.unlink, SYS.unlinkat]))


def _marker(pid: int, prefix: bytes) -> int | None:
    try:
        for var in procfs.environ(pid):
            if var.startswith(prefix):
                return int(var[len(prefix):])
    except (HuptError, ValueError):
        return None
    return None
