"""The real-server matrix (integration/matrix.py): each server, each mode (fork, exec, attach).

Each cell starts the server under hupt (or without it, then `hupt attach`), puts it
under fresh and persistent clients, reloads it 3 times (HUPT_MATRIX=full: 10) and
asserts: every reload succeeded, 0 failed requests, the listening socket is the
same inode throughout, the expected processes after each reload (the old
generation gone), and, at the end, no process left (the `procs` fixture).
What it measured goes to the results file (HUPT_MATRIX_RESULTS, by default
integration/.build/matrix-results.json), from which integration/matrix_report.py
makes the README's compatibility table. The full matrix:

    HUPT_MATRIX=full python3 -m pytest integration/test_matrix.py
    python3 integration/matrix_report.py --update

A redis cell's fresh clients are redis-benchmark's (`-k 0`: a connection per
request, which must exit 0 and print no error), its persistent ones hold one
RESP connection each, here: they reconnect and send again only when the server
closed the connection before any byte of the answer (what redis-py does), and
anything else counts as a failure.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    HuptProcess,
    Procs,
    Started,
    children,
    descendants,
    free_port,
    hupt_cli,
    listener_inode,
    wait_for,
    wait_listening,
    zombie_children,
)
from load import Load, Target
from matrix import BUILD, SERVERS, Address, Server
from supervision import ping

pytestmark = pytest.mark.root

FULL = os.environ.get("HUPT_MATRIX", "short") == "full"
RELOADS = 10 if FULL else 3
RESULTS = Path(os.environ.get("HUPT_MATRIX_RESULTS", str(BUILD / "matrix-results.json")))
READY_TIMEOUT = 20.0

CELLS = [(s.name, mode) for s in SERVERS for mode in ("fork", "exec", "attach")
         if s.cell(mode) is not None]


def _cell_id(cell: tuple[str, str]) -> str:
    return f"{cell[0]}-{cell[1]}".replace(" ", "_")


# -- results ----------------------------------------------------------------------------------


def record(server: str, mode: str, figures: dict[str, Any]) -> None:
    """Put one cell's figures in the results file (cells run one at a time)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    try:
        doc: dict[str, Any] = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("cells", {}).setdefault(server, {})[mode] = figures
    tmp = RESULTS.with_name(RESULTS.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)


# -- loads ------------------------------------------------------------------------------------


