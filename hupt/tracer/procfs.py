"""Facts about /proc, the kernel's window on other processes, as hupt reads it.

hupt learns everything it needs about a server generation from /proc: who is
whose parent (the generation's process tree), which thread group a seccomp
notification's thread belongs to, which fds are sockets and with which flags,
which epoll instances watch a listener, and the tracee's memory.

Why the parsing is written the way it is:

- ``/proc/PID/stat`` starts with ``pid (comm) state ppid``; ``comm`` is up to 15
  arbitrary bytes chosen by the process (PR_SET_NAME), spaces, parentheses and
  newlines included, and not necessarily UTF-8.  The only safe split is at the
  *last* ``)``.  Everything is read as bytes.
- ``/proc/TID/...`` works for any thread id although ``/proc`` lists only
  thread-group leaders.  A seccomp notification names a TID; ``tgid_of`` maps it
  to the process (``pidfd_open`` refuses TIDs of non-leaders with ENOENT).
  ``fdinfo``, ``mem`` and ``status`` accept the TID directly.
- ``fdinfo`` ``flags:`` is octal (04000 = O_NONBLOCK, 02000000 = O_CLOEXEC; the
  latter is per-fd and shown merged in).  An epoll fd's fdinfo has one line per
  registration: ``tfd: 5 events: 40000019 data: 5 pos:0 ino:3a6db3 sdev:9`` with
  events, data, ino and sdev in hex.  ``events`` keeps EPOLLET/EPOLLONESHOT/
  EPOLLEXCLUSIVE and has EPOLLERR|EPOLLHUP (0x18) added by the kernel.  ``tfd`` is
  the fd number the registration was made with: after a dup2/close the entry
  lives on under the same number, so identify the file by ``ino``.
- ``/proc/PID/environ`` is the environment the process *started* with, and
  ``cmdline`` can be rewritten by the process (setproctitle): both are hints.
  ``exe`` may end in " (deleted)" after a package upgrade; it is returned as is.
- Everything here races with the process exiting.  A vanished process shows
  as ENOENT (or ESRCH) on its /proc paths, a zombie as ENOENT on ``cwd``/``exe``,
  ESRCH on ``environ``/``cmdline``, an empty fd directory and reads of ``mem``
  returning nothing.  ``proc_errors`` turns all of these into NoSuchProcess;
  ENOENT on an fd entry of a live process means the fd is not open, which stays
  a plain KernelError.
- ``/proc/PID/mem`` needs ptrace-attach rights (root, or same user with
  yama ptrace_scope 0).  Kept open, a pread costs about 1 µs, four times less
  than process_vm_readv, and writes go through even to read-only mappings
  (the kernel uses FOLL_FORCE), which the injection code relies on.  An
  unmapped address reads as EIO.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

from hupt.errors import KernelError, NoSuchProcess, from_errno, kernel_errors

PROC = "/proc"
_READ_CHUNK = 65536
# Tracee strings are read page by page so that a string ending just before an
# unmapped page is not lost to EIO.
_PAGE = 4096


# --- error translation ---------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (what the error paths need to know)."""
    try:
        data = _read_bytes(f"{PROC}/{pid}/stat")
    except OSError:
        return False
    try:
        return parse_stat(data).state not in ("Z", "X", "x")
    except ValueError:
        return False


def proc_error(e: OSError, op: str, pid: int, *, entry: str | None = None) -> Exception:
    """The hupt error for an OSError raised on ``/proc/PID/...``.

    ENOENT or ESRCH mean the process is gone (NoSuchProcess), except on an
    ``entry`` of a live process (``fd/N``, ``fdinfo/N``) where ENOENT means that
    entry does not exist (a KernelError with errno ENOENT).
    """
    if e.errno is None:
        return e
    if e.errno in (errno.ENOENT, errno.ESRCH):
        if entry is not None and e.errno == errno.ENOENT and _alive(pid):
            return from_errno(e.errno, op, f"/proc/{pid}/{entry} does not exist")
        return NoSuchProcess(errno.ESRCH, op, f"process {pid} is gone")
    return from_errno(e.errno, op, f"/proc/{pid}")


