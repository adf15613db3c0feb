"""The control socket: how ``hupt reload PID`` talks to a running ``hupt run``.

One unix stream socket per hupt instance, named after hupt's PID (and, in a
PID namespace other than the initial one, the namespace: ``_ns_tag``), in a
directory only its user can enter (root: /run/hupt; others:
$XDG_RUNTIME_DIR/hupt, else /tmp/hupt-UID, mode 0700).  Every connection's
peer credentials (SO_PEERCRED) are checked as well: only root or hupt's own
user may send commands, whatever the directory's permissions became.  Anyone
else gets one result line saying so and is hung up on, and hupt logs it.
SO_PEERCRED holds the *effective* uid at connect(), while the path lookup
uses the filesystem uid: a process can pass the directory check and still be
someone else.

Protocol: the client sends one JSON object on a line, {"cmd": "reload"}; the
server answers with JSON lines, {"event": "progress", "message": ...} as the
reload goes, and finally {"event": "result", "ok": bool, "reason": str}.
{"cmd": "change", "argv": [...], "env": {...}, "unset_env": [...]} is a reload
with a changed command (hupt/command.py; ``hupt reload --env ... -- ARGV``).

PID lookup: hupt is a child subreaper, so every process of a server has the
hupt that supervises it among its ancestors; ``find_instance`` walks up from
the given PID to the first one with a control socket.  A server taken over by
``hupt attach`` is not below its hupt: the attach process adds an alias, a
symlink named after the server's PID to its own socket, which the same walk
finds from any process of the server.

Names (``hupt run --name web``): a symlink ``web.name -> PID.sock`` in the
runtime directory, made once hupt's socket listens, so ``hupt reload web``
finds the instance without a PID.  symlink() is atomic, so of two hupts
started with one name only one gets it; the other refuses to start.  A name
whose socket nobody answers on (its hupt was killed) is stale and is taken
over; hupt removes its name at exit.

Trust, both ways (issue 13):

* The runtime directory is checked before use by hupt and by the CLI alike
  (hupt/safefs.py: a real directory, this user's, mode 0700, never a symlink).
* The CLI believes only a peer running as its own uid or root (SO_PEERCRED
  of the listening socket, taken when hupt called listen()): a socket someone
  else put where hupt's should be gets one line and exit 2, never a "done".
* A request is one line of at most MAX_REQUEST bytes; a longer one is
  answered with an error and hung up on (one log line), so a client cannot
  make hupt buffer without bound.  A line that is JSON but not an object gets
  an error result too.
* A hupt that was killed leaves its socket behind.  The next hupt to start and
  ``hupt status`` remove every socket in the directory that nobody answers on
  (connect() refused).  A hupt binds its socket under a temporary name and
  renames it into place only once it listens, so a socket under a final name
  is never refused merely for being a moment too young.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

from hupt import log
from hupt.errors import ControlError, ControlTimeout, NotUnderHupt, Refused, UsageError
from hupt.safefs import private_dir

Message = dict[str, Any]
_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
# The longest request line: the commands are a few dozen bytes.
MAX_REQUEST = 4096


@functools.cache
def version() -> str:
    """hupt's version: that of the code running (the package metadata is built from
    the same attribute, and importlib.metadata would cost ~10 ms a command)."""
    from hupt import __version__

    return __version__


def runtime_dir(uid: int | None = None) -> str:
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return "/run/hupt"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "hupt")
    return f"/tmp/hupt-{uid}"


# The inode of the initial PID namespace (PROC_PID_INIT_INO, include/linux/proc_ns.h).
_INIT_PID_NS = 0xEFFFFFFC


@functools.cache
def _ns_tag() -> str:
    """What this PID namespace adds to a socket name: nothing in the initial one,
    ``.ns<inode>`` in any other.

    PIDs repeat across PID namespaces (every container's hupt may be PID 1) and
    containers may share /run: named by PID alone, a second instance's socket
    replaced the first one's, which removed it at exit.  A process sees the PIDs
    of its own namespace, so a CLI finds the instances of its namespace, and
    only those (``hupt status`` lists them alone).
    """
    try:
        ino = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return "" if ino == _INIT_PID_NS else f".ns{ino}"


def socket_name(pid: int) -> str:
    return f"{pid}{_ns_tag()}.sock"


def socket_path(pid: int, uid: int | None = None) -> str:
    return os.path.join(runtime_dir(uid), socket_name(pid))


def pid_of_socket(name: str) -> int | None:
    """The PID a control socket's file name is for, if it is one of this namespace."""
    base = name.removesuffix(_ns_tag() + ".sock")
    return int(base) if base != name and base.isdigit() else None


NAME_SUFFIX = ".name"
NAME_MAX = 64
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]*")


