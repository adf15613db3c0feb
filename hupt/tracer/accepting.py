"""Facts about making an unmodified server stop accepting (and start again).

hupt retires a generation that shares its listening sockets with the next
one.  The old generation must stop taking connections from the shared accept
queue while it finishes the ones it has, without being told: it is an
unmodified program.  ``pause_listeners`` does it from the outside, in one
``inject.Tracee`` session per process, and ``resume_listeners`` undoes it
(a reload that failed, a rollback).

For each listener fd, in this order (the order is the kernel's, not ours):

1. Keep the listener alive inside the process: ``fcntl(F_DUPFD_CLOEXEC)`` to
   a high fd number, the "saved" copy.  High, because programs hand out the
   lowest free number and a bug such as a double close() then hits one of
   their own fds, not ours.  Close-on-exec, so nothing the server spawns
   inherits it.
2. ``EPOLL_CTL_DEL`` the listener from every epoll instance that watches it,
   as listed (events with their EPOLLET/ONESHOT/EXCLUSIVE bits, and data) by
   the epoll fds' /proc fdinfo, recorded before the change.  An epoll
   registration is keyed by (file, fd number) and DEL needs the fd to still
   name the file: done after the swap of step 3, DEL fails with ENOENT and
   the stale entry reports the listener forever, a busy loop.
3. ``dup3`` a dummy over the listener fd: a listening stream socket with
   the O_NONBLOCK the process expects (see below) and the fd's close-on-exec
   flag, which never becomes readable and never reports an error or
   hang-up: accept() on it blocks or says EAGAIN, select and poll never wake
   for it.  (An unconnected TCP socket reports POLLHUP and makes selector
   loops spin.)  It is of the listener's family, because servers ask it what
   it is: gunicorn, closing its listeners at exit, unlinks the path
   getsockname() gives when it is a unix name, and a unix dummy in place of
   a TCP listener made it fail with "embedded null character" at every
   generation's exit.  A TCP listener gets a TCP dummy on loopback
   (127.0.0.1 or ::1, port 0: an ephemeral port) with a socket filter that
   drops every packet, so no connection to it ever completes.  A unix
   listener with a path gets a unix dummy that answers with a path too (an
   abstract name made gunicorn fail the same way), bound next to the
   listener, to its path plus ".paused-" and a random token (or, too long
   for sun_path, ".hupt-TOKEN" in its directory), and that file unlinked in
   the same session: the name stays the socket's, nothing can connect to
   it, nothing is left on disk, and the server's own unlink of it at exit
   is answered 0 by hupt (handoff.py; a retiring generation's no-op unlink
   filter lets hupt's injected unlink through).  An abstract listener, a
   directory the process cannot create in, or a TCP listener whose loopback
   cannot be bound get an AF_UNIX dummy bound with a bare 2-byte sockaddr
   (autobind to a fresh abstract name).  Family and path come from an
   injected getsockname() of the listener.  The dummy's own fd is closed
   again.
4. Threads blocked in accept() were interrupted by the session and restart
   their accept on the dummy.

O_NONBLOCK is a file status flag of the open file description, not of the
fd: every fd and every process holding the socket shares it (a dup, a fork,
pidfd_getfd and SCM_RIGHTS all give the same description), fcntl(F_SETFL)
by one holder changes it for all, and a socket cannot be reopened through
/proc for a description of its own (integration/test_blocking_mode.py).
When the next generation is handed the socket in the mode it asked for, the
old one sees that mode too, until it is paused: an event loop that accepts
until EAGAIN then sleeps in accept() on a socket made blocking, and a
blocking accept() loop spins on EAGAIN on one made non-blocking.  The mode
is read as accept() starts: a thread already asleep in a blocking accept()
stays asleep when another holder sets O_NONBLOCK, until a connection, a
signal or this session's interrupt wakes it.  So the dummy takes the mode
the process had (``nonblock``, as hupt recorded it at the handoff; by default
the socket's own), the session's interrupt sends every thread asleep in
accept() to it, and resuming sets that mode on the socket again before the
listener goes back on its fd (for every holder: the process resumed must
be the one that serves on, as after a rollback or a failed exec).

The connections that keep arriving wait in the listener's accept queue, which
the next generation (holding the same socket) drains.

A datagram socket (UDP, unix SOCK_DGRAM: held from its bind, there is no
listen) is paused the same way with a datagram dummy, so that what the old
generation does with its fd stays harmless: recvfrom() blocks or says
EAGAIN, poll says writable only, getsockname() and sendto() work.  What the
old generation still sends matters: it may have read requests it has not
answered yet, and a reply that leaves from another port is lost (a client
on a connected socket never sees it; DNS resolvers drop it as a spoof).  So
a UDP dummy is bound to the very address of the held socket:

* hupt bound the held socket with SO_REUSEPORT and attached the group's
  selector (below) right after, before the server got it back (handoff),
  so no dummy is ever in a group without it.  For a socket bound otherwise
  the flag is set here through the old generation's fd (it is only looked
  at when another socket binds, and the held socket's group is created
  then, with the held socket first).  The dummy gets it too and is bound to
  the held socket's getsockname() address.  Both
  sockets were created by the same user (the server's), as the kernel
  requires.  The flag stays set on the held socket: later dummies join the
  same group.
* A classic BPF program "return 0" is attached to the group
  (SO_ATTACH_REUSEPORT_CBPF): every datagram goes to the group's first
  socket, the held one, never to a dummy.  It outlives the dummy (a
  group's program is the group's) and keeps choosing the held socket.
* The same "return 0" as a socket filter on the dummy (SO_ATTACH_FILTER)
  drops whatever would still reach it, so it never becomes readable.

Replies sent on the dummy then leave from the held address, as before the
pause.  If that bind is refused (the held socket is bound by another user),
the dummy is a loopback one on port 0 with the drop-all filter: replies the
old generation sends after the pause then come from another port.  A unix
datagram dummy is autobound (an abstract name nobody knows, so it receives
nothing); unix datagram replies from a paused generation come from that
name, and a client connected to the server's path does not accept them.

Resuming reverses it: the process's O_NONBLOCK on the listener, ``dup3``
the saved copy back, ``EPOLL_CTL_ADD`` with the recorded events and data,
close the saved copy.  The kernel adds
EPOLLERR|EPOLLHUP (0x18) to every registration and fdinfo shows them; adding
them back explicitly is accepted (also with EPOLLEXCLUSIVE) and gives the
same registration.  A connection queued meanwhile makes the re-added entry
ready at once, so an edge-triggered loop (Go, libuv) sees it.  Threads
blocked in accept() on the dummy are interrupted by the resume session, too.

Limits:

- Per process: processes sharing a listener (workers forked after listen())
  each hold their own fds; call once per process.  An epoll instance created
  before a fork is shared by parent and child: a DEL in one process removes
  the registration for both, and each process's resume adds it back once
  (the second ADD of the same fd number into a shared instance fails with
  EEXIST, which is ignored as "already there").
- A registration made under another fd number (a dup of the listener) must
  be paused too: pass every fd of the listener.  A stale registration (its fd
  number closed or reused while the file lives on) cannot be removed from
  outside and makes ``pause_listeners`` refuse before changing anything.
- A disarmed EPOLLONESHOT entry comes back armed for EPOLLERR|EPOLLHUP only,
  which a listener never reports.
- Between the next generation's bind() and the pause, the old generation
  sees the next one's O_NONBLOCK on the shared socket: its accept() may
  sleep until the next connection or the pause, or say EAGAIN.  Nothing
  gives it a description of its own (above); the pause ends it.
- ``getsockname`` on a paused fd sees the dummy: the listener's family, but
  a loopback address and another port, or a unix path next to the
  listener's that names no file (an abstract name in the fallback cases).

Two more operations on a running, unmodified server use the same sessions:

``exec_in_place`` replaces the program of a process, keeping its pid, its
parent and the fds it chooses to pass on.  Every fd from 3 up is marked
close-on-exec first (``close_range(3, ~0U, CLOSE_RANGE_CLOEXEC)``: one
syscall, and if execve fails the marks are put back from the flags recorded
before, so the fds are intact).  FD_CLOEXEC is cleared on 0-2: node marks
its stdio close-on-exec and the new program would start without stdout and
stderr.  argv and envp go into a scratch mapping; execve does not search
PATH, so the path must be absolute or relative to the process's cwd.  Only
the leader execs, after every other thread was let go (see
``Tracee.execve``).  The saved listener copies of ``pause_listeners`` are
close-on-exec: a paused process that execs drops them.

``inject_filter`` puts a seccomp filter on every thread of a running process
(attach) and gives hupt its notify fd: seccomp() with NEW_LISTENER|TSYNC|
TSYNC_ESRCH (TSYNC with NEW_LISTENER needs TSYNC_ESRCH, and WAIT_KILLABLE_RECV
is asked for where the kernel knows it) returns the notify fd number in the
target, ``pidfd_getfd`` copies it to hupt, an injected close() drops the
target's copy.  Without CAP_SYS_ADMIN in the target, the kernel requires
no_new_privs, set first with prctl.  Neither can be undone: a filter stays for
the life of the process, and if hupt's copy of the notify fd is closed the
filtered syscalls fail with ENOSYS from then on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from hupt.errors import HuptError, InjectionError, KernelError
from hupt.tracer import pidfd, procfs, seccomp
from hupt.tracer.abi import (
    AF_INET,
    AF_INET6,
    AF_UNIX,
    BPF_RET_K,
    CAP_SYS_ADMIN,
    CLOSE_RANGE_CLOEXEC,
    CLOSE_RANGE_MAX_FD,
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    EPOLL_EVENT,
    F_DUPFD_CLOEXEC,
    F_GETFL,
    F_SETFD,
    F_SETFL,
    FD_CLOEXEC,
    IPPROTO_IPV6,
    IPV6_V6ONLY,
    O_CLOEXEC,
    O_NONBLOCK,
    PR_SET_NO_NEW_PRIVS,
    PTRACE_O_TRACEEXEC,
    SO_ATTACH_FILTER,
    SO_ATTACH_REUSEPORT_CBPF,
    SO_REUSEPORT,
    SO_TYPE,
    SOCK_CLOEXEC,
    SOCK_DGRAM,
    SOCK_FILTER,
    SOCK_FPROG,
    SOCK_NONBLOCK,
    SOCK_STREAM,
    SOCKADDR_FAMILY,
    SOCKADDR_IN,
    SOCKADDR_IN6,
    SOCKADDR_MAX,
    SOCKADDR_UN,
    SOL_SOCKET,
    SUN_PATH_MAX,
    SYS,
    FilterFlag,
    SeccompOp,
)
from hupt.tracer.inject import Tracee

# The saved copy goes at or above this fd number (or half the fd limit, if lower).
SAVED_FD_FLOOR = 1000


class UnpausableListener(HuptError):
    """A listener cannot be paused or resumed safely; nothing was changed."""


@dataclass(frozen=True)
class Registration:
    """One epoll instance's watch on a listener fd, exactly as it was."""

    epfd: int
    events: int  # as fdinfo shows them: flag bits kept, EPOLLERR|EPOLLHUP included
    data: int


