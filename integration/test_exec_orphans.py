"""The workers an exec in place leaves behind are reaped, not left as zombies.

A pre-fork master that reaps only the workers it forked (as node's cluster
and gunicorn do) never reaps the old image's workers after an exec: they
are children of the same pid, unknown to the new image.  hupt retires them
and makes the root reap them (an injected wait4 per zombie, WNOHANG).
Proved first on the mechanism alone, then under hupt run --exec with
several reloads under load.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import (
    Procs,
    children,
    free_port,
    http_get,
    listener_inode,
    wait_for,
    wait_gone,
    wait_listening,
    write_executable,
    zombie_children,
)
from load import Load, Target
from supervision import reload_ok

from hupt.tracer import orphans

# A master that forks WORKERS acceptors and waits only for those: a child it
# did not fork (an old image's worker) stays a zombie until someone reaps it.
MASTER = '''\
import os, signal, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
try:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(64)
except Exception as e:
    print(e, file=sys.stderr); sys.exit(1)
me = os.getpid()
workers = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
        while True:
            c, _ = s.accept()
            c.recv(65536)
            body = f"ok master={me} worker={os.getpid()}\\n".encode()
            c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
            c.close()
    workers.append(pid)
def stop(*a):
    for w in workers:
        os.kill(w, signal.SIGTERM)
    for w in workers:
        os.waitpid(w, 0)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    signal.pause()
'''


def test_reap_for_makes_the_parent_reap_exactly_the_children_named(tmp_path: Path) -> None:
    # The parent forks three children that exit at once and never reaps them.
    script = ("import os, signal, time\n"
              "kids = [os.fork() or os._exit(0) for _ in range(3)]\n"
              "print(*kids, flush=True)\n"
              "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        kids = [int(k) for k in p.stdout.readline().split()]
        wait_for("three zombies", lambda: zombie_children(p.pid) == set(kids), 10)
        assert orphans.reap_for(p.pid, kids[:2]) == kids[:2]
        assert zombie_children(p.pid) == {kids[2]}, "only those named are reaped"
        assert orphans.reap_for(p.pid, kids[:2]) == [], "ECHILD: reaped already"
        assert p.poll() is None, "the parent runs on"
    finally:
        p.kill()
        p.wait(10)


def test_exec_reloads_leave_no_zombie_workers(procs: Procs, tmp_path: Path) -> None:
    master = tmp_path / "master.py"
    write_executable(master, MASTER.encode())
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--exec", "--drain-timeout", "20", "--kill-timeout", "5",
                   cmd=[sys.executable, str(master), f"127.0.0.1:{port}"])
    wait_listening(target, 20, proc=h)
    (root,) = children(h.pid)
    inode = listener_inode(port)
    retired: set[int] = set()
    with Load(target, fresh=2, keepalive=2) as load:
        for _ in range(3):
            before = children(root)
            assert len(before) == 2, before
            reload_ok(h)
            retired |= before
            wait_for("the old workers gone",
                     lambda b=before: not (b & children(root)), 20)  # type: ignore[misc]
        time.sleep(0.5)
    assert load.result.failed == 0, load.result.summary()
    assert listener_inode(port) == inode, "the same listening socket throughout"
    wait_for("no zombie left under the root", lambda: not zombie_children(root), 10)
    assert len(children(root)) == 2, "exactly the new image's workers"
    assert not any(Path(f"/proc/{p}").exists() for p in retired), "every old worker reaped"
    assert http_get(target)[1].startswith(f"ok master={root} ")
    h.signal(signal.SIGTERM)
    assert h.popen.wait(30) == 0, h.log()
    assert not wait_gone({root}, 5.0)
