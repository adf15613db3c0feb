"""The real-server matrix: which servers hupt is proven with, in which modes, under which load.

One `Server` per row. Adding a row is one entry in SERVERS: how to start it
(`cmd`, given a private directory and the address), where it listens (`address`),
what load it gets (`load`: "http", "redis" or "udp"), how many processes one
generation has, and for each mode (fork, exec, attach) either the options hupt
runs it with or, where it cannot work, the one-line reason hupt gives. A row
whose support is being built elsewhere says so in `pending` and is skipped.

integration/test_matrix.py runs every cell (3 reloads by default, 10 with
HUPT_MATRIX=full) and records what it measured in a JSON results file;
integration/matrix_report.py turns that file into the README's compatibility
table. Choices this rests on:

- Reloads under fresh AND persistent clients (load.py for HTTP; redis-benchmark
  with a connection per request plus persistent RESP clients here for redis):
  a persistent connection pins the old generation, and is what shows whether
  the server ends it cleanly when it drains.
- `drain` is the server's own graceful-stop signal (hupt's --drain-signal):
  haproxy's soft stop is USR1, nginx's QUIT, the others' TERM. Without it a
  persistent client keeps an old generation until --drain-timeout.
- The previous major gunicorn is installed from PyPI into a --target directory
  of its own (integration/.build/, cached), pinned, so that the newest one in
  the test extra and it never meet in one site-packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVERS_DIR = HERE / "servers"
BUILD = HERE / ".build"
MODES = ("fork", "exec", "attach")

GUNICORN_PREVIOUS = "26.2.0"
"""The newest release of gunicorn's previous major (the test extra has the newest)."""

Address = tuple[str, int] | str
"""("127.0.0.1", port), ("::1", port), ("::", port) (dual stack) or a unix socket path."""


@dataclass(frozen=True)
class Server:
    name: str
    """The row's label in the README table."""
    cmd: Callable[[Path, Address], list[str]]
    """The server's command, given a private directory and the address to listen on."""
    modes: dict[str, tuple[str, ...] | str]
    """Mode -> hupt's options for it, or the one-line reason it cannot work."""
    address: str = "tcp4"
    """tcp4, tcp6 (IPv6 only), dual ([::] serving 127.0.0.1 and ::1) or unix."""
    load: str = "http"
    processes: int = 1
    """Processes of one generation once it serves (a master and its workers)."""
    needs: tuple[str, ...] = ()
    """Programs that must be on PATH (CI installs them: .ci/run)."""
    env: dict[str, str] = field(default_factory=dict)
    pending: str | None = None
    """Where the support is being built, for a row not run yet."""
    note: str = ""
    """What the row is, in a few words, for the table."""
    reload_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Mode -> `hupt reload` options (before the PID) that the server needs there."""
    dns_name: str | None = None
    """For a "udp" load: ask DNS queries for this name instead of numbered echoes."""

    def cell(self, mode: str) -> tuple[str, ...] | str | None:
        """hupt's options for mode, the reason it cannot work, or None: not applicable."""
        return self.modes.get(mode)


# -- commands -----------------------------------------------------------------------------


def _host_port(address: Address) -> tuple[str, int]:
    assert isinstance(address, tuple), f"a TCP address, not {address!r}"
    return address


def _bind_arg(address: Address) -> str:
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


HAPROXY_CONF = """
global
    maxconn 512
    pidfile {dir}/haproxy.pid
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend web
    bind {bind}
    http-request return status 200 content-type text/plain lf-string "ok pid=%pid tag=\\n"
"""


def haproxy(master_worker: bool) -> Callable[[Path, Address], list[str]]:
    def cmd(directory: Path, address: Address) -> list[str]:
        conf = directory / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(dir=directory, bind=_bind_arg(address)))
        return [_which("haproxy"), *(["-W"] if master_worker else []), "-f", str(conf)]
    return cmd


def gunicorn(version: str | None, worker: str, control_socket: bool = False
             ) -> Callable[[Path, Address], list[str]]:
    """gunicorn with two workers of `worker` class; `version` None: the test extra's."""
    def cmd(directory: Path, address: Address) -> list[str]:
        opts = ["--workers", "2", "--worker-class", worker, "--bind", _bind_arg(address),
                "--chdir", str(SERVERS_DIR), "--graceful-timeout", "5"]
        prefix: list[str] = []
        if control_socket:
            # gunicorn >= 24 opens $XDG_RUNTIME_DIR/gunicorn.ctl or ~/.gunicorn/gunicorn.ctl
            # by default: its default, with a private HOME that keeps cells apart and
            # leaves the tester's own alone.
            prefix = ["env", "-u", "XDG_RUNTIME_DIR", f"HOME={directory}"]
        else:
            opts.append("--no-control-socket")
        if worker == "gthread":
            opts += ["--threads", "4"]
        if version is not None:
            python = ["-c", _WITH_PATH.format(path=str(gunicorn_previous()))]
        else:
            python = ["-m", "gunicorn"]
        return [*prefix, sys.executable, *python, *opts, "wsgi_app:app"]
    return cmd


