"""Helpers for hupt's real-kernel tests: ports, processes, listeners, the hupt CLI.

Facts and choices this rests on:

- Process trees are read from /proc/*/stat (field 4, ppid). The comm field may
  hold spaces and parentheses, so the line is split at its LAST ')'. Zombies
  (state Z) count as gone: they run nothing and hold no sockets.
- A process that double-forks (daemonizes) leaves the tree: once its parent
  exits it is re-parented to init and no ppid walk finds it again. So every
  process the `procs` fixture starts carries a marker in its environment
  (HUPT_TEST_PROCS=<random>), which children inherit across fork and exec; the
  leftover check scans /proc/*/environ for it as well as walking the tree.
- Killing a tree: children of a killed process are re-parented at once, so the
  tree is frozen with SIGSTOP (a stopped process cannot fork), re-read until it
  stops growing, and only then SIGKILLed. A ptraced process also stops (in a
  signal-delivery-stop). Only processes we started are ever signalled: the root
  must be our own child or carry this run's marker.
- Listening sockets: a socket fd shows as "socket:[INODE]" in /proc/PID/fd; the
  listening ones are the inodes in state 0A (LISTEN) in /proc/net/tcp and tcp6,
  or with the __SO_ACCEPTCON flag (0x10000) in /proc/net/unix. These files list
  only the reader's network namespace and are slow with thousands of TIME_WAIT
  entries (kernel-facts 3): fine for tests, never for hupt itself.
- The hupt CLI is driven as `python -m hupt run [opts] -- CMD` / `hupt reload PID`
  with the repository on PYTHONPATH, so tests run the working tree, installed or not.
- Waiting: `wait_for` polls until something holds and fails with a message at its
  deadline; `settle` polls and returns the last value, for a test that asserts on
  it. Deadlines are generous: a test that needs a phase to last (a request in
  flight, a drain) makes it last on purpose (load.HeldRequest), it never relies on
  the machine being fast.

Helpers for hupt's generations and reloads are in supervision.py; snapshots of a
process's fds, epoll registrations and threads in snapshots.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from load import Target, connect, request

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
SERVERS = Path(__file__).resolve().parent / "servers"
MARKER_ENV = "HUPT_TEST_PROCS"

# Prologue of the small Python children the kernel-mechanism tests start:
# report(obj) prints one JSON line to the test; hold() waits for SIGTERM.
CHILD_PROLOGUE = """
import json, os, signal, sys, threading, time
def report(obj):
    sys.stdout.write(json.dumps(obj) + "\\n")
    sys.stdout.flush()
def hold():
    while True:
        signal.pause()
"""
TCP_LISTEN = 0x0A
SO_ACCEPTCON = 0x10000


# -- addresses ----------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def address_arg(target: Target) -> str:
    """The servers' address argument: "127.0.0.1:P", "[::1]:P" or "unix:/path"."""
    if isinstance(target, str):
        return "unix:" + target
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Pollable(Protocol):
    @property
    def pid(self) -> int: ...
    def poll(self) -> int | None: ...


class Logged(Protocol):
    def log(self) -> str: ...


class Reloadable(Pollable, Logged, Protocol):
    """What reloads a server: `hupt run` under test (HuptProcess) or `hupt attach`."""

    def reload(self, *args: str) -> subprocess.CompletedProcess[str]: ...


def wait_listening(target: Target, timeout: float = 10.0, proc: Pollable | None = None) -> None:
    """Wait until a connect() to target succeeds; fail early if `proc` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(target, 1.0).close()
            return
        except OSError as e:
            error = e
        if proc is not None and (code := proc.poll()) is not None:
            raise RuntimeError(f"pid {proc.pid} exited ({code}) before {target} listened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target} not listening after {timeout}s: {error!r}")
        time.sleep(0.05)


def http_get(target: Target, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of one GET on a fresh connection; raises load.RequestFailed."""
    response = request(target, path, timeout)
    return response.status, response.body.decode(errors="replace")


_OK_PID = re.compile(r"ok pid=(\d+)")


def answer_pid(body: str) -> int:
    """The pid in a test server's "ok pid=N ..." answer."""
    m = _OK_PID.match(body)
    assert m, f"not a test server's answer: {body!r}"
    return int(m[1])


def serving_pid(target: Target, path: str = "/") -> int:
    """The pid of the process that answers a GET on `target` now."""
    status, body = http_get(target, path)
    assert status == 200, (status, body)
    return answer_pid(body)


