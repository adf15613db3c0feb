"""--ready http rollback for event-loop servers (node, static Go), end to end.

While hupt probes a new generation it has paused the old one: the listener
taken out of every epoll set that watched it and a dummy in its place.  When
no probe succeeds (here: a path the server answers with 404) hupt rolls
back: the old generation accepts again, its listener back at the same fd and
its epoll registrations (events, flags, data) exactly as they were, which is
what an epoll server needs to ever wake up for it again.  Asserted under load:
0 failed requests across repeated rollbacks, the old process alone serving
after each, its state identical, the failed generations stopped.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
from harness import Procs, free_port, go_cmd, http_get, node_cmd, wait_gone, wait_listening
from load import Load, Target
from test_exec_mode import server_state

pytestmark = pytest.mark.root

STARTED = re.compile(r"started generation (\d+) \(pid (\d+)\)")


@pytest.mark.parametrize("kind", ["node", "go"])
def test_rollback_restores_an_epoll_server_exactly(kind: str, procs: Procs,
                                                   request: pytest.FixtureRequest) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    cmd = (go_cmd(request.getfixturevalue("go_server"), target) if kind == "go"
           else node_cmd(target))
    h = procs.hupt("--ready", "http:/no-such-page", "--ready-timeout", "1.5",
                   "--drain-timeout", "10", "--kill-timeout", "3", cmd=cmd)
    wait_listening(target, 20, proc=h)
    (old,) = h.descendants()
    before = server_state(old, port)
    assert any(before[2].values()), f"{kind} watches its listener with epoll"
    failed: list[int] = []
    with Load(target, fresh=2, keepalive=2) as load:
        for i in range(3):
            r = h.reload()
            assert r.returncode == 1, r.stderr
            assert "rolled back" in r.stderr and "404" in r.stderr, r.stderr
            m = STARTED.search(r.stderr)
            assert m is not None, r.stderr
            failed.append(int(m.group(2)))
            # Only the old process answers: it accepts again, the new one is paused.
            for _ in range(20):
                status, body = http_get(target, "/pid")
                assert status == 200 and int(body) == old, (i, body)
            assert server_state(old, port) == before, f"rollback {i + 1} changed the server"
            time.sleep(0.2)
    assert load.result.failed == 0, load.result.summary()
    # While it was probed the new generation alone accepted: clients reached it too.
    assert load.result.pids <= {old, *failed}, load.result.summary()
    assert not wait_gone(set(failed), 15), "the generations that failed are stopped"
    h.signal(signal.SIGTERM)
    assert h.popen.wait(20) == 0, h.log()
