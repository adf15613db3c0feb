"""Helpers for the end-to-end tests of `hupt run` and `hupt attach`.

- hupt's own view: its control socket's "ping" (generations by number, their
  state, pid and addresses) and `hupt status --json`, whose documented schema
  is checked on every read.
- The processes of each generation: hupt marks a generation's environment with
  HUPT_GEN=<hupt pid>.<n>, which every process it forks or execs inherits, so a
  process that daemonized is still found and attributed.
- Reloads that check the handoff engaged, not only that requests succeeded:
  after each one the new generation serves from the very listening socket (same
  inode) that hupt holds and held before. In exec mode the PID and the parent
  stay and the new image holds that socket.
- Stand-ins around hupt: a systemd manager's NOTIFY_SOCKET, an idle keep-alive
  client.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness import (
    Background,
    HuptProcess,
    Procs,
    Reloadable,
    alive,
    chatty_cmd,
    children,
    free_port,
    health_cmd,
    hupt_cli,
    listener_inode,
    listener_inodes,
    ppid,
    unix_listeners,
    wait_for,
    wait_gone,
    wait_listening,
)
from load import Connection, HeldRequest, Load, LoadResult, Response, Target, request_bytes

from hupt import control

# -- starting -----------------------------------------------------------------------------


def start_hupt(procs: Procs, *opts: str, cmd: Sequence[str] | None = None,
               env: Mapping[str, str] | None = None,
               target: Target | None = None) -> tuple[HuptProcess, Target]:
    """`hupt run OPTS -- CMD` (default: servers/health_server.py), once it listens."""
    target = target or ("127.0.0.1", free_port())
    h = procs.hupt(*opts, cmd=cmd if cmd is not None else health_cmd(target), env=env)
    wait_listening(target, 20, proc=h)
    return h, target


def start_chatty(procs: Procs, *opts: str,
                 server: Sequence[str] = ()) -> tuple[HuptProcess, Target]:
    """`hupt run OPTS -- servers/chatty_server.py SERVER...`, once it listens."""
    target: Target = ("127.0.0.1", free_port())
    h = procs.hupt(*opts, cmd=chatty_cmd(target, *server))
    wait_listening(target, 20, proc=h)
    return h, target


# -- hupt's view and the generations' processes ---------------------------------------------


def ping(h: HuptProcess) -> dict[int, dict[str, Any]]:
    """hupt's own view of its live generations, by number (control socket "ping")."""
    for msg in control.request(h.pid, {"cmd": "ping"}, timeout=10):
        if msg.get("event") == "result":
            return {int(g["number"]): g for g in msg["generations"]}
    raise AssertionError("ping got no result")


def states(h: HuptProcess) -> dict[int, str]:
    """Generation number -> state ("serving", "draining"...), as hupt sees them."""
    return {n: str(g["state"]) for n, g in ping(h).items()}


def generation_of(pid: int, hupt_pid: int) -> int | None:
    """The generation number hupt marked pid's environment with (HUPT_GEN=<hupt>.<n>)."""
    prefix = f"HUPT_GEN={hupt_pid}.".encode()
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for var in env.split(b"\0"):
        if var.startswith(prefix):
            return int(var[len(prefix):])
    return None


def generations(h: HuptProcess) -> dict[int, set[int]]:
    """Live processes under hupt, by generation number."""
    out: dict[int, set[int]] = {}
    for p in h.descendants():
        n = generation_of(p, h.pid)
        if n is not None:
            out.setdefault(n, set()).add(p)
    return out


def held_by_hupt(h: HuptProcess) -> set[int]:
    """Inodes of the listening sockets in hupt's own fd table, bar its control socket.

    The control socket is the unix socket in hupt's runtime directory. It is bound
    under a temporary name there and renamed into place once it listens, and the
    kernel lists a unix socket by the name it was bound to: known by its directory.
    """
    runtime = control.runtime_dir() + os.sep
    control_sockets = {i for i, name in unix_listeners().items() if name.startswith(runtime)}
    return listener_inodes(h.pid) - control_sockets


def retired(h: HuptProcess, gen: int) -> bool:
    """Generation `gen` is gone, for hupt and in the process table."""
    return gen not in states(h) and gen not in generations(h)


def wait_single_generation(h: HuptProcess, timeout: float = 30.0) -> int:
    """Wait until one generation is left (the old ones retired); return its number.

    One for hupt (ping) and in the process table: every process under hupt carries
    that generation's mark, none is unmarked or of another generation.
    """
    def single() -> int | None:
        live = ping(h)
        if len(live) != 1:
            return None
        pids = h.descendants()
        marks = {generation_of(p, h.pid) for p in pids}
        return next(iter(live)) if pids and marks == set(live) else None

    return wait_for("the old generations to retire", single, timeout, h)


# -- reloads --------------------------------------------------------------------------------


