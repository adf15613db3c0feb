"""Facts about taking over a server that hupt did not start (``hupt attach PID``).

A server started by a shell or by systemd has no notify filter and its
listeners belong to it alone.  Taking it over means, without restarting it:
finding its listening sockets, taking references to them (so that they
outlive an exec of the server), putting the notify filter on every thread of
every one of its processes, and from then on supervising it in exec mode.

What the kernel makes us do, and why:

- Its listeners are found in the kernel's socket tables (sock_diag LISTEN
  entries, TCP v4/v6 and unix) and matched by socket inode against the fd
  tables of the process and its descendants: a pre-fork server's master
  holds them and its workers inherited them.  /proc/net would do the same
  more slowly (kernel-facts 3).
- A reference is ``pidfd_getfd``: our own open file, shared with the server.
  It needs the same permission as ptrace (PTRACE_MODE_ATTACH: root, or the
  same user with Yama's ptrace_scope 0), so the copies taken while
  inspecting double as the permission check that comes before any change.
  Taking them changes nothing the server can observe; they are closed again
  on a refusal.
- A filter is installed by the process itself (seccomp(2) has no pid
  argument), so it is injected (``accepting.inject_filter``): with TSYNC it
  reaches every thread of that process at once.  Processes are separate:
  each existing process gets its own filter and its own notify fd; one
  forked after the injection inherits its parent's filter and sends its
  notifications to its parent's notify fd.  A process whose filter count
  grew between the inspection and its turn inherited one of ours: a second
  notify filter would fail with EBUSY, and it is not needed.
- The root process goes first: if it cannot be filtered, nothing was done
  anywhere.  A worker that cannot be filtered is reported and left as it
  is; it cannot bind behind hupt's back in a way that matters, since the
  first reload retires it.
- A filter cannot be removed.  If hupt's notify fd is closed (hupt attach
  exits while the server lives on), every later bind()/listen() of the
  server fails with ENOSYS: the CLI says so and asks before going ahead.
- Refusals happen before any change: no such process, a thread traced by
  someone else (a debugger, or hupt in the middle of an injection), no
  listening socket, no permission.  A server already under hupt has a
  notify filter; the CLI finds its hupt through the control sockets, and a
  filter claimed by another supervisor makes the injected seccomp() fail
  with EBUSY, atomically.  (For a target without CAP_SYS_ADMIN the
  no_new_privs set just before stays; such a target has it already, since
  the filter it has needed it too.  Setting it only on demand would not
  help: the kernel checks permission, EACCES, before the listener, EBUSY.)
  Other filters (a systemd
  SystemCallFilter=) are no reason to refuse: filters stack.
- Only fds 0-2 survive an exec in place: a server that inherited its
  listeners as fds 3 and up (systemd socket activation, LISTEN_FDS) cannot
  be reloaded in exec mode.
- Not hupt's child: its exit is seen on a pidfd (readable once the process
  has exited), and its exit status is its parent's to collect, not ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from hupt.address import Address, from_socket_name
from hupt.errors import AccessDenied, HuptError, InjectionError, KernelError, NoSuchProcess
from hupt.tracer import accepting, pidfd, procfs, sockdiag


class AttachRefused(HuptError):
    """The process cannot be taken over; nothing in it was changed."""


@dataclass(frozen=True)
class Listener:
    """One listening socket of the server, and where it sits in the server's fd tables."""

    address: Address
    inode: int
    backlog: int
    holders: tuple[tuple[int, int], ...]  # (pid, fd) of every fd that refers to it


@dataclass
class Server:
    """What ``inspect`` found: enough to describe the server and to re-exec it."""

    pid: int
    processes: list[int]  # the root first, then its descendants
    listeners: list[Listener]
    argv: list[bytes]
    env: list[bytes]
    cwd: str
    exe: str  # /proc/PID/exe, " (deleted)" removed
    filters: dict[int, int] = field(default_factory=dict)  # pid -> seccomp filters before