# -- waiting ------------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], T | bool | None], timeout: float = 10.0,
             proc: Logged | None = None) -> T:
    """Poll check() until it returns something other than None/False; return that.

    Fails (AssertionError naming `what`, with `proc`'s output) after `timeout` s.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None and got is not False:
            return got  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f"\n{proc.log()}" if proc is not None else ""))
        time.sleep(0.05)


def settle(probe: Callable[[], T], until: object, timeout: float = 10.0) -> T:
    """Poll probe() until its value satisfies `until` (a predicate, or a value to equal).

    Returns the last value either way: the caller asserts on it, so a failure shows
    what was seen (the kernel finishes handshakes and exits asynchronously).
    """
    ok: Callable[[T], object] = until if callable(until) else (lambda v: v == until)
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


class Background(Generic[T]):
    """fn() running in a thread: start it, check something meanwhile, then result()."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = 60.0) -> T:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


# -- processes ----------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of pid, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[1])


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def ppid(pid: int) -> int | None:
    """The parent of pid, or None if it is gone."""
    st = _stat(pid)
    return None if st is None else st[1]


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(pid: int) -> set[int]:
    """Live (non-zombie) processes below pid, at any depth. Threads are not listed."""
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        st = _stat(p)
        if st is not None and st[0] != "Z":
            children.setdefault(st[1], []).append(p)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def zombie_children(pid: int) -> set[int]:
    """Direct children of pid that exited and are not reaped yet."""
    return {p for p in _all_pids() if (st := _stat(p)) is not None and st[0] == "Z"
            and st[1] == pid}


def children(pid: int) -> set[int]:
    """Live (non-zombie) direct children of pid."""
    found = set()
    for p in _all_pids():
        st = _stat(p)
        if st is not None and st[0] != "Z" and st[1] == pid:
            found.add(p)
    return found


def environ(pid: int) -> dict[str, str]:
    """pid's environment as it started (/proc/PID/environ); raises OSError if gone."""
    data = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = [e.decode(errors="replace").partition("=") for e in data.split(b"\0") if e]
    return {k: v for k, _, v in pairs}


def marked(marker: str) -> set[int]:
    """Live processes whose environment carries HUPT_TEST_PROCS=marker."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = set()
    for p in _all_pids():
        try:
            env = Path(f"/proc/{p}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(p):
            found.add(p)
    return found


def wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait until none of pids is alive; returns those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = {p for p in pids if alive(p)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def _ours(pid: int, marker: str | None) -> bool:
    if pid in descendants(os.getpid()):
        return True
    return marker is not None and pid in marked(marker)


def kill_tree(pid: int, marker: str | None = None) -> set[int]:
    """SIGKILL pid and everything below it (frozen first); returns the pids killed.

    Refuses (ValueError) a live pid that is neither our descendant nor marked with `marker`.
    """
    if not alive(pid):
        return set()
    if not _ours(pid, marker):
        raise ValueError(f"pid {pid} was not started by this test run")
    tree: set[int] = set()
    for _ in range(50):
        grown = ({pid} | descendants(pid) | set().union(*(descendants(p) for p in tree))) - tree
        if not grown:
            break
        for p in grown:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
        tree |= grown
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return tree


def describe(pids: Iterable[int]) -> str:
    """"pid: cmdline" lines, for failure messages."""
    lines = []
    for p in sorted(pids):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            cmd = "?"
        lines.append(f"  {p}: {cmd}")
    return "\n".join(lines)


# -- file descriptors and listening sockets -----------------------------------------------

# In the octal "flags:" line of /proc/PID/fdinfo/FD (the open file's flags, and
# O_CLOEXEC for the fd's close-on-exec bit).
O_NONBLOCK_FLAG = 0o4000
O_CLOEXEC_FLAG = 0o2000000


def fdinfo_flags(pid: int, fd: int) -> int:
    """The flags of pid's fd, from the octal "flags:" line of /proc/PID/fdinfo/FD."""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags line in /proc/{pid}/fdinfo/{fd}")



def socket_inodes(pid: int) -> dict[int, int]:
    """{socket inode: fd} for pid's fd table."""
    found: dict[int, int] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError):
        return found  # it has exited: it holds nothing
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(fd_dir / fd)
            if link.startswith("socket:["):
                found[int(link[8:-1])] = int(fd)
    return found