def reload_ok(h: Reloadable) -> subprocess.CompletedProcess[str]:
    """`hupt reload`, which must succeed."""
    r = h.reload()
    assert r.returncode == 0, f"reload failed: {r.stderr}\n{h.log()}"
    assert "done" in r.stderr, r.stderr
    return r


def reload_many(h: HuptProcess, n: int, where: int | str | None, *, inode: int | None = None,
                pause: float = 0.2) -> list[tuple[int, set[int]]]:
    """n reloads; after each, the new generation serves from the listener on `where`.

    `where` is a TCP port or a unix socket path as the kernel lists it (listener_inode),
    or None with the listener's `inode` given. That listening socket is never
    replaced: hupt keeps holding it, alone, and the new generation holds it too.
    Returns each new generation's (number, processes).
    """
    if inode is None:
        assert where is not None
        inode = listener_inode(where)
    assert inode is not None, f"nothing listens on {where!r}"
    reloaded = []
    for i in range(n):
        before = max(generations(h))
        reload_ok(h)
        gens = generations(h)
        new = max(gens)
        assert new > before, f"reload {i + 1} started no new generation: {gens}"
        if where is not None:
            assert listener_inode(where) == inode, "the listening socket must never be replaced"
        assert held_by_hupt(h) == {inode}, "hupt must keep holding the original listener"
        assert any(inode in listener_inodes(p) for p in gens[new]), (
            f"generation {new} does not serve from the original listening socket")
        reloaded.append((new, gens[new]))
        time.sleep(pause)
    return reloaded


def check_load(res: LoadResult, min_ok: int = 50) -> None:
    """No request failed, and enough succeeded for that to mean something."""
    assert res.failed == 0, res.summary()
    assert res.ok >= min_ok, res.summary()


def stop_gracefully(h: HuptProcess) -> None:
    """SIGTERM; hupt drains and exits 0."""
    h.signal(signal.SIGTERM)
    code = h.popen.wait(30)
    assert code == 0, f"hupt exited {code}\n{h.log()}"


# -- exec mode ------------------------------------------------------------------------------

EXEC_RELOADS = 10
READY = re.compile(r"generation (\d+) \(pid (\d+)\) is ready")
DRAINING_FOR_EXEC = "draining it before it execs"

Reload = Callable[[], subprocess.CompletedProcess[str]]


def check_exec_reload(r: subprocess.CompletedProcess[str], i: int, pid: int, parent: int,
                      port: int, inode: int, log: Callable[[], str]) -> int:
    """Reload number i was an exec in place; returns the generation number it reported."""
    assert r.returncode == 0, f"reload {i} failed: {r.stderr}\n{log()}"
    m = READY.search(r.stderr)
    assert m is not None, r.stderr
    assert int(m[2]) == pid, f"reload {i}: a new process serves: {r.stderr}"
    assert "execed" in r.stderr, r.stderr
    assert alive(pid) and ppid(pid) == parent, "the PID and its parent must stay"
    assert listener_inode(port) == inode, "the listening socket must never be replaced"
    assert inode in listener_inodes(pid), "the new image does not hold the listener"
    return int(m[1])


def exec_reloads(reload: Reload, pid: int, parent: int, port: int, n: int,
                 log: Callable[[], str]) -> list[int]:
    """Reload n times; each must exec in place. Returns the generation numbers reported."""
    inode = listener_inode(port)
    assert inode is not None and inode in listener_inodes(pid)
    numbers = []
    for i in range(n):
        numbers.append(check_exec_reload(reload(), i + 1, pid, parent, port, inode, log))
        time.sleep(0.15)
    assert numbers == sorted(set(numbers)), numbers
    return numbers


def exec_reloads_under_load(kind: str, target: Target, pid: int, parent: int, reload: Reload,
                            log: Callable[[], str]) -> None:
    """EXEC_RELOADS exec reloads under load, a request held in flight across the first.

    The server stops accepting and drains before it execs: the first reload is
    still waiting a second after that began, and the held request, released
    then, is answered by the old image.
    """
    assert isinstance(target, tuple)
    port = target[1]
    inode = listener_inode(port)
    assert inode is not None and inode in listener_inodes(pid)
    workers = children(pid) if kind == "prefork" else set()
    with Load(target, fresh=2, keepalive=2, conn_requests=20) as load:
        time.sleep(0.3)
        held = HeldRequest(target).start()
        held.wait_accepted()
        drains = log().count(DRAINING_FOR_EXEC)
        first = Background(reload)
        wait_for("the server to stop accepting and drain",
                 lambda: log().count(DRAINING_FOR_EXEC) > drains, 30)
        time.sleep(1.0)
        assert not first.done(), "the first reload must wait for the request in flight"
        held.release()
        status, _ = held.result()
        numbers = [check_exec_reload(first.result(), 1, pid, parent, port, inode, log)]
        numbers += exec_reloads(reload, pid, parent, port, EXEC_RELOADS - 1, log)
        time.sleep(0.3)
    res = load.result
    assert numbers == sorted(set(numbers)), numbers
    assert res.failed == 0, res.summary()
    assert res.ok > 100, res.summary()
    assert status == 200, status
    assert "drain timeout" not in log(), "every exec waited for the connections to finish"
    if kind in ("go", "node"):
        assert res.pids == {pid}, res.summary()
    if kind == "prefork":
        assert len(workers) == 2
        assert not wait_gone(workers, 10), "the old image's workers must be retired"
        wait_for("the last image's workers alone", lambda: len(children(pid)) == 2)
        assert not children(pid) & workers
        assert len(res.pids) > 4, res.summary()


