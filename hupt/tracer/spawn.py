"""Facts about starting a generation under a notify filter.

The filter must be in place before the server's first instruction, so it is
installed by the forked child itself, between fork() and execve():

* seccomp(SET_MODE_FILTER, NEW_LISTENER) returns the notify fd in the child
  only; the child passes it to hupt with SCM_RIGHTS over a socketpair (no
  ptrace permission needed) and hupt receives it with MSG_CMSG_CLOEXEC:
  CPython's recv_fds() drops that flag, and an inheritable notify fd would
  leak into the next generation, which could then answer its own calls.
* The notify fd is O_CLOEXEC in the child, so the server never sees it.
* execve() is not filtered and the filter survives it, fork(), setsid() and
  daemonizing; every descendant's bind() reaches hupt.
* Python's fork keeps signal dispositions: SIGPIPE and SIGXFSZ are ignored
  by CPython and ignored signals survive exec, so they are reset to default
  here, as are the handlers hupt installed, the signal mask and the wakeup fd.
* An exec failure (no such program) is reported through a close-on-exec
  pipe: EOF means the exec happened.
* A bare program name is looked up on the server's PATH by hupt, before the
  fork: os.execvpe() in the child tries execve() in each directory, building
  the environment's C array again for each try, in a process where every
  page it writes is a copy-on-write fault (0.9 ms with an 11-entry PATH, of
  3.4 for the whole spawn).  A relative PATH entry, which means the child's
  working directory, leaves the search to the child as before.
* ``cgroup``: the child is created in that cgroup2 group by clone3
  (hupt/tracer/clone.py: no migration, which would cost the start 10 to 20
  ms), or, where the kernel refuses that, forked and joins it first
  (hupt/tracer/cgroup.py); either way everything it will make is a member.
  If it cannot join, it says so in its message with the notify fd (``u``
  instead of ``n``) and runs on: hupt then tracks that generation by its
  process tree.
* Each generation gets its own process group so that a Ctrl-C at hupt's
  terminal reaches hupt (which drains) and not the server directly.
* hupt raised its own soft limit of open files (hupt/fdlimit.py): the child
  sets back the one hupt was started with, right before execve().
* ``stdout``/``stderr``: write ends of pipes hupt reads (hupt/output.py),
  dup2()ed onto fds 1 and 2 (dup2 clears close-on-exec on the copy; the
  originals are close-on-exec and go at the exec).  None: hupt's own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import struct
from collections.abc import Iterable, Sequence

from hupt import fdlimit
from hupt.errors import HuptError, KernelError
from hupt.tracer import clone, seccomp
from hupt.tracer.abi import SYS

_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP, signal.SIGTERM, signal.SIGINT,
                  signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)


class SpawnError(HuptError):
    pass


def notified_calls(*, unix: bool) -> list[SYS]:
    """The calls a spawned generation's filter hands to hupt: bind and listen, and
    with ``unix`` (hupt holds a unix socket path, or exec mode, whose next image
    removes its path before binding it) unlink and unlinkat."""
    return [SYS.bind, SYS.listen, *((SYS.unlink, SYS.unlinkat) if unix else ())]


def spawn(argv: Sequence[str], env: dict[str, str], notify: Iterable[SYS], *,
          cwd: str | None = None, stdout: int | None = None,
          stderr: int | None = None, cgroup: str | None = None) -> tuple[int, int, bool]:
    """Fork, install the notify filter in the child, exec ``argv``; return (pid, notify
    fd (close-on-exec, the caller's to close), whether it joined ``cgroup``)."""
    prog = seccomp.build_filter(notify)
    program = _on_path(argv[0], env)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = _fork_into(cgroup) if cgroup is not None else None
    join = None
    if pid is None:
        pid, join = os.fork(), cgroup
    if pid == 0:  # pragma: no cover - runs in the child, proved by integration tests
        try:
            ours.close()
            os.close(err_r)
            _child(argv, program, env, prog, theirs, err_w, cwd, (stdout, stderr), join)
        finally:
            os._exit(127)
    theirs.close()
    os.close(err_w)
    try:
        notify_fd, joined = _receive_fd(ours)
        failure = _read_all(err_r)
    finally:
        ours.close()
        os.close(err_r)
    if failure:
        if notify_fd is not None:
            os.close(notify_fd)
        os.waitpid(pid, 0)
        code, _, what = failure.partition(b":")
        raise SpawnError(f"cannot start {argv[0]!r}: {what.decode()}: {os.strerror(int(code))}")
    if notify_fd is None:
        os.waitpid(pid, 0)
        raise SpawnError(f"cannot start {argv[0]!r}: the child sent no notify fd")
    return pid, notify_fd, joined and cgroup is not None


def _fork_into(cgroup: str) -> int | None:
    """fork() into ``cgroup`` with clone3; None if the kernel refused (fork and join)."""
    try:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None  # the child's join will fail too, and say so
    try:
        return clone.fork_into(fd)
    except KernelError:
        return None
    finally:
        os.close(fd)  # the child's copy too (and it is close-on-exec)


def _on_path(name: str, env: dict[str, str]) -> str | None:
    """The file execvpe() would run for a bare ``name``, or None to let the child
    search (a path, a relative PATH entry, or nothing found: its error is the
    child's to report)."""
    if "/" in name:
        return None
    for d in os.get_exec_path(env):
        if not os.path.isabs(d):
            return None
        candidate = os.path.join(d, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _child(argv: Sequence[str], program: str | None, env: dict[str, str], prog: object,
           chan: socket.socket,
           err_w: int, cwd: str | None,
           stdio: tuple[int | None, int | None],
           cgroup: str | None) -> None:  # pragma: no cover
    step = "setup"
    joined = b"n"
    try:
        if cgroup is not None:
            try:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write("0")
            except OSError:
                joined = b"u"
        signal.set_wakeup_fd(-1)
        for s in _RESET_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setpgid(0, 0)
        step = "stdio"
        for target, fd in enumerate(stdio, start=1):
            if fd is not None:
                os.dup2(fd, target)
        if cwd is not None:
            step = "chdir"
            os.chdir(cwd)
        step = "seccomp"
        fd = seccomp.install_listener(prog)  # type: ignore[arg-type]
        chan.sendmsg([joined], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        os.close(fd)
        chan.close()
        # Last: below the old limit, the fds of hupt's not closed yet may leave
        # no number for the notify fd.
        step = "setrlimit"
        fdlimit.restore_in_child()
        step = "exec"
        if program is not None:
            with contextlib.suppress(OSError):
                os.execve(program, list(argv), env)
            # A file execve() refuses (a noexec mount, ENOEXEC): execvpe() goes on
            # to the next PATH entry, and reports the error as it always did.
        os.execvpe(argv[0], list(argv), env)
    except KernelError as e:
        os.write(err_w, f"{e.errno}:{step}".encode())
    except OSError as e:
        os.write(err_w, f"{e.errno or errno.EINVAL}:{step}".encode())
    except BaseException:
        os.write(err_w, f"{errno.EINVAL}:{step}".encode())


def _receive_fd(chan: socket.socket) -> tuple[int | None, bool]:
    """The notify fd the child sent, and whether it joined its cgroup."""
    try:
        msg, anc, _, _ = chan.recvmsg(1, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return None, False
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) >= 4:
            return int(struct.unpack("i", data[:4])[0]), msg == b"n"
    return None, False


def _read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 256):
        out += chunk
    return out
