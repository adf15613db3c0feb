"""Starting a generation, and ``hupt run``'s first one before the supervisor exists.

``start_generation`` is what every fork-mode start does, from the fleet
(reloads, revives) or from ``start_first``: remove the --unlink files, build
the environment (with --ready notify, a NOTIFY_SOCKET of hupt's own), spawn.

``start_first`` (issue 14: ``hupt run`` should add little before the server
runs) starts generation 1 with only what its exec needs imported: the
control socket and the name (so a second instance with the name refuses
before anything runs), the pidfile, then the spawn, through ``Early``
(hupt/early.py), which LinuxSystem adopts later.  It takes a ``FirstRun``,
not the supervisor's Options, and this module has no dataclass: importing
dataclasses alone costs that path ~5 ms.  The supervisor's parts
(hupt/supervisor.py and everything below it) are imported and built
afterwards, while the server starts; a bind() or listen() it makes
meanwhile waits in the notify filter until hupt answers.
With --metrics the supervisor is built first, as before: a refused or taken
metrics address must start nothing, and the endpoint is the supervisor's.
Every signal is blocked from before the spawn until the supervisor's
handlers are in place (``First.mask`` is the mask to restore): a TERM in
that window is a graceful stop, not the death of hupt with a server whose
filter nobody answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import TYPE_CHECKING, NamedTuple

from hupt.command import environment
from hupt.errors import HuptError

if TYPE_CHECKING:
    from typing import Protocol

    from hupt.command import Change
    from hupt.control import ControlServer
    from hupt.options import Options
    from hupt.output import Output
    from hupt.sdnotify import Listener

    # Typing alone (a Protocol class costs its importers 0.2 ms at run time).
    class Spawner(Protocol):
        """What starting a generation needs of the System (hupt/system.py), and all that
        ``Early`` (hupt/early.py) offers before the System exists."""

        def spawn(self, number: int, argv: list[str], env: dict[str, str],
                  cwd: str | None = None, stdio: tuple[int | None, int | None] = (None, None)
                  ) -> tuple[int, int]: ...


# NamedTuples, not dataclasses: this module is on `hupt run`'s path to the
# server's exec, which importing dataclasses (inspect, ast, dis...) slows down.


class Launch(NamedTuple):
    """What a new generation runs: the command as it is now, with a reload's change."""

    argv: list[str]
    env: dict[str, str]  # before hupt's own additions (HUPT_GEN, NOTIFY_SOCKET)
    program: str | None  # the file to execve when argv[0] does not name it (attach)
    cwd: str | None  # where it starts and its program is looked up (None: hupt's)
    chdir: str | None  # --chdir: entered by path at each start, an exec's too


def launch_of(opts: Options, change: Change | None = None) -> Launch:
    """What a generation started now runs: the command, ``change`` applied, the env
    file read again (raises HuptError in one line if it cannot be used)."""
    if opts.chdir is not None and not os.path.isdir(opts.chdir):
        raise HuptError(f"--chdir {opts.chdir}: no such directory")
    argv, program = opts.argv, opts.program
    changes = opts.env_changes
    if change is not None:
        if change.argv is not None:
            argv, program = change.argv, None  # looked up by its own argv[0]
        changes = change.changes(changes)
    env = environment(opts.env, opts.env_file, changes)
    return Launch(list(argv), env, program, opts.chdir or opts.cwd, opts.chdir)


def generation_env(opts: Options | FirstRun, number: int,
                   base: dict[str, str]) -> tuple[dict[str, str], Listener | None]:
    """Generation ``number``'s environment, spawned or exec'd: ``base`` (the
    command's), with --ready notify a NOTIFY_SOCKET of hupt's own."""
    env = dict(base)
    if not _notify_ready(opts):
        return env, None
    from hupt.control import ensure_runtime_dir
    from hupt.sdnotify import Listener

    directory = ensure_runtime_dir()  # checked: never a symlink, never someone else's
    listener = Listener(directory, f"{os.getpid()}.{number}.notify")
    env["NOTIFY_SOCKET"] = listener.path
    return env, listener


