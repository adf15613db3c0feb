"""Processes for the benchmark: servers bare and under hupt, CPU placement, timing probes.

Facts and choices this rests on:

- Every process is started through integration/harness.Procs: it carries a
  per-run marker in its environment, so `finish()` stops (SIGTERM, then
  SIGKILL by PID) everything this run started, daemonized strays included,
  and reports what it had to kill.
- CPU placement. Measured on this project's 2-vCPU VM: with wrk on one CPU
  and the Go server on the other, 1 s runs of the same bare server ranged
  from 30k to 88k req/s (p99 4 ms in the slow runs: every request wakes the
  other, often halted, vCPU); with both on the same CPU the runs stayed within
  ±3%. So by default ("shared") wrk and the server (bare, or hupt and its
  generations) share the last CPU and the bench, its Load threads and
  `hupt reload` run on the others: the ratio then compares the CPU cost of a
  request bare and under hupt. Affinity is inherited at fork, so the bench
  moves its own thread to the target CPUs just for the spawn (`Cpus.on`) and
  back: no `taskset` exec sits between a bare launch and the server (that
  would add ~1 ms to a bare start and not to a generation hupt forks).
- A server's start time is taken from just before the launch (vfork+exec) to
  the first successful connect(), polled every 0.5 ms from the client CPU
  (a refused connect on loopback costs microseconds).
- The steady-state cost of hupt is its seccomp filter, which the kernel
  consults on every syscall of the server. Measured here with C loops of
  getppid(): no filter 170 ns, a one-instruction allow-all filter 211 ns,
  hupt's filter 212 ns: the kernel's action cache answers hupt's filter as
  fast as the trivial one; the ~40 ns is the syscall slow path any filter
  costs. `syscall_ns` shows it with a Python loop, bare and under hupt.
- hupt's `run` overhead before the server's exec: the "server" is
  `date +%s%N`, which prints CLOCK_REALTIME in ns as soon as it runs; the
  same program launched directly gives the baseline, so the exec and date's
  own start cancel out. The bench reads the same clock (time.time_ns()).
- `hupt reload`'s stderr (not a terminal) has lines "NNN ms MESSAGE", NNN
  counted by the client from just before it sends the request (after its
  imports): "generation N (pid P) is ready in X ms", X counted by hupt from
  the moment the new generation had exec'd, then "generation M (pid Q)
  stopped accepting; draining" once the old generation is paused; the client
  exits after that. In exec mode (`hupt run --exec`) the order differs: the
  server "stopped accepting; draining it before it execs" first (with
  --drain-signal: "stopped accepting; sent SIGTERM"), then "pid P execed"
  once the same process runs the new image (with --drain-signal preceded by
  "finished draining and exited: execed ... in X ms", X counted by hupt from
  catching the server's exit_group to the exec), then the new image "is
  ready", and the client exits after "ready".
- The probe behind "the longest wait a request saw" is one client thread in
  the bench process (on the bench CPUs), one request at a time on a fresh
  connection, started every PROBE_INTERVAL_S at most: a request that
  arrives while nothing accepts (an exec-mode server between its last
  accept and the new image's first) waits in the listener's accept queue,
  and its latency is that wait. Paced rather than back to back so it does
  not load the server's CPU while a new generation starts on it.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import (  # integration/ is on sys.path (bench.py puts it there)
    PT_DYNAMIC,
    PT_INTERP,
    SERVERS,
    Procs,
    Started,
    descendants,
    elf_segment_types,
    hupt_env,
)
from load import RequestFailed, request

REPO = Path(__file__).resolve().parent.parent
INTEGRATION = REPO / "integration"
_PROGRESS = re.compile(r"^\s*(\d+) ms (.*)$")
_READY_IN = re.compile(r"is ready in (\d+) ms")
_PAUSED = re.compile(r"stopped accepting")
# Exec mode with --drain-signal: the server's exit became the exec; hupt's own time
# from catching its exit_group to the new image (tracer/syscall_stops.py).
_EXITED = re.compile(r"finished draining and exited: execed .* in ([\d.]+) ms")
_EXECED = re.compile(r"^pid \d+ execed ")


# -- CPUs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cpus:
    """Where each party runs: the bench itself (and `hupt reload`), wrk, the servers."""

    bench: frozenset[int]
    load: frozenset[int]
    server: frozenset[int]
    how: str

    @classmethod
    def place(cls, how: str) -> Cpus:
        """"shared": wrk and the server share the last CPU, the bench has the others;
        "split": wrk and the bench on the first half, the servers on the rest; "none"."""
        cpus = sorted(os.sched_getaffinity(0))
        every = frozenset(cpus)
        if how == "none" or len(cpus) < 2:
            return cls(every, every, every, "none")
        if how == "shared":
            last = frozenset(cpus[-1:])
            return cls(every - last, last, last, how)
        first = frozenset(cpus[: len(cpus) // 2])
        return cls(first, first, every - first, how)

    def describe(self) -> str:
        if self.how == "none":
            return f"not pinned (CPUs {_cpulist(self.bench)})"
        if self.how == "shared":
            return (f"wrk and the server share CPU {_cpulist(self.server)}, "
                    f"the bench runs on CPU {_cpulist(self.bench)}")
        return f"wrk on CPU {_cpulist(self.load)}, servers on CPU {_cpulist(self.server)}"

    def enter_bench(self) -> None:
        os.sched_setaffinity(0, self.bench)

    @contextlib.contextmanager
    def on(self, cpus: frozenset[int]) -> Iterator[None]:
        """Processes spawned inside inherit `cpus`; the bench goes back to its own after."""
        os.sched_setaffinity(0, cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, self.bench)


def _cpulist(cpus: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


# -- servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    key: str
    label: str
    argv: tuple[str, ...]  # "{port}" is replaced by the port
    keepalive: bool  # False: the server closes after every response (HTTP/1.0)

    def command(self, port: int) -> list[str]:
        return [a.replace("{port}", str(port)) for a in self.argv]


def go_server(binary: Path) -> Server:
    return Server("go", "go (static)", (str(binary), "127.0.0.1:{port}"), True)


def python_server(docroot: Path) -> Server:
    return Server("python", "python http.server",
                  (sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1",
                   "--directory", str(docroot)), False)


def node_server() -> Server:
    return Server("node", "node http", ("node", str(SERVERS / "node_server.js"),
                                        "127.0.0.1:{port}"), True)


def python_docroot(where: Path) -> Path:
    """A directory whose index.html is a small static page, for python -m http.server."""
    root = where / "docroot"
    root.mkdir(exist_ok=True)
    (root / "index.html").write_text("ok\n")
    return root


def build_go(out_dir: Path) -> Path:
    """Build integration/servers/goserver statically (CGO_ENABLED=0), as the tests do.

    Go's caches are shared with the tests (integration/.build, git-ignored) so a
    machine that ran the tests builds in a second; a tmp dir if it is not writable.
    """
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("`go` not found: the static Go server needs golang-go")
    cache = INTEGRATION / ".build"
    try:
        cache.mkdir(exist_ok=True)
        probe = cache / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        cache = Path(tempfile.mkdtemp(prefix="hupt-bench-go-"))
    binary = out_dir / "goserver"
    env = {**os.environ, "CGO_ENABLED": "0", "GOCACHE": str(cache / "gocache"),
           "GOPATH": str(cache / "gopath"), "GOENV": "off", "GOFLAGS": "",
           "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOWORK": "off", "GO111MODULE": "on"}
    built = subprocess.run([go, "build", "-trimpath", "-o", str(binary), "."],
                           cwd=SERVERS / "goserver", env=env, capture_output=True, text=True,
                           timeout=600)
    if built.returncode != 0:
        raise RuntimeError(f"go build failed ({built.returncode}):\n{built.stderr}")
    segments = elf_segment_types(binary)
    if PT_INTERP in segments or PT_DYNAMIC in segments:
        raise RuntimeError(f"{binary} is dynamically linked")
    return binary


# -- probes -------------------------------------------------------------------------------


def can_connect(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_listening(port: int, proc: Started, timeout: float) -> float:
    """Poll connect() every 0.5 ms; return when it succeeded (perf_counter)."""
    deadline = time.perf_counter() + timeout
    while True:
        if can_connect(port):
            return time.perf_counter()
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.name} (pid {proc.pid}) exited before listening:\n"
                               f"{proc.log()}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{proc.name} not listening on {port} after {timeout}s")
        time.sleep(0.0005)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU time of these processes (all their threads, dead ones included)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            data = Path(f"/proc/{pid}/stat").read_bytes()
            fields = data[data.rindex(b")") + 2:].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return ticks / CLK_TCK


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of pid, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


@dataclass(frozen=True)
class Reload:
    ok: bool
    wall_ms: float  # `python -m hupt reload PID`, launch to exit
    to_ready_ms: float  # client-measured: request sent -> "is ready" received
    ready_in_ms: float  # hupt's own "ready in X ms"
    paused_ms: float  # client-measured: request sent -> "old generation stopped accepting"
    output: str
    started: float  # perf_counter just before the launch
    # Exec mode only, client-measured like the others: request sent -> "pid P execed"
    # (the new image runs), and with --drain-signal hupt's "execed ... in X ms".
    execed_ms: float = float("nan")
    exit_to_exec_ms: float = float("nan")

    @property
    def drain_ms(self) -> float:
        """Exec mode: the server stopped accepting (and got the drain signal) -> it execed."""
        return self.execed_ms - self.paused_ms


PROBE_INTERVAL_S = 0.002


@dataclass(frozen=True)
class Sample:
    """One probe request: which server it went to, when (perf_counter), what went wrong."""

    key: str
    start: float
    end: float
    error: str  # "" for a 200 response

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000


class Probe:
    """A client thread sending requests on fresh connections to whatever `aim` points it at.

    Aimed at nothing it idles, so the bench can point it at one server for exactly
    the time of a reload. Every request is bounded by `timeout`.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.samples: list[Sample] = []
        self._aim: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)

    def aim(self, key: str | None, port: int = 0) -> None:
        with self._lock:
            self._aim = None if key is None else (key, port)

    def start(self) -> Probe:
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(self.timeout + 2.0)
        if self._thread.is_alive():
            raise RuntimeError("probe still running past its request timeout")
        return self.samples

    def _run(self) -> None:
        next_at = time.perf_counter()
        while not self._stop.wait(max(0.0, next_at - time.perf_counter())):
            next_at = max(next_at + PROBE_INTERVAL_S, time.perf_counter())
            with self._lock:
                aim = self._aim
            if aim is None:
                continue
            key, port = aim
            t0 = time.perf_counter()
            try:
                status = request(("127.0.0.1", port), "/", self.timeout).status
                error = "" if status == 200 else f"HTTP {status}"
            except RequestFailed as e:
                error = str(e)
            except Exception as e:  # a bug in the probe must show up as a failure
                error = f"probe: {e!r}"
            self.samples.append(Sample(key, t0, time.perf_counter(), error))


