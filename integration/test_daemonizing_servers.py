"""Servers that daemonize and rewrite their process title, reloaded under load.

nginx with `daemon on` forks its master away from the process hupt started (which
exits 0 at once) and overwrites its environment with its title ("nginx: master
process ..."), so a marker in the environment cannot say which generation a master
belongs to. redis-server `--daemonize yes` does the same fork, and retitles too.
hupt puts each generation into a cgroup of its own, which no server can leave by
forking or retitling: every daemonized master stays a member.

Asserted, for nginx: 6 reloads under fresh, keep-alive and persistent clients with
0 failed requests; after each, exactly one master is left (the new one: the old one
drained and exited) and every fresh request is answered by its workers; every
generation serves from the very listening socket hupt holds (same inode); the
generation's cgroup lists its master and workers; `hupt stop` ends every master
within a bound; nothing is left behind. SIGKILL of hupt: the serving master serves
on (as any server under a killed hupt does, README "Recovering from a killed
hupt"), the cgroup of the killed hupt still names it, and the next hupt to start
removes what was left empty and names the survivors. For redis: reloads under a
RESP client load with 0 failed.

The `procs` fixture's leftover check reads a marker in the environment, which
these servers overwrite: each test finds its servers by their command line (which
names the test's own directory) and kills what is left itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from harness import (
    Procs,
    alive,
    free_port,
    hupt_cli,
    listener_inode,
    listener_inodes,
    ppid,
    variant_cmd,
    wait_for,
    wait_gone,
    wait_listening,
)
from load import Load, Target, body_pid, request
from supervision import check_load, held_by_hupt, hupt_status, ping, reload_ok

pytestmark = pytest.mark.root

RELOADS = 6
CGROUP2 = Path("/sys/fs/cgroup/unified")

NGINX_DAEMON_CONF = """
daemon on;
master_process on;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 512; }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "$pid\\n"; }}
    }}
}}
"""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _titled(needle: str, title: str) -> set[int]:
    """Live processes whose (rewritten) command line starts with `title` and names `needle`."""
    return {p for p in _pids() if (c := _cmdline(p)).startswith(title) and needle in c
            and alive(p)}


def _with_children(pids: set[int]) -> set[int]:
    return pids | {p for p in _pids() if ppid(p) in pids and alive(p)}


@contextlib.contextmanager
def _cleanup(find: Callable[[], set[int]]) -> Iterator[None]:
    """Whatever `find()` names at the end is killed, and the test fails if it was alive."""
    try:
        yield
    finally:
        left = _with_children(find())
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        wait_gone(left, 5)
    assert not left, f"left behind: {sorted(left)}"


def _nginx(directory: Path, port: int) -> list[str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is needed (apt-get install nginx-light)"
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_DAEMON_CONF.format(dir=directory, port=port))
    return [nginx, "-c", str(conf), "-p", str(directory), "-e", "stderr"]


def _masters(directory: Path) -> set[int]:
    return _titled(str(directory / "nginx.conf"), "nginx: master process")


def _one_master(directory: Path, not_in: set[int]) -> int | None:
    got = _masters(directory)
    return next(iter(got)) if len(got) == 1 and not got & not_in else None


def _answered_by(target: Target) -> int:
    """The master whose worker answered one fresh request."""
    r = request(target)
    assert r.status == 200, r
    worker = body_pid(r.body)
    parent = ppid(worker)
    assert parent is not None, f"worker {worker} is gone"
    return parent


def _cgroup_procs(pid: int) -> set[int]:
    """The processes of the cgroup2 group `pid` is in."""
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if x.startswith("0::"))
    path = CGROUP2 / line[3:].lstrip("/")
    return {int(x) for x in (path / "cgroup.procs").read_text().split()}


def _hupt_cgroups(hupt_pid: int) -> Path:
    return CGROUP2 / f"hupt.{hupt_pid}"


def _cgroups_usable() -> bool:
    return (CGROUP2 / "cgroup.procs").exists() and os.access(CGROUP2, os.W_OK)


needs_cgroup2 = pytest.mark.skipif(not _cgroups_usable(),
                                   reason="no writable cgroup2 hierarchy at /sys/fs/cgroup/unified")


@needs_cgroup2
def test_nginx_daemon_on_reloads_under_load(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    with _cleanup(lambda: _masters(tmp_path)):
        h = procs.hupt("--drain-timeout", "10", "--kill-timeout", "5", "--stop-signal", "QUIT",
                       "--drain-signal", "QUIT", cmd=_nginx(tmp_path, port))
        wait_listening(target, 20, proc=h)
        inode = listener_inode(port)
        assert inode is not None and held_by_hupt(h) == {inode}
        master = wait_for("generation 1's master", lambda: _one_master(tmp_path, set()), 10, h)
        assert ppid(master) == h.pid, "the daemonized master came back to hupt (subreaper)"
        gens = wait_for("hupt to count the master in generation 1",
                        lambda: (g := ping(h)) and master in g.get(1, {}).get("pids", ()) and g,
                        10, h)
        assert gens[1]["pid"] != master, "the master is not the process hupt started"
        assert _with_children({master}) <= _cgroup_procs(master), "one cgroup: master, workers"
        assert hupt_status(h)["tracking"] == f"cgroup {_hupt_cgroups(h.pid)}"
        assert str(_cgroup_path(master)) == f"{_hupt_cgroups(h.pid)}/gen.1"
        # The launcher exited 0 long ago: the generation lives on in its master.
        time.sleep(1.5)
        assert h.poll() is None and "exited on its own" not in h.log(), h.log()
        masters = [master]
        with Load(target, fresh=2, keepalive=2, conn_requests=20, persistent=2) as load:
            time.sleep(0.3)
            for i in range(RELOADS):
                reload_ok(h)
                assert listener_inode(port) == inode, "the listening socket is never replaced"
                assert held_by_hupt(h) == {inode}
                new = wait_for(f"reload {i + 1}: one master, the new one",
                               lambda: _one_master(tmp_path, set(masters)), 30, h)
                assert not wait_gone(masters, 1), "the old masters exited"
                assert any(inode in listener_inodes(p) for p in _with_children({new})), (
                    "the new master's workers serve from the original listening socket")
                answered = {_answered_by(target) for _ in range(20)}
                assert answered == {new}, f"reload {i + 1}: answered by masters {answered}"
                live = ping(h)
                assert len(live) == 1 and new in next(iter(live.values()))["pids"], live
                masters.append(new)
            time.sleep(0.5)
        check_load(load.result)
        assert load.result.persistent_failed == 0, load.result.summary()
        # hupt stop ends the last master (QUIT, nginx's graceful stop) within a bound.
        r = hupt_cli("stop", str(h.pid), timeout=60)
        assert r.returncode == 0, r.stderr + h.log()
        assert h.popen.wait(30) == 0, h.log()
        assert not wait_gone(masters, 10), "every master exited with hupt"
        assert not _hupt_cgroups(h.pid).exists(), "hupt removed its cgroups as it exited"


@needs_cgroup2
def test_sigkill_of_hupt_leaves_one_master_and_the_next_hupt_cleans_up(
        procs: Procs, tmp_path: Path) -> None:
    """hupt SIGKILLed after two reloads: only the serving master is left (the old ones
    retired before), in the killed hupt's cgroup; the next hupt to start removes that
    hupt's empty groups and names the survivor, which `hupt attach` can take over."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    with _cleanup(lambda: _masters(tmp_path)):
        h = procs.hupt("--drain-timeout", "10", "--kill-timeout", "5", "--stop-signal", "QUIT",
                       "--drain-signal", "QUIT", cmd=_nginx(tmp_path, port))
        wait_listening(target, 20, proc=h)
        seen: set[int] = set()
        for _ in range(2):
            seen.add(wait_for("one master", lambda: _one_master(tmp_path, seen), 30, h))
            reload_ok(h)
        last = wait_for("one master", lambda: _one_master(tmp_path, seen), 30, h)
        assert not wait_gone(seen, 10)
        groups = _hupt_cgroups(h.pid)
        assert groups.is_dir()
        h.signal(signal.SIGKILL)
        h.popen.wait(10)
        time.sleep(0.5)
        assert _masters(tmp_path) == {last}, "the serving master serves on, alone"
        assert _answered_by(target) == last
        assert last in _cgroup_procs(last) and str(_cgroup_path(last)).startswith(str(groups))
        # The next hupt (any instance) cleans up after the killed one.
        other_port = free_port()
        h2 = procs.hupt(cmd=[*_http_server(other_port)])
        wait_listening(("127.0.0.1", other_port), 20, proc=h2)
        wait_for("the next hupt to name the survivor",
                 lambda: f"{last} (nginx)" in h2.log(), 10, h2)
        assert "hupt attach" in h2.log()
        h2.signal(signal.SIGTERM)
        assert h2.popen.wait(30) == 0, h2.log()
        # The survivor goes; then only an empty group was left, and the next hupt removes it.
        os.kill(last, signal.SIGQUIT)
        assert not wait_gone(_with_children({last}), 10)
        h3 = procs.hupt(cmd=[*_http_server(other_port)])
        wait_listening(("127.0.0.1", other_port), 20, proc=h3)
        wait_for("the killed hupt's cgroups to be removed", lambda: not groups.exists(), 10, h3)
        h3.signal(signal.SIGTERM)
        assert h3.popen.wait(30) == 0, h3.log()


