"""Which processes make a generation: its cgroup, or its process tree (no root needed).

The groups here are plain directories with a ``cgroup.procs`` file, which is all
hupt reads of a real group; the processes are real (children of this test).
The real hierarchy is exercised by integration/test_daemonizing_servers.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hupt import linux
from hupt.generations import State
from hupt.linux import LinuxSystem, _GenRecord
from hupt.supervisor import Options, Supervisor
from hupt.tracer import cgroup
from tests.fakes import FakeSystem, state_of
from tests.test_supervisor import A, Recorder, make


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A live process with no HUPT_GEN marker (a child of this test)."""
    p = subprocess.Popen(["sleep", "60"], env={"PATH": os.environ.get("PATH", "")})
    yield p.pid
    p.kill()
    p.wait()


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def group_with(tmp_path: Path, name: str, pids: set[int]) -> str:
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in sorted(pids)))
    return str(d)


# -- the cgroup facts ---------------------------------------------------------------------


def test_the_cgroup2_hierarchy_is_found_in_mountinfo(tmp_path: Path) -> None:
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "30 25 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755\n"
        "33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    assert cgroup.mount_point(str(hybrid)) == "/sys/fs/cgroup/unified"
    unified = tmp_path / "unified"
    unified.write_text("31 25 0:27 / /sys/fs/cgroup\\040x rw shared:9 - cgroup2 cgroup2 rw\n")
    assert cgroup.mount_point(str(unified)) == "/sys/fs/cgroup x"
    # A bind mount of a subtree (its root is not "/") cannot place hupt's own group.
    sub = tmp_path / "sub"
    sub.write_text("31 25 0:27 /lxc/x /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    assert cgroup.mount_point(str(sub)) is None
    assert cgroup.mount_point(str(tmp_path / "missing")) is None


def test_a_group_lists_its_processes_and_none_once_gone(tmp_path: Path) -> None:
    path = group_with(tmp_path, "g", {12, 34})
    assert cgroup.procs(path) == {12, 34}
    assert cgroup.procs(str(tmp_path / "gone")) == set()


def test_the_next_hupt_removes_a_killed_hupts_groups_and_names_what_is_left(
        tmp_path: Path) -> None:
    mine = tmp_path / f"hupt.{os.getpid()}"
    mine.mkdir()
    empty = tmp_path / f"hupt.{dead_pid()}"
    (empty / "gen.3").mkdir(parents=True)
    busy_hupt = dead_pid()
    busy = group_with(tmp_path, f"hupt.{busy_hupt}/gen.7", {4321})
    # A live hupt's groups are its own: left alone.
    other = subprocess.Popen(["hupt-stand-in", "60"], executable="/bin/sleep")
    try:
        # Popen may return while the child is still in its exec: wait for the new image.
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{other.pid}/cmdline").read_bytes().startswith(b"hupt-stand-in"):
            assert time.monotonic() < deadline, "the stand-in never ran"
            time.sleep(0.01)
        (tmp_path / f"hupt.{other.pid}" / "gen.1").mkdir(parents=True)
        left = cgroup.sweep(cgroup.Groups(str(mine)))
        assert (tmp_path / f"hupt.{other.pid}" / "gen.1").is_dir()
    finally:
        other.kill()
        other.wait()
    assert left == {busy: {4321}}
    assert not empty.exists(), "an empty group of a dead hupt is removed"
    assert Path(busy).is_dir() and mine.is_dir()


def test_groups_are_removed_unless_a_process_is_still_in_them(tmp_path: Path) -> None:
    groups = cgroup.Groups(str(tmp_path / "hupt.1"))
    os.mkdir(groups.base)
    one, two = groups.create(1), groups.create(2)
    assert groups.remove(one) and not os.path.exists(one)
    Path(two, "cgroup.procs").write_text("99\n")  # a real group would be busy (EBUSY)
    assert groups.close() == {two: {99}}
    assert os.path.isdir(groups.base), "kept while a group below it is"


# -- LinuxSystem.members --------------------------------------------------------------------


def test_a_generation_with_a_group_is_its_groups_processes_wherever_they_are(
        tmp_path: Path, sleeper: int) -> None:
    """The daemon's title and parent do not matter: the group says (here the root is
    gone and the member is no descendant of hupt's generation root)."""
    sys = LinuxSystem()
    sys._gens[1] = _GenRecord(group=group_with(tmp_path, "gen.1", {sleeper}), marker=1)
    assert sys.members({1: dead_pid()}) == {1: {sleeper}}


def test_a_listed_process_gone_since_is_no_member(tmp_path: Path, sleeper: int) -> None:
    sys = LinuxSystem()
    sys._gens[1] = _GenRecord(group=group_with(tmp_path, "gen.1", {sleeper, dead_pid()}))
    assert sys.members({1: dead_pid()}) == {1: {sleeper}}


def test_without_a_group_an_unreadable_process_keeps_a_generation_for_a_bounded_time(
        sleeper: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child of hupt without a marker (a daemon in transit, or retitled) keeps a
    generation that seems empty for IN_TRANSIT_MAX, not for ever."""
    sys = LinuxSystem()
    sys._gens[1] = _GenRecord(marker=1, members={sleeper})
    now = [1000.0]
    monkeypatch.setattr(sys, "now", lambda: now[0])
    assert sys.members({1: dead_pid()}) == {1: {sleeper}}
    now[0] += linux.IN_TRANSIT_MAX - 1
    assert sys.members({1: dead_pid()}) == {1: {sleeper}}
    now[0] += 2
    assert sys.members({1: dead_pid()}) == {1: set()}


def test_a_grouped_generations_retitled_process_is_not_in_transit_for_the_others(
        tmp_path: Path, sleeper: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The marker-less child belongs to generation 1's group: generation 2 (no group)
    has nothing in transit and is empty at once."""
    sys = LinuxSystem()
    sys._gens[1] = _GenRecord(group=group_with(tmp_path, "gen.1", {sleeper}))
    sys._gens[2] = _GenRecord(marker=2, members={dead_pid()})  # not 12345: it may live
    assert sys.members({1: dead_pid(), 2: dead_pid()}) == {1: {sleeper}, 2: set()}


# -- the supervisor with a generation whose launcher exited ----------------------------------


def test_a_daemonized_generation_is_drained_and_stopped_through_its_daemon(
        fake: FakeSystem) -> None:
    """The launcher exits 0 after forking the daemon: the generation lives on, and
    the reload's pause, drain and stop signal reach the daemon, not the gone launcher."""
    sup = make(fake, kill_timeout=5.0)
    g1 = sup.gens[0]
    launcher = g1.pid
    daemon = fake.fork(1)
    sup.settle()
    fake.exit_pid(launcher, 0)
    sup.fleet.rescan_soon()
    fake.advance(2)
    sup.tick()
    assert g1.state is State.SERVING and g1.pids == {daemon} and not sup.stopping
    sup.request_reload(Recorder())
    fake.listen(2, A)
    sup.on_notify(sup.gens[1])
    assert fake.paused_pids[1] == {daemon}
    sup.tick()
    assert state_of(g1) is State.RETIRING
    assert fake.signals == [(daemon, signal.SIGTERM)]
    # hupt stop: the new generation's daemon gets the stop signal too.
    g2 = sup.gens[1]
    daemon2 = fake.fork(2)
    fake.exit_pid(g2.pid, 0)
    sup.fleet.rescan_soon()
    fake.advance(2)
    sup.tick()
    sup.request_stop()
    sup.tick()
    assert (daemon2, signal.SIGTERM) in fake.signals
    assert (g2.pid, signal.SIGTERM) not in fake.signals


def test_status_says_how_generations_are_tracked(fake: FakeSystem) -> None:
    sup = Supervisor(fake, Options(argv=["server"], env={}), control=False)
    sup.start()
    assert sup.status()["tracking"] == "process tree (fake)"


def test_status_says_so_when_generations_are_tracked_without_cgroups(
        capsys: pytest.CaptureFixture[str]) -> None:
    from hupt import status

    inst = {"hupt_pid": 99, "name": None, "command": ["srv"], "mode": "fork",
            "state": "running", "uptime_s": 1.0, "generations": [], "reloads": [],
            "listeners": [], "tracking": "process tree (cannot create /x/hupt.99 (read-only))"}
    status.render({"schema": 1, "instances": [inst]})
    out = capsys.readouterr().out
    assert "generations tracked by their process tree (cannot create /x/hupt.99 (read-only))" \
        in out and "may be lost" in out
    for quiet in ({"tracking": "cgroup /sys/fs/cgroup/hupt.99"}, {}):  # {}: an older hupt
        status.render({"schema": 1, "instances": [{**inst, **quiet} if quiet else
                                                   {k: v for k, v in inst.items()
                                                    if k != "tracking"}]})
        assert "tracked" not in capsys.readouterr().out


def test_a_group_left_with_processes_by_a_killed_hupt_of_the_same_pid_is_not_reused(
        tmp_path: Path) -> None:
    groups = cgroup.Groups(str(tmp_path / "hupt.1"))
    group_with(tmp_path, "hupt.1/gen.1", {4321})
    with pytest.raises(cgroup.CgroupUnavailable, match="killed"):
        groups.create(1)
    os.unlink(tmp_path / "hupt.1/gen.1/cgroup.procs")
    assert groups.create(1) == str(tmp_path / "hupt.1/gen.1"), "an empty one is"
