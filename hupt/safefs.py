"""Paths hupt creates or writes, often as root: never through a symlink, never
into a directory someone else could have prepared.

* The runtime directory (control sockets, sd_notify sockets) must be a real
  directory, owned by hupt's user, mode exactly 0700.  ``/tmp/hupt-UID`` sits
  in a world-writable directory: another user may create that name first, as
  a symlink to a directory the victim owns (which hupt would then chmod) or
  to one of their own holding a fake control socket.  The directory is opened
  with O_NOFOLLOW and checked on the open descriptor (fstat), so what is
  checked is what the name pointed at, not what a symlink swapped in later
  would point at; in a sticky /tmp no one else can rename or remove an entry
  hupt's user owns afterwards.
* A pidfile is opened with O_NOFOLLOW|O_CREAT (and O_NONBLOCK, so a FIFO left
  there cannot block hupt), only a regular file is truncated and written.

Anything wrong is one ``Refused`` (or ``UsageError`` for a bad --pidfile)
line for the user; hupt starts nothing.
"""

from __future__ import annotations

import errno
import os
import stat

from hupt.errors import Refused, UsageError

PRIVATE_MODE = 0o700


def private_dir(path: str, *, create: bool = True) -> bool:
    """Check (and with ``create``, make) ``path`` a directory of this user, mode 0700.

    Returns False if it does not exist and ``create`` is off; raises Refused
    if it exists but cannot be trusted.
    """
    uid = os.geteuid()
    created = False
    if create:
        try:
            os.mkdir(path, PRIVATE_MODE)  # never follows a symlink: EEXIST
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise Refused(f"cannot create the runtime directory {path}: {e.strerror}") from e
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            return False
        raise Refused(f"the runtime directory {path} vanished while hupt created it") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symlink" if os.path.islink(path) else "not a directory"
            raise Refused(f"the runtime directory {path} is {what}: refusing to use it "
                          f"(hupt needs a directory of its own there; remove it)") from None
        if e.errno in (errno.EACCES, errno.EPERM):  # not ours to enter: say whose it is
            _check(path, os.lstat(path), uid)
        raise Refused(f"cannot open the runtime directory {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if created and st.st_uid == uid:  # ours since a moment ago: the umask may have cut bits
            os.fchmod(fd, PRIVATE_MODE)
            st = os.fstat(fd)
        _check(path, st, uid)
    finally:
        os.close(fd)
    return True


def _check(path: str, st: os.stat_result, uid: int) -> None:
    if st.st_uid != uid:
        raise Refused(f"the runtime directory {path} belongs to uid {st.st_uid}, not to "
                      f"uid {uid}: refusing to use it (someone else created it; remove it)")
    mode = stat.S_IMODE(st.st_mode)
    if mode != PRIVATE_MODE:
        raise Refused(f"the runtime directory {path} has mode {mode:04o}, not 0700: "
                      f"refusing to use it (chmod 700 it, or remove it)")


def write_pidfile(path: str, pid: int) -> None:
    """Write ``pid`` to ``path``, never through a symlink, only into a regular file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        raise UsageError(f"--pidfile {path}: the directory {parent} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"--pidfile {path} is a directory, not a file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Refused(f"--pidfile {path} is a symlink: refusing to follow it "
                          f"(remove it, or give its target)") from None
        if e.errno == errno.ENXIO:
            raise UsageError(f"--pidfile {path} is a FIFO, not a file") from None
        raise UsageError(f"--pidfile {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"--pidfile {path} is not a regular file")
        os.ftruncate(fd, 0)
        os.write(fd, f"{pid}\n".encode())
    except OSError as e:
        raise UsageError(f"--pidfile {path}: {e.strerror}") from None
    finally:
        os.close(fd)