@dataclass(frozen=True)
class PausedListener:
    fd: int  # the program's fd number, now holding the dummy
    saved: int  # the tracee's close-on-exec copy of the listener
    ino: int  # the listener's socket inode
    dummy_ino: int  # the dummy's socket inode, to recognise it at resume
    cloexec: bool  # FD_CLOEXEC of ``fd`` (per fd, restored by dup3)
    nonblock: bool  # O_NONBLOCK this process expects (the dummy's; the listener's at resume)
    registrations: tuple[Registration, ...]
    # The path a unix listener's dummy was bound to, as given (its file is
    # unlinked at once): what getsockname() of the paused fd answers.  None:
    # an abstract name, or not a unix dummy.
    stand_in: bytes | None = None


@dataclass(frozen=True)
class PausedListeners:
    pid: int
    listeners: tuple[PausedListener, ...]


def pause_listeners(pid: int, fds: Sequence[int], *, nonblock: Mapping[int, bool] | None = None,
                    timeout: float = 5.0) -> PausedListeners:
    """Make process ``pid`` stop accepting on listener ``fds``; return what resuming needs.

    ``nonblock``: fd -> the O_NONBLOCK the process expects of that listener, where
    another holder has changed the shared socket's (default: the socket's own).
    Its stand-in gets that mode, and resuming puts it back on the socket.

    All or nothing: on any error every change is undone and the error raised.
    """
    views = dict(nonblock or {})
    fds = list(dict.fromkeys(fds))
    if not fds:
        return PausedListeners(pid, ())
    with Tracee.seize(pid, timeout=timeout) as t:
        socks = procfs.socket_inodes(t.pid)
        for fd in fds:
            if fd not in socks:
                raise UnpausableListener(f"pid {pid}: fd {fd} is not a socket")
        registrations = _registrations_of(t.pid, {fd: socks[fd] for fd in fds}, socks)
        base = _saved_fd_base(t.pid)
        paused = []
        with t.scratch(_DummyScratch.SIZE) as scratch:
            mem = _DummyScratch(t, scratch)
            for fd in fds:
                flags = procfs.fd_flags(t.pid, fd)
                paused.append(_pause_one(
                    t, fd, socks[fd], base, mem,
                    cloexec=bool(flags & O_CLOEXEC),
                    nonblock=views.get(fd, bool(flags & O_NONBLOCK)),
                    registrations=registrations[fd],
                ))
        return PausedListeners(pid, tuple(paused))