@contextmanager
def proc_errors(op: str, pid: int, *, entry: str | None = None) -> Iterator[None]:
    """``proc_error`` for an OSError raised inside the block."""
    try:
        yield
    except OSError as e:
        raise proc_error(e, op, pid, entry=entry) from e


def _read_bytes(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, _READ_CHUNK):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def _read(pid: int, name: str, op: str, *, entry: bool = False) -> bytes:
    with proc_errors(op, pid, entry=name if entry else None):
        return _read_bytes(f"{PROC}/{pid}/{name}")


def _readlink(pid: int, name: str, op: str, *, entry: bool = False) -> str:
    with proc_errors(op, pid, entry=name if entry else None):
        return os.readlink(f"{PROC}/{pid}/{name}")


# --- pure parsers (unit-tested on captured text) --------------------------------


@dataclass(frozen=True)
class Stat:
    """The leading fields of /proc/PID/stat."""

    pid: int
    comm: bytes
    state: str
    ppid: int


def parse_stat(data: bytes) -> Stat:
    """Parse ``pid (comm) state ppid ...``; comm may hold any byte, ')' included."""
    open_ = data.find(b" (")
    close = data.rfind(b")")
    if open_ < 0 or close < open_:
        raise ValueError(f"not a /proc/PID/stat line: {data[:80]!r}")
    rest = data[close + 1:].split()
    if len(rest) < 2:
        raise ValueError(f"truncated /proc/PID/stat line: {data[:80]!r}")
    return Stat(
        pid=int(data[:open_]),
        comm=data[open_ + 2:close],
        state=rest[0].decode("ascii", "replace"),
        ppid=int(rest[1]),
    )


def parse_status(data: bytes) -> dict[str, str]:
    """``Key:\\tvalue`` lines of /proc/PID/status (or fdinfo) as a dict of stripped strings."""
    out: dict[str, str] = {}
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        key, sep, value = line.partition(":")
        if sep and key not in out:
            out[key] = value.strip()
    return out


def parse_fd_flags(data: bytes) -> int:
    """The ``flags:`` field of an fdinfo file (octal)."""
    flags = parse_status(data).get("flags")
    if flags is None:
        raise ValueError("fdinfo has no flags: line")
    return int(flags, 8)


@dataclass(frozen=True)
class EpollEntry:
    """One registration of an epoll instance, as its fdinfo shows it."""

    tfd: int  # the fd number at registration time (see the module docstring)
    events: int  # with EPOLLET/ONESHOT/EXCLUSIVE kept and EPOLLERR|EPOLLHUP added
    data: int  # the u64 epoll_data the registrant chose
    ino: int  # inode of the registered file (for sockets: the socket inode)


# fs/eventpoll.c ep_show_fdinfo():
#   "tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x\n"
_EPOLL_LINE = re.compile(
    rb"^tfd:\s*(\d+)\s+events:\s*([0-9a-fA-F]+)\s+data:\s*([0-9a-fA-F]+)"
    rb"\s+pos:\s*-?\d+\s+ino:\s*([0-9a-fA-F]+)",
    re.MULTILINE,
)


def parse_epoll_fdinfo(data: bytes) -> list[EpollEntry]:
    """The registrations listed in an epoll fd's fdinfo."""
    return [
        EpollEntry(int(m[1]), int(m[2], 16), int(m[3], 16), int(m[4], 16))
        for m in _EPOLL_LINE.finditer(data)
    ]


def parse_nul_list(data: bytes) -> list[bytes]:
    """NUL-separated strings (environ, cmdline); the final terminator is optional."""
    if not data:
        return []
    items = data.split(b"\0")
    if items[-1] == b"":
        items.pop()
    return items


