"""Facts about cgroup v2 as the record of which processes make a generation.

A generation is the process hupt started and everything it made.  Walking the
process tree down from hupt finds a daemon only while its launcher lives or
once it is re-parented to hupt (a subreaper), and tells orphans apart only by
a marker in their environment, which a server that rewrites its title
(nginx, redis, postgres, setproctitle) overwrites in place: /proc/PID/environ
then reads its title.  A cgroup is what no server can leave or overwrite:

* A child created by fork/clone starts in its parent's cgroup, whatever it
  does afterwards (setsid, double fork, exec, a new title).  So the process
  hupt starts is created in the generation's group (clone3 with
  CLONE_INTO_CGROUP, hupt/tracer/clone.py), or where the kernel refuses
  that joins it between fork() and execve(), by writing "0" (itself) to its
  ``cgroup.procs``: every descendant is a member.
* ``cgroup.procs`` lists the thread-group ids of the group's processes;
  zombies are not listed (measured: a child that exited and is not reaped is
  gone from it at once, ``cgroup.events`` reads ``populated 0``).
* The cgroup2 hierarchy is found in /proc/self/mountinfo (file system type
  ``cgroup2``): /sys/fs/cgroup on a unified system, /sys/fs/cgroup/unified in
  the hybrid layout of v1 controllers with a v2 hierarchy beside them (this
  project's machines, 6.18).  A hierarchy without controllers still groups
  processes; hupt needs no controller.
* hupt's own group is the ``0::PATH`` line of /proc/self/cgroup.  Its groups
  go below it: ``hupt.<hupt pid>/gen.<N>``.  A group that has processes may
  have child groups as long as it enables no controller for them (the "no
  internal processes" rule applies to domain controllers only), and hupt's
  own group has a process: hupt.  Under systemd the unit's group is hupt's,
  so KillMode=control-group still reaches every generation.
* Moving a process needs write access to ``cgroup.procs`` of the target and
  of the common ancestor of both groups: root, or a delegated subtree.  In a
  container the hierarchy is often mounted read-only: mkdir fails (EROFS,
  EACCES, EPERM) and hupt falls back to the process tree.
* ``rmdir`` removes a group with no process (EBUSY otherwise); its files need
  no removal.  Groups outlive their processes and hupt: a hupt killed with
  SIGKILL leaves ``hupt.<pid>`` behind, which the next hupt started in the
  same group removes (``sweep``), naming any process still in it.
* ``cgroup.kill`` (5.14+) SIGKILLs every process of a group at once, forks
  in progress included: not used by hupt, which retires generations with
  their own signals, but the way to end what a killed hupt left.
"""

from __future__ import annotations

import errno
import os

from hupt.errors import HuptError

PREFIX = "hupt."
GEN_PREFIX = "gen."


class CgroupUnavailable(HuptError):
    """No cgroup2 hierarchy hupt can make groups in (the message says why)."""


def mount_point(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup2 hierarchy is mounted (its root), or None."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and right.split()[:1] == ["cgroup2"] and len(fields) >= 5 and fields[3] == "/":
            return _unescape(fields[4])
    return None


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(path):
        code = path[i + 1:i + 4]
        if path[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def group_of(pid: int | str = "self") -> str | None:
    """The cgroup2 path of ``pid`` (relative to the hierarchy's root), or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        return None
    return None


def procs(path: str) -> set[int]:
    """The live processes of group ``path`` (empty if the group is gone)."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return {int(x) for x in f.read().split()}
    except (OSError, ValueError):
        return set()


def _remove(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # EBUSY: a process is still in it
    return True


class Groups:
    """hupt's own groups: ``base`` = <hierarchy>/<hupt's group>/hupt.<pid>.

    (A plain class: this module is on `hupt run`'s path to the server's exec,
    which importing dataclasses would slow down.)
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.made: set[str] = set()  # generations' groups not removed yet

    def __repr__(self) -> str:
        return f"Groups({self.base!r})"

    def create(self, number: int) -> str:
        path = os.path.join(self.base, f"{GEN_PREFIX}{number}")
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            # A killed hupt's whose pid this one got, with a server it left serving:
            # those processes are not this generation's.
            if procs(path):
                raise CgroupUnavailable(f"{path} has processes of a hupt that was "
                                        "killed") from None
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {path}: {e.strerror}") from e
        self.made.add(path)
        return path

    def remove(self, path: str) -> bool:
        """Remove a generation's group; False while a process is still in it."""
        if not _remove(path):
            return False
        self.made.discard(path)
        return True

    def close(self) -> dict[str, set[int]]:
        """Remove every group left; return those that still have processes."""
        busy: dict[str, set[int]] = {}
        for path in sorted(self.made):
            if not self.remove(path):
                busy[path] = procs(path)
        if not busy:
            _remove(self.base)
        return busy


def open_groups(me: int) -> Groups:
    """Make hupt's own group below the one it runs in (CgroupUnavailable if it cannot)."""
    mount = mount_point()
    if mount is None:
        raise CgroupUnavailable("no cgroup2 hierarchy is mounted")
    own = group_of()
    if own is None:
        raise CgroupUnavailable("hupt is in no cgroup2 group")
    base = os.path.join(mount, own.lstrip("/"), f"{PREFIX}{me}")
    try:
        os.mkdir(base, 0o755)
    except FileExistsError:
        pass  # a killed hupt's, whose pid this one got: ours now
    except OSError as e:
        reasons = {errno.EROFS: "read-only", errno.EACCES: "not writable",
                   errno.EPERM: "not permitted"}
        reason = reasons.get(e.errno or 0, e.strerror or "")
        raise CgroupUnavailable(f"cannot create {base} ({reason})") from e
    return Groups(base)


def _is_hupt(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"hupt" in f.read()
    except OSError:
        return False


def sweep(groups: Groups) -> dict[str, set[int]]:
    """Remove the groups of hupts that are gone (killed: nobody removed them) beside
    ``groups``; return those that still have processes (left serving), by group."""
    parent = os.path.dirname(groups.base)
    left: dict[str, set[int]] = {}
    try:
        names = os.listdir(parent)
    except OSError:
        return left
    for name in names:
        if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
            continue
        base = os.path.join(parent, name)
        if base == groups.base or _is_hupt(int(name[len(PREFIX):])):
            continue
        try:
            subs = [os.path.join(base, s) for s in os.listdir(base) if s.startswith(GEN_PREFIX)]
        except OSError:
            continue
        for sub in subs:
            if not _remove(sub):
                left[sub] = procs(sub)
        if not any(sub in left for sub in subs):
            _remove(base)
    return left