def check_name(name: str) -> str:
    """``name`` if it can name an instance (UsageError in one line otherwise).

    Letters, digits and ``_ . @ + -``, not starting with a dot or a dash, at
    most NAME_MAX characters, and not all digits (that is a PID).
    """
    if not name or len(name) > NAME_MAX or not _NAME.fullmatch(name):
        raise UsageError(f"invalid name {name!r}: use 1 to {NAME_MAX} letters, digits and "
                         f"'_.@+-', not starting with '.' or '-'")
    if name.isdigit():
        raise UsageError(f"invalid name {name!r}: all digits would be taken for a PID")
    return name


def name_path(name: str, uid: int | None = None) -> str:
    return os.path.join(runtime_dir(uid), name + NAME_SUFFIX)


def _named_pid(link: str) -> int | None:
    """The hupt PID a name symlink points at (None: not a name link of ours)."""
    try:
        target = os.readlink(link)
    except OSError:
        return None
    return None if "/" in target else pid_of_socket(target)


def find_named(name: str) -> int:
    """The PID of the hupt started with ``--name name`` (NotUnderHupt if none answers)."""
    check_name(name)
    d = existing_runtime_dir()
    link = name_path(name)
    pid = _named_pid(link) if d is not None else None
    if pid is None or _answers(socket_path(pid), socket.SOCK_STREAM) is not True:
        if pid is not None:  # its hupt was killed: nobody will answer for this name
            clean_stale(os.path.dirname(link))
        raise NotUnderHupt(f"no hupt instance named {name!r}: not a PID, nor the name of a "
                           f"running hupt of this user (names live in {runtime_dir()})")
    return pid


def names() -> dict[int, str]:
    """Every name of this user's instances, by hupt PID (stale ones included)."""
    d = existing_runtime_dir()
    out: dict[int, str] = {}
    if d is None:
        return out
    for entry in os.listdir(d):
        if entry.endswith(NAME_SUFFIX) and not entry.startswith("."):
            pid = _named_pid(os.path.join(d, entry))
            if pid is not None:
                out[pid] = entry.removesuffix(NAME_SUFFIX)
    return out