def _cgroup_path(pid: int) -> Path:
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if x.startswith("0::"))
    return CGROUP2 / line[3:].lstrip("/")


def _http_server(port: int) -> list[str]:
    import sys
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


# -- redis ------------------------------------------------------------------------------------


def _resp(sock: socket.socket, *args: str) -> bytes:
    sock.sendall(b"".join([f"*{len(args)}\r\n".encode()]
                          + [f"${len(a)}\r\n{a}\r\n".encode() for a in args]))
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before an answer")
        data += chunk
    return data


class RespLoad:
    """Clients of a redis server: fresh connections (PING) and persistent ones (INCR), each
    answered request counted; a persistent client whose connection is closed between two
    requests (the old server going) reconnects, as redis clients do."""

    def __init__(self, port: int, fresh: int = 2, persistent: int = 2) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self.reconnects = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._fresh, daemon=True) for _ in range(fresh)]
        self._threads += [threading.Thread(target=self._persistent, daemon=True)
                          for _ in range(persistent)]

    def __enter__(self) -> RespLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _count(self, error: str | None) -> None:
        with self._lock:
            if error is None:
                self.ok += 1
            else:
                self.failed.append(error)

    def _fresh(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    got = _resp(s, "PING")
                self._count(None if got == b"+PONG\r\n" else f"PING: {got!r}")
            except OSError as e:
                self._count(f"fresh: {e!r}")
            time.sleep(0.01)

    def _persistent(self) -> None:
        s: socket.socket | None = None
        while not self._stop.is_set():
            try:
                if s is None:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                try:
                    got = _resp(s, "INCR", "n")
                except (ConnectionError, BrokenPipeError, ConnectionResetError):
                    # Closed by a server that went, before it read this request: send it
                    # again on a new connection (nothing was executed).
                    s.close()
                    s = None
                    with self._lock:
                        self.reconnects += 1
                    continue
                self._count(None if got.startswith(b":") else f"INCR: {got!r}")
            except OSError as e:
                self._count(f"persistent: {e!r}")
                if s is not None:
                    s.close()
                s = None
            time.sleep(0.02)
        if s is not None:
            s.close()


def _redis(directory: Path, port: int) -> list[str]:
    redis = shutil.which("redis-server")
    assert redis, "redis-server is needed (apt-get install redis-server)"
    return [redis, "--daemonize", "yes", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(directory),
            "--pidfile", str(directory / "redis.pid"), "--logfile", str(directory / "redis.log")]


def _redis_servers(port: int) -> set[int]:
    return _titled(f"127.0.0.1:{port}", "/usr/bin/redis-server") | _titled(
        f"127.0.0.1:{port}", "redis-server")


def _one_new_redis(port: int, seen: frozenset[int]) -> set[int] | None:
    got = _redis_servers(port)
    return got if len(got) == 1 and not got & seen else None


@needs_cgroup2
def test_redis_daemonize_yes_reloads_under_load(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    with _cleanup(lambda: _redis_servers(port)):
        h = procs.hupt("--drain-timeout", "5", "--kill-timeout", "5",
                       cmd=_redis(tmp_path, port))
        wait_listening(("127.0.0.1", port), 20, proc=h)
        inode = listener_inode(port)
        assert inode is not None
        first = wait_for("the redis daemon", lambda: len(s := _redis_servers(port)) == 1 and s,
                         10, h)
        seen = set(first)
        with RespLoad(port) as load:
            time.sleep(0.5)
            for i in range(5):
                reload_ok(h)
                assert listener_inode(port) == inode
                assert held_by_hupt(h) == {inode}
                new = wait_for(f"reload {i + 1}: one redis, the new one",
                               partial(_one_new_redis, port, frozenset(seen)), 30, h)
                assert any(inode in listener_inodes(p) for p in new)
                seen |= new
                time.sleep(0.3)
        assert not load.failed, load.failed[:10]
        assert load.ok > 200, load.ok
        r = hupt_cli("stop", str(h.pid), timeout=60)
        assert r.returncode == 0, r.stderr + h.log()
        assert h.popen.wait(30) == 0, h.log()
        assert not wait_gone(seen, 10)



# -- without cgroups ----------------------------------------------------------------------------

# hupt in a mount namespace of its own where the cgroup2 hierarchy is read-only, as in
# a container: it cannot make a group and must fall back to the process tree.
READ_ONLY_CGROUPS = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                     f"mount -o remount,bind,ro {CGROUP2} && exec \"$@\"", "sh"]


@needs_cgroup2
def test_without_a_writable_cgroup2_hierarchy_hupt_falls_back_and_says_so(
        procs: Procs) -> None:
    """A server that daemonizes (a double fork) but keeps its environment is still
    found by its marker: reloads under load, 0 failed; `hupt status` says the
    generations are tracked by the process tree, and why."""
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--drain-timeout", "5", "--kill-timeout", "5",
                   cmd=variant_cmd(target, "--daemonize", "3"), wrapper=READ_ONLY_CGROUPS)
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    assert inode is not None
    doc = hupt_status(h)
    assert doc["tracking"].startswith("process tree (") and "read-only" in doc["tracking"], doc
    assert "cgroups unavailable" in h.log() and "read-only" in h.log()
    r = hupt_cli("status", str(h.pid))
    assert "generations tracked by their process tree" in r.stdout, r.stdout
    first = wait_for("generation 1's daemon", lambda: (g := ping(h).get(1)) and
                     (p := set(g["pids"]) - {g["pid"]}) and p, 10, h)
    with Load(target, fresh=2, keepalive=2) as load:
        time.sleep(0.3)
        for i in range(3):
            reload_ok(h)
            assert listener_inode(port) == inode and held_by_hupt(h) == {inode}
            wait_for(f"reload {i + 1}: one generation left", lambda: len(ping(h)) == 1, 30, h)
            time.sleep(0.2)
    check_load(load.result)
    assert not wait_gone(first, 10), "generation 1's daemon was retired"
    r = hupt_cli("stop", str(h.pid), timeout=60)
    assert r.returncode == 0, r.stderr + h.log()
    assert h.popen.wait(30) == 0, h.log()
    assert not _hupt_cgroups(h.pid).exists()


