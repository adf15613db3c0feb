"""``--before-reload`` and ``--after-reload`` commands.

A hook runs as ``sh -c CMD`` with hupt's environment plus HUPT_PID and
HUPT_GENERATION, its stdout and stderr captured together (the output of a
failed --before-reload is the reason ``hupt reload`` reports).

hupt reaps every child with waitid(P_ALL) because it is a child subreaper
(orphaned server processes come back to it), so a hook's exit status comes
from the supervisor's reaper, never from Popen.wait(); the supervisor's
event loop reads the output pipe without blocking.  A hook starts with the
limit of open files hupt was started with (hupt/fdlimit.py), like a server.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hupt import fdlimit

if TYPE_CHECKING:
    from hupt.loop import Loop

MAX_OUTPUT = 64 * 1024


@dataclass
class Hook:
    name: str  # "before-reload" / "after-reload"
    command: str
    pid: int = 0
    fd: int = -1
    output: bytearray = field(default_factory=bytearray)
    status: int | None = None

    def start(self, env: dict[str, str]) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.dup2(w, 1)
                os.dup2(w, 2)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                signal.set_wakeup_fd(-1)
                for s in (signal.SIGPIPE, signal.SIGHUP, signal.SIGTERM, signal.SIGINT,
                          signal.SIGCHLD, signal.SIGUSR2):
                    signal.signal(s, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                fdlimit.restore_in_child()
                os.execve("/bin/sh", ["sh", "-c", self.command], env)
            finally:
                os._exit(127)
        os.close(w)
        os.set_blocking(r, False)
        self.pid, self.fd = pid, r

    def read(self) -> bool:
        """Read what is there; False at end of output."""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            if len(self.output) < MAX_OUTPUT:
                self.output += chunk[: MAX_OUTPUT - len(self.output)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace").strip()

    def reason(self) -> str:
        """One line for ``hupt reload``: what failed and the hook's last words."""
        code = self.status
        how = (f"exit status {code}" if code is not None and code >= 0
               else f"killed by signal {-(code or 0)}")
        last = self.text.splitlines()[-3:] if self.text else []
        tail = (": " + " / ".join(last)) if last else ""
        return f"--{self.name} command failed ({how}){tail}"

    def kill(self) -> None:
        if self.pid and self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class HookRunner:
    """Runs hooks inside the supervisor's loop and says when each is done.

    A hook is done once both its exit status (from the supervisor's reaper:
    ``child_exited``) and the end of its output are in, in either order.
    """

    def __init__(self, loop: Loop, env: Callable[[], dict[str, str]]) -> None:
        self._loop = loop
        self._env = env
        self._running: list[tuple[Hook, Callable[[Hook], None]]] = []

    def run(self, name: str, command: str, on_done: Callable[[Hook], None]) -> Hook:
        hook = Hook(name, command)
        hook.start(self._env())
        self._running.append((hook, on_done))
        self._loop.add(hook.fd, functools.partial(self._on_output, hook))
        return hook

    def _on_output(self, hook: Hook, mask: int) -> None:
        if not hook.read():
            self._loop.remove(hook.fd)
            hook.close()
            self._maybe_done(hook)

    def child_exited(self, pid: int, status: int) -> None:
        for hook, _ in list(self._running):
            if hook.pid == pid:
                hook.status = status
                self._maybe_done(hook)

    def _maybe_done(self, hook: Hook) -> None:
        if hook.status is None or hook.fd >= 0:
            return  # wait for both its exit and the end of its output
        for entry in self._running:
            if entry[0] is hook:
                self._running.remove(entry)
                entry[1](hook)
                return

    def close(self) -> None:
        for hook, _ in self._running:
            if hook.fd >= 0:
                self._loop.remove(hook.fd)
            hook.kill()
            hook.close()
        self._running.clear()