def inspect(pid: int, datagrams: frozenset[Address] = frozenset()) -> Server:
    """Look at process ``pid`` and its descendants; raise AttachRefused if it cannot be taken over.

    ``datagrams``: the datagram sockets to take too, by the address they are bound
    to (the user names them: see ``_datagram_sockets``).  Changes nothing in the server.
    """
    try:
        return _inspect(pid, datagrams)
    except NoSuchProcess as e:
        raise AttachRefused(f"no process with PID {pid}") from e
    except AccessDenied as e:
        raise AttachRefused(f"not allowed to trace PID {pid} ({e.op}: permission denied; "
                            "hupt attach needs CAP_SYS_PTRACE (root), or the same user and "
                            "kernel.yama.ptrace_scope=0)") from e


def _inspect(pid: int, datagrams: frozenset[Address]) -> Server:
    if pid == os.getpid():
        raise AttachRefused("hupt cannot attach to itself")
    if procfs.tgid_of(pid) != pid:
        raise AttachRefused(f"PID {pid} is a thread of process {procfs.tgid_of(pid)}: "
                            "attach to the process")
    processes = [pid, *_descendants(pid)]
    for p in processes:
        for tid in _threads(p):
            tracer = _tracer(tid)
            if tracer:
                raise AttachRefused(f"PID {p} is being traced by PID {tracer}")
    listeners = _listeners(processes)
    if datagrams:
        listeners += _datagram_sockets(pid, processes, datagrams)
    if not listeners:
        raise AttachRefused(f"PID {pid} and its children have no listening socket "
                            "(TCP or unix stream; name datagram ones with --datagram ADDR)")
    exe = procfs.exe(pid)
    if exe.endswith(" (deleted)"):
        exe = exe[: -len(" (deleted)")]
    return Server(pid, processes, listeners, procfs.cmdline(pid), procfs.environ(pid),
                  procfs.cwd(pid), exe, {p: _filters(p) for p in processes})


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p, parent in procfs.parent_map().items():
        children.setdefault(parent, []).append(p)
    out: list[int] = []
    stack = sorted(children.get(pid, []), reverse=True)
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(sorted(children.get(p, []), reverse=True))
    return out


def _threads(pid: int) -> list[int]:
    try:
        return procfs.threads(pid)
    except NoSuchProcess:
        return []


def _tracer(tid: int) -> int:
    try:
        return procfs.tracer_pid(tid)
    except NoSuchProcess:
        return 0


def _filters(pid: int) -> int:
    try:
        return procfs.seccomp_filters(pid)
    except NoSuchProcess:
        return 0


def _listeners(processes: list[int]) -> list[Listener]:
    """The listening stream sockets held by ``processes``, each once (the root's fd first)."""
    with sockdiag.SockDiag() as diag:
        backlog: dict[int, int] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for t in diag.tcp_listeners(family):
                backlog[t.inode] = t.backlog
        for u in diag.unix_listeners():
            backlog[u.inode] = u.backlog
    holders: dict[int, list[tuple[int, int]]] = {}
    for p, fd, ino in _socket_fds(processes):
        if ino in backlog:
            holders.setdefault(ino, []).append((p, fd))
    out: list[Listener] = []
    for ino, where in holders.items():
        with _their_socket(*where[0]) as sock:
            if sock is None or sock.type != socket.SOCK_STREAM:
                continue
            address = _address(sock, where[0][0])
        if address.chosen:
            out.append(Listener(address, ino, backlog[ino], tuple(where)))
    return out


def _socket_fds(processes: list[int]) -> Iterator[tuple[int, int, int]]:
    """(pid, fd, socket inode) of every socket fd of ``processes``, in fd order; a
    process gone meanwhile holds none."""
    for p in processes:
        try:
            fds = procfs.socket_inodes(p)
        except NoSuchProcess:
            continue
        for fd, ino in sorted(fds.items()):
            yield p, fd, ino