def _notify_ready(opts: Options | FirstRun) -> bool:
    return opts.notify_ready if isinstance(opts, FirstRun) else opts.ready.kind == "notify"


def unlink_files(opts: Options | FirstRun) -> None:
    """--unlink: what a generation must not find when it starts (a stale pidfile)."""
    for path in opts.unlink:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class Started(NamedTuple):
    """A generation just spawned: its root, the fd to watch, what it was given."""

    number: int
    pid: int
    fd: int
    env: dict[str, str]
    ready: Listener | None
    launch: Launch


def spawn_process(system: Spawner, number: int, argv: list[str], env: dict[str, str],
                  cwd: str | None, output: Output | None) -> tuple[int, int]:
    """Spawn a process of generation ``number``; with ``output``, its stdout and stderr
    are pipes hupt reads (hupt/output.py)."""
    if output is None:
        return system.spawn(number, argv, env, cwd)
    stdio = output.open(number)
    try:
        return system.spawn(number, argv, env, cwd, stdio)
    finally:  # the process has its copies (or never started): the pipes end with it
        for fd in stdio:
            if fd is not None:
                os.close(fd)


def start_generation(system: Spawner, opts: Options | FirstRun, number: int, la: Launch,
                     output: Output | None = None) -> Started:
    """Spawn generation ``number`` running ``la`` (raises HuptError if it cannot start)."""
    unlink_files(opts)
    env, ready = generation_env(opts, number, la.env)
    argv = [la.program, *la.argv[1:]] if la.program is not None else la.argv
    try:
        pid, fd = spawn_process(system, number, argv, env, la.cwd, output)
    except HuptError:
        if ready is not None:
            ready.close()
        raise
    return Started(number, pid, fd, env, ready, la)


class First(NamedTuple):
    """``hupt run``'s generation 1, started before the supervisor was built."""

    started: Started
    control: ControlServer | None  # listening, its name taken
    pidfile: str | None  # written (removed by whoever stops hupt)
    mask: set[int | signal.Signals]  # the signal mask to restore once handlers are in place


class FirstRun(NamedTuple):
    """What ``start_first`` needs of ``hupt run``'s options: the supervisor's Options
    (a dataclass, with the readiness policies behind it) are built after the exec."""

    argv: list[str]
    env: dict[str, str]  # the command's (servers_env(), the --env-file read)
    cwd: str | None  # --chdir
    pidfile: str | None
    unlink: list[str]
    notify_ready: bool  # --ready notify: a NOTIFY_SOCKET of hupt's own


def start_first(system: Spawner, opts: FirstRun, *, name: str | None = None,
                control: bool = True, output: Output | None = None) -> First:
    """Open the control socket (taking ``name``), write the pidfile, start generation 1.

    Raises HuptError (UsageError: the name is taken) with nothing left behind:
    no socket, no pidfile, no process, the signal mask as it was.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    server = None
    written = False
    try:
        if control:
            from hupt.control import listen_as

            server = listen_as(name)
        if opts.pidfile:
            from hupt.safefs import write_pidfile

            write_pidfile(opts.pidfile, os.getpid())
            written = True
        la = Launch(list(opts.argv), opts.env, None, opts.cwd, opts.cwd)
        started = start_generation(system, opts, 1, la, output)
    except BaseException:
        if written and opts.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(opts.pidfile)
        if server is not None:
            server.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    return First(started, server, opts.pidfile if written else None, mask)


def abandon(first: First) -> None:
    """The supervisor could not be built after all: stop generation 1 (its filter
    would have nobody to answer it) and remove what was made for it."""
    with contextlib.suppress(OSError):
        os.killpg(first.started.pid, signal.SIGKILL)  # its own process group
    with contextlib.suppress(ChildProcessError):
        os.waitpid(first.started.pid, 0)
    if first.pidfile is not None:
        with contextlib.suppress(OSError):
            os.unlink(first.pidfile)
    if first.started.ready is not None:
        first.started.ready.close()
    if first.control is not None:
        first.control.close()
    signal.pthread_sigmask(signal.SIG_SETMASK, first.mask)
