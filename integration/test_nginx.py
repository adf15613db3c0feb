"""nginx (master + workers, as packaged by Debian) under hupt run, reloaded under load.

nginx is what many operators would put under hupt first.  Its master binds
and listens, then forks the workers that accept; `daemon off` keeps the
master in the foreground, as under any supervisor.  Asserted: 10 reloads
under fresh-connection and keep-alive load with 0 failed requests, a 3-second
request in flight across the reloads completing with 200, the very same
listening socket in every generation, old masters and their workers gone,
and a graceful stop (nginx's own graceful signal, QUIT, as --stop-signal).
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
from harness import Procs, free_port, listener_inode, listener_inodes, wait_gone, wait_listening
from load import Load, SlowRequest, Target

pytestmark = pytest.mark.root

CONF = """
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


def test_nginx_reloads_under_load(procs: Procs, tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is needed (apt-get install nginx-light)"
    port = free_port()
    target: Target = ("127.0.0.1", port)
    conf = tmp_path / "nginx.conf"
    conf.write_text(CONF.format(dir=tmp_path, port=port))
    h = procs.hupt("--drain-timeout", "20", "--kill-timeout", "5", "--stop-signal", "QUIT",
                   "--unlink", str(tmp_path / "nginx.pid"),
                   cmd=[nginx, "-c", str(conf), "-p", str(tmp_path), "-e", "stderr"])
    wait_listening(target, 20, proc=h)
    inode = listener_inode(port)
    assert inode is not None
    first = h.descendants()
    assert len(first) == 3, "a master and two workers"
    with Load(target, fresh=2, keepalive=2, conn_requests=20) as load:
        time.sleep(0.3)
        slow = SlowRequest(target, 3.0).start()
        time.sleep(0.3)
        seen = set(first)
        for i in range(10):
            r = h.reload()
            assert r.returncode == 0, f"reload {i + 1}: {r.stderr}\n{h.log()}"
            assert listener_inode(port) == inode, "the listening socket is never replaced"
            time.sleep(0.3)
            new = h.descendants() - seen
            assert any(inode in listener_inodes(p) for p in new), "the new master holds it"
            seen |= new
        status, elapsed = slow.result()
    assert load.result.failed == 0, load.result.summary()
    assert load.result.ok > 100, load.result.summary()
    assert status == 200 and elapsed >= 2.9, (status, elapsed)
    deadline = time.monotonic() + 30
    while len(h.descendants()) != 3:  # the last master and its two workers
        assert time.monotonic() < deadline, (h.descendants(), h.log())
        time.sleep(0.1)
    assert not wait_gone(first, 1.0), "the first master and its workers exited"
    h.signal(signal.SIGTERM)
    assert h.popen.wait(30) == 0, h.log()