def _datagram_sockets(root: int, processes: list[int],
                      wanted: frozenset[Address]) -> list[Listener]:
    """The datagram sockets of ``processes`` bound to the ``wanted`` addresses.

    Named by the user, never guessed: a bound, unconnected datagram socket may
    as well be a client's (one that sent with sendto() got an ephemeral port),
    and a held address is one every new image must bind before it counts as
    ready.  Refused if one of them is not found.
    """
    seen: dict[int, Address | None] = {}
    holders: dict[Address, tuple[int, list[tuple[int, int]]]] = {}
    for p, fd, ino in _socket_fds(processes):
        if ino not in seen:
            seen[ino] = None
            with _their_socket(p, fd) as sock:
                if sock is not None and sock.type == socket.SOCK_DGRAM:
                    seen[ino] = replace(_address(sock, p), kind=socket.SOCK_DGRAM)
        addr = seen[ino]
        if addr is not None and addr in wanted:
            holders.setdefault(addr, (ino, []))[1].append((p, fd))
    missing = sorted(wanted - set(holders))
    if missing:
        found = sorted({a for a in seen.values() if a is not None and a.chosen})
        has = ", ".join(map(str, found)) if found else "none"
        raise AttachRefused(f"PID {root} and its children have no datagram socket on "
                            f"{', '.join(map(str, missing))} (bound datagram sockets: {has})")
    return [Listener(addr, ino, 0, tuple(where)) for addr, (ino, where) in holders.items()]


def _address(sock: socket.socket, pid: int) -> Address:
    addr = from_socket_name(sock.family, sock.getsockname())
    if addr.is_unix and addr.path and not addr.is_abstract and not addr.path.startswith(b"/"):
        # sun_path as passed to bind(): relative to the cwd it had then, which
        # the current cwd is the best guess for.
        path = os.path.normpath(os.path.join(os.fsencode(procfs.cwd(pid)), addr.path))
        return Address(addr.family, path=path)
    return addr


@contextlib.contextmanager
def _their_socket(pid: int, fd: int) -> Iterator[socket.socket | None]:
    """Our own copy of fd ``fd`` of ``pid`` as a socket, closed at the end (None: no socket)."""
    with pidfd.PidFd(pid) as p:
        try:
            ours = p.getfd(fd)
        except KernelError as e:
            if e.errno == errno.EBADF:
                yield None
                return
            raise
    try:
        sock = socket.socket(fileno=ours)
    except OSError:
        os.close(ours)
        yield None
        return
    with sock:
        yield sock


def take_listener(listener: Listener) -> socket.socket:
    """hupt's own reference to ``listener`` (close-on-exec), from the first process holding it."""
    for pid, fd in listener.holders:
        try:
            with pidfd.PidFd(pid) as p:
                ours = p.getfd(fd)
        except (NoSuchProcess, KernelError):
            continue
        sock = socket.socket(fileno=ours)
        if os.fstat(sock.fileno()).st_ino == listener.inode:
            return sock
        sock.close()  # the fd was closed or reused meanwhile
    raise AttachRefused(f"the listener on {listener.address} is gone")


def filter_processes(server: Server, prog: bytes) -> tuple[int, dict[int, int], list[str]]:
    """Put the packed notify filter ``prog`` on every process of ``server``.

    Returns (the root's notify fd, {pid: notify fd} of the other processes,
    problems with processes that were left unfiltered).  Raises if the root
    cannot be filtered, in which case no process was changed.
    """
    try:
        root = accepting.inject_filter(server.pid, prog)
    except InjectionError as e:
        if e.errno == errno.EBUSY:
            raise AttachRefused(f"PID {server.pid} already has a seccomp filter that notifies "
                                "a supervisor (under hupt or another one)") from e
        raise
    assert root is not None
    others: dict[int, int] = {}
    problems: list[str] = []
    for p in server.processes[1:]:
        try:
            if _filters(p) != server.filters.get(p, 0):
                continue  # forked from a filtered process: it shares that filter
            fd = accepting.inject_filter(p, prog)
        except NoSuchProcess:
            continue
        except HuptError as e:
            problems.append(f"pid {p}: {e}")
            continue
        assert fd is not None
        others[p] = fd
    return root, others, problems