def resume_listeners(pid: int, paused: PausedListeners, *, timeout: float = 5.0) -> list[int]:
    """Undo ``pause_listeners``: process ``pid`` accepts on its listeners again.

    Returns the fds that were left alone because the program closed or
    replaced them while paused (their saved copies are closed).  All or
    nothing for the others.
    """
    if pid != paused.pid:
        raise ValueError(f"listeners paused in {paused.pid}, not {pid}")
    if not paused.listeners:
        return []
    with Tracee.seize(pid, timeout=timeout) as t:
        socks = procfs.socket_inodes(t.pid)
        lost = [p for p in paused.listeners if socks.get(p.saved) != p.ino]
        if lost:
            raise UnpausableListener(
                f"pid {t.pid}: the saved copies of fds {[p.fd for p in lost]} are gone")
        epolls = set(procfs.epoll_fds(t.pid))
        replaced = [p.fd for p in paused.listeners if socks.get(p.fd) != p.dummy_ino]
        for p in paused.listeners:
            if p.fd not in replaced:
                _resume_one(t, p, epolls)
        t.commit()
        # Past the commit: the listeners serve again, so a failure to close a
        # copy must not undo that.
        for p in paused.listeners:
            t.syscall(SYS.close, p.saved, op=f"close saved copy {p.saved}")
        return replaced


