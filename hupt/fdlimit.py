"""hupt's own limit of open files, and the one the processes it starts get.

Under systemd a service's soft RLIMIT_NOFILE is 1,024 and its hard one far
higher: enough for most servers, tight for a supervisor whose control socket
any process of its user can fill with clients.  ``hupt run`` raises its own
soft limit to the hard one at start.  A server must not notice: every process
hupt starts (a generation, a hook) has the soft limit hupt was started with
set back between fork() and execve(), so it runs with the limits it would
have had without hupt.  The hard limit is never changed, so it is inherited
as it was.
"""

from __future__ import annotations

import fcntl
import os
import resource

from hupt import log

_NOFILE = resource.RLIMIT_NOFILE
# The soft limit hupt was started with (None: never raised, nothing to set back).
_started_with: int | None = None


def soft_limit() -> int:
    return resource.getrlimit(_NOFILE)[0]


def raise_own() -> None:
    """Raise hupt's soft limit of open files to its hard limit (kept lower if it cannot)."""
    global _started_with
    soft, hard = resource.getrlimit(_NOFILE)
    if _started_with is None:
        _started_with = soft
    target = _ceiling(hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        log.debug(f"open files: soft limit left at {soft} (raising it to {target}: {e})")
        return
    log.debug(f"open files: soft limit raised from {soft} to {target} (what hupt starts "
              f"gets {soft})")


def _ceiling(hard: int) -> int:
    """The highest soft limit the kernel takes: the hard one, but never above fs.nr_open."""
    try:
        with open("/proc/sys/fs/nr_open", "rb") as f:
            nr_open = int(f.read().strip())
    except (OSError, ValueError):
        nr_open = 1 << 20  # the kernel's default
    return nr_open if hard == resource.RLIM_INFINITY else min(hard, nr_open)


def restore_in_child() -> None:
    """In a child of hupt, before execve(): the soft limit hupt was started with."""
    if _started_with is None:
        return
    soft, hard = resource.getrlimit(_NOFILE)
    # The hard limit lowered since hupt started: never above it.
    wanted = _started_with if hard == resource.RLIM_INFINITY else min(_started_with, hard)
    if wanted != soft:
        resource.setrlimit(_NOFILE, (wanted, hard))


def lowest_free(near: int) -> int | None:
    """The number the next new fd would get (None: the table is full); ``near`` is any open fd.

    The kernel hands out the lowest free number, so when it is N, fds 0..N-1
    are all taken.
    """
    try:
        probe = fcntl.fcntl(near, fcntl.F_DUPFD_CLOEXEC, 0)
    except OSError:
        return None
    os.close(probe)
    return probe


def open_count() -> int | None:
    """How many fds this process has open (None: cannot tell, none is free to look)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except OSError:
        return None