def _tcp_listeners() -> dict[int, int]:
    """{inode: port} of LISTEN sockets in /proc/net/tcp and tcp6."""
    found = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[3], 16) == TCP_LISTEN:
                    found[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
    return found


def _unix_listeners() -> dict[int, str]:
    """{inode: path} of listening unix stream sockets in /proc/net/unix."""
    found = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[3], 16) & SO_ACCEPTCON:
                found[int(fields[6])] = fields[7] if len(fields) > 7 else ""
    return found


def unix_listeners() -> dict[int, str]:
    """{inode: name} of the listening unix stream sockets, each by the name it was bound to."""
    return _unix_listeners()


def listener_inode(where: int | str) -> int | None:
    """Inode of the listening socket on TCP port `where` (v4 or v6) or unix path `where`."""
    if isinstance(where, int):
        found = [i for i, port in _tcp_listeners().items() if port == where]
    else:
        found = [i for i, path in _unix_listeners().items() if path == where]
    if len(found) > 1:
        raise AssertionError(f"{len(found)} listeners on {where!r}: {found}")
    return found[0] if found else None


def listener_inodes(pid: int) -> set[int]:
    """Inodes of the listening (TCP or unix) sockets in pid's fd table."""
    listening = set(_tcp_listeners()) | set(_unix_listeners())
    return set(socket_inodes(pid)) & listening


# -- ELF ----------------------------------------------------------------------------------

PT_DYNAMIC = 2
PT_INTERP = 3
# Elf64_Ehdr { unsigned char e_ident[16]; Elf64_Half e_type, e_machine; Elf64_Word e_version;
#              Elf64_Addr e_entry; Elf64_Off e_phoff, e_shoff; Elf64_Word e_flags;
#              Elf64_Half e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx; }
# Elf64_Phdr starts with Elf64_Word p_type.
_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")


def fds_and_rss(pid: int) -> tuple[int, int]:
    """(open fds, VmRSS in KB) of pid."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines() if line.startswith("VmRSS:"))
    return len(os.listdir(f"/proc/{pid}/fd")), rss


def fd_targets(pid: int) -> list[str]:
    """What pid's fds point at, for a failure message."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(out)


def settled_fds(pid: int, expected: int, within: float = 10.0) -> int:
    """pid's fd count once a moment's fds (a control client being answered, a probe)
    are closed again, back to `expected` or below (or at `within` s): a leak per
    reload never comes back down."""
    deadline = time.monotonic() + within
    while (n := len(os.listdir(f"/proc/{pid}/fd"))) > expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