_SOCKET_PREFIX = "socket:["
EVENTPOLL_LINK = "anon_inode:[eventpoll]"


def parse_socket_link(link: str) -> int | None:
    """The inode of a ``socket:[N]`` fd link, or None for any other kind of file."""
    # Called once per fd of a server (thousands per count): no regex.
    if link.startswith(_SOCKET_PREFIX) and link.endswith("]"):
        digits = link[len(_SOCKET_PREFIX):-1]
        if digits.isascii() and digits.isdigit():
            return int(digits)
    return None


# --- processes and threads ------------------------------------------------------


def status_fields(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (PID may be a TID)."""
    return parse_status(_read(pid, "status", "read status"))


def _status_int(pid: int, key: str) -> int:
    value = status_fields(pid).get(key)
    if value is None:
        raise KernelError(errno.ENOENT, f"read status {key}", f"/proc/{pid}/status has no {key}")
    return int(value)


def tgid_of(tid: int) -> int:
    """The thread group (process) id of thread ``tid``."""
    return _status_int(tid, "Tgid")


def tracer_pid(pid: int) -> int:
    """The pid of the process ptrace-attached to ``pid``; 0 if none."""
    return _status_int(pid, "TracerPid")


def seccomp_filters(pid: int) -> int:
    """How many seccomp filters are attached to thread ``pid`` (Linux 5.9+)."""
    return _status_int(pid, "Seccomp_filters")


def ppid_of(pid: int) -> int:
    """The parent process id of ``pid``."""
    try:
        return parse_stat(_read(pid, "stat", "read stat")).ppid
    except ValueError as e:
        raise KernelError(errno.EINVAL, "read stat", str(e)) from e


def _all_stats() -> Iterator[Stat]:
    """The stat line of every process visible in /proc; vanishing ones are skipped."""
    with kernel_errors("list /proc"):
        names = os.listdir(PROC)
    for name in names:
        if not name.isdigit():
            continue
        try:
            yield parse_stat(_read_bytes(f"{PROC}/{name}/stat"))
        except (OSError, ValueError):
            continue  # exited between listdir and read


def parent_map() -> dict[int, int]:
    """Every process visible in /proc mapped to its parent."""
    return {st.pid: st.ppid for st in _all_stats()}


def zombie_children(parent: int) -> list[int]:
    """The children of ``parent`` that have exited and wait to be reaped (state Z)."""
    return [st.pid for st in _all_stats() if st.ppid == parent and st.state == "Z"]


def threads(pid: int) -> list[int]:
    """The thread ids of process ``pid``, sorted (the leader's TID is the pid)."""
    with proc_errors("list threads", pid):
        return sorted(int(t) for t in os.listdir(f"{PROC}/{pid}/task"))


def environ(pid: int) -> list[bytes]:
    """The environment ``pid`` was started with (``KEY=VALUE`` entries)."""
    return parse_nul_list(_read(pid, "environ", "read environ"))


def cmdline(pid: int) -> list[bytes]:
    """The argument vector of ``pid`` (as it currently shows it)."""
    return parse_nul_list(_read(pid, "cmdline", "read cmdline"))


def cwd(pid: int) -> str:
    """The working directory of ``pid``."""
    return _readlink(pid, "cwd", "read cwd")


def exe(pid: int) -> str:
    """The executable of ``pid``; may end in " (deleted)"."""
    return _readlink(pid, "exe", "read exe")


# --- file descriptors -----------------------------------------------------------


def fd_path(pid: int, fd: int) -> str:
    """What ``pid``'s descriptor ``fd`` refers to (a directory for a dirfd)."""
    return _readlink(pid, f"fd/{fd}", "read fd link", entry=True)


def fd_flags(pid: int, fd: int) -> int:
    """The open flags of ``fd`` in ``pid`` (O_NONBLOCK, O_CLOEXEC, access mode)."""
    data = _read(pid, f"fdinfo/{fd}", "read fdinfo", entry=True)
    try:
        return parse_fd_flags(data)
    except ValueError as e:
        raise KernelError(errno.EINVAL, "read fdinfo", str(e)) from e


def _fd_links(pid: int) -> Iterator[tuple[int, str]]:
    """(fd, link target) for every open fd; fds closed during the scan are skipped."""
    path = f"{PROC}/{pid}/fd"
    with proc_errors("list fds", pid):
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with proc_errors("list fds", pid):
            names = os.listdir(dfd)
        for name in names:
            try:
                link = os.readlink(name, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise proc_error(e, "read fd link", pid, entry=f"fd/{name}") from e
            yield int(name), link
    finally:
        os.close(dfd)


def socket_inodes(pid: int) -> dict[int, int]:
    """fd -> socket inode for every socket ``pid`` holds."""
    out: dict[int, int] = {}
    for fd, link in _fd_links(pid):
        ino = parse_socket_link(link)
        if ino is not None:
            out[fd] = ino
    return out


def epoll_fds(pid: int) -> list[int]:
    """The fds of ``pid`` that are epoll instances, sorted."""
    return sorted(fd for fd, link in _fd_links(pid) if link == EVENTPOLL_LINK)


def epoll_registrations(pid: int, epfd: int) -> list[EpollEntry]:
    """What the epoll instance at ``epfd`` in ``pid`` watches."""
    return parse_epoll_fdinfo(_read(pid, f"fdinfo/{epfd}", "read epoll fdinfo", entry=True))


# --- memory ---------------------------------------------------------------------


class Memory:
    """/proc/PID/mem kept open: read and write another process's memory.

    ``pid`` may be a TID (all threads share the mm).  Use as a context manager;
    changes that must be undone go through ``patched``.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        with proc_errors("open mem", pid):
            self._fd = os.open(f"{PROC}/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _short(self, op: str, addr: int, got: int, want: int) -> KernelError:
        # mm gone (zombie or exited): the kernel reads and writes nothing.
        if got == 0 and not _alive(self.pid):
            return NoSuchProcess(errno.ESRCH, op, f"process {self.pid} is gone")
        return KernelError(errno.EIO, op, f"{got} of {want} bytes at {addr:#x} in {self.pid}")

    def read(self, addr: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``addr``; EIO (KernelError) if any of them is unmapped."""
        if n == 0:
            return b""
        with proc_errors("read mem", self.pid):
            data = os.pread(self._fd, n, addr)
        if len(data) != n:
            raise self._short("read mem", addr, len(data), n)
        return data

    def read_cstring(self, addr: int, limit: int) -> bytes:
        """The NUL-terminated string at ``addr``, without its NUL.

        At most ``limit`` bytes are read; a string with no NUL among them comes
        back cut to ``limit`` bytes (the caller decides whether that is an error).
        """
        parts: list[bytes] = []
        total = 0
        while total < limit:
            pos = addr + total
            chunk = self.read(pos, min(limit - total, _PAGE - pos % _PAGE))
            nul = chunk.find(b"\0")
            if nul >= 0:
                parts.append(chunk[:nul])
                break
            parts.append(chunk)
            total += len(chunk)
        return b"".join(parts)

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr`` (read-only mappings included); not undone by itself."""
        if not data:
            return
        with proc_errors("write mem", self.pid):
            n = os.pwrite(self._fd, data, addr)
        if n != len(data):
            raise self._short("write mem", addr, n, len(data))

    @contextmanager
    def patched(self, addr: int, data: bytes) -> Iterator[bytes]:
        """Write ``data`` at ``addr`` for the duration of the block; yields the old bytes."""
        old = self.read(addr, len(data))
        self.write(addr, data)
        try:
            yield old
        finally:
            self.write(addr, old)
