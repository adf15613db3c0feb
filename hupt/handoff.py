"""Answering a generation's bind(), listen() and unlink() calls.

Each generation runs under a seccomp filter that turns these calls into
notifications on the generation's notify fd; this module answers them:

bind(fd, addr)
    An address hupt holds: the held socket is installed at the app's fd
    number (ADDFD with SETFD; the app's own socket is closed by the
    replacement) with the app's O_NONBLOCK mirrored onto it, and bind
    returns 0.  That flag is one for every holder of the socket: the mode
    the older generations had is recorded (``Held.views``), so
    that pausing one gives it a stand-in in its own mode and resuming it
    (a rollback) puts its own mode back on the socket.  Any other address:
    the call goes through unchanged (CONTINUE), and a chosen address (not
    port 0) is remembered by the socket's inode so the listen() that follows
    can be recognised.

bind(fd, addr) of a datagram socket (UDP, unix SOCK_DGRAM)
    There is no listen(): the bind is when the socket starts receiving, so
    it is the event that is held and counted.  A held address: the held
    socket is handed over as above, and the bind counts as this process's
    listen on it.  An address not held yet: hupt does the bind itself on
    its own reference to the app's socket (the same socket: pidfd_getfd),
    answers with its result, and holds the socket from then on.  Doing it
    is the only way to know the bind succeeded (seccomp has no post-syscall
    hook) and the socket receives from that moment, so no datagram reaches
    a socket hupt does not hold.  Only while the generation starts: a
    datagram socket a serving generation binds to a new address is a
    client's (DNS resolvers bind a random query port per upstream query),
    let through unheld; one held at start-up and closed since is released
    by the fleet's scans (``release_abandoned``).  The bind runs with hupt's credentials: a
    refusal for want of privilege (EACCES, EPERM) is retried as the app's
    own bind (CONTINUE), not held, with a warning.  A unix path hupt bound
    is given the owner and mode the app's own bind would have made (its
    fsuid/fsgid, 0777 & ~umask).

listen(fd, backlog)
    hupt takes its own reference (pidfd_getfd) and does the listen itself
    on it, with a backlog of at least MIN_BACKLOG, then answers 0: seccomp
    has no post-syscall hook, so doing the call ourselves is the only way
    to both raise the backlog and know it succeeded.

getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN)
    Servers that may inherit their sockets (gunicorn, haproxy) ask this after
    bind() and call listen() only on a socket that does not listen yet.  The
    held socket handed to them listens already, so they never call listen():
    asked of a socket this generation was handed, the question counts as its
    listen.  The call itself goes through unchanged (CONTINUE: read-only).
    Each process counts once per address, whether it asked, listened or both
    (--multi waits for every copy).

unlink(path) / unlinkat(dirfd, path, 0)
    A held unix socket path is answered 0 and left in place: servers unlink
    their socket path before bind and at exit, which would cut every new
    client off the socket the next generation serves.  So is the path of a
    paused listener's stand-in (``Listeners.stand_ins``, its file removed
    as it was bound), which is what getsockname() of the paused fd gives and
    gunicorn unlinks at exit.

Every answer is preceded by ID_VALID after reading the target's memory: a
signal can withdraw a notification at any moment (the syscall then restarts
with a new id or fails with EINTR), so every handler is idempotent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from dataclasses import dataclass, field, replace

from hupt import log
from hupt.address import Address, from_socket_name, parse_sockaddr
from hupt.errors import KernelError, NoSuchProcess, NotificationGone
from hupt.listeners import Listeners, reuseport
from hupt.tracer import bpf, libc, pidfd, procfs
from hupt.tracer.abi import O_CLOEXEC, O_NONBLOCK, SYS
from hupt.tracer.notify import Notification, NotifyFd

AT_FDCWD = -100
AT_REMOVEDIR = 0x200
PATH_MAX = 4096
SOCKADDR_MAX = 128


@dataclass
class Handoff:
    """The notification side of one generation."""

    generation: int
    notify: NotifyFd
    listeners: Listeners
    # Inodes of sockets bound (by CONTINUE) to an address the server chose.
    pending: dict[int, Address] = field(default_factory=dict)
    # SO_REUSEPORT sockets bound (by CONTINUE) and not yet listening: hupt's
    # reference, for the same address bound again before anything is held.
    first_reuseport: dict[Address, socket.socket] = field(default_factory=dict)
    # Binds of a held address so far: the n-th gets the n-th socket of its
    # reuseport group (an attached server's), and the held one past the last.
    binds: dict[Address, int] = field(default_factory=dict)
    # Addresses this generation got by handoff (for status and tests).
    handed: set[Address] = field(default_factory=set)
    # (process, address) already counted as listening: once each.
    counted: set[tuple[int, Address]] = field(default_factory=set)
    # A datagram bind of an address not held yet is held while the generation
    # starts; once it serves, such a bind is a client's (a resolver's query
    # port, bound and closed per query) and goes through unheld.
    hold_new_datagrams: bool = True

    def service(self) -> list[Address]:
        """Answer every pending notification; return the addresses newly listened on."""
        listened: list[Address] = []
        while True:
            try:
                n = self.notify.recv()
            except NotificationGone:
                continue
            if n is None:
                return listened
            try:
                addr = self._answer(n)
            except (NotificationGone, NoSuchProcess):
                continue  # withdrawn or gone: the kernel re-notifies if it matters
            except KernelError as e:
                log.warn(f"generation {self.generation}: answering {SYS(n.nr).name}: {e}")
                self._try_continue(n)
                continue
            if addr is not None:
                listened.append(addr)

    def _answer(self, n: Notification) -> Address | None:
        if n.nr == SYS.bind:
            return self._bind(n)
        elif n.nr == SYS.listen:
            return self._listen(n)
        elif n.nr in (SYS.unlink, SYS.unlinkat):
            self._unlink(n)
        elif n.nr == SYS.getsockopt:
            return self._acceptconn(n)
        else:
            self.notify.send_continue(n.id)
        return None

    # -- bind ------------------------------------------------------------
    def _bind(self, n: Notification) -> Address | None:
        fd, uaddr, alen = int(n.args[0]), n.args[1], int(n.args[2])
        with procfs.Memory(n.pid) as mem:
            raw = mem.read(uaddr, min(max(alen, 0), SOCKADDR_MAX))
        cwd = procfs.cwd(n.pid) if raw[:2] == socket.AF_UNIX.to_bytes(2, "little") else None
        if not self.notify.id_valid(n.id):
            return None
        addr = parse_sockaddr(raw, cwd)
        if addr is None or not addr.chosen:
            self.notify.send_continue(n.id)
            return None
        with _TheirSocket(n.pid, fd) as theirs:
            if theirs is not None and theirs.type == socket.SOCK_DGRAM:
                return self._bind_datagram(n, fd, replace(addr, kind=socket.SOCK_DGRAM),
                                           raw, theirs)
            if theirs is None or theirs.type != socket.SOCK_STREAM:
                self.notify.send_continue(n.id)
                return None
            held = self.listeners.get(addr)
            if held is not None and held.sock.family == theirs.family:
                group = held.sockets()
                k = self.binds.get(addr, 0)
                self.binds[addr] = k + 1
                give = group[k] if k < len(group) else held.sock
            elif (first := self._first_of_group(addr, theirs)) is not None:
                give = first
            else:
                self.pending[os.fstat(theirs.fileno()).st_ino] = addr
                # hupt's reference keeps the address bound: a bind that could
                # not join a group must not fail because of it (the server may
                # have closed its own socket meanwhile).
                old = self.first_reuseport.pop(addr, None)
                if old is not None:
                    old.close()
                # The first SO_REUSEPORT socket is bound here rather than let
                # through: a later bind of the group is handed this very socket
                # and may listen() on it before a CONTINUE'd bind has run, and
                # listen() on an unbound socket binds it to an ephemeral port;
                # the first bind then fails with EINVAL (CI, four workers
                # binding at one moment).
                if held is None and reuseport(theirs) and self._bind_first(n, theirs, raw,
                                                                           addr):
                    return None
                self.notify.send_continue(n.id)
                return None
        if self._hand(n, fd, give, addr):
            what = ("socket it bound first" if held is None else "held socket"
                    if give is held.sock else "held socket of its reuseport group")
            log.debug(f"generation {self.generation}: bind {addr} -> {what} at fd {fd}")
        return None

    def _hand(self, n: Notification, fd: int, give: socket.socket, addr: Address) -> bool:
        """Install ``give`` at the app's ``fd`` and make its bind return 0."""
        flags = procfs.fd_flags(n.pid, fd)
        # O_NONBLOCK lives on the open file description, shared with every
        # holder: mirror what this generation expects (Go needs it set).  The
        # older generations see it too until they are paused: what they had is
        # recorded for their stand-ins and for a rollback.
        cur = fcntl.fcntl(give.fileno(), fcntl.F_GETFL)
        want = (cur | O_NONBLOCK) if flags & O_NONBLOCK else (cur & ~O_NONBLOCK)
        held = self.listeners.get(addr)
        if held is not None and give is held.sock:
            held.set_by(self.generation, bool(cur & O_NONBLOCK), bool(want & O_NONBLOCK))
        if want != cur:
            fcntl.fcntl(give.fileno(), fcntl.F_SETFL, want)
        if not self.notify.id_valid(n.id):
            return False
        self.notify.addfd(n.id, give.fileno(), fd, cloexec=bool(flags & O_CLOEXEC))
        self.notify.send_result(n.id, 0)
        self.handed.add(addr)
        return True

    def _bind_datagram(self, n: Notification, fd: int, addr: Address, raw: bytes,
                       theirs: socket.socket) -> Address | None:
        """A datagram socket's bind: handed the held socket, or bound by hupt and held.
        Either way the bind is this process's "listen" on ``addr``."""
        held = self.listeners.get(addr)
        if held is not None and held.sock.family == theirs.family:
            if not self._hand(n, fd, held.sock, addr):
                return None
            log.debug(f"generation {self.generation}: bind {addr} -> held socket at fd {fd}")
            return self._count(n.pid, addr)
        if held is not None or not self.hold_new_datagrams or not self.notify.id_valid(n.id):
            self.notify.send_continue(n.id)
            return None
        # A relative unix path would resolve against hupt's cwd: bind the
        # resolved one.  Anything else exactly as passed (IPv6 scope ids).
        sockaddr = addr.sockaddr() if addr.is_unix and not addr.is_abstract else raw
        try:
            if not addr.is_unix:
                _steer_to_first(theirs)
            libc.bind(theirs.fileno(), sockaddr)
        except KernelError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                log.warn(f"generation {self.generation}: hupt may not bind {addr} ({e}): "
                         "the server binds it itself, and it is not held across reloads")
                self.notify.send_continue(n.id)
            else:
                self.notify.send_result(n.id, error=e.errno)
            return None
        if not addr.is_unix:
            try:
                bpf.attach_reuseport_selector(theirs)  # (see _steer_to_first)
            except OSError as e:  # its dummies then fall back to another port
                log.warn(f"generation {self.generation}: {addr}: reuseport selector: {e}")
        if addr.is_unix and not addr.is_abstract:
            _own_like(n.pid, addr.path)
        kept = socket.socket(fileno=os.dup(theirs.fileno()))
        os.set_inheritable(kept.fileno(), False)
        self.listeners.add(addr, kept, 0).setter = self.generation
        self.notify.send_result(n.id, 0)
        log.debug(f"generation {self.generation}: bound and holding datagram socket {addr}")
        return self._count(n.pid, addr)

    def _bind_first(self, n: Notification, theirs: socket.socket, raw: bytes,
                    addr: Address) -> bool:
        """Bind ``theirs``, the first SO_REUSEPORT socket on ``addr``, as the server
        asked, and answer its bind (the kernel's error, if any); False if hupt may
        not make that bind (a privileged port, a policy on hupt): the caller lets
        the server's own call through then."""
        try:
            libc.bind(theirs.fileno(), raw)
        except KernelError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                return False
            self.notify.send_result(n.id, error=e.errno)
            return True
        # Kept before the answer: a bind withdrawn by a signal comes again, and
        # finds its socket bound and first in its group.
        kept = socket.socket(fileno=os.dup(theirs.fileno()))
        os.set_inheritable(kept.fileno(), False)
        self.first_reuseport[addr] = kept
        self.notify.send_result(n.id, 0)
        log.debug(f"generation {self.generation}: bound {addr} (SO_REUSEPORT) for it")
        return True

    def _first_of_group(self, addr: Address, theirs: socket.socket) -> socket.socket | None:
        """The socket this generation already bound to ``addr`` with SO_REUSEPORT, if
        ``theirs`` would join it in a reuseport group.

        A group is one accept queue per socket: each would be paused and
        closed apart at the next reload, resetting what its queue held, while
        hupt can hand on only one.  Given the first socket instead, every
        process of the server accepts from one queue, as every later
        generation does from the held socket.
        """
        first = self.first_reuseport.get(addr)
        if first is None or first.family != theirs.family or not reuseport(theirs):
            return None
        # Where hupt could not bind it itself (_bind_first), its own bind was let
        # through (CONTINUE) but may not have run yet: the process that made it
        # is runnable, not necessarily scheduled.  Unbound is therefore fine;
        # bound elsewhere is not the same socket's business.
        if not (_bound_to(first, addr) or _unbound(first)):
            return None
        return first

    def close(self) -> None:
        for sock in self.first_reuseport.values():
            sock.close()
        self.first_reuseport.clear()

    # -- listen ----------------------------------------------------------
    def _listen(self, n: Notification) -> Address | None:
        fd, backlog = int(n.args[0]), _s32(n.args[1])
        with _TheirSocket(n.pid, fd) as theirs:
            if theirs is None or theirs.type != socket.SOCK_STREAM:
                self.notify.send_continue(n.id)  # the kernel's EOPNOTSUPP for a datagram one
                return None
            ino = os.fstat(theirs.fileno()).st_ino
            held = self.listeners.by_inode(ino)
            if held is not None:
                mine = next((g for g in held.sockets() if os.fstat(g.fileno()).st_ino == ino),
                            held.sock)
                held.raise_backlog(backlog, mine)
                self.notify.send_result(n.id, 0)
                return self._count(n.pid, held.address)
            addr = self.pending.get(ino)
            if addr is None or not _bound_to(theirs, addr):
                self.notify.send_continue(n.id)
                return None
            if not self.notify.id_valid(n.id):
                return None
            try:
                kept = socket.socket(fileno=os.dup(theirs.fileno()))
                os.set_inheritable(kept.fileno(), False)
                self.listeners.add(addr, kept, backlog).setter = self.generation
            except OSError as e:
                self.notify.send_result(n.id, error=e.errno or errno.EINVAL)
                return None
        del self.pending[ino]
        first = self.first_reuseport.pop(addr, None)
        if first is not None:  # held now: later binds get the held socket
            first.close()
        self.notify.send_result(n.id, 0)
        log.debug(f"generation {self.generation}: holding new listener {addr}")
        return self._count(n.pid, addr)

    def _count(self, tid: int, addr: Address) -> Address | None:
        """``addr`` if this is the first time process ``tid`` counts as listening on it."""
        key = (procfs.tgid_of(tid), addr)
        if key in self.counted:
            return None
        self.counted.add(key)
        return addr

    # -- getsockopt(SO_ACCEPTCONN) ----------------------------------------
    def _acceptconn(self, n: Notification) -> Address | None:
        with _TheirSocket(n.pid, int(n.args[0])) as theirs:
            ino = os.fstat(theirs.fileno()).st_ino if theirs is not None else None
        self.notify.send_continue(n.id)
        held = self.listeners.by_inode(ino) if ino is not None else None
        if held is None or held.address not in self.handed:
            return None
        log.debug(f"generation {self.generation}: asked whether {held.address} listens "
                  "(it does: counted as its listen)")
        return self._count(n.pid, held.address)

    # -- unlink ----------------------------------------------------------
    def _unlink(self, n: Notification) -> None:
        if n.nr == SYS.unlink:
            dirfd, upath, flags = AT_FDCWD, n.args[0], 0
        else:
            dirfd, upath, flags = _s32(n.args[0]), n.args[1], int(n.args[2])
        paths = self.listeners.unix_paths()
        if flags & AT_REMOVEDIR or not paths:
            self.notify.send_continue(n.id)
            return
        with procfs.Memory(n.pid) as mem:
            path = mem.read_cstring(upath, PATH_MAX)
        if not path.startswith(b"/"):
            base = procfs.cwd(n.pid) if dirfd == AT_FDCWD else procfs.fd_path(n.pid, dirfd)
            path = os.path.normpath(os.path.join(os.fsencode(base), path))
        if not self.notify.id_valid(n.id):
            return
        if path in paths:
            log.debug(f"generation {self.generation}: kept held socket path {path!r}")
            self.notify.send_result(n.id, 0)
        elif path in self.listeners.stand_ins:
            # Its file is gone already: removing it "again" must not fail.
            log.debug(f"generation {self.generation}: unlink of stand-in path {path!r}")
            self.notify.send_result(n.id, 0)
        else:
            self.notify.send_continue(n.id)

    def _try_continue(self, n: Notification) -> None:
        with contextlib.suppress(KernelError):
            self.notify.send_continue(n.id)


