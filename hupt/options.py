"""What ``hupt run`` and ``hupt attach`` were asked to do: one record, read by every part."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from hupt.address import Address
from hupt.command import servers_env as servers_env
from hupt.readiness import Policy


@dataclass
class Options:
    argv: list[str]
    # The servers' starting environment (hupt attach: the attached server's own).
    env: dict[str, str] = field(default_factory=servers_env)
    ready_timeout: float = 30.0
    drain_timeout: float = 60.0
    kill_timeout: float = 10.0
    stop_signal: int = signal.SIGTERM
    # --drain-signal: the server's own graceful stop, sent as a generation starts
    # draining (fork mode only: in exec mode the server would exit, not exec).
    drain_signal: int | None = None
    # Exec mode: a reload makes the server execve its program again in place.
    exec_mode: bool = False
    cwd: str | None = None  # where the command starts and is looked up (None: hupt's)
    program: str | None = None  # the file to execve (None: argv[0], looked up on PATH)
    # --chdir: the directory every generation starts in, entered afresh by this
    # path at each start (exec mode: at each exec too), symlinks and all.
    chdir: str | None = None
    # --env-file: KEY=VALUE lines added to the environment, read at every start.
    env_file: str | None = None
    # hupt reload --env/--unset-env kept so far (None: unset), over env and env_file;
    # ``argv`` (and ``program``) change with hupt reload -- ARGV (hupt/command.py).
    env_changes: dict[str, str | None] = field(default_factory=dict)
    ready: Policy = field(default_factory=lambda: Policy("listen"))
    revive: bool = False
    pidfile: str | None = None
    unlink: list[str] = field(default_factory=list)
    watch: list[str] = field(default_factory=list)
    before_reload: str | None = None
    after_reload: str | None = None
    close_idle_ms: int | None = None
    # --multi: copies of each generation sharing the held sockets (one accept queue).
    multi: int = 1
    # --prefix-output: whether the generations' stdout and stderr go through hupt,
    # each line prefixed with its generation (hupt/output.py); else inherited.
    prefix_output: tuple[bool, bool] = (False, False)
    # hupt attach: TERM/INT detach hupt (the server it did not start runs on)
    # instead of stopping the server; confirm_detach asks on the terminal first.
    detach_on_stop: bool = False
    confirm_detach: bool = False
    # --metrics: where to serve Prometheus metrics (hupt/metrics.py); an address other
    # hosts can reach only with --metrics-allow-remote.
    metrics: Address | None = None
    metrics_allow_remote: bool = False