def read_pidfile(path: str) -> int:
    """The PID a pidfile holds (its first line), UsageError in one line otherwise."""
    try:
        with open(path, "rb") as f:
            first = f.read(64).split(b"\n", 1)[0].strip()
    except FileNotFoundError:
        raise UsageError(f"--pidfile {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"--pidfile {path} is a directory, not a file") from None
    except OSError as e:
        raise UsageError(f"--pidfile {path}: {e.strerror}") from None
    if not first.isdigit() or int(first) <= 0:
        raise UsageError(f"--pidfile {path} does not hold a PID")
    return int(first)


def ensure_runtime_dir() -> str:
    """This user's runtime directory, created if missing, refused (Refused) if unsafe."""
    d = runtime_dir()
    private_dir(d, create=True)
    return d


def existing_runtime_dir() -> str | None:
    """This user's runtime directory if it exists (None if not); Refused if unsafe."""
    d = runtime_dir()
    return d if private_dir(d, create=False) else None


def _answers(path: str, kind: int) -> bool | None:
    """Whether someone listens on the unix socket ``path`` (None: the path is gone).

    Only a refused connect() means nobody: a full backlog or a slow peer is
    someone.
    """
    s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except ConnectionRefusedError:
        return False
    except FileNotFoundError:
        return None
    except OSError:
        return True
    finally:
        s.close()


def _lock(directory: str) -> int:
    """The runtime directory's lock (flock), held by the fd returned: names are
    judged stale and replaced or removed under it, so no one removes a name
    another hupt has just taken."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    fd = _lock(directory)
    try:
        yield
    finally:
        os.close(fd)


def clean_stale(directory: str, keep: str | None = None) -> list[str]:
    """Remove the sockets and aliases in ``directory`` that nobody answers on.

    Control sockets (``PID.sock``), attach aliases and names (symlinks to
    one) and sd_notify sockets (``PID.N.notify``, datagram) left by a hupt that was
    killed.  Returns the paths removed.
    """
    try:
        fd = _lock(directory)
    except OSError:
        return []
    try:
        return _clean_stale(directory, keep)
    finally:
        os.close(fd)


def _clean_stale(directory: str, keep: str | None) -> list[str]:
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if name.endswith(".sock"):
            kind = socket.SOCK_STREAM
        elif name.endswith(".notify"):
            kind = socket.SOCK_DGRAM
        elif name.endswith(NAME_SUFFIX):
            kind = socket.SOCK_STREAM  # a name: stale once its hupt's socket is
        else:
            continue
        path = os.path.join(directory, name)
        if path == keep:
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            target = os.path.join(directory, os.readlink(path))
            stale = os.path.dirname(os.path.normpath(target)) != directory or \
                _answers(target, kind) is not True
        elif stat.S_ISSOCK(st.st_mode):
            stale = _answers(path, kind) is False
        else:
            continue
        if stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


def find_instance(pid: int) -> int:
    """The PID of the hupt that supervises ``pid`` (which may be hupt itself)."""
    p = pid
    if not os.path.exists(f"/proc/{pid}"):
        raise NotUnderHupt(f"no process with PID {pid}")
    if existing_runtime_dir() is None:
        raise NotUnderHupt(f"PID {pid} is not under hupt (no hupt instance of this user: "
                           f"{runtime_dir()} does not exist)")
    while p >= 1:  # hupt may be PID 1 (a container entrypoint, unshare --pid)
        path = socket_path(p)
        if os.path.exists(path) and (p != 1 or _answered_by(path, 1)):
            if os.path.islink(path):  # an attached server's alias: name the hupt behind it
                behind = pid_of_socket(os.path.basename(os.readlink(path)))
                return behind if behind is not None else p
            return p
        try:
            p = _parent_of(p)
        except (OSError, ValueError, IndexError):
            break
    raise NotUnderHupt(f"PID {pid} is not under hupt (no hupt instance of this user among its "
                       f"ancestors; control sockets live in {runtime_dir()})")


def _parent_of(pid: int) -> int:
    """The parent of ``pid``, from /proc/PID/stat (OSError if gone).

    Read here rather than through hupt.system, whose kernel modules (ctypes,
    the tracer) a control command does not need: ``hupt status PID`` should
    start about as fast as the interpreter (issue 14).  The command name may
    hold spaces and parentheses: the fields that follow its last ')' are
    state, then ppid.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[1])


