"""Unix stream sockets under hupt run: a path, an abstract name, a path relative to the cwd.

Servers unlink their socket path before binding (and at exit), as gunicorn
does: hupt answers the unlink of a held path with 0 and leaves the file, so
every generation binds the very socket file of the first; once no generation
serves it, hupt removes the path itself. Asserted under load: 0 failed
requests, the same listening socket (inode) in every generation, the same
socket file on disk. Exec mode and hupt attach have their unix socket tests
in test_exec_mode.py and test_attach.py.

gunicorn, stopping, unlinks the path getsockname() gives for each of its
listeners: a paused generation's listener fd holds hupt's stand-in, a
listening unix socket that must answer with a path (not an abstract name,
"embedded null byte") whose unlink is harmless: hupt answers it with 0 (the
stand-in's file is gone already), and the held path stays.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from pathlib import Path

from harness import SERVERS, Procs, listener_inode, unix_cmd, variant_cmd, wait_listening
from load import Load, Target
from supervision import (
    check_load,
    held_by_hupt,
    ping,
    reload_many,
    stop_gracefully,
    wait_single_generation,
)


def test_unix_socket_server_reloads(procs: Procs, short_tmp: Path) -> None:
    path = str(short_tmp / "app.sock")
    h = procs.hupt("--drain-timeout", "20", cmd=unix_cmd(path))
    wait_listening(path, 20, proc=h)
    with Load(path, fresh=2, keepalive=2) as load:
        time.sleep(0.3)
        reload_many(h, 8, path, pause=0.15)
        time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary()
    assert len(load.result.pids) >= 4
    assert os.path.exists(path), "the server's unlink of a held path must not remove it"


def test_abstract_unix_socket_reloads(procs: Procs) -> None:
    name = f"hupt-test-{uuid.uuid4().hex[:12]}"
    target: Target = "\0" + name
    h = procs.hupt("--drain-timeout", "20", "--kill-timeout", "5",
                   cmd=variant_cmd(f"unix:@{name}"))
    wait_listening(target, 20, proc=h)
    inode = listener_inode("@" + name)
    assert inode is not None and held_by_hupt(h) == {inode}
    with Load(target, fresh=2, keepalive=2) as load:
        time.sleep(0.3)
        numbers = [n for n, _ in reload_many(h, 5, "@" + name)]
        time.sleep(0.3)
    check_load(load.result)
    assert len(load.result.pids) >= 4, load.result.summary()
    assert numbers == [2, 3, 4, 5, 6]
    assert ping(h)[6]["listening"] == [f"unix:@{name}"]
    wait_single_generation(h)
    assert listener_inode("@" + name) == inode
    stop_gracefully(h)


def test_unix_path_relative_to_cwd_reloads(procs: Procs, short_tmp: Path) -> None:
    path = short_tmp / "app.sock"
    # The server binds (and unlinks) "app.sock" as given: against its cwd.
    h = procs.hupt("--drain-timeout", "20", "--kill-timeout", "5",
                   cmd=unix_cmd("app.sock"), cwd=short_tmp)
    wait_listening(str(path), 20, proc=h)
    held = held_by_hupt(h)
    assert len(held) == 1
    inode = next(iter(held))
    file_inode = path.stat().st_ino
    # hupt resolved the relative name against the server's cwd.
    assert [g["listening"] for g in ping(h).values()] == [[f"unix:{path}"]]
    with Load(str(path), fresh=2, keepalive=2) as load:
        time.sleep(0.3)
        reload_many(h, 5, None, inode=inode)  # the kernel lists the name as bound: app.sock
        time.sleep(0.3)
    check_load(load.result)
    assert len(load.result.pids) >= 4, load.result.summary()
    # Every generation unlinked "app.sock" before binding: the path must be the original file.
    assert path.is_socket() and path.stat().st_ino == file_inode
    wait_single_generation(h)
    assert path.stat().st_ino == file_inode, "a retired generation's unlink removed the path"
    stop_gracefully(h)
    # Once no generation serves it, the path goes, as the server's own unlink at exit would.
    assert not path.exists(), "a dead socket file was left behind"


class PathWatch:
    """Checks, every few ms in a thread, that `path` is always the same socket file."""

    def __init__(self, path: str) -> None:
        self.path, self.inode = path, os.stat(path).st_ino
        self.misses: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PathWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            try:
                ino = os.stat(self.path).st_ino
            except OSError as e:
                self.misses.append(repr(e))
                continue
            if ino != self.inode:
                self.misses.append(f"inode {ino}, not {self.inode}")


def test_gunicorn_on_a_unix_socket_reloads_and_unlinks_nothing_at_exit(
        procs: Procs, short_tmp: Path) -> None:
    path = str(short_tmp / "g.sock")
    cmd = [sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"unix:{path}",
           "--chdir", str(SERVERS), "--graceful-timeout", "5", "--no-control-socket",
           "wsgi_app:app"]
    h = procs.hupt("--drain-timeout", "10", "--kill-timeout", "5", cmd=cmd, verbose=True)
    wait_listening(path, 30, proc=h)
    with PathWatch(path) as watch, Load(path, fresh=2, keepalive=1, persistent=2) as load:
        time.sleep(0.3)
        reload_many(h, 4, path, pause=0.3)
        # The old masters have stopped: each unlinked what getsockname() gave it.
        wait_single_generation(h)
        time.sleep(0.3)
    check_load(load.result)
    assert len(load.result.pids) >= 8, load.result.summary()  # 2 workers x 5 generations
    assert not watch.misses, f"{path} went away: {watch.misses[:5]}"
    log = h.log()
    assert "embedded null" not in log and "Traceback" not in log, log
    # Each old master unlinked its listener's stand-in path: answered by hupt for
    # generations 2-4, whose filters notify unlink (generation 1 started before
    # hupt held a unix socket: its retiring processes get a filter that makes
    # every unlink a no-op).
    assert log.count("unlink of stand-in path") == 3, log
    stop_gracefully(h)
    assert not os.path.exists(path), "a dead socket file was left behind"