def test_exec_mode_reload_of_a_daemonized_server_says_why_in_one_line(
        procs: Procs, tmp_path: Path) -> None:
    """Exec mode execs the process hupt started in place; a server that daemonized
    left it (it exited 0): the reload fails with one line saying so, and the
    daemon serves on until `hupt stop` (the matrix's exec reason for these rows)."""
    port = free_port()
    with _cleanup(lambda: _redis_servers(port)):
        h = procs.hupt("--exec", "--drain-timeout", "5", "--kill-timeout", "5",
                       cmd=_redis(tmp_path, port))
        wait_listening(("127.0.0.1", port), 20, proc=h)
        daemon = wait_for("the redis daemon", lambda: len(s := _redis_servers(port)) == 1 and s,
                          10, h)
        # Said at start, before any reload: the launcher exited 0, its daemon lives on.
        wait_for("hupt's warning", lambda: "did the server daemonize?" in h.log(), 10, h)
        assert "exec mode reloads the process hupt started in place" in h.log(), h.log()
        r = h.reload()
        assert r.returncode != 0, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, r.stderr
        assert "exec mode reloads the process hupt started" in lines[0], r.stderr
        assert "did the server daemonize?" in lines[0], r.stderr
        assert _redis_servers(port) == daemon, "the daemon serves on"
        assert h.stop() == 0, h.log()
