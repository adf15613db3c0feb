"""A generation's first process is born in its cgroup (hupt/tracer/clone.py).

The facts first, on the kernel alone: a child of ``clone.fork_into`` reads
its group in /proc/self/cgroup before it has done anything, and CPython's
at-fork handlers ran on both sides as for os.fork().  Then hupt's spawn: a
server started into a group is in it from its first instruction, by clone3
where the kernel allows it, and by a fork and a join where clone3 is refused
(a seccomp filter that answers ENOSYS to it, as container runtimes' default
profiles do): either way in the group.  Root and a writable cgroup2
hierarchy needed, as for hupt's own groups.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import REPO

from hupt.errors import KernelError
from hupt.tracer import cgroup, clone

MOUNT = cgroup.mount_point()


def _usable() -> bool:
    return MOUNT is not None and os.access(MOUNT, os.W_OK) and os.geteuid() == 0


pytestmark = pytest.mark.skipif(not _usable(), reason="no writable cgroup2 hierarchy")


@pytest.fixture
def group() -> Iterator[Path]:
    """A group of the test's own beside hupt's, emptied and removed at the end."""
    assert MOUNT is not None
    own = cgroup.group_of() or "/"
    path = Path(MOUNT + own.rstrip("/")) / f"hupt-test.{os.getpid()}.{os.urandom(3).hex()}"
    path.mkdir()
    try:
        yield path
    finally:
        for pid in cgroup.procs(str(path)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                os.sched_yield()


def _relative(path: Path) -> str:
    assert MOUNT is not None
    return "/" + str(path.relative_to(MOUNT))


# -- the facts ----------------------------------------------------------------------------------


def test_a_child_of_fork_into_is_in_the_group_from_its_start(group: Path) -> None:
    seen: list[str] = []
    os.register_at_fork(after_in_parent=lambda: seen.append("parent"))
    r, w = os.pipe()
    fd = os.open(group, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        pid = clone.fork_into(fd)
        if pid == 0:  # the child: its group first, then what at-fork left in it
            try:
                first = Path("/proc/self/cgroup").read_text()
                os.write(w, json.dumps({"cgroup": first, "seen": seen}).encode())
            finally:
                os._exit(0)
    finally:
        os.close(fd)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        doc = json.loads(f.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a child like fork's, reaped by waitpid"
    assert f"0::{_relative(group)}\n" in doc["cgroup"]
    assert seen == ["parent"], "PyOS_AfterFork_Parent ran the parent's at-fork handlers"
    assert doc["seen"] == [], "the child's copy was taken before the parent's handlers ran"
    assert cgroup.group_of() != _relative(group), "the parent stays where it was"


def test_fork_into_a_directory_that_is_no_group_is_refused_and_makes_nothing(
        tmp_path: Path) -> None:
    # Other tests may have left children of this interpreter behind (waitpid(-1) would
    # see them), so compare the processes whose parent is this one instead.
    before = _children()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with pytest.raises(KernelError) as e:
            clone.fork_into(fd)
        assert e.value.errno == errno.EBADF, "not a cgroup2 directory"
    finally:
        os.close(fd)
    assert _children() <= before, "no child was made"


def _children() -> set[int]:
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        if int(stat.rpartition(")")[2].split()[1]) == os.getpid():
            found.add(int(entry.name))
    return found


# -- hupt's spawn -------------------------------------------------------------------------------

SPAWN = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {repo!r})
    from hupt.errors import KernelError
    from hupt.tracer import clone, spawn
    from hupt.tracer.abi import SYS
    refused = None
    if {refuse_clone3!r}:
        from hupt.tracer import bpf, seccomp
        from hupt.tracer.abi import SECCOMP_DATA_NR, Ret, ret_errno
        seccomp.install(bpf.assemble([
            bpf.ld_abs(SECCOMP_DATA_NR), bpf.jeq(SYS.clone3, jf="allow"),
            bpf.ret(ret_errno(38)),  # ENOSYS, as a runtime's default profile answers
            bpf.Label("allow"), bpf.ret(Ret.ALLOW)]))
        fd = os.open({group!r}, os.O_RDONLY | os.O_DIRECTORY)
        try:
            clone.fork_into(fd)
        except KernelError as e:
            refused = e.errno
    born = []
    real = clone.fork_into
    def counted(fd):
        pid = real(fd)
        if pid:
            born.append(pid)
        return pid
    clone.fork_into = counted
    r, w = os.pipe()
    pid, notify, joined = spawn.spawn(["sh", "-c", "cat /proc/self/cgroup"], dict(os.environ),
                                      [SYS.bind, SYS.listen], stdout=w, cgroup={group!r})
    os.close(w)
    out = os.read(r, 4096).decode()
    os.waitpid(pid, 0)
    os.close(notify)
    print(json.dumps({{"out": out, "joined": joined, "refused": refused,
                      "born": born == [pid]}}))
""")


@pytest.mark.parametrize("refuse_clone3", [False, True], ids=["clone3", "clone3-refused"])
def test_a_spawned_server_starts_in_its_group(group: Path, refuse_clone3: bool) -> None:
    code = SPAWN.format(repo=str(REPO), group=str(group), refuse_clone3=refuse_clone3)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert f"0::{_relative(group)}\n" in doc["out"], doc
    assert doc["joined"] is True
    assert doc["refused"] == (38 if refuse_clone3 else None), "the filter answered clone3"
    assert doc["born"] is (not refuse_clone3), "clone3 made it, or a fork that joined"