# -- the runner ---------------------------------------------------------------------------


class Runner:
    """Starts and stops this run's processes; every one is cleaned up by finish()."""

    def __init__(self, workdir: Path, cpus: Cpus, hupt_src: Path | None = None) -> None:
        self.dir = workdir
        self.cpus = cpus
        self.procs = Procs(workdir)
        # Another hupt tree (a checkout with a change to compare) goes first on PYTHONPATH,
        # and hupt runs from the work dir: `python -m` looks in its cwd before PYTHONPATH.
        self.hupt_env: dict[str, str] | None = None
        self.hupt_cwd: Path | None = None
        if hupt_src is not None:
            base = self.procs.env()
            self.hupt_env = {"PYTHONPATH": os.pathsep.join([str(hupt_src), base["PYTHONPATH"]])}
            self.hupt_cwd = workdir
        # Bytecode as an installed package has it (pip compiles at install): with
        # PYTHONDONTWRITEBYTECODE set, as on this project's machines, a source tree
        # would otherwise be compiled anew by every `python -m hupt`, ~20 ms more.
        tree = (hupt_src or Path(__file__).resolve().parent.parent) / "hupt"
        compileall.compile_dir(str(tree), quiet=1)

    def start_bare(self, server: Server, port: int) -> Started:
        with self.cpus.on(self.cpus.server):
            return self.procs.spawn(server.command(port), name=f"{server.key}-bare")

    def start_hupt(self, server: Server, port: int, opts: Sequence[str]) -> Started:
        with self.cpus.on(self.cpus.server):
            return self.procs.hupt(*opts, cmd=server.command(port), env=self.hupt_env,
                                   cwd=self.hupt_cwd)

    def spawn_load(self, argv: list[str]) -> Started:
        with self.cpus.on(self.cpus.load):
            return self.procs.spawn(argv, name="wrk")

    def start_time(self, server: Server, port: int, timeout: float = 20.0) -> float:
        """Seconds from launching the server bare to its first accepted connect()."""
        with self.cpus.on(self.cpus.server):
            t0 = time.perf_counter()
            proc = self.procs.spawn(server.command(port), name=f"{server.key}-start")
        try:
            return wait_listening(port, proc, timeout) - t0
        finally:
            self.stop(proc)

    def stop(self, proc: Started, timeout: float = 15.0) -> None:
        """SIGTERM and wait; on timeout the tree is SIGKILLed (harness.Started.stop)."""
        with contextlib.suppress(AssertionError):
            proc.stop(timeout)

    def reload(self, hupt_pid: int, timeout: float = 60.0) -> Reload:
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "hupt", "reload", str(hupt_pid)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**hupt_env(os.environ), **(self.hupt_env or {})},
                              cwd=self.hupt_cwd)
        wall = time.perf_counter() - t0
        to_ready = ready_in = paused = execed = exit_to_exec = float("nan")
        for line in done.stderr.splitlines():
            if not (m := _PROGRESS.match(line)):
                continue
            if r := _READY_IN.search(m[2]):
                to_ready, ready_in = float(m[1]), float(r[1])
            elif _PAUSED.search(m[2]):
                paused = float(m[1])
            elif r := _EXITED.search(m[2]):
                exit_to_exec = float(r[1])
            elif _EXECED.match(m[2]):
                execed = float(m[1])
        return Reload(done.returncode == 0, wall * 1000, to_ready, ready_in, paused, done.stderr,
                      t0, execed, exit_to_exec)

    def hupt_pids(self, hupt_pid: int) -> set[int]:
        """hupt and every process of its generations."""
        return {hupt_pid} | descendants(hupt_pid)

    def generations(self, hupt_pid: int) -> int:
        """Live generations: hupt's child processes (each test server is one process)."""
        return len(descendants(hupt_pid))

    def settle(self, hupt_pid: int, timeout: float) -> bool:
        """Wait until only one generation is left (old ones drained and exited)."""
        deadline = time.monotonic() + timeout
        while self.generations(hupt_pid) > 1:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def time_to_exec(self, prefix: Sequence[str], timeout: float = 20.0) -> float:
        """ms from launching `prefix + date +%s%N` to date running (its printed clock)."""
        with self.cpus.on(self.cpus.server):
            t0 = time.time_ns()
            proc = self.procs.spawn([*prefix, "date", "+%s%N"], name="date", env=self.hupt_env,
                                    cwd=self.hupt_cwd)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise
        printed = _unprefixed(proc.out.read_text()).split()
        if not printed:
            raise RuntimeError(f"date printed nothing:\n{proc.log()}")
        return (int(printed[0]) - t0) / 1e6

    def command_ms(self, argv: Sequence[str], timeout: float = 20.0) -> float:
        """Wall ms of a command, launch to exit (a CLI command's whole cost); stdout and
        stderr to files, as every command here."""
        with self.cpus.on(self.cpus.server):
            t0 = time.perf_counter()
            proc = self.procs.spawn(argv, name="cli", env=self.hupt_env, cwd=self.hupt_cwd)
        # Popen.wait(timeout) polls (sleeps up to 50 ms between looks): a pidfd says
        # at once.
        fd = os.pidfd_open(proc.pid)
        try:
            exited = select.select([fd], [], [], timeout)[0]
            end = time.perf_counter()
        finally:
            os.close(fd)
        if not exited:
            self.stop(proc)
            raise RuntimeError(f"{argv} did not exit within {timeout:g} s")
        proc.popen.wait()
        return (end - t0) * 1000

    def idle_hupt(self, name: str) -> Started:
        """A `hupt run --name NAME` of a server that does nothing, for control commands;
        returned once its control socket answers."""
        proc = self.procs.hupt("--name", name, cmd=["sleep", "3600"], env=self.hupt_env,
                               cwd=self.hupt_cwd)
        deadline = time.monotonic() + 20
        while subprocess.run([sys.executable, "-m", "hupt", "status", name],
                             capture_output=True, env={**hupt_env(os.environ),
                                                       **(self.hupt_env or {})},
                             cwd=self.hupt_cwd).returncode != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"hupt run --name {name} did not answer:\n{proc.log()}")
            time.sleep(0.05)
        return proc

    def python_startup(self, python: str = sys.executable, timeout: float = 20.0) -> float:
        """ms from launching the interpreter to its first statement (site and the .pth
        files it runs included)."""
        with self.cpus.on(self.cpus.server):
            t0 = time.time_ns()
            proc = self.procs.spawn([python, "-c", "import time; print(time.time_ns())"],
                                    name="python")
        proc.popen.wait(timeout)
        return (int(proc.out.read_text().split()[0]) - t0) / 1e6

    def python_without_pth(self) -> str:
        """An interpreter of this installation that runs none of its .pth files: a venv
        (no pip) whose one .pth adds this installation's site-packages as plain path
        lines, which site does not scan for .pth files.  hupt and its dependencies
        are found there as from the installation itself."""
        import site

        venv = self.dir / "venv-without-pth"
        if not venv.exists():
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                           check=True, timeout=120)
            lib = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
            (lib / "site-packages" / "installation.pth").write_text(
                "".join(f"{d}\n" for d in site.getsitepackages()))
        return str(venv / "bin" / "python")

    def syscall_ns(self, prefix: Sequence[str], calls: int, timeout: float = 60.0) -> float:
        """ns per getppid() in a Python loop launched as `prefix + python3 -c ...`."""
        code = (f"import os, time\nf, r = os.getppid, range({calls})\nt = time.perf_counter_ns()"
                "\nfor _ in r: f()\nprint((time.perf_counter_ns() - t) / len(r))")
        with self.cpus.on(self.cpus.server):
            proc = self.procs.spawn([*prefix, sys.executable, "-c", code], name="syscalls",
                                    env=self.hupt_env, cwd=self.hupt_cwd)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise
        return float(_unprefixed(proc.out.read_text()).split()[0])

    def interrupt(self, proc: Started, timeout: float) -> None:
        """SIGINT (wrk prints its summary) and wait; SIGKILL the tree on timeout."""
        proc.signal(signal.SIGINT)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc, 2.0)

    def finish(self) -> list[str]:
        return self.procs.finish(term_timeout=15.0, grace=3.0)


def _unprefixed(text: str) -> str:
    """A program's output as hupt passed it on (its stdout is not a terminal here, so
    each line starts with "[gen N] "), without those prefixes."""
    return re.sub(r"(?m)^\[gen \d+\] ", "", text)
