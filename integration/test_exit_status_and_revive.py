"""A server that exits on its own: hupt's exit status is the server's, or --revive restarts it.

Without --revive, when the serving generation exits on its own hupt exits with
its status (128+N for signal N), whichever generation it was. With --revive
the sockets stay held while the server is started again, so clients queue
instead of being refused: 0 failed requests across three crashes.
"""

from __future__ import annotations

import time

import pytest
from harness import Procs, free_port, http_get, serving_pid, variant_cmd, wait_gone, wait_listening
from load import Load, Target
from supervision import ping, reload_ok, start_hupt, wait_single_generation


@pytest.mark.parametrize(("route", "code", "logged"), [
    ("/exit?code=7", 7, "exited on its own (exit status 7)"),
    ("/kill?sig=9", 128 + 9, "exited on its own (killed by SIGKILL)"),
    ("/kill?sig=10", 128 + 10, "exited on its own (killed by SIGUSR1)"),
])
def test_exit_status_is_the_servers(route: str, code: int, logged: str, procs: Procs) -> None:
    port = free_port()
    target: Target = ("127.0.0.1", port)
    h = procs.hupt("--kill-timeout", "5", cmd=variant_cmd(target))
    wait_listening(target, 20, proc=h)
    # The generation that dies is a reloaded one: hupt tracks which one is serving.
    reload_ok(h)
    wait_single_generation(h)
    serving = ping(h)[2]["pid"]
    assert serving_pid(target) == serving
    status, _ = http_get(target, route)
    assert status == 200
    got = h.popen.wait(15)
    assert got == code, f"hupt exited {got}, expected {code}\n{h.log()}"
    assert f"generation 2 (pid {serving}) {logged}" in h.log(), h.log()
    assert "Traceback" not in h.log()


def test_without_revive_a_crash_ends_hupt_with_its_status(procs: Procs) -> None:
    h, target = start_hupt(procs)
    http_get(target, "/exit?code=3")
    assert h.popen.wait(15) == 3


def test_revive_restarts_a_crashed_server_while_clients_queue(procs: Procs) -> None:
    h, target = start_hupt(procs, "--revive")
    victims = []
    with Load(target, fresh=2, keepalive=1, timeout=15) as load:
        for _ in range(3):
            victim = serving_pid(target)
            victims.append(victim)
            http_get(target, "/exit?code=3")  # it crashes between requests
            deadline = time.monotonic() + 15
            while True:
                try:
                    if serving_pid(target) != victim:
                        break
                except (OSError, AssertionError):
                    pass
                assert time.monotonic() < deadline, h.log()
                time.sleep(0.1)
    assert load.result.failed == 0, load.result.summary()
    assert h.log().count("nothing serves: starting the command again") == 3, h.log()
    assert h.poll() is None
    assert not wait_gone(victims, 1.0)
