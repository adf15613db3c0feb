"""The System on Linux: the seam's interface (hupt/system.py) implemented with
the modules of ``hupt.tracer``.

One record per generation number (``_GenRecord``): its notify fds behind
one pollable fd, the listener copies saved while it is paused, its
generation marker, its cgroup, an attached root's pidfd, its last members.
An exec in place moves the record to the new number whole.

Membership: a spawned generation's processes are those of its own cgroup2
group (hupt/tracer/cgroup.py), which a server cannot leave by daemonizing
nor hide by rewriting its title.  Where no group can be made (no writable
cgroup2 hierarchy: a container, a non-root hupt without delegation) and for
an attached server, they are the process tree below the root, orphans that
came back to hupt told apart by the HUPT_GEN marker in their environment.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hupt import log
from hupt.address import Address
from hupt.errors import HuptError, KernelError, NoSuchProcess
from hupt.handoff import Handoff
from hupt.listeners import Listeners, reuseport
from hupt.system import (
    GEN_ENV,
    Attached,
    Followed,
    FollowResult,
    Serviced,
    find_program,
    procname,
)
from hupt.tracer import cgroup, pidfd, procfs
from hupt.tracer.abi import SYS
from hupt.tracer.notify import NotifyFd
from hupt.tracer.spawn import notified_calls, spawn

if TYPE_CHECKING:
    from hupt.early import Early
    from hupt.tracer.accepting import PausedListeners
    from hupt.tracer.sockdiag import SockDiag
    from hupt.tracer.syscall_stops import ExitToExec, Report


class _Notifications:
    """The notify fds of one generation behind one pollable fd.

    A spawned generation has one notify fd; an attached server has one per
    process that existed at attach time (a filter is per process).  They sit
    in an epoll instance, which is readable while any of them is, so the
    supervisor watches one fd per generation whatever the count.  A notify fd
    whose processes are all gone reports POLLHUP for ever: it is removed and
    closed here, and the group has hung up when none is left.
    """

    def __init__(self, epoll: select.epoll | None = None) -> None:
        self._epoll = epoll if epoll is not None else select.epoll(flags=select.EPOLL_CLOEXEC)
        self.handoffs: dict[int, Handoff] = {}

    def add(self, handoff: Handoff, *, registered: bool = False) -> None:
        fd = handoff.notify.fileno()
        if not registered:  # (Early registered generation 1's: hupt/early.py)
            self._epoll.register(fd, select.EPOLLIN)
        self.handoffs[fd] = handoff

    def fileno(self) -> int:
        return self._epoll.fileno()

    def renumber(self, generation: int) -> None:
        for h in self.handoffs.values():
            h.generation = generation
            h.pending.clear()  # sockets of the program that was replaced
            h.binds.clear()
            h.handed.clear()
            h.counted.clear()  # the same process, a new program: it listens afresh
            h.hold_new_datagrams = True  # and starts up afresh
            h.close()

    def service(self) -> Serviced:
        listened: list[Address] = []
        for fd, ev in self._epoll.poll(0):
            h = self.handoffs[fd]
            if ev & select.EPOLLIN:
                listened += h.service()
            elif ev & select.EPOLLHUP:
                self._epoll.unregister(fd)
                del self.handoffs[fd]
                h.notify.close()
                h.close()
        return Serviced(listened, not self.handoffs)

    def close(self) -> None:
        for h in self.handoffs.values():
            h.notify.close()
            h.close()
        self.handoffs.clear()
        self._epoll.close()


@dataclass(eq=False)
class _GenRecord:
    """What LinuxSystem keeps about one generation, under its current number.

    An exec in place moves the record to the next number: the root process
    and its filter live on, so its notify fds, its pidfd, its marker and its
    unlink coverage go with it.
    """

    notifications: _Notifications | None = None
    # Saved copies of its listeners, one per paused process, until ``resume``.
    paused: list[PausedListeners] = field(default_factory=list)
    # Its filter notifies unlink/unlinkat (spawned while hupt held a unix socket
    # path or in exec mode, or attached to a unix server).
    unlink_covered: bool = False
    # The HUPT_GEN marker number its processes carry: its own number, or after
    # an exec in place the number it was spawned as.  None: attached (no marker).
    marker: int | None = None
    # Attached (the root is not our child): a pidfd on the root.
    pidfd: int | None = None
    members: set[int] = field(default_factory=set)  # the last answer of ``members``
    # Its cgroup2 group (every process it makes is a member); None: tracked by its tree.
    group: str | None = None
    # Without a group: since when an unreadable process (a daemon on its way to hupt,
    # or a retitled one) has kept its last members (IN_TRANSIT_MAX bounds it).
    transit_since: float | None = None

    def close(self) -> None:
        if self.notifications is not None:
            self.notifications.close()
            self.notifications = None
        self.paused.clear()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


# Longest a generation whose processes all seem gone keeps its last members
# because a process under hupt could not be told apart (its marker unreadable:
# exiting, or overwritten by a new process title).  A daemon in transit is
# re-parented within milliseconds; past this the generation is taken as gone.
IN_TRANSIT_MAX = 5.0


class LinuxSystem:
    """The System on Linux.

    ``exec_mode``: generations are never started anew, so the filter they
    start with must do for every image they will exec: a spawned one
    notifies unlink and unlinkat from the start (the next image removes its
    unix socket path before binding it, which must not remove the path hupt
    holds), at the cost of a round trip to hupt for each unlink the server
    makes.  An attached server does only if it listens on a unix socket
    already: its filter outlives hupt attach, and every filtered call fails
    once hupt is gone.
    """

    def __init__(self, *, exec_mode: bool = False,
                 attach_datagrams: frozenset[Address] = frozenset()) -> None:
        self.listeners = Listeners()
        self._exec_mode = exec_mode
        self._attach_datagrams = attach_datagrams  # hupt attach --datagram
        self._gens: dict[int, _GenRecord] = {}  # by generation number
        self._diag: SockDiag | None = None
        self._me = os.getpid()
        # Roots followed until their exit becomes an exec: number -> (tracer, new number)
        self._following: dict[int, tuple[ExitToExec, int]] = {}
        # hupt's cgroups, made at the first spawn; why not, when they cannot be.
        self._groups: cgroup.Groups | None = None
        self._no_groups: str | None = None

    def _cgroups(self) -> cgroup.Groups | None:
        if self._groups is not None or self._no_groups is not None:
            return self._groups
        try:
            self._groups = cgroup.open_groups(self._me)
        except HuptError as e:
            self._no_groups = str(e)
        return self._report_groups()

    def _report_groups(self) -> cgroup.Groups | None:
        """Say whether hupt has cgroups; remove what killed hupts left (once)."""
        if self._groups is None:
            e = self._no_groups
            log.info(f"cgroups unavailable ({e}): generations are tracked by their process "
                     "tree; a server that daemonizes and rewrites its title may be lost")
            return None
        log.debug(f"each generation gets a cgroup below {self._groups.base}")
        for path, pids in cgroup.sweep(self._groups).items():
            log.warn(f"{path} was left by a hupt that was killed; still in it: "
                     + ", ".join(f"{p} ({procname(p)})" for p in sorted(pids))
                     + ": `hupt attach PID` takes a server over again; `echo 1 > "
                     f"{path}/cgroup.kill` ends them all")
        return self._groups

    def tracking(self) -> str:
        if self._groups is not None:
            return f"cgroup {self._groups.base}"
        if self._no_groups is not None:
            return f"process tree ({self._no_groups})"
        return "process tree"

    def now(self) -> float:
        return time.monotonic()

    def _filter_calls(self, *, spawning: bool) -> list[SYS]:
        return notified_calls(unix=self.listeners.has_unix or (self._exec_mode and spawning))

    def adopt_early(self, early: Early) -> None:
        """Take generation 1 as ``hupt run`` spawned it before this System existed
        (hupt/early.py), as if ``spawn`` had made it."""
        sp = early.spawned
        if sp is None:
            raise HuptError("no generation was spawned early")
        self._groups, self._no_groups = early.groups, early.no_groups
        self._report_groups()
        if early.group_problem is not None:
            log.warn(f"generation {sp.number} is tracked by its process tree: "
                     f"{early.group_problem}")
        early.spawned, early.groups = None, None  # ours now
        self._register(sp.number, _GenRecord(group=sp.group), sp.pid, sp.notify_fd, sp.joined,
                       sp.syscalls, _Notifications(sp.epoll))

    def spawn(self, number: int, argv: list[str], env: dict[str, str],
              cwd: str | None = None, stdio: tuple[int | None, int | None] = (None, None)
              ) -> tuple[int, int]:
        syscalls = self._filter_calls(spawning=True)
        env = dict(env)
        env[GEN_ENV] = f"{self._me}.{number}"
        rec = self._gens.get(number)
        fresh = rec is None
        if rec is None:
            rec = _GenRecord()
            groups = self._cgroups()
            if groups is not None:
                try:
                    rec.group = groups.create(number)
                except HuptError as e:
                    log.warn(f"generation {number} is tracked by its process tree: {e}")
        try:
            pid, notify_fd, joined = spawn(argv, env, syscalls, cwd=cwd, stdout=stdio[0],
                                           stderr=stdio[1], cgroup=rec.group)
        except BaseException:
            if fresh and rec.group is not None and self._groups is not None:
                self._groups.remove(rec.group)
            raise
        return self._register(number, rec, pid, notify_fd, joined, syscalls)

    def _register(self, number: int, rec: _GenRecord, pid: int, notify_fd: int, joined: bool,
                  syscalls: list[SYS], registered: _Notifications | None = None
                  ) -> tuple[int, int]:
        """A process of generation ``number`` was spawned: its group checked, its notify
        fd watched (``registered``: in there already, by Early)."""
        if rec.group is not None and not joined:
            # --multi: a copy outside the group would be no member at all.
            log.warn(f"generation {number}: pid {pid} could not join {rec.group}: the "
                     "generation is tracked by its process tree")
            if self._groups is not None and cgroup.procs(rec.group) == set():
                self._groups.remove(rec.group)
            rec.group = None
        self._gens[number] = rec
        notify = NotifyFd(notify_fd)
        notify.enable_sync_wakeup()
        group = rec.notifications
        if group is None:  # --multi: later copies join the first one's group
            group = rec.notifications = registered or _Notifications()
        group.add(Handoff(number, notify, self.listeners), registered=registered is not None)
        rec.marker = number
        rec.unlink_covered |= SYS.unlink in syscalls
        if self._exec_mode and self._diag is None:
            # Counting connections imports pyroute2 (a few hundred ms).  In exec
            # mode the first count happens while the server accepts nothing:
            # pay for it now, while it starts.
            from hupt.tracer import sockdiag

            self._diag = sockdiag.SockDiag()
        return pid, group.fileno()

    def attach(self, number: int, pid: int) -> Attached:
        from hupt.tracer import attach, bpf, seccomp

        server = attach.inspect(pid, self._attach_datagrams)
        taken: list[Address] = []
        try:
            for lst in server.listeners:
                sock = attach.take_listener(lst)
                try:
                    held = self.listeners.get(lst.address)
                    if held is not None and reuseport(sock) and reuseport(held.sock):
                        # A server sharding its port (a socket per worker): keep
                        # every queue of the group, not only the last one found.
                        self.listeners.add_to_group(lst.address, sock)
                        continue
                    self.listeners.add(lst.address, sock, lst.backlog)
                except BaseException:
                    sock.close()
                    raise
                taken.append(lst.address)
            exit_fd = pidfd.pidfd_open(pid)
        except BaseException:
            for a in taken:
                self.listeners.release(a)
            raise
        syscalls = self._filter_calls(spawning=False)
        try:
            prog = bpf.pack(seccomp.build_filter(syscalls))
            root, others, problems = attach.filter_processes(server, prog)
        except BaseException:
            os.close(exit_fd)
            for a in taken:
                self.listeners.release(a)
            raise
        group = _Notifications()
        for fd in (root, *others.values()):
            notify = NotifyFd(fd)
            notify.enable_sync_wakeup()
            group.add(Handoff(number, notify, self.listeners))
        self._gens[number] = _GenRecord(notifications=group, pidfd=exit_fd,
                                        unlink_covered=SYS.unlink in syscalls)
        return Attached(group.fileno(), exit_fd, taken, problems)

    def find_program(self, argv: list[str], env: dict[str, str], cwd: str | None,
                     path: str | None) -> str:
        return find_program(path or argv[0], env.get("PATH"), cwd)

    def _exec_env(self, number: int, env: dict[str, str]) -> list[bytes]:
        env = dict(env)
        rec = self._gens.get(number)
        if rec is not None and rec.marker is not None:
            env[GEN_ENV] = f"{self._me}.{rec.marker}"
        return [os.fsencode(f"{k}={v}") for k, v in env.items()]

    def exec_in_place(self, number: int, new_number: int, pid: int, path: str,
                      argv: list[str], env: dict[str, str], *, cwd: str | None = None) -> None:
        from hupt.tracer import accepting

        try:
            accepting.exec_in_place(pid, [os.fsencode(a) for a in argv],
                                    self._exec_env(number, env), path=os.fsencode(path),
                                    cwd=os.fsencode(cwd) if cwd is not None else None)
        except ValueError as e:
            raise HuptError(str(e)) from e
        self._moved(number, new_number)

    def follow_exit(self, number: int, new_number: int, pid: int, path: str,
                    argv: list[str], env: dict[str, str], *, cwd: str | None = None) -> None:
        from hupt.tracer.syscall_stops import ExitToExec

        if number in self._following:
            raise HuptError(f"generation {number} is followed already")
        try:
            tracer = ExitToExec(pid, os.fsencode(path), [os.fsencode(a) for a in argv],
                                self._exec_env(number, env),
                                cwd=os.fsencode(cwd) if cwd is not None else None)
        except ValueError as e:
            raise HuptError(str(e)) from e
        tracer.arm()
        self._following[number] = (tracer, new_number)

    def exit_followed(self, number: int) -> FollowResult | None:
        got = self._following.get(number)
        if got is None:
            return None
        return self._followed(number, got[0].pump())

    def unfollow(self, number: int) -> FollowResult | None:
        got = self._following.get(number)
        if got is None:
            return None
        try:
            got[0].release()
        except HuptError as e:
            log.warn(f"letting go of generation {number}'s root: {e}")
        return self._followed(number, got[0].pump())

    def _followed(self, number: int, report: Report | None) -> FollowResult | None:
        from hupt.tracer.syscall_stops import Outcome

        if report is None:
            return None
        _tracer, new_number = self._following.pop(number)
        outcome = {Outcome.EXECED: Followed.EXECED, Outcome.EXEC_FAILED: Followed.EXEC_FAILED,
                   Outcome.EXITED: Followed.EXITED,
                   Outcome.RELEASED: Followed.RELEASED}[report.outcome]
        if outcome is Followed.EXECED:
            self._moved(number, new_number)
        return FollowResult(outcome, report.detail)

    def _moved(self, number: int, new_number: int) -> None:
        rec = self._gens.get(number)
        if rec is None:
            return
        # The same root and filter under the next number; the marker stays (the
        # exec'd image keeps the environment above).
        del self._gens[number]
        self._gens[new_number] = rec
        # The saved listener copies were close-on-exec: nothing is left to resume.
        # The stand-ins went with them (the exec closed every fd but stdio).
        rec.paused.clear()
        self.listeners.forget_stand_ins(number)
        if rec.notifications is not None:
            rec.notifications.renumber(new_number)
        rec.members = set()  # ``members`` has not been asked about the new number yet

    def service(self, number: int) -> Serviced:
        rec = self._gens.get(number)
        if rec is None or rec.notifications is None:
            return Serviced([], True)
        return rec.notifications.service()

    def forget(self, number: int) -> None:
        if number in self._following:
            self.unfollow(number)
        rec = self._gens.pop(number, None)
        if rec is not None:
            rec.close()
            if rec.group is not None and self._groups is not None:
                # Busy (a process outlived its generation): tried again at close.
                self._groups.remove(rec.group)
        self.listeners.forget_stand_ins(number)

    def close_tracking(self) -> None:
        if self._groups is None:
            return
        for path, pids in self._groups.close().items():
            log.warn(f"{path} is left: its processes outlived hupt: "
                     + ", ".join(f"{p} ({procname(p)})" for p in sorted(pids)))

    def reap(self) -> list[tuple[int, int]]:
        # The kernel reports a ptrace-stop of a thread hupt traces to any wait of
        # hupt's, WEXITED only or not (wait_task_stopped: "we see ptrace'd stopped
        # tasks regardless of options"), and such a wait consumes it.  Injections
        # are synchronous and never meet this; a root followed to its exit is
        # traced across many loop steps, so while one is, only the zombies /proc
        # shows are reaped, one by one.
        if self._following:
            return self._reap_zombies()
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

    def _reap_zombies(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for pid in procfs.zombie_children(self._me):
            try:
                r = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                continue
            if r is None or r.si_pid == 0:
                continue
            if r.si_code == os.CLD_EXITED:
                out.append((r.si_pid, r.si_status))
            elif r.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
                out.append((r.si_pid, -r.si_status))
        return out

    def members(self, roots: dict[int, int]) -> dict[int, set[int]]:
        # A generation with a group: its members are the group's, whatever their
        # titles and parents.  Read before the tree, so that a process forked
        # between the two reads is in the group (a child starts in its parent's).
        grouped: dict[int, set[int]] = {}
        for number in roots:
            got = self._gens.get(number)
            if got is not None and got.group is not None:
                grouped[number] = cgroup.procs(got.group)
        in_groups = set().union(*grouped.values()) if grouped else set()
        parents = procfs.parent_map()
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            if pid not in in_groups:
                children.setdefault(ppid, []).append(pid)
        by_root = {pid: n for n, pid in roots.items() if n not in grouped}
        by_marker = {r.marker: n for n, r in self._gens.items()
                     if r.marker is not None and n not in grouped}
        out: dict[int, set[int]] = {n: set() for n in roots}
        prefix = f"{GEN_ENV}={self._me}.".encode()
        starts: list[tuple[int, int]] = []
        in_transit = False
        pending = list(children.get(self._me, []))
        while pending:
            pid = pending.pop()
            n = by_root.get(pid)
            if n is None:
                # An orphan that came back to us (subreaper), told by its marker.
                m = _marker(pid, prefix)
                if m is None:
                    # Unreadable: a daemonizing intermediate that exited since the
                    # scan (a zombie's environ reads empty).  Its children are on
                    # their way to us, maybe forked after the scan's listing.
                    in_transit = True
                    pending.extend(children.get(pid, []))
                    continue
                n = by_marker.get(m)
            if n is not None and n in out:
                starts.append((pid, n))
        for n, pid in roots.items():
            rec = self._gens.get(n)
            if n in grouped:
                out[n] = grouped[n] & set(parents)  # listed, and not a zombie since
                continue
            fd = rec.pidfd if rec is not None else None
            # Not our child: a zombie root is its parent's to reap, and the pidfd
            # says when the whole process (every thread) has exited.
            if fd is not None and pid in parents and not _readable(fd):
                starts.append((pid, n))
        for pid, n in starts:
            stack = [pid]
            while stack:
                p = stack.pop()
                out[n].add(p)
                stack.extend(children.get(p, []))
        now = self.now()
        for n, pids in out.items():
            rec = self._gens.get(n)
            if rec is None or n in grouped:
                continue
            if pids or not in_transit:
                rec.transit_since = None
                continue
            # A generation that seems empty may have its daemon in transit behind
            # that zombie: it keeps its last members until a scan after the reap,
            # for IN_TRANSIT_MAX at most (a retitled daemon's marker never reads).
            if rec.transit_since is None:
                rec.transit_since = now
            if now - rec.transit_since < IN_TRANSIT_MAX:
                pids |= rec.members
            elif rec.members:
                log.warn(f"generation {n}: no process of it found for {IN_TRANSIT_MAX:g} s "
                         "(unreadable processes under hupt: exiting, or retitled daemons "
                         "without a cgroup to find them by): taken as gone")
        for n, rec in self._gens.items():
            rec.members = out.get(n, set())
        return out

    def alive(self, pids: Iterable[int]) -> set[int]:
        out = set()
        for pid in pids:
            try:
                state = procfs.status_fields(pid).get("State", "")
            except HuptError:
                continue
            if not state.startswith(("Z", "X")):
                out.add(pid)
        return out

    def pause(self, number: int, pids: set[int], lives_on: Iterable[int] = ()) -> list[str]:
        from hupt.tracer import accepting  # ptrace machinery: only needed at a reload

        problems: list[str] = []
        inodes = self.listeners.inodes()
        for pid in sorted(pids):
            try:
                socks = procfs.socket_inodes(pid)
                fds = [fd for fd, ino in socks.items() if ino in inodes]
                if fds:
                    # (A reuseport group's other sockets have flags of their own: left as found.)
                    views = {fd: held.nonblock_of(number) for fd in fds
                             if (held := self.listeners.by_inode(socks[fd])) is not None
                             and held.inode == socks[fd]}
                    saved = accepting.pause_listeners(pid, fds, nonblock=views)
                    self._gens.setdefault(number, _GenRecord()).paused.append(saved)
                    for p in saved.listeners:
                        if p.stand_in is not None:
                            self.listeners.add_stand_in(
                                _absolute(pid, p.stand_in), number)
            except NoSuchProcess:
                continue
            except HuptError as e:
                problems.append(f"pid {pid}: {e}")
        return problems + self.seal(number, pids - set(lives_on))

    def seal(self, number: int, pids: set[int]) -> list[str]:
        from hupt.tracer import accepting

        # A generation whose filter does not notify unlink could remove the
        # unix socket path the next one serves, as servers do when they exit:
        # a filter stacked on it makes unlink a no-op.  Only on processes on
        # their way out: one that serves on would never unlink anything again.
        rec = self._gens.get(number)
        if not self.listeners.unix_paths() or (rec is not None and rec.unlink_covered):
            return []
        problems: list[str] = []
        for pid in sorted(pids):
            try:
                accepting.inject_filter(pid, _noop_unlink_filter(), listener=False)
            except NoSuchProcess:
                continue
            except HuptError as e:
                problems.append(f"pid {pid}: {e}")
        return problems

    def resume(self, number: int) -> list[str]:
        from hupt.tracer import accepting

        problems: list[str] = []
        rec = self._gens.get(number)
        paused: list[PausedListeners] = []
        if rec is not None:
            paused, rec.paused = rec.paused, []
        for saved in reversed(paused):
            try:
                was = {p.ino: h.nonblock() for p in saved.listeners
                       if (h := self.listeners.by_inode(p.ino)) is not None and h.inode == p.ino}
                skipped = accepting.resume_listeners(saved.pid, saved)
                for p in saved.listeners:
                    held = self.listeners.by_inode(p.ino)
                    if held is not None and p.ino in was and p.fd not in skipped:
                        # The resume gave it its own O_NONBLOCK back, for every holder.
                        held.set_by(number, was[p.ino], p.nonblock)
                if skipped:
                    problems.append(f"pid {saved.pid}: fds {skipped} were replaced meanwhile")
            except NoSuchProcess:
                continue
            except HuptError as e:
                problems.append(f"pid {saved.pid}: {e}")
        return problems

    def _sockdiag(self) -> SockDiag:
        from hupt.tracer import sockdiag  # pyroute2 is slow to import: not before the exec

        if self._diag is None:
            self._diag = sockdiag.SockDiag()
        return self._diag

    def close_idle(self, pids: set[int], addresses: set[Address], idle_ms: int) -> int:
        from hupt import drain

        try:
            idle = drain.idle_connections(self._sockdiag(), _streams(addresses), pids, idle_ms)
        except KernelError as e:
            log.warn(f"looking for idle connections: {e}")
            return 0
        return sum(1 for c in idle if drain.close_connection(c))

    def reap_for(self, parent: int, pids: set[int]) -> list[str]:
        from hupt.tracer import orphans

        zombies = []
        for pid in sorted(pids):
            try:
                fields = procfs.status_fields(pid)
            except HuptError:
                continue  # reaped already
            if fields.get("State", "").startswith("Z") and fields.get("PPid") == str(parent):
                zombies.append(pid)
        if not zombies:
            return []
        try:
            orphans.reap_for(parent, zombies)
        except NoSuchProcess:
            return []  # the parent is gone: they went to hupt, the subreaper
        except HuptError as e:
            return [f"pid {parent} could not reap {zombies}: {e}"]
        return []

    def release_except(self, addresses: set[Address]) -> list[Address]:
        return self.listeners.keep_only(addresses)

    def end_startup(self, number: int) -> None:
        rec = self._gens.get(number)
        if rec is not None and rec.notifications is not None:
            for h in rec.notifications.handoffs.values():
                h.hold_new_datagrams = False

    def release_abandoned(self, pids: set[int]) -> list[Address]:
        held = {h.inode: h.address for h in self.listeners if h.address.is_datagram}
        if not held:
            return []
        open_now: set[int] = set()
        for pid in pids:
            try:
                open_now |= set(procfs.socket_inodes(pid).values())
            except HuptError:
                continue  # gone: holds nothing
        gone = [a for ino, a in held.items() if ino not in open_now]
        for a in gone:
            self.listeners.release(a)
        return gone

    def refuse_new(self) -> None:
        self.listeners.refuse_new()

    def close_listeners(self) -> None:
        self.listeners.close_all()

    def listener_holders(self) -> dict[int, list[Address]]:
        held = self.listeners.inodes()
        out: dict[int, list[Address]] = {}
        if not held:
            return out
        # A paused process keeps its listener on a high close-on-exec fd (to be put
        # back on resume): that copy accepts nothing, so it does not count.
        saved = {(p.pid, one.saved) for rec in self._gens.values() for p in rec.paused
                 for one in p.listeners}
        for pid in procfs.parent_map():
            if pid == self._me:
                continue
            try:
                found = {held[i] for fd, i in procfs.socket_inodes(pid).items()
                         if i in held and (pid, fd) not in saved}
            except HuptError:
                continue  # gone, or not ours to look at
            if found:
                out[pid] = sorted(found, key=str)
        return out

    def listener_stats(self) -> list[dict[str, object]]:
        diag = self._sockdiag()
        out: list[dict[str, object]] = []
        for held in self.listeners:
            a = held.address
            queued: int | None = None
            backlog: int | None = held.backlog
            try:
                if a.is_datagram:
                    rows = []  # no accept queue
                elif a.is_unix:
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

    def in_flight(self, pids: set[int], addresses: set[Address]) -> int | None:
        from hupt.tracer import sockdiag

        try:
            return sockdiag.in_flight(self._sockdiag(), _streams(addresses), pids)
        except KernelError as e:
            log.warn(f"counting connections: {e}")
            return None

    def connections(self, pids: set[int], addresses: set[Address]) -> set[int] | None:
        from hupt.tracer import sockdiag

        try:
            return sockdiag.in_flight_inodes(self._sockdiag(), _streams(addresses), pids)
        except KernelError as e:
            log.warn(f"counting connections: {e}")
            return None

    def signal(self, pids: Iterable[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            except PermissionError as e:
                log.warn(f"cannot signal {pid}: {e}")


def _absolute(pid: int, path: bytes) -> bytes:
    """``path`` as process ``pid`` would resolve it (against its cwd), as the handoff does."""
    if path.startswith(b"/"):
        return path
    return os.path.normpath(os.path.join(os.fsencode(procfs.cwd(pid)), path))


def _streams(addresses: Iterable[Address]) -> set[Address]:
    """The stream ones: a datagram socket has no connections to count or wait for
    (the unix one even carries its own name, as an accepted connection would)."""
    return {a for a in addresses if not a.is_datagram}


def _noop_unlink_filter() -> bytes:
    from hupt.tracer import bpf, seccomp

    return bpf.pack(seccomp.build_noop_filter([SYS.unlink, SYS.unlinkat]))


def _readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _marker(pid: int, prefix: bytes) -> int | None:
    try:
        for var in procfs.environ(pid):
            if var.startswith(prefix):
                return int(var[len(prefix):])
    except (HuptError, ValueError):
        return None
    return None
