"""Issue 11, items 1, 5 and 9 against the real kernel, each under fresh and persistent clients.

1. `hupt run --exec`: after an exec reload, the server listens on one more
   address. hupt holds the new address like any other and starts nothing:
   exactly one server process before, during and after, the new address is
   served by it, and the next exec hands both sockets on.
5. `hupt run --exec`: the reload's new image exits before it is ready and the
   command started afresh fails too. hupt keeps holding the listening socket
   (the same inode), starts the command again with a backoff (0.5 s, 1 s,
   ...), says `down` in `hupt status`, and does not exit;
   a client that connects while nothing serves waits in the accept queue and
   is answered once the command finally starts.
9. Fork mode: the new generation dies on its own right after taking over,
   while the old one still drains a request held in flight. The old one
   accepts again (hupt logs "rolled back"), requests keep succeeding, hupt
   keeps running, the held request completes, and a later reload works.

The clients (load.Load): `fresh` ones open a connection per request, the
persistent ones hold one keep-alive connection for the whole test and
reconnect only when the server closed it.
Every test ends with 0 failed requests, and the `procs` fixture fails it if a
process is left behind.

In exec mode the server drains before it execs, and a persistent connection
never ends on its own: `--close-idle` closes it between two requests (the
persistent clients here pause longer than that between requests). A request
sent at that very moment sees the connection end before any byte of an
answer, and is retried on a new connection, as real clients do: a retry, not
a failure.

The phases that must last are made to last by the test: the command fails
for as long as a file says so; the new generation of item 9 dies when the test
creates a file; the old generation drains a request the test holds.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from harness import (
    SERVERS,
    Background,
    HuptProcess,
    Procs,
    alive,
    children,
    free_port,
    http_get,
    hupt_cli,
    listener_inode,
    listener_inodes,
    one_line_error,
    serving_pid,
    wait_for,
    wait_gone,
    wait_listening,
    write_executable,
)
from load import HeldRequest, Load, LoadResult, Target
from supervision import (
    NotifyManager,
    held_by_hupt,
    reload_ok,
    states,
    stop_gracefully,
    wait_single_generation,
)

pytestmark = pytest.mark.root

CLOSE_IDLE_MS = "100"
PERSISTENT_PAUSE = 0.25  # > CLOSE_IDLE_MS: --close-idle ends an exec-mode drain between requests
CLIENT_TIMEOUT = 60.0  # a request may wait in the accept queue through a whole outage

# A test server: "ok pid=N tag=startK" on every GET, K counting the starts of
# the command (a file in --state).  --extra ADDRESS: listen there too on
# SIGUSR1, and at every later start (a flag file remembers it), as a lazily
# opened admin port does.  The start numbered K exits with status 5 once the
# file die-K appears in --state, gracefully: it stops accepting, answers what
# comes on its open connections with "Connection: close", and exits once they
# are closed, as a server that decides to go does.
SERVER = '''
import argparse, os, signal, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("address")
ap.add_argument("--state", required=True)
ap.add_argument("--extra")
args = ap.parse_args()
starts = os.path.join(args.state, "starts")
number = int(open(starts).read()) + 1 if os.path.exists(starts) else 1
with open(starts + ".new", "w") as f:
    f.write(str(number))
os.replace(starts + ".new", starts)
extra_on = os.path.join(args.state, "extra-on")
closing = threading.Event()
lock = threading.Lock()
open_connections = 0
servers = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"ok pid={os.getpid()} tag=start{number}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if closing.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def process_request(self, request, client_address):
        global open_connections
        with lock:
            open_connections += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        global open_connections
        super().shutdown_request(request)
        with lock:
            open_connections -= 1


def serve(address):
    host, _, port = address.rpartition(":")
    server = Server((host, int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    print(f"start{number} pid {os.getpid()} listening on {address}", flush=True)


def open_extra(*_):
    if args.extra and len(servers) == 1:
        serve(args.extra)
        open(extra_on, "w").close()


serve(args.address)
if os.path.exists(extra_on):
    open_extra()
signal.signal(signal.SIGUSR1, open_extra)
die = os.path.join(args.state, f"die-{number}")
while not os.path.exists(die):
    time.sleep(0.05)
closing.set()
for s in servers:
    s.shutdown()  # accepts no more; the connections it has finish
deadline = time.monotonic() + 10
while open_connections and time.monotonic() < deadline:
    time.sleep(0.01)
print(f"start{number} pid {os.getpid()} exits on its own", flush=True)
os._exit(5)
'''


def server_cmd(tmp_path: Path, address: str, *extra: str) -> list[str]:
    script = tmp_path / "recovery_server.py"
    script.write_text(SERVER)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    return [sys.executable, str(script), address, "--state", str(state), *extra]


def addr(target: Target) -> str:
    assert isinstance(target, tuple)
    return f"{target[0]}:{target[1]}"


def clients(target: Target, *, fresh: int = 2, persistent: int = 2,
            pause: float = PERSISTENT_PAUSE) -> Load:
    """`fresh` clients opening a connection per request, `persistent` holding one each
    and waiting `pause` s between an answer and their next request."""
    return Load(target, fresh=fresh, keepalive=0, persistent=persistent, persistent_pause=pause,
                timeout=CLIENT_TIMEOUT, max_rate=60.0)


def fresh_ok(res: LoadResult) -> int:
    return res.ok - res.persistent_ok


def check_clients(load: Load, min_ok: int = 20) -> None:
    res = load.result
    assert res.failed == 0, res.summary()
    assert fresh_ok(res) >= min_ok, res.summary()
    assert res.persistent_failed == 0, res.summary()
    for p in res.persistent:
        assert p.ok > 0, res.summary()


def only_process(h: HuptProcess, pid: int, seconds: float) -> None:
    """For `seconds`, `pid` is the only process below hupt (sampled every 50 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        below = h.descendants()
        assert below == {pid}, f"hupt runs {sorted(below)}, not only the server {pid}\n{h.log()}"
        time.sleep(0.05)


def status_json(h: HuptProcess) -> dict[str, object]:
    r = hupt_cli("status", "--json", str(h.pid), timeout=30)
    assert r.returncode == 0, r.stderr
    (inst,) = json.loads(r.stdout)["instances"]
    assert isinstance(inst, dict)
    return inst


# -- item 1 -----------------------------------------------------------------------------------


def test_exec_a_new_address_after_an_exec_is_held_and_starts_no_copy(
        procs: Procs, tmp_path: Path) -> None:
    main: Target = ("127.0.0.1", free_port())
    admin: Target = ("127.0.0.1", free_port())
    assert isinstance(main, tuple) and isinstance(admin, tuple)
    h = procs.hupt("--exec", "--close-idle", CLOSE_IDLE_MS, "--drain-timeout", "30",
                   "--kill-timeout", "5",
                   cmd=server_cmd(tmp_path, addr(main), "--extra", addr(admin)))
    wait_listening(main, 20, proc=h)
    (pid,) = children(h.pid)
    inode = listener_inode(main[1])
    assert inode is not None and held_by_hupt(h) == {inode}
    with clients(main) as load:
        time.sleep(0.5)
        r = reload_ok(h)
        assert f"(pid {pid}) is ready" in r.stderr, r.stderr
        assert serving_pid(main) == pid and listener_inode(main[1]) == inode
        only_process(h, pid, 0.5)

        # The exec'd image opens its admin port: a bind and a listen hupt has not seen.
        # Before the fix, hupt took the exec'd generation for one short of its
        # copies and started a second full server on the held sockets.
        time.sleep(0.5)
        assert listener_inode(admin[1]) is None
        h.signal(signal.SIGUSR1)  # forwarded to the server's own PID
        wait_listening(admin, 20)
        admin_inode = listener_inode(admin[1])
        assert admin_inode is not None
        with clients(admin, fresh=1, persistent=1) as admin_load:
            only_process(h, pid, 3.0)  # copies would start 0.3 s after the listen
            assert held_by_hupt(h) == {inode, admin_inode}, "the new address is held too"
            assert listener_inodes(pid) == {inode, admin_inode}
            assert serving_pid(admin) == pid and serving_pid(main) == pid

            # The next exec hands both held sockets to the new image.
            r = reload_ok(h)
            assert f"(pid {pid}) is ready" in r.stderr, r.stderr
            only_process(h, pid, 1.0)
            assert listener_inode(main[1]) == inode and listener_inode(admin[1]) == admin_inode
            assert listener_inodes(pid) == {inode, admin_inode}
            assert held_by_hupt(h) == {inode, admin_inode}
            time.sleep(0.5)
    check_clients(load)
    check_clients(admin_load, min_ok=5)
    assert load.result.pids == {pid}, load.result.summary()
    assert admin_load.result.pids == {pid}, admin_load.result.summary()
    assert (tmp_path / "state" / "starts").read_text() == "3", "one start per image"
    assert "drain timeout" not in h.log(), h.log()
    stop_gracefully(h)
    assert not wait_gone({pid}, 5.0)


# -- item 5 -----------------------------------------------------------------------------------

# Runs the health server, except while the file DOWN exists: then it exits 3
# at once.  Every start is a line "fail T" or "start T" (seconds) in ATTEMPTS.
FAILING_WRAPPER = """#!/bin/sh
if [ -e {down} ]; then echo "fail $(date +%s.%N)" >> {attempts}; exit 3; fi
echo "start $(date +%s.%N)" >> {attempts}
exec {python} {server} {address}
"""


def attempts(path: Path) -> list[tuple[str, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        what, _, when = line.partition(" ")
        out.append((what, float(when)))
    return out


def test_exec_a_failed_fresh_start_keeps_the_socket_and_starts_the_command_again(
        procs: Procs, tmp_path: Path) -> None:
    target: Target = ("127.0.0.1", free_port())
    assert isinstance(target, tuple)
    down, log_of_attempts = tmp_path / "DOWN", tmp_path / "ATTEMPTS"
    wrapper = tmp_path / "server"
    write_executable(wrapper, FAILING_WRAPPER.format(
        down=down, attempts=log_of_attempts, python=sys.executable,
        server=SERVERS / "health_server.py", address=addr(target)).encode())
    manager = NotifyManager(tmp_path / "manager.sock")  # a stand-in for systemd
    h = procs.hupt("--exec", "--close-idle", CLOSE_IDLE_MS, "--drain-timeout", "30",
                   "--kill-timeout", "5", cmd=[str(wrapper)], env={"NOTIFY_SOCKET": manager.path})
    wait_listening(target, 20, proc=h)
    (pid,) = children(h.pid)
    inode = listener_inode(target[1])
    assert inode is not None and held_by_hupt(h) == {inode}
    with clients(target) as load:
        time.sleep(0.5)
        down.touch()
        r = h.reload()
        # The exec'd image (same PID) exited, then the command started afresh.
        one_line_error(r, "exited (exit status 3) before it was ready",
                       "started the command afresh")
        def failed_thrice() -> bool:
            assert h.popen.poll() is None, f"hupt exited\n{h.log()}"
            return sum(w == "fail" for w, _ in attempts(log_of_attempts)) >= 3

        wait_for("the exec'd image, the fresh start and a first retry to fail",
                 failed_thrice, 30, h)
        assert not alive(pid)

        # Down: nothing serves, hupt holds the very same socket and says so.
        seen: list[str] = []

        def down_state() -> bool:
            state = status_json(h)["state"]
            seen.append(str(state))
            return state == "down"

        wait_for("hupt status to say it is down", down_state, 30, h)
        assert h.popen.poll() is None, "hupt must not exit"
        assert children(h.pid) == set() or all(
            not listener_inodes(p) for p in children(h.pid)), "nothing serves"
        assert listener_inode(target[1]) == inode and held_by_hupt(h) == {inode}
        plain = hupt_cli("status", str(h.pid), timeout=30)
        assert " down" in plain.stdout, plain.stdout + plain.stderr

        # A client connecting now waits in the accept queue: neither refused nor reset.
        waiting = Background(lambda: http_get(target, timeout=CLIENT_TIMEOUT))
        time.sleep(1.5)
        assert not waiting.done(), f"answered or refused while down: {waiting.result(1)}"
        assert h.popen.poll() is None, "hupt must not exit"
        assert listener_inode(target[1]) == inode and held_by_hupt(h) == {inode}

        down.unlink()  # the next start succeeds
        status, body = waiting.result(CLIENT_TIMEOUT)
        assert status == 200, body
        (fresh,) = children(h.pid)
        assert fresh != pid and body.startswith(f"ok pid={fresh}"), body
        assert listener_inode(target[1]) == inode, "the listening socket must never be replaced"
        assert inode in listener_inodes(fresh) and held_by_hupt(h) == {inode}
        wait_for("hupt status to say it runs", lambda: status_json(h)["state"] == "running",
                 30, h)
        tries = attempts(log_of_attempts)
        time.sleep(0.5)

        # The command started again is supervised in exec mode like the first.
        r = reload_ok(h)
        assert f"(pid {fresh}) is ready" in r.stderr, r.stderr
        assert listener_inode(target[1]) == inode and inode in listener_inodes(fresh)
        time.sleep(0.5)
    check_clients(load)
    assert load.result.pids >= {pid, fresh}, load.result.summary()
    assert h.popen.poll() is None, "hupt must not exit"
    assert children(h.pid) == {fresh} and h.descendants() == {fresh}

    # The retries came with the documented backoff: 0.5 s, then 1 s, then longer.
    fails = [t for w, t in tries if w == "fail"]
    assert [w for w, _ in tries] == ["start"] + ["fail"] * len(fails) + ["start"], tries
    # From the fresh start's failure on, each try comes after the backoff doubled.
    gaps = [b - a for a, b in zip(fails[1:], [*fails[2:], tries[-1][1]], strict=True)]
    assert len(gaps) >= 2, tries
    for i, gap in enumerate(gaps):
        assert gap >= 0.5 * 2**i * 0.9, f"try {i + 3} came {gap:.2f} s after the one before: {gaps}"
    assert "drain timeout" not in h.log(), h.log()

    # The service manager heard that the service was down, then that it served again.
    said = []
    while (m := manager.next(0.2)) is not None:
        said.append(m)
    down_at = [i for i, m in enumerate(said) if m.get("STATUS", "").startswith("down:")]
    assert down_at, said
    assert any(m.get("READY") == "1" and m.get("STATUS", "").startswith("serving")
               for m in said[down_at[0]:]), said
    stop_gracefully(h)
    assert not wait_gone({fresh}, 5.0)
    manager.close()


# -- item 9 -----------------------------------------------------------------------------------


def test_fork_a_new_generation_dying_while_the_old_drains_rolls_back(
        procs: Procs, tmp_path: Path) -> None:
    target: Target = ("127.0.0.1", free_port())
    assert isinstance(target, tuple)
    state = tmp_path / "state"
    h = procs.hupt("--drain-timeout", "120", "--kill-timeout", "5",
                   cmd=server_cmd(tmp_path, addr(target)))
    wait_listening(target, 20, proc=h)
    first = serving_pid(target)
    inode = listener_inode(target[1])
    assert inode is not None and held_by_hupt(h) == {inode}
    with clients(target, pause=0.01) as load:
        time.sleep(0.5)
        held = HeldRequest(target, timeout=120, interval=0.2).start()
        held.wait_accepted()  # by generation 1: it drains until the test releases it

        reload_ok(h)
        second = serving_pid(target)
        assert second != first and alive(first)
        assert states(h) == {1: "draining", 2: "serving"}, states(h)
        assert listener_inode(target[1]) == inode and inode in listener_inodes(second)
        # Persistent clients of generation 2, which it will close when it goes.
        with clients(target, fresh=0, persistent=2, pause=0.01) as load_second:
            wait_for("generation 2 to answer its persistent clients",
                     lambda: all(p.ok >= 5 for p in load_second.so_far().persistent), 30, h)
            assert all(p.answers[-1][1] == second for p in load_second.so_far().persistent)

            (state / "die-2").touch()  # generation 2 exits on its own (status 5)
            wait_for("the rollback", lambda: "rolled back" in h.log(), 30, h)
            assert not wait_gone({second}, 20), "generation 2 exited"
            assert states(h) == {1: "serving"}, states(h)
            assert h.popen.poll() is None, "hupt must keep running"
            assert serving_pid(target) == first, "generation 1 accepts again"
            assert listener_inode(target[1]) == inode and inode in listener_inodes(first)
            assert held_by_hupt(h) == {inode}
            before = fresh_ok(load.so_far())
            time.sleep(2.0)
            assert fresh_ok(load.so_far()) > before, "fresh clients are served again"
            wait_for("the persistent clients of generation 2 to move to generation 1",
                     lambda: all(p.answers[-1][1] == first
                                 for p in load_second.so_far().persistent), 30, h)
        assert not held.expired
        held.release()
        status, _ = held.result()
        assert status == 200, "the request held in flight completes"
        time.sleep(0.5)
    check_clients(load)
    second_res = load_second.result
    assert second_res.failed == 0 and second_res.persistent_failed == 0, second_res.summary()
    for p in second_res.persistent:
        # generation 2 closed them with Connection: close
        assert p.reconnects >= 1, second_res.summary()
    assert first in load.result.pids <= {first, second}, load.result.summary()
    assert "generation 2 (pid" in h.log() and "died while generation 1" in h.log(), h.log()

    # hupt goes on: the next reload is an ordinary one.
    with clients(target, persistent=0) as load:
        time.sleep(0.3)
        reload_ok(h)
        third = serving_pid(target)
        assert third not in (first, second)
        assert listener_inode(target[1]) == inode and inode in listener_inodes(third)
        assert wait_single_generation(h, 60) == 3
        time.sleep(0.3)
    check_clients(load, min_ok=5)
    assert (state / "starts").read_text() == "3"
    stop_gracefully(h)
    assert not wait_gone({first, third}, 5.0)