class Measured:
    """What a load saw, whatever its kind."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.failures: list[str] = []
        self.longest_wait = 0.0
        self.persistent_ok = 0

    def summary(self) -> str:
        return (f"{self.ok} ok, {self.failed} failed ({self.persistent_ok} by persistent"
                f" clients), longest wait {self.longest_wait:.3f}s; failures: {self.failures[:10]}")


@contextlib.contextmanager
def http_load(targets: list[Target]) -> Iterator[Measured]:
    measured = Measured()
    share = 4 // len(targets)
    loads = [Load(t, fresh=share, keepalive=0, persistent=max(1, 2 // len(targets)))
             for t in targets]
    for load in loads:
        load.start()
    try:
        yield measured
    finally:
        for load in loads:
            r = load.stop()
            measured.ok += r.ok
            measured.failed += r.failed
            measured.persistent_ok += r.persistent_ok
            measured.failures += [f"{k}: {e}" for _, k, e in r.failures]
            measured.longest_wait = max(measured.longest_wait, r.longest_wait)


class RespClient(threading.Thread):
    """One persistent RESP connection, PING after PING, until stopped (module doc)."""

    def __init__(self, target: tuple[str, int], measured: Measured, lock: threading.Lock,
                 stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.target, self.measured, self.lock, self.stop = target, measured, lock, stop

    def run(self) -> None:
        conn: socket.socket | None = None
        while not self.stop.wait(0.01):
            started = time.monotonic()
            try:
                conn = self._ping(conn, retry=True)
            except OSError as e:
                with self.lock:
                    self.measured.failed += 1
                    self.measured.failures.append(f"persistent redis client: {e!r}")
                if conn is not None:
                    conn.close()
                conn = None
                continue
            with self.lock:
                self.measured.ok += 1
                self.measured.persistent_ok += 1
                self.measured.longest_wait = max(self.measured.longest_wait,
                                                 time.monotonic() - started)
        if conn is not None:
            conn.close()

    def _ping(self, conn: socket.socket | None, retry: bool) -> socket.socket:
        reused = conn is not None
        if conn is None:
            conn = socket.create_connection(self.target, timeout=10)
        answer = b""
        try:
            conn.sendall(b"PING\r\n")
            while not answer.endswith(b"\r\n"):
                chunk = conn.recv(64)
                if not chunk:
                    raise ConnectionResetError("EOF")
                answer += chunk
        except (ConnectionResetError, BrokenPipeError) as e:
            conn.close()
            # Closed by the server before any byte of the answer: send again, once.
            if reused and retry and not answer:
                return self._ping(None, retry=False)
            raise OSError(f"connection ended: {e!r}") from e
        if answer != b"+PONG\r\n":
            conn.close()
            raise OSError(f"answer {answer!r}")
        return conn


@contextlib.contextmanager
def redis_load(target: tuple[str, int]) -> Iterator[Measured]:
    measured = Measured()
    lock, stop = threading.Lock(), threading.Event()
    clients = [RespClient(target, measured, lock, stop) for _ in range(2)]
    bench = shutil.which("redis-benchmark") or "redis-benchmark"

    def benchmark() -> None:
        while not stop.is_set():
            r = subprocess.run([bench, "-h", target[0], "-p", str(target[1]), "-c", "4",
                                "-n", "600", "-k", "0", "-t", "ping,set,get", "--csv"],
                               capture_output=True, text=True, timeout=120,
                               stdin=subprocess.DEVNULL)
            rows = list(csv.DictReader(io.StringIO(r.stdout)))
            with lock:
                # "ping" is two tests (inline and multi-bulk): 4 rows, each of 600.
                if r.returncode != 0 or "rror" in r.stderr or len(rows) != 4:
                    measured.failed += 1
                    measured.failures.append(f"redis-benchmark exit {r.returncode}: "
                                             f"{r.stderr.strip()[-300:]!r}")
                    continue
                measured.ok += 600 * len(rows)
                longest = max(float(row["max_latency_ms"]) for row in rows) / 1000
                measured.longest_wait = max(measured.longest_wait, longest)

    runner = threading.Thread(target=benchmark, daemon=True)
    for c in clients:
        c.start()
    runner.start()
    try:
        yield measured
    finally:
        stop.set()
        runner.join(150)
        for c in clients:
            c.join(15)


# -- cells ------------------------------------------------------------------------------------


def address_for(spec: Server, short_tmp: Path) -> tuple[Address, list[Target], int | str]:
    """(where the server binds, where the clients go, where the listener shows)."""
    if spec.address == "unix":
        path = str(short_tmp / "server.sock")
        return path, [path], path
    if spec.address == "tcp6":
        port = free_port("::1")
        return ("::1", port), [("::1", port)], port
    if spec.address == "dual":
        port = free_port("::")
        return ("::", port), [("127.0.0.1", port), ("::1", port)], port
    port = free_port()
    return ("127.0.0.1", port), [("127.0.0.1", port)], port


def hupt_opts() -> tuple[str, ...]:
    return ("--ready-timeout", f"{READY_TIMEOUT:g}", "--drain-timeout", "5",
            "--kill-timeout", "5")


@pytest.mark.parametrize("cell", CELLS, ids=[_cell_id(c) for c in CELLS])
def test_matrix_cell(cell: tuple[str, str], procs: Procs, tmp_path: Path,
                     short_tmp: Path) -> None:
    name, mode = cell
    spec = next(s for s in SERVERS if s.name == name)
    if spec.pending is not None:
        pytest.skip(f"pending: {spec.pending}")
    opts = spec.cell(mode)
    if not isinstance(opts, tuple):
        pytest.skip(f"{name} in {mode} mode cannot work: {opts}")
    if spec.load == "udp":
        datagram_cell(spec, mode, opts, procs, tmp_path)
        return
    for program in spec.needs:
        assert shutil.which(program) or Path("/usr/sbin", program).exists(), (
            f"{program} is needed (.ci/run installs it)")
    bind, targets, where = address_for(spec, short_tmp)
    cmd = spec.cmd(tmp_path, bind)

    server: Started | None = None
    if mode == "attach":
        server = procs.spawn(cmd, name=name.split()[0], env=spec.env)
        for t in targets:
            wait_listening(t, 30, proc=server)
        sup = procs.spawn([sys.executable, "-m", "hupt", "attach", "--yes", *opts,
                           *hupt_opts(), str(server.pid), "--", *cmd], name="attach")
        wait_for("hupt attach to take over",
                 lambda: "supervising pid" in sup.err.read_text() or sup.poll() is not None,
                 30)
        assert sup.poll() is None, sup.log()
        root = server.pid
    else:
        sup = procs.hupt(*opts, *hupt_opts(), cmd=cmd, env=spec.env)
        for t in targets:
            wait_listening(t, 30, proc=sup)
        root = sup.pid

    def reload() -> subprocess.CompletedProcess[str]:
        extra = spec.reload_args.get(mode, ())
        if isinstance(sup, HuptProcess):
            return sup.reload(*extra)
        return hupt_cli("reload", *extra, str(root))

    def log() -> str:
        return sup.log() + (server.log() if server is not None else "")

    inode = listener_inode(where)
    assert inode is not None
    # Exec mode and attach: one process runs every image, the PID hupt started or attached.
    image = server.pid if server is not None else (
        wait_for("generation 1's root", lambda: next(iter(children(root)), None), 10)
        if mode == "exec" else None)
    born = start_time(image) if image is not None else None
    counts = []
    times = []
    load = (redis_load(targets[0]) if spec.load == "redis"  # type: ignore[arg-type]
            else http_load(targets))
    with load as measured:
        time.sleep(0.5)
        for i in range(RELOADS):
            t0 = time.monotonic()
            r = reload()
            times.append(time.monotonic() - t0)
            assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{log()}"
            assert listener_inode(where) == inode, "the same listening socket"
            if image is not None:
                assert start_time(image) == born, f"reload {i + 1}: pid {image} still runs it"
            counts.append(settled_processes(spec, mode, sup, root))
            time.sleep(0.3)
    figures = {
        "reloads": RELOADS, "requests": measured.ok + measured.failed, "failed": measured.failed,
        "longest_wait_ms": round(measured.longest_wait * 1000),
        "mean_reload_ms": round(sum(times) / len(times) * 1000),
        "processes": counts[-1], "persistent_ok": measured.persistent_ok,
        "same_socket": True,
    }
    assert measured.failed == 0, measured.summary() + "\n" + log()
    assert measured.ok > 50 and measured.persistent_ok > 0, measured.summary()
    assert counts == [spec.processes] * RELOADS, counts
    if mode == "attach":
        assert server is not None and server.poll() is None, "the parent never sees an exit"
        r = hupt_cli("stop", str(root))
        assert r.returncode == 0, r.stderr
        assert sup.popen.wait(30) == 0, sup.log()
        server.popen.wait(30)
    record(name, mode, figures)


def datagram_cell(spec: Server, mode: str, opts: tuple[str, ...], procs: Procs,
                  tmp_path: Path) -> None:
    """A "udp" row: test_datagram's own counting load and checks.

    Every datagram numbered and answered (0 lost, 0 refused), hupt holding the same
    socket throughout, and each new generation reading that socket.  Attached, the
    server is started alone and taken over with `--datagram` naming its address.
    """
    from datagram_load import dns_query
    from test_datagram import (
        address_of,
        ask,
        check_result,
        free_udp_port,
        held_inode,
        reloads_under_load,
    )

    for program in spec.needs:
        assert shutil.which(program) or Path("/usr/sbin", program).exists(), (
            f"{program} is needed (.ci/run installs it)")
    target = ("127.0.0.1", free_udp_port("127.0.0.1"))
    cmd = spec.cmd(tmp_path, target)

    def answering() -> bool:
        probe = dns_query(1, spec.dns_name) if spec.dns_name else b"0"
        return ask(target, probe, timeout=2) is not None

    h: HuptProcess | _Attached
    first: int | None
    if mode == "attach":
        server = procs.spawn(cmd, name=spec.name.split()[0], env=spec.env)
        wait_for(f"{spec.name} to answer", answering, 30, server)
        sup = procs.spawn([sys.executable, "-m", "hupt", "attach", "--yes", *opts,
                           "--datagram", address_of(target), *hupt_opts(), str(server.pid),
                           "--", *cmd], name="attach")
        wait_for("hupt attach to take over",
                 lambda: "supervising pid" in sup.err.read_text() or sup.poll() is not None,
                 30)
        assert sup.poll() is None, sup.log()
        h, root, first = _Attached(sup, server), server.pid, server.pid
    else:
        h = procs.hupt(*opts, *hupt_opts(), cmd=cmd, env=spec.env)
        wait_for(f"{spec.name} to answer", answering, 30, h)
        root = h.pid
        first = (wait_for("generation 1's root", lambda: next(iter(children(h.pid)), None),
                          10) if mode == "exec" else None)
    inode = held_inode(h, target)
    born = start_time(first) if first is not None else None
    res = reloads_under_load(h, target, exec_pid=first,
                             dns_name=spec.dns_name, reloads=RELOADS)
    assert held_inode(h, target) == inode, "the same held socket"
    if first is not None:
        assert start_time(first) == born, f"pid {first} still runs every image"
    processes = settled_processes(spec, mode, h if isinstance(h, HuptProcess) else h.sup, root)
    failed = len(res.lost) + res.refused + len(res.errors) + res.bad_answers
    figures = {
        "reloads": RELOADS, "requests": res.sent, "failed": failed,
        "lost": len(res.lost), "refused": res.refused,
        "processes": processes, "persistent_ok": res.answered, "same_socket": True,
    }
    check_result(res, min_sent=100)
    assert processes == spec.processes, processes
    record(spec.name, mode, figures)


class _Attached:
    """`hupt attach` where test_datagram drives a HuptProcess: hupt's PID (the socket's
    holder), both logs, and reloads by the server's PID."""

    def __init__(self, sup: Started, server: Started) -> None:
        self.sup, self.server = sup, server

    @property
    def pid(self) -> int:
        return self.sup.pid

    def poll(self) -> int | None:
        return self.sup.poll()

    def log(self) -> str:
        return self.sup.log() + self.server.log()

    def reload(self, *args: str) -> subprocess.CompletedProcess[str]:
        return hupt_cli("reload", *args, str(self.server.pid), timeout=60)


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (None once it is gone): a reused PID would differ."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(data[data.rfind(b")") + 2:].split()[19])


def settled_processes(spec: Server, mode: str, sup: Started, root: int) -> int:
    """The server's processes once the old generation is gone (fork) or retired (exec)."""
    def tree() -> set[int]:
        return ({root} | descendants(root)) if mode == "attach" else descendants(root)

    def settled() -> int | None:
        # hupt's own view, not the generation marks in /proc/PID/environ: redis
        # overwrites its environment with its process title.
        if mode == "fork" and len(ping(sup)) != 1:  # type: ignore[arg-type]
            return None
        n = len(tree())
        return n if n == spec.processes and not zombie_children(root) else None

    with contextlib.suppress(AssertionError):
        return wait_for("the server's processes to settle", settled, 30)
    return len(tree())


def test_cells_name_every_server_and_mode() -> None:
    """Every row says, for each mode, how it runs or why it cannot."""
    for s in SERVERS:
        for mode in ("fork", "exec", "attach"):
            assert s.cell(mode) is not None, f"{s.name}: nothing said about {mode}"