# -- nginx: a master and its two workers, in the foreground ---------------------------------

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 512; }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx_cmd(directory: Path, port: int) -> list[str]:
    """nginx as Debian packages it, with its config, pid file and logs in ``directory``,
    listening on 127.0.0.1:``port`` (its pid file is directory/nginx.pid)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is needed (apt-get install nginx-light)"
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, port=port))
    return [nginx, "-c", str(conf), "-p", str(directory), "-e", "stderr"]


def elf_segment_types(path: Path) -> list[int]:
    """p_type of every program header of a little-endian ELF64 file."""
    data = path.read_bytes()
    (ident, _type, _machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     _shentsize, _shnum, _shstrndx) = _ELF64_HEADER.unpack_from(data)
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        raise ValueError(f"{path} is not a little-endian ELF64 file")
    return [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]


# -- commands for the test servers --------------------------------------------------------


def go_cmd(binary: Path, target: Target) -> list[str]:
    return [str(binary), address_arg(target)]


def node_cmd(target: Target) -> list[str]:
    return ["node", str(SERVERS / "node_server.js"), address_arg(target)]


def threaded_cmd(target: Target, threads: int = 8, idle_timeout: float = 15.0) -> list[str]:
    return [sys.executable, str(SERVERS / "threaded_server.py"), address_arg(target),
            "--threads", str(threads), "--idle-timeout", str(idle_timeout)]


def unix_cmd(path: str, idle_timeout: float = 15.0) -> list[str]:
    return [sys.executable, str(SERVERS / "unix_server.py"), path,
            "--idle-timeout", str(idle_timeout)]


def http_server_cmd(port: int, bind: str = "127.0.0.1", directory: Path | None = None) -> list[str]:
    """Stock `python3 -m http.server` (HTTP/1.0, no /pid or /slow routes)."""
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", bind]
    return cmd + (["--directory", str(directory)] if directory is not None else [])


def health_cmd(target: Target, *extra: str) -> list[str]:
    """servers/health_server.py: /healthz, READY=1 on demand, crashes on request."""
    assert isinstance(target, tuple)
    return [sys.executable, str(SERVERS / "health_server.py"), f"{target[0]}:{target[1]}",
            *extra]


def variant_cmd(address: Target, *opts: str) -> list[str]:
    """servers/variant_server.py on (host, port), or on an ADDRESS string such as "unix:@name"."""
    if isinstance(address, tuple):
        address = address_arg(address)
    return [sys.executable, str(SERVERS / "variant_server.py"), address, *opts]


def chatty_cmd(target: Target, *opts: str) -> list[str]:
    """servers/chatty_server.py: records its signals, writes to stdout and stderr."""
    assert isinstance(target, tuple)
    return [sys.executable, str(SERVERS / "chatty_server.py"), f"{target[0]}:{target[1]}",
            *opts]


def prefork_cmd(target: Target, workers: int = 2) -> list[str]:
    """servers/prefork_server.py: a master that listens and forks `workers` acceptors."""
    return [sys.executable, str(SERVERS / "prefork_server.py"), address_arg(target),
            str(workers)]


KINDS = ["http.server", "go", "node", "prefork"]
"""The servers every mode is proven with: stock, static Go, event loop, pre-fork."""


def kind_cmd(kind: str, target: Target, go: Path | None = None) -> list[str]:
    """The command of a test server by kind: http.server, go, node, threaded or prefork."""
    if kind == "http.server":
        assert isinstance(target, tuple)
        return http_server_cmd(target[1], bind=target[0])
    if kind == "go":
        assert go is not None, "the go kind needs the go_server binary"
        return go_cmd(go, target)
    if kind == "node":
        return node_cmd(target)
    if kind == "threaded":
        return threaded_cmd(target, threads=4)
    if kind == "prefork":
        return prefork_cmd(target)
    raise AssertionError(f"unknown server kind {kind!r}")


# A stand-in for "the new version" of a server: any program put at the old one's path.
V2_PROGRAM = '''#!{python}
import sys
sys.path.insert(0, {servers!r})
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from routes import parse_address

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"v2\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

ThreadingHTTPServer(parse_address(sys.argv[1])[1], Handler).serve_forever()
'''


def write_executable(path: Path, data: bytes) -> None:
    """Put a new file at ``path`` in one step (the old one may be running)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, path)


def v2_program(path: Path) -> None:
    """Replace the program at `path` by one that answers "v2" to every GET."""
    write_executable(path, V2_PROGRAM.format(python=sys.executable, servers=str(SERVERS)).encode())


# -- started processes and the leftover check ---------------------------------------------


class Started:
    """A process started by Procs.spawn, output in files under the test's tmp dir."""

    def __init__(self, popen: subprocess.Popen[bytes], name: str, out: Path, err: Path) -> None:
        self.popen = popen
        self.name = name
        self.out = out
        self.err = err

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def log(self) -> str:
        out = self.out.read_text(errors="replace")
        err = self.err.read_text(errors="replace")
        return f"== {self.name} stdout ==\n{out}== {self.name} stderr ==\n{err}"

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait; on timeout SIGKILL the tree and raise AssertionError."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.pid)
            self.popen.wait(5)
            raise AssertionError(
                f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout}s\n{self.log()}"
            ) from None