def _steer_to_first(sock: socket.socket) -> None:
    """Make ``sock``'s bind create a SO_REUSEPORT group, first in it, whose selector
    program ("return 0") sends every datagram to it.

    A paused generation's dummy later joins this group on the same address (see
    tracer/accepting.py): with the program in place before any dummy exists, no
    datagram is ever steered to a dummy.  Attached by the dummy's injection
    instead, a datagram arriving between its bind and the attach went to the
    dummy, whose filter dropped it (1 lost in ~2,000 under load).  The program
    can only be attached once the group exists, i.e. right after the bind,
    before the server gets its socket back.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def _own_like(tid: int, path: bytes) -> None:
    """Give the socket file hupt bound at ``path`` the owner and mode that process
    ``tid``'s own bind would have: its fsuid/fsgid, 0777 less its umask."""
    fields = procfs.status_fields(tid)
    try:
        uid, gid = int(fields["Uid"].split()[3]), int(fields["Gid"].split()[3])
        umask = int(fields.get("Umask", "022"), 8)
    except (KeyError, IndexError, ValueError):
        return
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.lchown(path, uid, gid)
        os.chmod(path, 0o777 & ~umask)


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


class _TheirSocket:
    """Our own reference to the target's fd as a socket object, closed on exit.

    None instead if the fd is not a socket.
    """

    def __init__(self, tid: int, fd: int) -> None:
        self.tid, self.fd = tid, fd
        self.sock: socket.socket | None = None

    def __enter__(self) -> socket.socket | None:
        tgid = procfs.tgid_of(self.tid)
        with pidfd.PidFd(tgid) as p:
            try:
                ours = p.getfd(self.fd)
            except KernelError as e:
                if e.errno in (errno.EBADF, errno.ENOTSOCK):
                    return None
                raise
        try:
            self.sock = socket.socket(fileno=ours)
        except OSError:
            os.close(ours)
            return None
        return self.sock

    def __exit__(self, *exc: object) -> None:
        if self.sock is not None:
            self.sock.close()


def _unbound(sock: socket.socket) -> bool:
    try:
        return from_socket_name(sock.family, sock.getsockname()).port == 0
    except OSError:
        return False


def _bound_to(sock: socket.socket, addr: Address) -> bool:
    """The bind went through: listen() on an unbound socket would autobind a random port."""
    try:
        name = from_socket_name(sock.family, sock.getsockname())
    except OSError:
        return False
    if addr.is_unix:
        # getsockname gives the path as passed (maybe relative); the inode matched already.
        return bool(name.path)
    return name.port == addr.port