# --- steps -----------------------------------------------------------------------------


def _registrations_of(pid: int, listeners: dict[int, int],
                      socks: dict[int, int]) -> dict[int, list[Registration]]:
    """fd -> the epoll registrations of that listener fd; refuses stale or foreign ones."""
    out: dict[int, list[Registration]] = {fd: [] for fd in listeners}
    inodes = set(listeners.values())
    for epfd in procfs.epoll_fds(pid):
        for e in procfs.epoll_registrations(pid, epfd):
            if e.ino not in inodes:
                continue
            if listeners.get(e.tfd) != e.ino:
                what = ("a stale registration" if socks.get(e.tfd) != e.ino
                        else "a registration under another fd of it")
                raise UnpausableListener(
                    f"pid {pid}: epoll fd {epfd} holds {what} (fd {e.tfd}) of listener "
                    f"inode {e.ino}; pass every fd of the listener")
            out[e.tfd].append(Registration(epfd, e.events, e.data))
    return out


def _saved_fd_base(pid: int) -> int:
    soft = _nofile_soft_limit(pid)
    return max(3, min(SAVED_FD_FLOOR, soft // 2))


def _nofile_soft_limit(pid: int) -> int:
    with procfs.proc_errors("read limits", pid), open(f"/proc/{pid}/limits", "rb") as f:
        text = f.read().decode("ascii", "replace")
    for line in text.splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files"):].split()[0]
            return 1 << 20 if soft == "unlimited" else int(soft)
    raise KernelError(errno.EINVAL, "read limits", f"/proc/{pid}/limits has no open-files line")


def _pause_one(t: Tracee, fd: int, ino: int, base: int, mem: _DummyScratch, *, cloexec: bool,
               nonblock: bool, registrations: list[Registration]) -> PausedListener:
    saved = t.syscall(SYS.fcntl, fd, F_DUPFD_CLOEXEC, base, op=f"fcntl({fd}, F_DUPFD_CLOEXEC)")
    t.on_rollback(f"saved copy {saved} of fd {fd}",
                  lambda: t.syscall(SYS.close, saved, op=f"close {saved}"))
    for r in registrations:
        t.syscall(SYS.epoll_ctl, r.epfd, EPOLL_CTL_DEL, fd, 0,
                  op=f"epoll_ctl({r.epfd}, DEL, {fd})")
        t.on_rollback(f"epoll {r.epfd} registration of fd {fd}",
                      partial(_epoll_add, t, r, fd))
    dummy_ino, stand_in = _swap_in_dummy(t, fd, mem, fd, cloexec=cloexec,
                                         nonblock=nonblock, saved=saved)
    return PausedListener(fd, saved, ino, dummy_ino, cloexec, nonblock, tuple(registrations),
                          stand_in)


def _resume_one(t: Tracee, p: PausedListener, epolls: set[int]) -> None:
    _set_nonblock(t, p.saved, p.nonblock)
    _dup3(t, p.saved, p.fd, p.cloexec)

    def undo_swap() -> None:
        with t.scratch(_DummyScratch.SIZE) as scratch:
            mem = _DummyScratch(t, scratch)
            _swap_in_dummy(t, p.fd, mem, p.saved, cloexec=p.cloexec,
                           nonblock=p.nonblock, saved=None,
                           names=[p.stand_in] if p.stand_in is not None else [])

    t.on_rollback(f"listener back on fd {p.fd}", undo_swap)
    for r in p.registrations:
        if r.epfd not in epolls:
            continue  # the program closed that epoll instance meanwhile
        if _epoll_add(t, r, p.fd):
            t.on_rollback(f"epoll {r.epfd} registration of fd {p.fd}",
                          partial(t.syscall, SYS.epoll_ctl, r.epfd, EPOLL_CTL_DEL, p.fd, 0,
                                  op=f"epoll_ctl({r.epfd}, DEL, {p.fd})"))


def stand_in_names(path: bytes, token: str) -> list[bytes]:
    """The paths to try binding a unix listener's dummy to, given the listener's ``path``
    (its getsockname(), empty or NUL-led if it has no path) and a random ``token``.

    Next to the listener, where the server could bind: its path with a suffix,
    else (too long for sun_path) a short name in its directory.
    """
    if not path or path.startswith(b"\0"):
        return []
    head, _, _ = path.rpartition(b"/")
    names = [path + b".paused-" + token.encode(),
             (head + b"/" if b"/" in path else b"") + b".hupt-" + token.encode()]
    return [n for n in names if len(n) < SUN_PATH_MAX]


class _DummyScratch:
    """What making dummies needs in the tracee's memory, written once per session:
    the three sockaddrs, a one-instruction "return 0" classic BPF program (as a
    socket filter: drop everything; on a reuseport group: the first socket),
    room for a getsockname() answer, for a unix path to bind, and for an int
    option with its length."""

    UNIX, IN, IN6, FPROG, INSN, NAME, NAMELEN = 0, 16, 32, 64, 80, 96, 96 + SOCKADDR_MAX
    SUN = NAMELEN + 8
    OPT = SUN + SOCKADDR_UN.size + 8
    OPTLEN = OPT + 8
    SIZE = OPTLEN + 8

    def __init__(self, t: Tracee, base: int) -> None:
        self.t, self.base = t, base
        t.write(base + self.UNIX, SOCKADDR_FAMILY.pack(AF_UNIX))
        t.write(base + self.IN, SOCKADDR_IN.pack(AF_INET, 0, bytes([127, 0, 0, 1])))
        t.write(base + self.IN6, SOCKADDR_IN6.pack(AF_INET6, 0, 0, bytes(15) + b"\x01", 0))
        t.write(base + self.INSN, SOCK_FILTER.pack(BPF_RET_K, 0, 0, 0))
        t.write(base + self.FPROG, SOCK_FPROG.pack(1, base + self.INSN))

    def name_of(self, fd: int) -> tuple[int, bytes]:
        """The address family of the socket on ``fd`` in the tracee (getsockname) and,
        for a unix socket, its sun_path as bound (no trailing NUL; NUL-led if abstract)."""
        self.t.write(self.base + self.NAMELEN, struct.pack("<I", SOCKADDR_MAX))
        self.t.syscall(SYS.getsockname, fd, self.base + self.NAME, self.base + self.NAMELEN,
                       op=f"getsockname({fd})")
        (size,) = struct.unpack("<I", self.t.read(self.base + self.NAMELEN, 4))
        raw = self.t.read(self.base + self.NAME, max(SOCKADDR_FAMILY.size,
                                                      min(size, SOCKADDR_MAX)))
        (family,) = SOCKADDR_FAMILY.unpack(raw[:SOCKADDR_FAMILY.size])
        path = raw[SOCKADDR_FAMILY.size:] if family == AF_UNIX else b""
        if path and not path.startswith(b"\0"):
            path = path.split(b"\0", 1)[0]
        return int(family), path

    def unix_path(self, name: bytes) -> tuple[int, int]:
        """Write a sockaddr_un naming ``name``; return its address and length."""
        self.t.write(self.base + self.SUN, SOCKADDR_UN.pack(AF_UNIX, name))
        return self.base + self.SUN, SOCKADDR_FAMILY.size + len(name) + 1

    def name_len(self) -> int:
        """The length of the name the last ``name_of`` got (it stays at NAME)."""
        (n,) = struct.unpack("<I", self.t.read(self.base + self.NAMELEN, 4))
        return int(n)

    def get_int(self, fd: int, option: int, level: int = SOL_SOCKET) -> int:
        """getsockopt(fd, level, option) of an int option in the tracee."""
        self.t.write(self.base + self.OPTLEN, struct.pack("<I", 4))
        self.t.syscall(SYS.getsockopt, fd, level, option, self.base + self.OPT,
                       self.base + self.OPTLEN, op=f"getsockopt({fd}, {option})")
        (v,) = struct.unpack("<i", self.t.read(self.base + self.OPT, 4))
        return int(v)

    def set_int(self, fd: int, option: int, value: int, level: int = SOL_SOCKET) -> None:
        self.t.write(self.base + self.OPT, struct.pack("<i", value))
        self.t.syscall(SYS.setsockopt, fd, level, option, self.base + self.OPT, 4,
                       op=f"setsockopt({fd}, {option}, {value})")

    def attach_return_0(self, fd: int, option: int) -> None:
        """Attach the "return 0" program to ``fd`` as ``option`` (a filter, or the
        reuseport group's selector)."""
        self.t.syscall(SYS.setsockopt, fd, SOL_SOCKET, option, self.base + self.FPROG,
                       SOCK_FPROG.size, op=f"setsockopt({fd}, {option}, return 0)")


def _swap_in_dummy(t: Tracee, fd: int, mem: _DummyScratch, like: int, *, cloexec: bool,
                   nonblock: bool, saved: int | None,
                   names: Sequence[bytes] | None = None) -> tuple[int, bytes | None]:
    """Put a never-ready socket of the family and type of fd ``like`` on ``fd`` (a
    listening one for a stream socket, unix if that cannot be had); return the
    dummy's inode and the unix path it was bound to.

    A unix stream dummy is bound to the first of ``names`` that it can be (its
    file unlinked at once; None: names next to ``like``'s own path), else
    autobound.  With ``saved``, the swap is registered to be undone by putting
    ``saved`` back.
    """
    family, path = mem.name_of(like)  # ``like``'s name stays at mem.NAME
    if mem.get_int(like, SO_TYPE) == SOCK_DGRAM:
        return _swap_in_datagram(t, fd, mem, like, family, cloexec=cloexec, nonblock=nonblock,
                                 saved=saved), None
    if names is None:
        names = stand_in_names(path, os.urandom(4).hex())
    swap = partial(_swap_in, t, fd, mem, cloexec=cloexec, nonblock=nonblock, saved=saved)
    if family in (AF_INET, AF_INET6):
        try:
            return swap(family), None
        except InjectionError:
            pass  # no loopback of that family to bind: a unix dummy does as well
    for name in names:
        try:
            return swap(AF_UNIX, name), name
        except InjectionError:
            continue  # not ours to create there (EACCES, EROFS, EADDRINUSE...)
    return swap(AF_UNIX), None


def _swap_in(t: Tracee, fd: int, mem: _DummyScratch, family: int, name: bytes | None = None, *,
             cloexec: bool, nonblock: bool, saved: int | None) -> int:
    kind = SOCK_STREAM | SOCK_CLOEXEC | (SOCK_NONBLOCK if nonblock else 0)
    where, size = {AF_UNIX: (mem.base + mem.UNIX, SOCKADDR_FAMILY.size),
                   AF_INET: (mem.base + mem.IN, SOCKADDR_IN.size),
                   AF_INET6: (mem.base + mem.IN6, SOCKADDR_IN6.size)}[family]
    if name is not None:
        where, size = mem.unix_path(name)
    with t.temporary_fd(SYS.socket, family, kind, 0, op=f"socket({family}) for the dummy") as dummy:
        if family != AF_UNIX:
            # Before it listens: no SYN to it is ever answered.
            t.syscall(SYS.setsockopt, dummy, SOL_SOCKET, SO_ATTACH_FILTER, mem.base + mem.FPROG,
                      SOCK_FPROG.size, op="setsockopt(SO_ATTACH_FILTER) on the dummy")
        t.syscall(SYS.bind, dummy, where, size, op="bind dummy")
        if name is not None:
            # The name stays the socket's (getsockname) without a file: nothing
            # can connect to it, and nothing is left to remove.  A file the
            # process could create but not remove (an LSM rule) stays: the
            # stand-in works the same, and trying another name would leave two.
            with contextlib.suppress(InjectionError):
                t.syscall(SYS.unlink, where + SOCKADDR_FAMILY.size, op="unlink the dummy's path")
        t.syscall(SYS.listen, dummy, 1, op="listen on dummy")
        ino = procfs.socket_inodes(t.pid).get(dummy)
        if ino is None:
            raise KernelError(errno.ENOTSOCK, "dummy", f"fd {dummy} of {t.pid} is no socket")
        _dup3(t, dummy, fd, cloexec)
        if saved is not None:
            t.on_rollback(f"dummy over fd {fd}", lambda: _dup3(t, saved, fd, cloexec))
    return ino


def _swap_in_datagram(t: Tracee, fd: int, mem: _DummyScratch, like: int, family: int, *,
                      cloexec: bool, nonblock: bool, saved: int | None) -> int:
    """A datagram dummy on ``fd``: sending from the address of ``like`` (the held
    socket; its name is at mem.NAME) and never receiving (module docstring)."""
    kind = SOCK_DGRAM | SOCK_CLOEXEC | (SOCK_NONBLOCK if nonblock else 0)
    if family in (AF_INET, AF_INET6):
        namelen = mem.name_len()
        # A group only takes sockets alike in this (and bound device): a dummy
        # outside the held socket's group would get its share of datagrams.
        v6only = mem.get_int(like, IPV6_V6ONLY, IPPROTO_IPV6) if family == AF_INET6 else 0
        had = mem.get_int(like, SO_REUSEPORT)
        if not had:
            mem.set_int(like, SO_REUSEPORT, 1)
        try:
            with t.temporary_fd(SYS.socket, family, kind, 0, op="socket for the dummy") as dummy:
                mem.set_int(dummy, SO_REUSEPORT, 1)
                if v6only:
                    mem.set_int(dummy, IPV6_V6ONLY, 1, IPPROTO_IPV6)
                mem.attach_return_0(dummy, SO_ATTACH_FILTER)  # before it can receive
                t.syscall(SYS.bind, dummy, mem.base + mem.NAME, namelen,
                          op="bind dummy to the held address")
                mem.attach_return_0(dummy, SO_ATTACH_REUSEPORT_CBPF)
                return _install_dummy(t, fd, dummy, cloexec, saved)
        except InjectionError:
            if not had:
                mem.set_int(like, SO_REUSEPORT, 0)
        # Not allowed to share the address: replies then leave from another port.
        where, size = ((mem.IN, SOCKADDR_IN.size) if family == AF_INET
                       else (mem.IN6, SOCKADDR_IN6.size))
        try:
            with t.temporary_fd(SYS.socket, family, kind, 0, op="socket for the dummy") as dummy:
                mem.attach_return_0(dummy, SO_ATTACH_FILTER)
                t.syscall(SYS.bind, dummy, mem.base + where, size, op="bind dummy")
                return _install_dummy(t, fd, dummy, cloexec, saved)
        except InjectionError:
            pass  # no loopback of that family: an unnamed unix one does as well
    with t.temporary_fd(SYS.socket, AF_UNIX, kind, 0, op="socket for the dummy") as dummy:
        t.syscall(SYS.bind, dummy, mem.base + mem.UNIX, SOCKADDR_FAMILY.size, op="bind dummy")
        return _install_dummy(t, fd, dummy, cloexec, saved)


def _install_dummy(t: Tracee, fd: int, dummy: int, cloexec: bool, saved: int | None) -> int:
    """dup3 ``dummy`` over ``fd``; return its inode."""
    ino = procfs.socket_inodes(t.pid).get(dummy)
    if ino is None:
        raise KernelError(errno.ENOTSOCK, "dummy", f"fd {dummy} of {t.pid} is no socket")
    _dup3(t, dummy, fd, cloexec)
    if saved is not None:
        t.on_rollback(f"dummy over fd {fd}", lambda: _dup3(t, saved, fd, cloexec))
    return ino


def _set_nonblock(t: Tracee, fd: int, on: bool) -> None:
    """Give the open file on ``fd`` (and so every holder of it) O_NONBLOCK ``on``;
    undone if the session fails."""
    cur = t.syscall(SYS.fcntl, fd, F_GETFL, op=f"fcntl({fd}, F_GETFL)")
    want = cur | O_NONBLOCK if on else cur & ~O_NONBLOCK
    if want == cur:
        return
    t.syscall(SYS.fcntl, fd, F_SETFL, want, op=f"fcntl({fd}, F_SETFL)")
    t.on_rollback(f"O_NONBLOCK of fd {fd}",
                  partial(t.syscall, SYS.fcntl, fd, F_SETFL, cur, op=f"fcntl({fd}, F_SETFL)"))


def _dup3(t: Tracee, src: int, dst: int, cloexec: bool) -> None:
    t.syscall(SYS.dup3, src, dst, O_CLOEXEC if cloexec else 0, op=f"dup3({src}, {dst})")


def _epoll_add(t: Tracee, r: Registration, fd: int) -> bool:
    """Register ``fd`` with ``r``'s events and data; False if it was already there."""
    with t.scratch(EPOLL_EVENT.size) as ev:
        t.write(ev, EPOLL_EVENT.pack(r.events, r.data))
        try:
            t.syscall(SYS.epoll_ctl, r.epfd, EPOLL_CTL_ADD, fd, ev,
                      op=f"epoll_ctl({r.epfd}, ADD, {fd})")
        except InjectionError as e:
            if e.errno == errno.EEXIST:
                return False  # an instance shared with another process already has it back
            raise
    return True


# --- exec in place ------------------------------------------------------------------------


def exec_image(base: int, path: bytes, argv: Sequence[bytes],
               envp: Sequence[bytes]) -> tuple[bytes, int, int, int]:
    """What to write at ``base`` for execve: (bytes, path address, argv address, envp address).

    Layout: the argv pointer array and its NULL, the envp array and its NULL,
    then every string NUL-terminated.
    """
    strings = [path, *argv, *envp]
    if any(b"\0" in s for s in strings):
        raise ValueError("execve strings cannot contain NUL bytes")
    pointers = 8 * (len(argv) + 1 + len(envp) + 1)
    addrs, pos = [], base + pointers
    for s in strings:
        addrs.append(pos)
        pos += len(s) + 1
    arrays = struct.pack(f"<{len(argv) + len(envp) + 2}Q",
                         *addrs[1:1 + len(argv)], 0, *addrs[1 + len(argv):], 0)
    blob = arrays + b"".join(s + b"\0" for s in strings)
    return blob, addrs[0], base, base + 8 * (len(argv) + 1)


def exec_in_place(pid: int, argv: Sequence[bytes], envp: Sequence[bytes], *,
                  path: bytes | None = None, cwd: bytes | None = None,
                  timeout: float = 5.0) -> None:
    """Make process ``pid`` execve ``path`` (default ``argv[0]``) with ``argv`` and ``envp``,
    in directory ``cwd`` if given (a chdir by that path first: ``hupt run --chdir``).

    Its fds 0-2 are passed on, every other fd is closed by the exec.  On
    failure (InjectionError with the chdir's or execve's errno) the process
    runs on as before, in its old working directory.
    """
    exe = path if path is not None else argv[0]
    if cwd is not None and b"\0" in cwd:
        raise ValueError("a directory cannot contain NUL bytes")
    with Tracee.seize(pid, timeout=timeout, options=PTRACE_O_TRACEEXEC) as t:
        flags = {fd: procfs.fd_flags(pid, fd) for fd in _open_fds(pid)}
        t.syscall(SYS.close_range, 3, CLOSE_RANGE_MAX_FD, CLOSE_RANGE_CLOEXEC,
                  op="close_range(3, ~0U, CLOSE_RANGE_CLOEXEC)")
        inheritable = [fd for fd, f in flags.items() if fd >= 3 and not f & O_CLOEXEC]
        t.on_rollback("close-on-exec marks", partial(_set_cloexec, t, inheritable, False))
        stdio = [fd for fd in (0, 1, 2) if fd in flags and flags[fd] & O_CLOEXEC]
        _set_cloexec(t, stdio, False)
        t.on_rollback("close-on-exec of stdio", partial(_set_cloexec, t, stdio, True))
        size = len(exec_image(0, exe, argv, envp)[0])
        extra = len(cwd) + 3 if cwd is not None else 0
        with t.scratch(size + extra) as base:
            blob, path_addr, argv_addr, envp_addr = exec_image(base, exe, argv, envp)
            t.write(base, blob)
            if cwd is not None:
                _enter(t, base + len(blob), cwd)
            t.execve(path_addr, argv_addr, envp_addr)


AT_FDCWD = -100


def _enter(t: Tracee, at: int, cwd: bytes) -> None:
    """chdir(cwd) in the tracee (``at``: scratch room for the strings), undone if the
    block fails: the old directory is kept open (close-on-exec) to fchdir back to."""
    t.write(at, cwd + b"\0.\0")
    dot = at + len(cwd) + 1
    old = t.syscall(SYS.openat, AT_FDCWD, dot, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                    op="open its working directory")
    t.on_rollback("the working directory's fd", partial(t.syscall, SYS.close, old,
                                                         op=f"close({old})"))
    t.syscall(SYS.chdir, at, op=f"chdir {os.fsdecode(cwd)}")
    t.on_rollback("the working directory", partial(t.syscall, SYS.fchdir, old,
                                                   op=f"fchdir({old})"))


def _open_fds(pid: int) -> list[int]:
    with procfs.proc_errors("list fds", pid):
        return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


def _set_cloexec(t: Tracee, fds: Sequence[int], on: bool) -> None:
    for fd in fds:
        t.syscall(SYS.fcntl, fd, F_SETFD, FD_CLOEXEC if on else 0, op=f"fcntl({fd}, F_SETFD)")


# --- attach: a seccomp filter for a running process -------------------------------------


def inject_filter(pid: int, prog: bytes, *, timeout: float = 5.0,
                  listener: bool = True) -> int | None:
    """Install the packed seccomp filter ``prog`` on every thread of ``pid``.

    Returns hupt's own copy (close-on-exec) of the filter's notify fd.  The
    target's copy is closed again.  Irreversible (see the module docstring).
    With ``listener=False`` the filter gets no notify fd (it may then be
    stacked on a process that already has one) and None is returned.
    """
    if not prog or len(prog) % SOCK_FILTER.size:
        raise ValueError(f"a filter is a non-empty array of {SOCK_FILTER.size}-byte instructions")
    needs_nnp = not _has_capability(pid, CAP_SYS_ADMIN)
    handle = pidfd.pidfd_open(pid)
    try:
        with Tracee.seize(pid, timeout=timeout) as t, \
                t.scratch(SOCK_FPROG.size + len(prog)) as fprog:
            code = fprog + SOCK_FPROG.size
            t.write(code, prog)
            t.write(fprog, seccomp.sock_fprog(code, len(prog) // SOCK_FILTER.size))
            if needs_nnp:
                t.syscall(SYS.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, op="prctl(NO_NEW_PRIVS)")
            if not listener:
                res = t.syscall(SYS.seccomp, SeccompOp.SET_MODE_FILTER, FilterFlag.TSYNC, fprog,
                                op="seccomp(SET_MODE_FILTER)")
                if res != 0:  # TSYNC without ESRCH: the TID of a thread that could not sync
                    raise InjectionError(f"seccomp TSYNC (thread {res})", errno.ESRCH)
                t.commit()
                return None
            flags = FilterFlag.NEW_LISTENER | FilterFlag.TSYNC | FilterFlag.TSYNC_ESRCH
            try:
                remote = t.syscall(SYS.seccomp, SeccompOp.SET_MODE_FILTER,
                                   flags | FilterFlag.WAIT_KILLABLE_RECV, fprog,
                                   op="seccomp(SET_MODE_FILTER)")
            except InjectionError as e:
                if e.errno != errno.EINVAL:
                    raise
                remote = t.syscall(SYS.seccomp, SeccompOp.SET_MODE_FILTER, flags, fprog,
                                   op="seccomp(SET_MODE_FILTER)")
            t.commit()  # past the point of no return: the filter is in place
            try:
                return pidfd.pidfd_getfd(handle, remote)
            finally:
                t.syscall(SYS.close, remote, op=f"close notify fd {remote}")
    finally:
        os.close(handle)


def _has_capability(pid: int, cap: int) -> bool:
    eff = procfs.status_fields(pid).get("CapEff", "0")
    return bool(int(eff, 16) >> cap & 1)