def _answered_by(path: str, pid: int) -> bool:
    """Whether the hupt listening on ``path`` is ``pid`` as this process sees pids.

    ``1.sock`` may belong to a hupt that is PID 1 of another PID namespace
    sharing the runtime directory; from here its peer pid reads as its pid in
    this namespace, not 1, so the walk up to this namespace's init skips it.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(2.0)
            s.connect(path)
            peer, _, _ = _UCRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    except OSError:
        return False
    return bool(peer == pid)


class Peer:
    """One connected client, served without blocking from the supervisor's loop."""

    def __init__(self, sock: socket.socket, on_message: Callable[[Peer, Message], None],
                 on_change: Callable[[Peer], None]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self._in = b""
        self._out = b""
        self._on_message = on_message
        # Told when the peer wants write readiness or is about to close, so the
        # owner's selector registration follows (before the fd number can be reused).
        self._on_change = on_change
        self.closed = False
        self.close_when_flushed = False

    def fileno(self) -> int:
        return self.fd

    def readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        if self.close_when_flushed:
            return  # answered for good: what else comes is not read
        self._in += data
        while b"\n" in self._in:
            line, self._in = self._in.split(b"\n", 1)
            if len(line) > MAX_REQUEST:
                self._too_large()
                return
            try:
                msg = _decode(line)
            except (ValueError, RecursionError):
                self._reject("malformed request")
                return
            if not isinstance(msg, dict):
                self._reject(f"malformed request: a JSON object expected, not "
                             f"{type(msg).__name__}")
                return
            self._on_message(self, msg)
            if self.closed:
                return
        if len(self._in) > MAX_REQUEST:
            self._too_large()

    def _reject(self, reason: str) -> None:
        self.send({"event": "result", "ok": False, "reason": reason})
        self.finish()

    def _too_large(self) -> None:
        """Answer once and hang up: nothing more of the request is read."""
        log.warn(f"refused a control request over {MAX_REQUEST} bytes")
        self._in = b""
        self.send({"event": "result", "ok": False,
                   "reason": f"request too large (over {MAX_REQUEST} bytes)"})
        self.close()

    def send(self, msg: Message) -> None:
        if self.closed:
            return
        self._out += encode(msg)
        self.flush()

    def finish(self) -> None:
        self.close_when_flushed = True
        self.flush()

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def flush(self) -> None:
        while self._out and not self.closed:
            try:
                n = self.sock.send(self._out)
            except BlockingIOError:
                break  # the rest when writable: the owner is told below
            except OSError:
                self.close()
                return
            self._out = self._out[n:]
        if self.close_when_flushed and not self._out:
            self.close()
        elif not self.closed:
            self._on_change(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._on_change(self)
            self.sock.close()


def listen_as(name: str | None) -> ControlServer:
    """A control socket listening, with ``name`` taken (UsageError if a live hupt has
    it: nothing is left behind)."""
    server = ControlServer()
    if name is not None:
        try:
            server.claim_name(name)
        except BaseException:
            server.close()
            raise
    return server


class ControlServer:
    def __init__(self, pid: int | None = None) -> None:
        d = ensure_runtime_dir()
        self.path = os.path.join(d, socket_name(pid or os.getpid()))
        for stale in clean_stale(d, keep=self.path):
            log.info(f"removed {stale}: nobody answers on it (left by a hupt that was killed)")
        # Listening before it has its name (see the module's docstring).
        young = os.path.join(d, f".{os.path.basename(self.path)}.{os.urandom(4).hex()}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(young)
            os.chmod(young, 0o600)
            self.sock.listen(16)
            os.rename(young, self.path)  # replaces one of a hupt with this PID before
        except BaseException:
            self.sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(young)
            raise
        self.sock.setblocking(False)
        self._aliases: set[str] = set()
        self._name: str | None = None

    def _name_is_mine(self) -> bool:
        assert self._name is not None
        pid = _named_pid(self._name)
        return pid is not None and socket_path(pid) == self.path

    def claim_name(self, name: str) -> None:
        """Answer for ``name`` too (``hupt run --name``); UsageError if a live hupt has it.

        symlink() fails with EEXIST if the name is there already, so two hupts
        never both get one name; a stale one (nobody answers on the socket it
        points at) is removed and the symlink tried again.
        """
        path = name_path(check_name(name))
        with _locked(os.path.dirname(path)):
            self._claim(name, path)

    def _claim(self, name: str, path: str) -> None:
        target = os.path.basename(self.path)
        for _ in range(3):
            try:
                os.symlink(target, path)
            except FileExistsError:
                pass
            else:
                self._name = path
                return
            owner = _named_pid(path)
            if owner is not None and socket_path(owner) != self.path and \
                    _answers(socket_path(owner), socket.SOCK_STREAM) is True:
                raise UsageError(f"the name {name!r} is taken by hupt {owner} (`hupt status "
                                 f"{name}`); nothing started")
            if owner is None and os.path.lexists(path) and not os.path.islink(path):
                raise UsageError(f"cannot take the name {name!r}: {path} is not a name link "
                                 f"(remove it)")
            # Stale (or ours from a hupt with this PID before): remove it and try again.
            log.info(f"removed the stale name {path} (left by a hupt that was killed)")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise UsageError(f"cannot take the name {name!r}: {path} keeps reappearing")

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> socket.socket | None:
        """The next client whose credentials allow it to command this hupt (None: no
        one else is waiting; OSError as accept() raises it)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return None
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            pid, uid, _ = _UCRED.unpack(creds)
            if uid in (0, os.getuid()):
                conn.setblocking(False)
                return conn
            self._refuse(conn, pid, uid)

    @staticmethod
    def _refuse(conn: socket.socket, pid: int, uid: int) -> None:
        """Tell the client why, in the protocol's own terms, and hang up; nothing else happens.

        The one line fits in an empty socket buffer, so MSG_DONTWAIT never cuts
        it; a client gone already is no reason to fail.
        """
        me = os.getuid()
        reason = (f"permission denied: uid {uid} may not control hupt {os.getpid()} "
                  f"(only root{'' if me == 0 else f' and uid {me}'} may)")
        log.warn(f"refused a control connection from pid {pid}: {reason}")
        with contextlib.suppress(OSError):
            conn.send(encode({"event": "result", "ok": False, "reason": reason}),
                      socket.MSG_DONTWAIT)
        conn.close()

    def alias(self, pid: int) -> None:
        """Answer for ``pid`` too (an attached server): a symlink to this socket in its name."""
        path = socket_path(pid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.symlink(os.path.basename(self.path), path)
        self._aliases.add(path)

    def unalias(self, pid: int) -> None:
        path = socket_path(pid)
        if path in self._aliases:
            self._aliases.discard(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def close(self) -> None:
        if self._name is not None:  # while this socket answers: nobody can take it meanwhile
            with contextlib.suppress(OSError), _locked(os.path.dirname(self._name)):
                if self._name_is_mine():
                    os.unlink(self._name)
            self._name = None
        self.sock.close()
        for path in [self.path, *self._aliases]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._aliases.clear()


def _check_peer(s: socket.socket, path: str) -> None:
    """Believe only hupt's own user or root (see the module's docstring)."""
    pid, uid, _ = _UCRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                             _UCRED.size))
    me = os.geteuid()
    if uid not in (0, me):
        raise Refused(f"the process answering on {path} (pid {pid}) runs as uid {uid}, not "
                      f"as uid {me} or root: refusing to believe it (someone else's socket "
                      f"in the runtime directory?)")


# json is imported when first used: `hupt run` imports this module before its
# server's exec, which json (1.3 ms) would delay for nothing.


def encode(msg: Message) -> bytes:
    """One message as it goes on the wire: a line of JSON."""
    import json

    return json.dumps(msg).encode() + b"\n"


def _decode(line: bytes) -> Any:
    import json

    return json.loads(line)


def _connect(s: socket.socket, path: str, deadline: float | None) -> None:
    """connect(), waiting for room in hupt's backlog until ``deadline``.

    A unix socket with a timeout is non-blocking underneath, and its connect()
    fails with EAGAIN at once while the listener's backlog is full (clients
    arriving faster than hupt's loop accepts them, or hupt busy for a moment),
    where a blocking one waits for room.  A client with a timeout waits too.
    """
    delay = 0.005
    while True:
        try:
            s.connect(path)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise TimeoutError("hupt's control backlog stayed full") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def request(hupt_pid: int, msg: Message, timeout: float | None = None) -> Iterator[Message]:
    """Send ``msg`` to the hupt with PID ``hupt_pid`` and yield its answers until the result."""
    path = socket_path(hupt_pid)
    deadline = None if timeout is None else time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        _connect(s, path, deadline)
    except TimeoutError as e:
        s.close()
        raise ControlTimeout(f"hupt {hupt_pid} did not answer within {timeout:g} s") from e
    except OSError as e:
        s.close()
        raise ControlError(f"cannot reach hupt {hupt_pid} at {path}: {e.strerror}") from e
    with s:
        _check_peer(s, path)
        s.sendall(encode(msg))
        buf = b""
        while True:
            if deadline is not None:  # the whole exchange, not each read
                s.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = s.recv(65536)
            except TimeoutError as e:
                raise ControlTimeout(f"hupt {hupt_pid} gave no result within {timeout:g} s") \
                    from e
            if not data:
                raise ControlError(f"hupt {hupt_pid} closed the connection without a result")
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                ans = _decode(line)
                yield ans
                if ans.get("event") == "result":
                    return