# sys.path first, then gunicorn's entry point: PYTHONPATH would leak into the reload
# hooks and every child, and `-m` cannot take a path.
_WITH_PATH = ("import sys; sys.path.insert(0, {path!r}); sys.argv[0] = 'gunicorn';"
              " from gunicorn.app.wsgiapp import run; sys.exit(run())")


def gunicorn_previous() -> Path:
    """The previous major gunicorn's --target directory, installed from PyPI once."""
    target = BUILD / f"gunicorn-{GUNICORN_PREVIOUS}"
    if not (target / "gunicorn" / "__init__.py").exists():
        BUILD.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(target), f"gunicorn=={GUNICORN_PREVIOUS}"],
                       check=True, timeout=300)
    return target


ASGI_APP = '''
import os

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"ok pid={os.getpid()} tag=\\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''


def uvicorn(directory: Path, address: Address) -> list[str]:
    (directory / "asgi_app.py").write_text(ASGI_APP)
    host, port = _host_port(address)
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(directory), "--host", host,
            "--port", str(port), "--no-access-log", "--timeout-graceful-shutdown", "5",
            "asgi_app:app"]


def _node_arg(address: Address) -> str:
    # The node servers split HOST:PORT at the last colon and take the host unbracketed.
    host, port = _host_port(address)
    return f"{host}:{port}"


def node_cluster(directory: Path, address: Address) -> list[str]:
    return ["node", str(SERVERS_DIR / "cluster_server.js"), _node_arg(address), "2"]


def node_single(directory: Path, address: Address) -> list[str]:
    return ["node", str(SERVERS_DIR / "drain_node_server.js"), _node_arg(address)]


def redis(directory: Path, address: Address) -> list[str]:
    host, port = _host_port(address)
    # No persistence: a generation that saved at exit would make the next one load it.
    return [_which("redis-server"), "--port", str(port), "--bind", host, "--save", "",
            "--appendonly", "no", "--dir", str(directory), "--daemonize", "no",
            "--protected-mode", "no", "--loglevel", "warning"]


NGINX_CONF = """
daemon off;
master_process on;
worker_processes 2;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen {listen};
        location / {{ return 200 "ok pid=$pid tag=\\n"; }}
    }}
}}
"""


def nginx(user: str | None = None, listen_opts: str = "") -> Callable[[Path, Address], list[str]]:
    def cmd(directory: Path, address: Address) -> list[str]:
        host, port = _host_port(address)
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        (directory / "tmp").mkdir(exist_ok=True)
        if user is not None:
            # Its workers must reach the config's directories once they dropped to `user`.
            directory.chmod(0o755)
            for parent in directory.parents:
                if parent == Path("/"):
                    break
                parent.chmod(parent.stat().st_mode | 0o111)
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            dir=directory, listen=f"{listen} {listen_opts}".strip(),
            user=f"user {user} nogroup;" if user else ""))
        return [_which("nginx"), "-c", str(conf), "-p", str(directory), "-e", "stderr"]
    return cmd


def _which(program: str) -> str:
    found = shutil.which(program) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{program}", os.X_OK)), None)
    assert found is not None, f"{program} is needed (.ci/run installs it)"
    return found


def udp_echo(directory: Path, address: Address) -> list[str]:
    # test_datagram's own server and command: one definition of both.
    from test_datagram import address_of, echo_cmd
    return echo_cmd(address_of(_host_port(address)))


def dnsmasq(directory: Path, address: Address) -> list[str]:
    from test_datagram import dnsmasq_cmd
    return dnsmasq_cmd(_host_port(address)[1], directory)


def nginx_daemon_on(directory: Path, address: Address) -> list[str]:
    # test_daemonizing_servers' own configuration (`daemon on`).
    from test_daemonizing_servers import _nginx
    return _nginx(directory, _host_port(address)[1])


def redis_daemonize(directory: Path, address: Address) -> list[str]:
    from test_daemonizing_servers import _redis
    return _redis(directory, _host_port(address)[1])


# -- the rows -------------------------------------------------------------------------------

FORK: tuple[str, ...] = ()
TERM = ("--drain-signal", "TERM")
QUIT = ("--drain-signal", "QUIT")
EXEC_TERM = ("--exec", *TERM)
# hupt's own line (test_daemonizing_servers checks it is one line).
EXEC_DAEMON = ("exec mode reloads the process hupt started, which has exited (did the server"
               " daemonize?)")
# Tried: the launcher the cell starts exits as it daemonizes, and hupt attach says "PID
# and its children have no listening socket"; attaching to the daemon itself is untried.
ATTACH_DAEMON = "not run: the process started exits as it daemonizes (attach the daemon itself)"


def _nginx_modes() -> dict[str, tuple[str, ...] | str]:
    return {"fork": QUIT, "exec": ("--exec", *QUIT), "attach": QUIT}


# haproxy -W's master re-execs itself into a "wait mode" after forking its worker, with
# HAPROXY_MWORKER_REEXEC, HAPROXY_MWORKER_WAIT_ONLY and the process list in its environment:
# `hupt attach` reads the command's environment from /proc/PID/environ, so every image
# (and a fresh start) would start in wait mode, with no worker, and exit at once. The
# first reload removes them (hupt reload --unset-env, kept for every later generation).
HAPROXY_W_UNSET = tuple(a for v in ("HAPROXY_MWORKER_REEXEC", "HAPROXY_MWORKER_WAIT_ONLY",
                                    "HAPROXY_PROCESSES", "HAPROXY_CLI")
                        for a in ("--unset-env", v))

SERVERS: list[Server] = [
    Server("haproxy", haproxy(False), note="foreground, one process",
           modes={"fork": ("--drain-signal", "USR1"), "exec": ("--exec", "--drain-signal", "USR1"),
                  "attach": ("--drain-signal", "USR1")},
           needs=("haproxy",)),
    Server("haproxy -W", haproxy(True),
           note="master-worker; attached: reloaded with `--unset-env` of its HAPROXY_MWORKER_*",
           processes=2,
           modes={"fork": ("--drain-signal", "USR1"), "exec": ("--exec", "--drain-signal", "USR1"),
                  "attach": ("--drain-signal", "USR1")},
           reload_args={"attach": HAPROXY_W_UNSET},
           needs=("haproxy",)),
    Server("gunicorn (newest), sync, TCP", gunicorn(None, "sync"), processes=3,
           note="2 workers", modes={"fork": FORK, "exec": EXEC_TERM, "attach": TERM}),
    Server("gunicorn (newest), gthread, unix socket", gunicorn(None, "gthread"), processes=3,
           address="unix", note="2 workers, 4 threads",
           modes={"fork": FORK, "exec": EXEC_TERM, "attach": TERM}),
    Server("gunicorn (newest), sync, control socket on", gunicorn(None, "sync", True),
           processes=3, note="gunicorn's own control socket (its default since 24)",
           modes={"fork": FORK, "exec": EXEC_TERM, "attach": TERM}),
    Server(f"gunicorn {GUNICORN_PREVIOUS}, sync, TCP", gunicorn(GUNICORN_PREVIOUS, "sync"),
           processes=3, note="previous major, 2 workers",
           modes={"fork": FORK, "exec": EXEC_TERM, "attach": TERM}),
    Server(f"gunicorn {GUNICORN_PREVIOUS}, gthread, unix socket",
           gunicorn(GUNICORN_PREVIOUS, "gthread"), processes=3, address="unix",
           note="previous major, 2 workers, 4 threads",
           modes={"fork": FORK, "exec": EXEC_TERM, "attach": TERM}),
    Server("uvicorn", uvicorn, note="one process; exec and attach without --drain-signal",
           modes={"fork": TERM, "exec": ("--exec",), "attach": ()}),
    Server("node cluster", node_cluster, processes=3, note="a primary and 2 workers",
           modes={"fork": TERM, "exec": EXEC_TERM, "attach": TERM}, needs=("node",)),
    Server("redis-server", redis, load="redis", note="foreground; redis-benchmark",
           modes={"fork": FORK, "exec": ("--exec",), "attach": ()},
           needs=("redis-server", "redis-benchmark")),
    Server("node, IPv6 only", node_single, address="tcp6", note="[::1]",
           modes={"fork": TERM, "exec": EXEC_TERM, "attach": TERM}, needs=("node",)),
    Server("nginx, dual stack", nginx(listen_opts="ipv6only=off"), address="dual", processes=3,
           note="[::] with IPV6_V6ONLY=0, clients on 127.0.0.1 and ::1",
           modes=_nginx_modes(), needs=("nginx",)),
    Server("nginx, workers as nobody", nginx(user="nobody"), processes=3,
           note="master root, `user nobody nogroup;`", modes=_nginx_modes(), needs=("nginx",)),
    Server("nginx, daemon on", nginx_daemon_on, processes=3, needs=("nginx",),
           note="the master forks away; a cgroup per generation tracks it",
           modes={"fork": ("--stop-signal", "QUIT", *QUIT), "exec": EXEC_DAEMON,
                  "attach": ATTACH_DAEMON}),
    Server("redis-server --daemonize yes", redis_daemonize, load="redis",
           note="forks away; a cgroup per generation tracks it",
           modes={"fork": FORK, "exec": EXEC_DAEMON, "attach": ATTACH_DAEMON},
           needs=("redis-server", "redis-benchmark")),
    Server("UDP echo server", udp_echo, load="udp", note="numbered datagrams, python",
           modes={"fork": FORK, "exec": ("--exec",), "attach": ()}),
    Server("dnsmasq", dnsmasq, load="udp", dns_name="example.test",
           note="DNS queries in a loop, --no-daemon", needs=("dnsmasq",),
           modes={"fork": FORK, "exec": ("--exec",), "attach": ()}),
]


def server(name: str) -> Server:
    return next(s for s in SERVERS if s.name == name)