# -- hupt status --json ---------------------------------------------------------------------

# The documented keys of `hupt status --json` (hupt/status.py, README) and their JSON types.
KeyTypes = dict[str, type | tuple[type, ...]]
NUMBER: tuple[type, ...] = (int, float)
INSTANCE_KEYS: KeyTypes = {"hupt_pid": int, "command": list, "mode": str, "state": str,
                 "uptime_s": NUMBER, "generations": list, "listeners": list, "reloads": list,
                 "tracking": str}
GENERATION_KEYS: KeyTypes = {"number": int, "pid": int, "pids": list, "state": str, "age_s": NUMBER,
                   "ready_ms": (*NUMBER, type(None)), "in_flight": (int, type(None)),
                   "listening": list}
LISTENER_KEYS: KeyTypes = {"address": str, "inode": int, "queued": (int, type(None)),
                 "backlog": (int, type(None))}
RELOAD_KEYS: KeyTypes = {"at": NUMBER, "duration_ms": NUMBER, "ok": bool, "reason": str,
               "generation": (int, type(None))}
GENERATION_STATES = {"starting", "serving", "failed", "draining", "retiring", "exited"}


def _typed(where: str, obj: object, keys: KeyTypes) -> None:
    """Every documented key is present with its type (a bool is no number here)."""
    assert isinstance(obj, dict), (where, obj)
    missing = keys.keys() - obj.keys()
    assert not missing, f"{where}: documented keys missing: {sorted(missing)} in {obj}"
    for key, kind in keys.items():
        value = obj[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        assert ok, f"{where}.{key} = {value!r} is not {kind}"


def check_status_schema(doc: dict[str, Any]) -> None:
    """A `hupt status --json` document has every documented key, with its type and values."""
    assert doc.keys() >= {"schema", "instances"} and doc["schema"] == 1, doc
    assert isinstance(doc["instances"], list)
    for inst in doc["instances"]:
        _typed("instance", inst, INSTANCE_KEYS)
        assert all(isinstance(a, str) for a in inst["command"]), inst["command"]
        assert inst["mode"] in ("fork", "exec") and inst["uptime_s"] >= 0
        assert inst["state"] in ("running", "reloading", "down", "stopping"), inst["state"]
        for g in inst["generations"]:
            _typed("generation", g, GENERATION_KEYS)
            assert g["state"] in GENERATION_STATES, g
            assert all(type(p) is int for p in g["pids"]), g
            assert all(isinstance(a, str) for a in g["listening"]), g
            assert g["age_s"] >= 0, g
        for listener in inst["listeners"]:
            _typed("listener", listener, LISTENER_KEYS)
        for r in inst["reloads"]:
            _typed("reload", r, RELOAD_KEYS)
            assert r["duration_ms"] >= 0, r


def hupt_status(h: HuptProcess) -> dict[str, Any]:
    """This hupt's instance in `hupt status --json PID`, the whole document checked."""
    r = hupt_cli("status", "--json", str(h.pid), timeout=20)
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    check_status_schema(doc)
    (inst,) = doc["instances"]
    assert isinstance(inst, dict)
    return inst


# -- stand-ins around hupt ------------------------------------------------------------------


def keepalive_connection(target: Target) -> tuple[Connection, Response]:
    """A keep-alive connection that has carried one GET /, left open and idle."""
    deadline = time.monotonic() + 10
    conn = Connection(target, deadline)
    response = conn.exchange(request_bytes(target, "/", keep_alive=True), deadline)
    assert response.status == 200 and response.reusable, response
    return conn, response


class NotifyManager:
    """A stand-in for systemd: the NOTIFY_SOCKET hupt reports to, read with a timeout."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = str(path)

    def next(self, timeout: float) -> dict[str, str] | None:
        """The next message as a dict, or None if none came within `timeout` s."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        return dict(line.split("=", 1) for line in data.splitlines())

    def expect(self, timeout: float = 10.0) -> dict[str, str]:
        """The next message, which must come within `timeout` s."""
        m = self.next(timeout)
        assert m is not None, f"no message on {self.path} within {timeout}s"
        return m

    def close(self) -> None:
        self.sock.close()