class HuptProcess(Started):
    """`python -m hupt run [opts] -- CMD` under test."""

    def send_hup(self) -> None:
        os.kill(self.pid, signal.SIGHUP)

    def reload(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `python -m hupt reload [args] PID` and return its outcome (not checked)."""
        return subprocess.run(
            [sys.executable, "-m", "hupt", "reload", *args, str(self.pid)],
            capture_output=True, text=True, timeout=timeout, env=hupt_env(os.environ),
        )

    def descendants(self) -> set[int]:
        return descendants(self.pid)


def hupt_env(base: Mapping[str, str]) -> dict[str, str]:
    """base with the repository first on PYTHONPATH, so `-m hupt` is the working tree."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Procs:
    """Starts processes for one test and checks, at finish(), that none is left behind."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.marker = uuid.uuid4().hex
        self.started: list[Started] = []

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = hupt_env(os.environ)
        env.update(extra or {})
        env[MARKER_ENV] = self.marker
        return env

    def spawn(self, cmd: Sequence[str], *, name: str | None = None,
              env: Mapping[str, str] | None = None, cwd: Path | None = None,
              pass_fds: Sequence[int] = ()) -> Started:
        """Start cmd (extra env merged in) with stdout/stderr in files of the tmp dir."""
        return self._start(Started, list(cmd), name or Path(cmd[0]).name, env, cwd, pass_fds)

    def hupt(self, *opts: str, cmd: Sequence[str], env: Mapping[str, str] | None = None,
             cwd: Path | None = None, verbose: bool = False,
             wrapper: Sequence[str] = ()) -> HuptProcess:
        """Start `python -m hupt [-v] run *opts -- *cmd`, as `WRAPPER... python ...` if given
        (a wrapper must exec it, so that its pid is hupt's)."""
        argv = [*wrapper, sys.executable, "-m", "hupt", *(["-v"] if verbose else []), "run",
                *opts, "--", *cmd]
        started = self._start(HuptProcess, argv, "hupt", env, cwd)
        assert isinstance(started, HuptProcess)
        return started

    def _start(self, cls: type[Started], argv: list[str], name: str,
               env: Mapping[str, str] | None, cwd: Path | None,
               pass_fds: Sequence[int] = ()) -> Started:
        n = len(self.started)
        out, err = self.dir / f"{n}-{name}.out", self.dir / f"{n}-{name}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                     env=self.env(env), cwd=cwd, pass_fds=tuple(pass_fds))
        started = cls(popen, name, out, err)
        self.started.append(started)
        return started

    def leftovers(self) -> set[int]:
        """Live processes of this test: started ones, their trees, and marked strays."""
        pids = marked(self.marker)
        for s in self.started:
            if s.poll() is None:
                pids |= {s.pid} | descendants(s.pid)
        return pids - {os.getpid()}

    def finish(self, term_timeout: float = 10.0, grace: float = 3.0) -> list[str]:
        """Stop every started process; kill strays. Returns problems (empty: clean)."""
        problems = []
        # Read the trees while the parents live: their orphans are re-parented to init.
        before = self.leftovers()
        for s in reversed(self.started):
            if s.poll() is None:
                try:
                    s.stop(term_timeout)
                except AssertionError as e:
                    problems.append(str(e))
        left = wait_gone(before | self.leftovers(), grace)
        if left:
            problems.append(f"processes left behind {grace}s after their parents stopped:\n"
                            + describe(left))
            for p in left:
                # A pid killed with an earlier tree may be mid-exit, its environ unreadable:
                # the refusal is harmless here, the check below sees whatever survives.
                with contextlib.suppress(ValueError):
                    kill_tree(p, self.marker)
            if still := wait_gone(left | self.leftovers(), 5.0):
                problems.append("could not kill:\n" + describe(still))
        for s in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.popen.wait(1)
        return problems


def hupt_cli(*args: str, timeout: float = 60.0,
             user_caps: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m hupt ARGS` (the working tree), optionally under `setpriv USER_CAPS`."""
    prefix = ["setpriv", *user_caps] if user_caps else []
    return subprocess.run([*prefix, sys.executable, "-m", "hupt", *args], capture_output=True,
                          text=True, timeout=timeout, env=hupt_env(os.environ),
                          stdin=subprocess.DEVNULL)


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    """hupt failed with one "hupt: error:" line, last, naming every needle; no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("hupt: error:"), r.stderr
    assert all(n in lines[-1] for n in needles), r.stderr


def spawn_server(procs: Procs, cmd: Sequence[str], target: Target, *, name: str | None = None,
                 env: Mapping[str, str] | None = None) -> Started:
    """Start a server without hupt and wait until it listens on `target`."""
    server = procs.spawn(cmd, name=name, env=env)
    wait_listening(target, 20, proc=server)
    return server


def python_child(procs: Procs, code: str, wait: float = 10.0, *,
                 env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> tuple[Started, dict[str, Any]]:
    """Start a Python child running CHILD_PROLOGUE + ``code``; return it and its first report."""
    started = procs.spawn([sys.executable, "-c", CHILD_PROLOGUE + textwrap.dedent(code)],
                          name="child", env=env, cwd=cwd)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        line = started.out.read_text().partition("\n")
        if line[1]:
            report: dict[str, Any] = json.loads(line[0])
            return started, report
        if started.poll() is not None:
            break
        time.sleep(0.01)
    raise AssertionError(f"child reported nothing\n{started.log()}")


def listening_sockets(port: int) -> list[int]:
    """Inodes of the TCP (IPv4) sockets listening on ``port``, from sock_diag."""
    from hupt.tracer.sockdiag import SockDiag

    with SockDiag() as diag:
        return sorted(lst.inode for lst in diag.tcp_listeners(socket.AF_INET, port))
