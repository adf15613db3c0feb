"""hupt's command line: ``hupt run``, ``hupt reload``, ``hupt stop``, ``hupt attach``,
``hupt status``, ``hupt signal``, ``hupt completion``.  reload, stop, status and
signal name an instance by a PID, by its name (``hupt run --name``) or by
``--pidfile PATH``; ``-v`` goes before or after the command's name.

Errors the user can act on are HuptError subclasses and come out as one line
on stderr with a non-zero exit status; a traceback is always a bug.
Exit statuses (EXIT_HELP, also in the README): 0 success, 1 the operation
failed (e.g. a reload that did not produce a serving generation), 2 bad usage,
nothing to talk to, or a path or peer refused as unsafe, 3 no outcome within
``hupt reload --timeout`` (the reload may still be going on); ``hupt run``
exits with the server's status.

The shell completions (hupt/completion.py) and the man page (hupt/manpage.py,
docs/hupt.1) are generated from this parser: regenerate docs/hupt.1 after
changing a help text (tests/test_manpage.py says so).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hupt import fdlimit, log
from hupt.errors import ControlTimeout, HuptError, NotUnderHupt, Refused, UsageError

if TYPE_CHECKING:
    from hupt.output import Output
    from hupt.system import Server

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

EXIT_HELP = """\
exit status:
  0    success (hupt run: the server's own status, 128+N if signal N ended it)
  1    the operation failed: a reload that did not produce a serving
       generation (the old one keeps serving), a stop hupt did not finish,
       a signal with no generation to send it to
  2    bad usage; PID not under a hupt of this user, or no instance with
       that NAME; hupt run --name with a name in use; an unsafe runtime
       directory, pidfile or control socket refused (nothing was started)
  3    hupt reload --timeout expired: no outcome yet, the reload may still be
       going on (see hupt status)
  130  interrupted (Ctrl-C)
"""

DESCRIPTION = """\
Zero-downtime restarts for unmodified Linux servers.

hupt runs a server and, on reload, starts a new generation of the same
command; when it bind()s an address the old generation holds, it gets the
same listening socket, so no connection is refused or reset. The old
generation stops accepting, finishes its in-flight connections and exits.
"""

RELOAD_EPILOG = """\
changing the command (for this generation and every later one):
  hupt reload web --env LOG_LEVEL=debug --unset-env OLD_FLAG
  hupt reload web -- ./server --workers 8      # a new argv, after --
The change is kept only if the reload succeeds: a new command that fails
leaves the old generation serving and the command as it was.
"""

RUN_EPILOG = """\
examples:
  hupt run -- python3 -m http.server 8000
  kill -HUP <hupt pid>          # reload (or: hupt reload <pid>)

signals to hupt: HUP reload; TERM/INT stop gracefully (a second INT stops at
once); USR2 end every drain now. USR1, QUIT, WINCH, ALRM, IO, PWR, STKFLT and
the real-time signals are forwarded to the serving generation's main process
(each copy's with --multi), as if sent to the server's own PID: `kill -USR1`
reopens its logs (`hupt signal` does it by name, and says who got it).
Job-control signals (TSTP, TTIN, TTOU, CONT) and those the kernel raises for
hupt's own doing (PIPE, SEGV, XCPU...) are not forwarded.

output: the server's stdout and stderr go where hupt's go; when those are not
a terminal, each line is prefixed with its generation ('[gen 3] ') and hupt
keeps the last lines of each generation's stderr for `hupt reload` to show
when one fails (see --prefix-output). A small output keeper process holds the
pipes, so that a server outlives a killed hupt without blocking on its output.
"""


class _Parser(argparse.ArgumentParser):
    """hupt's parsers, each with the options every command takes, before or after its
    name (hupt -v run, hupt run -v).  After the command their default is SUPPRESS,
    so that a command's parser does not overwrite what was given before it.  Added
    here rather than from a parent parser: each ArgumentParser built costs
    `hupt run` a little more before its server's exec."""

    def __init__(self, *args: Any, global_default: object = argparse.SUPPRESS,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", default=global_default,
                          help="log every bind/listen handled")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return v


def _signal(text: str) -> int:
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        if text.isdigit() and 0 < int(text) < signal.NSIG:
            return int(text)
        raise argparse.ArgumentTypeError(f"unknown signal: {text!r}") from None


def _policy(text: str) -> object:
    from hupt.readiness import parse_policy

    try:
        return parse_policy(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _millis(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of milliseconds: {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 64:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 64: {text!r}")
    return int(text)


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"not a PID: {text!r}")
    return int(text)


def _name(text: str) -> str:
    from hupt.control import check_name

    try:
        return check_name(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _env_setting(text: str) -> tuple[str, str]:
    from hupt.command import env_pair

    try:
        return env_pair(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _env_key(text: str) -> str:
    from hupt.command import check_key

    try:
        return check_key(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _target(text: str) -> int | str:
    """A PID (all digits) or an instance's name (hupt run --name)."""
    return _pid(text) if text.isdigit() else _name(text)


class _Version(argparse.Action):
    """--version, looked up only when asked (package metadata costs an import)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from hupt.control import version

        print(f"hupt {version()}")
        parser.exit()


TARGET_HELP = ("hupt's PID, the PID of any process of the server, or the instance's name "
               "(hupt run --name)")


def _add_target(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    p.add_argument("target", type=_target, metavar="PID|NAME", nargs="?",
                   help=TARGET_HELP + (" (default: every instance of this user)"
                                       if optional else ""))
    p.add_argument("--pidfile", metavar="PATH",
                   help="instead of PID: the PID in this file (hupt run --pidfile, or the "
                        "server's own pidfile)")


# Each command's options, built only for the command being run: a control
# command (hupt status, hupt reload) does not pay for the others' (issue 14).
COMMANDS = {
    "run": "run a server under hupt",
    "reload": "reload a server and wait for the outcome",
    "stop": "stop a server gracefully and wait",
    "attach": "take over a running server, without restarting it",
    "status": "show generations, listeners and recent reloads",
    "signal": "send a signal to the server's processes",
    "completion": "print a shell completion script (bash, zsh)",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """hupt's parser; with ``only``, that command alone is defined (0.4 ms of the
    start of `hupt run`, the other commands' parsers even without their options)."""
    p = _Parser(prog="hupt", description=DESCRIPTION, epilog=EXIT_HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                global_default=False)
    p.add_argument("--version", action=_Version, help="print hupt's version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    builders = {"run": _run_parser, "reload": _reload_parser, "stop": _stop_parser,
                "attach": _add_attach_parser, "status": _status_parser,
                "signal": _add_signal_parser, "completion": _add_completion_parser}
    for name, help in COMMANDS.items():
        if only is None or only == name:
            builders[name](sub, help)
    return p


def _run_parser(sub: argparse._SubParsersAction[_Parser], help: str) -> None:
    run = sub.add_parser(
        "run", help=help, description=(
            "Run CMD as generation 1 and supervise it; hupt's own PID stays the same across "
            "reloads, so systemd or supervisord can watch it."),
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_timeouts(
        run,
        ready="a new generation must be ready (see --ready) within S seconds, or the reload "
              "fails and the old one keeps serving (default: 30)",
        drain="longest an old generation may take to finish its in-flight connections "
              "before it is stopped anyway (default: 60)",
        stop="signal that asks a drained generation to exit (default: TERM)")
    _add_drain_signal(run, "the server's own graceful-stop signal (nginx QUIT, gunicorn "
                           "and uvicorn TERM, Go http.Server.Shutdown TERM...), sent to a "
                           "generation as soon as it stops accepting (after a reload, at a "
                           "stop), so it closes its keep-alive connections itself; "
                           "--drain-timeout, --stop-signal and --kill-timeout still apply. "
                           "With --exec the server's exit becomes the exec: the same PID "
                           "runs the new code as soon as the old one has finished")
    run.add_argument("--exec", dest="exec_mode", action="store_true",
                     help="exec mode: a reload keeps the server's PID (it stops accepting, "
                          "drains, and execs its program again in place)")
    # default None, not "listen": argparse would parse the default string through
    # _policy at every `hupt run`, importing the readiness module before the exec.
    run.add_argument("--ready", type=_policy, default=None, metavar="POLICY",
                     help="when a new generation counts as ready: 'listen' (it listened on "
                          "every held address; default), 'delay:S' (and S more seconds), "
                          "'notify' (and it sent READY=1 to $NOTIFY_SOCKET), 'http:PATH' or "
                          "'http://HOST:PORT/PATH' (and a GET answered 2xx/3xx; otherwise the "
                          "old generation is rolled back in)")
    run.add_argument("--revive", action="store_true",
                     help="restart a generation that exits on its own (exponential backoff, "
                          "0.5 s to 30 s); its sockets stay held so clients queue meanwhile. "
                          "With --multi, a copy that exits is started again alone")
    _add_close_idle(run, "while an old generation drains, close its keep-alive connections "
                         "idle for MS milliseconds (see README: the race with a client's "
                         "next request)")
    run.add_argument("--multi", type=_count, default=1, metavar="N",
                     help="run N copies of each generation, all accepting on the same held "
                          "sockets (one accept queue, not SO_REUSEPORT); a reload replaces "
                          "all N; a copy that exits on its own is replaced with --revive "
                          "(default: 1)")
    run.add_argument("--chdir", metavar="DIR",
                     help="start every generation in DIR, entered afresh by this path each "
                          "time (a symlink swapped by a deploy is followed; relative "
                          "programs are looked up there too)")
    run.add_argument("--env-file", metavar="PATH",
                     help="add the KEY=VALUE lines of PATH to the servers' environment; "
                          "read again at every reload (a missing or malformed file fails "
                          "the reload, nothing is started)")
    run.add_argument("--pidfile", metavar="PATH", help="write hupt's own PID to PATH")
    run.add_argument("--name", type=_name, metavar="NAME",
                     help="name this instance: `hupt reload NAME`, `hupt status NAME`, "
                          "`hupt stop NAME`; a second hupt run with a name in use refuses "
                          "to start (exit status 2)")
    run.add_argument("--unlink", action="append", default=[], metavar="PATH",
                     help="remove PATH (e.g. the server's pidfile) before each generation "
                          "starts; repeatable")
    run.add_argument("--watch", action="append", default=[], metavar="PATH",
                     help="reload when files under PATH change (development); repeatable")
    run.add_argument("--before-reload", metavar="CMD",
                     help="shell command run before a new generation starts; a non-zero exit "
                          "aborts the reload and its output is the reason reported")
    run.add_argument("--after-reload", metavar="CMD",
                     help="shell command run once a reload succeeded; its failure is "
                          "reported, not fatal")
    _add_metrics(run)
    _add_prefix_output(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                     help="the server command")


def _reload_parser(sub: argparse._SubParsersAction[_Parser], help: str) -> None:
    rl = sub.add_parser(
        "reload", help=help, description=(
            "Reload the server PID belongs to (hupt's PID or any process of the server)\n"
            "and wait: exit 0 once the new generation serves; 1 with the reason if it\n"
            "failed (the old generation keeps serving), after the last lines the failed\n"
            "generation wrote to stderr; 2 if PID is not under a hupt of this user; 3 if\n"
            "--timeout expired first (the reload may still be going on)."),
        usage="hupt reload [-h] [--timeout S] [--wait-old] [--env K=V] [--unset-env K] "
              "(PID|NAME | --pidfile PATH) [-- NEW ARGV...]",
        epilog=RELOAD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_target(rl)
    rl.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                    help="give up waiting after S seconds, exit status 3 (the reload goes "
                         "on)")
    rl.add_argument("--env", type=_env_setting, action="append", default=[], metavar="K=V",
                    help="set K=V in the environment of this and every later generation "
                         "(kept only if the reload succeeds); repeatable")
    rl.add_argument("--unset-env", type=_env_key, action="append", default=[], metavar="K",
                    help="remove K from the environment of this and every later "
                         "generation; repeatable")
    _add_wait_old(rl)


def _stop_parser(sub: argparse._SubParsersAction[_Parser], help: str) -> None:
    st = sub.add_parser(
        "stop", help=help, description=(
            "Stop the hupt instance PID belongs to: every generation stops accepting, "
            "drains, and exits."))
    _add_target(st)
    st.add_argument("--now", action="store_true",
                    help="do not wait for in-flight connections: end every drain at once")


def _status_parser(sub: argparse._SubParsersAction[_Parser], help: str) -> None:
    ss = sub.add_parser(
        "status", help=help, description=(
            "Show every hupt instance of this user (or the one PID belongs to): generations "
            "(number, PIDs, state, age, in-flight connections), listeners (accept queue, "
            "backlog) and the last reloads. --json prints the documented schema-1 document."))
    _add_target(ss, optional=True)
    ss.add_argument("--json", action="store_true", help="machine-readable output")


def command_of(args: Sequence[str]) -> str | None:
    """The command named in ``args`` (its first word that is not an option), if any."""
    for a in args:
        if a == "--":
            return None
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def _help_before(command: str | None, args: list[str]) -> bool:
    """`hupt --help run`: hupt's own help, which lists every command."""
    return command is not None and any(a in ("-h", "--help") for a in args[:args.index(command)])


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        command = command_of(args_list)
        new_argv = None
        if command == "reload" and "--" in args_list:  # hupt reload PID -- NEW ARGV...
            cut = args_list.index("--")
            args_list, new_argv = args_list[:cut], args_list[cut + 1:]
            if not new_argv:
                raise UsageError("hupt reload: nothing after `--`: give the new command "
                                 "(hupt reload PID -- CMD ARGS...)")
        args = build_parser(None if _help_before(command, args_list) else command
                            ).parse_args(args_list)
        args.new_argv = new_argv
        log.configure(verbose=args.verbose)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "reload":
            return cmd_reload(args)
        if args.command == "stop":
            return cmd_stop(args)
        if args.command == "attach":
            return cmd_attach(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "signal":
            return cmd_signal(args)
        if args.command == "completion":
            return cmd_completion(args)
        build_parser().print_help(sys.stderr)
        return EXIT_USAGE
    except (UsageError, NotUnderHupt, Refused) as e:
        _fail(str(e))
        return EXIT_USAGE
    except HuptError as e:
        _fail(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    finally:
        log.flush()  # repeats of the last lines, counted but not written yet


def _fail(msg: str) -> None:
    sys.stderr.write(f"hupt: error: {msg}\n")


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("hupt run: missing the server command (hupt run [OPTIONS] -- CMD ...)")
    if args.multi > 1 and args.exec_mode:
        raise UsageError("hupt run: --multi and --exec do not go together (exec mode keeps "
                         "one process)")
    # Only what generation 1's exec needs is imported before it (hupt/early.py);
    # the supervisor and the Linux System are built while the server starts.
    from hupt.control import ensure_runtime_dir

    chdir, env_file = _deploy_paths(args)
    ensure_runtime_dir()  # an unsafe one is refused before anything starts
    if args.name is not None:
        _name_free(args.name)
    output = _output(args.prefix_output)  # its keeper must not be a child of the subreaper
    try:
        return _run(args, cmd, chdir, env_file, output)
    finally:
        if output is not None:
            output.close()  # the pipes' read ends, and the keeper's hold (it exits then)


def _run(args: argparse.Namespace, cmd: list[str], chdir: str | None, env_file: str | None,
         output: Output | None) -> int:
    from hupt.command import environment, servers_env
    from hupt.early import Early
    from hupt.launch import FirstRun, abandon, start_first
    from hupt.tracer import subreaper

    subreaper.become_subreaper()
    fdlimit.raise_own()  # for control clients; each generation starts with the limit as it was
    named = f" as {args.name!r}" if args.name else ""
    log.info(f"pid {os.getpid()}: starting {' '.join(cmd)}{named}")
    # Generation 1 starts before the supervisor is even imported, which happens
    # while the server starts (hupt/launch.py); the name is taken for good
    # (atomically) with the control socket, before generation 1. Not with
    # --metrics: a refused or taken address must start nothing, and its
    # endpoint is the supervisor's (it opens before generation 1, as before).
    early = first = None
    if args.metrics is None:
        early = Early(exec_mode=args.exec_mode)
        plan = FirstRun(argv=cmd, env=environment(servers_env(), env_file, {}), cwd=chdir,
                        pidfile=args.pidfile, unlink=args.unlink,
                        notify_ready=args.ready is not None and args.ready.kind == "notify")
        first = start_first(early, plan, name=args.name, output=output)
        # Generation 1 has exec'd.  What follows (the supervisor's imports, ~15 ms
        # of CPU) is needed only when its first bind() arrives, which waits in
        # the filter for it: on a CPU it shares with hupt, the server goes first.
        os.sched_yield()
    try:
        from hupt.linux import LinuxSystem
        from hupt.options import Options
        from hupt.readiness import Policy
        from hupt.sdnotify import Notifier
        from hupt.supervisor import Supervisor

        opts = Options(argv=cmd, chdir=chdir, env_file=env_file,
                       ready_timeout=args.ready_timeout, drain_timeout=args.drain_timeout,
                       kill_timeout=args.kill_timeout, stop_signal=args.stop_signal,
                       drain_signal=args.drain_signal, exec_mode=args.exec_mode,
                       ready=args.ready or Policy("listen"), revive=args.revive,
                       pidfile=args.pidfile, unlink=args.unlink, watch=args.watch,
                       before_reload=args.before_reload, after_reload=args.after_reload,
                       close_idle_ms=args.close_idle, multi=args.multi, metrics=args.metrics,
                       metrics_allow_remote=args.metrics_allow_remote)
        system = LinuxSystem(exec_mode=args.exec_mode)
        if early is not None:
            system.adopt_early(early)
        sup = Supervisor(system, opts, notifier=Notifier(), first=first, output=output)
        sup.endpoint.name = args.name
    except BaseException:
        if first is not None:
            abandon(first)
        if early is not None:
            early.close()
        raise
    if output is not None:
        output.release_keeper()  # not before: see hupt/output.py's start_keeper
    return sup.run()


def _deploy_paths(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """--chdir and --env-file as absolute paths (symlinks kept: they are followed
    afresh at every start), checked now: a bad one starts nothing (exit status 2)."""
    from hupt.command import logical_dir, read_env_file

    chdir = env_file = None
    if args.chdir is not None:
        chdir = logical_dir(args.chdir)
        if not os.path.isdir(chdir):
            raise UsageError(f"--chdir {args.chdir}: no such directory")
    if args.env_file is not None:
        env_file = logical_dir(args.env_file)
        try:
            read_env_file(env_file)
        except HuptError as e:
            raise UsageError(str(e)) from None
    return chdir, env_file


def _name_free(name: str) -> None:
    """Refuse a name a live hupt has, before anything starts (a race is caught later)."""
    from hupt import control

    try:
        owner = control.find_named(name)
    except NotUnderHupt:
        return
    raise UsageError(f"the name {name!r} is taken by hupt {owner} (`hupt status {name}`); "
                     f"nothing started")


# After a stop's result, hupt only closes its sockets and removes its pidfile.
EXIT_WAIT = 10.0


def _talk(pid: int, cmd: dict[str, object], timeout: float | None, verb: str,
          *, until_exit: bool = False) -> int:
    from hupt import control

    hupt_pid = control.find_instance(pid)
    # hupt as PID 1 of a PID namespace (a container's entrypoint): its exit ends
    # the namespace, this command included when it runs there, so it is not awaited.
    exited = _exit_watch(hupt_pid) if until_exit and hupt_pid != 1 else None
    try:
        try:
            code = _exchange(hupt_pid, cmd, timeout, verb)
        except OldStillRunning as e:  # hupt reload --wait-old: the reload itself is done
            _fail(f"{verb}: {e} ({timeout:g} s; `hupt status {pid}` shows them)")
            return EXIT_TIMEOUT
        except ControlTimeout:
            _fail(f"{verb}: no outcome within {timeout:g} s; the {verb} may still be going "
                  f"on (`hupt status {pid}` shows it)")
            return EXIT_TIMEOUT
        if code == 0 and exited is not None and not _wait_readable(exited, EXIT_WAIT):
            _fail(f"{verb}: hupt (pid {hupt_pid}) answered but has not exited "
                  f"{EXIT_WAIT:g} s later")
            return EXIT_FAILED
        return code
    finally:
        if exited is not None:
            os.close(exited)


def _exit_watch(pid: int) -> int | None:
    """A pidfd of hupt, taken before asking it anything (so never of a reused PID)."""
    from hupt.system import watch_exit

    try:
        return watch_exit(pid)
    except HuptError:
        return None  # gone already, or not ours to watch: nothing to wait for


def _wait_readable(fd: int, timeout: float) -> bool:
    """A pidfd is readable once its process has exited."""
    import select

    return bool(select.select([fd], [], [], timeout)[0])


def _exchange(hupt_pid: int, cmd: dict[str, object], timeout: float | None,
              verb: str) -> int:
    start = time.monotonic()
    # On a terminal the timings are dim; no rich: a control round trip should
    # cost little more than starting the interpreter (issue 14).
    dim, plain = ("\x1b[2m", "\x1b[0m") if sys.stderr.isatty() else ("", "")
    served: list[str] = []  # --wait-old: the reload succeeded, the old ones still run
    for msg in _answers(hupt_pid, cmd, timeout, served):
        t = f"{(time.monotonic() - start) * 1000:7.0f} ms"
        if msg.get("event") == "progress":
            if msg.get("served"):
                served.append(str(msg["message"]))
            print(f"{dim}{t}{plain} {msg['message']}", file=sys.stderr, flush=True)
        elif msg.get("event") == "result":
            _print_details(msg)
            if msg.get("ok"):
                print(f"hupt: {verb} done: {msg.get('reason', '')}", file=sys.stderr)
                return 0
            _fail(f"{verb} failed: {_explain(str(msg.get('reason', 'unknown reason')))}")
            return EXIT_FAILED
    return EXIT_FAILED


def _explain(reason: str) -> str:
    if reason == "unknown command 'change'":
        return ("this hupt does not know `hupt reload --env/--unset-env/-- ARGV` (it runs an "
                "older version): nothing was changed or reloaded; restart it with this one")
    return reason


def _answers(hupt_pid: int, cmd: dict[str, object], timeout: float | None,
             served: list[str]) -> Iterator[dict[str, Any]]:
    """control.request's answers; a timeout after the reload succeeded (``served``
    holds what said so: --wait-old) says so (still exit status 3: the outcome asked
    for is not known)."""
    from hupt import control

    try:
        yield from control.request(hupt_pid, cmd, timeout=timeout)
    except ControlTimeout:
        if not served:
            raise
        raise OldStillRunning(f"{served[-1]}; but the old generation(s) had not exited "
                              "within the timeout") from None


class OldStillRunning(ControlTimeout):
    """hupt reload --wait-old --timeout: the reload succeeded, the old generations had
    not all exited in time."""


def _print_details(msg: dict[str, Any]) -> None:
    """What a result says besides its reason: a failed generation's last lines on
    stderr, the old generations' drain figures (--wait-old)."""
    err = msg.get("stderr")
    if isinstance(err, dict):
        lines = [str(x) for x in err.get("lines") or []]
        who = f"generation {err.get('generation')} (pid {err.get('pid')})"
        if lines:
            print(f"hupt: {who} wrote to stderr (last {len(lines)} line(s)):", file=sys.stderr)
            for line in lines:
                print(f"  | {line}", file=sys.stderr)
        else:
            print(f"hupt: {who} wrote nothing to stderr", file=sys.stderr)
    for old in msg.get("old_generations") or []:
        if isinstance(old, dict):
            print(f"hupt: {old.get('summary')}", file=sys.stderr)


def resolve(args: argparse.Namespace, *, required: bool = True) -> int | None:
    """The PID the command is about: PID, NAME (its hupt's PID) or the PID in --pidfile."""
    from hupt import control

    target: int | str | None = args.target
    if target is not None and args.pidfile is not None:
        raise UsageError(f"hupt {args.command}: give PID|NAME or --pidfile, not both")
    if args.pidfile is not None:
        return control.read_pidfile(args.pidfile)
    if isinstance(target, str):
        return control.find_named(target)
    if target is None and required:
        raise UsageError(f"hupt {args.command}: which instance? PID, NAME or --pidfile PATH "
                         f"is required")
    return target


def cmd_reload(args: argparse.Namespace) -> int:
    return _talk(_required(resolve(args)), _reload_request(args), args.timeout, "reload")


def _reload_request(args: argparse.Namespace) -> dict[str, object]:
    """{"cmd": "reload"}, or with --env/--unset-env/-- ARGV a "change" (hupt/command.py)."""
    from hupt import control
    from hupt.command import Change

    new_argv: list[str] | None = getattr(args, "new_argv", None)
    change = Change(new_argv, dict(args.env), list(args.unset_env))
    req: dict[str, object] = {"cmd": "change", **change.wire()} if change else {"cmd": "reload"}
    if args.wait_old:
        req["wait_old"] = True
    size = len(control.encode(req))
    if size > control.MAX_REQUEST:
        raise UsageError(f"hupt reload: the change is too long for one request ({size} "
                         f"bytes, at most {control.MAX_REQUEST}): put the variables in the "
                         f"instance's --env-file")
    return req


def cmd_stop(args: argparse.Namespace) -> int:
    # Done means gone: a script may start another server on the port right after.
    return _talk(_required(resolve(args)), {"cmd": "stop", "now": args.now}, None, "stop",
                 until_exit=True)


def _required(pid: int | None) -> int:
    assert pid is not None  # resolve(required=True) raised otherwise
    return pid


# -- hupt attach ------------------------------------------------------------------

ATTACH_EPILOG = """\
The server keeps its PID and its parent; a reload makes it stop accepting,
finish its connections and exec its program again in place (exec mode).
hupt attach exits when the server exits. `hupt stop PID` stops the server
gracefully (as with hupt run). TERM/INT to hupt attach detach it instead: the
server runs on without hupt, but the filter cannot be removed, so from then on
its bind() and listen() calls fail with ENOSYS. On a terminal hupt attach
explains this and asks before detaching; --yes skips both questions.

A reload execs the command the server was started with, read from
/proc/PID/cmdline. Many servers overwrite that with a title (nginx, redis,
php-fpm, postgres, node's process.title, setproctitle): hupt then refuses to
attach until the command is given after `--`, e.g.
  hupt attach 1234 -- /usr/sbin/nginx -c /etc/nginx/nginx.conf
"""


def _add_attach_parser(sub: argparse._SubParsersAction[_Parser], help: str) -> None:
    at = sub.add_parser(
        "attach", help=help, description=(
            "Take over the server PID (started by a shell, systemd...) and supervise it in "
            "the foreground; from then on `hupt reload PID` reloads it in exec mode."),
        epilog=ATTACH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    at.add_argument("pid", type=_pid, metavar="PID",
                    help="the server's main process (the master of a pre-fork server)")
    at.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                    help="the command that starts the server, for reloads (default: its "
                         "command line, unless the server rewrote it with a title)")
    at.add_argument("--yes", action="store_true",
                    help="do not ask for confirmation, before attaching or before detaching "
                         "(for scripts)")
    at.add_argument("--datagram", type=_datagram_address, action="append", metavar="ADDR",
                    help="also hold the server's datagram socket bound to ADDR "
                         "(udp:HOST:PORT, udp:[V6]:PORT, unixgram:PATH, unixgram:@NAME; "
                         "repeat for each): each new image gets that very socket, with the "
                         "datagrams queued in it. Named, never guessed: an unconnected "
                         "datagram socket may be a client's")
    _add_timeouts(
        at,
        ready="the re-exec'd server must listen on every address within S seconds "
              "(default: 30)",
        drain="longest the server may take to finish its connections before it execs "
              "anyway (default: 60)",
        stop="signal that asks the server to exit (default: TERM)")
    _add_close_idle(at, "while the server drains before its exec (accepting nothing), close "
                        "its keep-alive connections idle for MS milliseconds, so the exec "
                        "need not wait for the drain timeout (see README: the race with a "
                        "client's next request)")
    _add_drain_signal(at, "the server's own graceful-stop signal (nginx QUIT, Go "
                          "http.Server.Shutdown TERM...), sent at a reload once it stops "
                          "accepting: it finishes its requests, closes its keep-alive "
                          "connections and exits, and hupt turns that exit into the exec of "
                          "its program (same PID; its parent never sees an exit)")
    _add_metrics(at)


def _datagram_address(text: str) -> object:
    from hupt.address import parse_datagram_address

    try:
        return parse_datagram_address(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _metrics_address(text: str) -> object:
    from hupt.metrics import parse_address

    try:
        return parse_address(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_metrics(p: argparse.ArgumentParser) -> None:
    """--metrics (hupt/metrics.py), for run and attach."""
    p.add_argument("--metrics", type=_metrics_address, metavar="ADDR",
                   help="serve Prometheus metrics (GET /metrics: reloads by outcome and "
                        "their durations, generations by state, in-flight connections, "
                        "accept queues, uptime, version) from hupt's own loop on ADDR: "
                        "127.0.0.1:PORT, [::1]:PORT, localhost:PORT or unix:PATH")
    p.add_argument("--metrics-allow-remote", action="store_true",
                   help="let --metrics listen on an address other hosts can reach "
                        "(0.0.0.0:PORT, a LAN address); the endpoint has no "
                        "authentication, so it is refused without this")


def _add_drain_signal(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--drain-signal", type=_signal, default=None, metavar="SIG", help=help)


def _add_close_idle(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--close-idle", type=_millis, default=None, metavar="MS", help=help)


def _add_timeouts(p: argparse.ArgumentParser, *, ready: str, drain: str, stop: str) -> None:
    """The supervision options `run` and `attach` share (their help differs)."""
    p.add_argument("--ready-timeout", type=_seconds, default=30.0, metavar="S", help=ready)
    p.add_argument("--drain-timeout", type=_seconds, default=60.0, metavar="S", help=drain)
    p.add_argument("--kill-timeout", type=_seconds, default=10.0, metavar="S",
                   help="grace between the stop signal and SIGKILL (default: 10)")
    p.add_argument("--stop-signal", type=_signal, default=signal.SIGTERM, metavar="SIG",
                   help=stop)


def cmd_attach(args: argparse.Namespace) -> int:
    from hupt import control
    from hupt.linux import LinuxSystem
    from hupt.supervisor import Options, Supervisor
    from hupt.system import AttachRefused, become_subreaper, inspect_server

    pid = args.pid
    given = list(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
    if given and given[0].startswith("-"):
        raise UsageError(f"hupt attach: {given[0]!r}: options go before the PID, the "
                         "server's command after `--` (hupt attach [OPTIONS] PID -- CMD ...)")
    try:
        owner = control.find_instance(pid)
    except NotUnderHupt:
        pass
    else:
        raise AttachRefused(f"PID {pid} is already under hupt (pid {owner})")
    datagrams = frozenset(args.datagram or ())
    server = inspect_server(pid, datagrams)
    env = dict(_env_pair(e) for e in server.env if b"=" in e)
    program: str | None
    if given:
        argv = given
        program = _given_program(argv, env, server.cwd)
    else:
        argv = [os.fsdecode(a) for a in server.argv]
        if not argv or not argv[0]:
            raise AttachRefused(f"PID {pid} has an empty command line: give the command "
                                f"(hupt attach {pid} -- CMD ARGS...)")
        title = rewritten(argv, env, server.cwd)
        if title is not None:
            raise AttachRefused(f"PID {pid}'s command line looks rewritten by the server "
                                f"({title}): a reload would exec that; give the command "
                                f"(hupt attach {pid} -- CMD ARGS...)")
        program = _attach_program(server, argv, env)
    _confirm_attach(server, args.yes, argv)
    # From here until the supervisor's handlers are in place (Supervisor.run
    # unblocks), a stop signal must not kill hupt with the filter installed.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    become_subreaper()  # for the command started afresh if an exec'd image fails
    fdlimit.raise_own()
    opts = Options(argv=argv, env=env, ready_timeout=args.ready_timeout,
                   drain_timeout=args.drain_timeout, kill_timeout=args.kill_timeout,
                   stop_signal=args.stop_signal, drain_signal=args.drain_signal,
                   exec_mode=True, cwd=server.cwd,
                   close_idle_ms=args.close_idle,
                   program=program,
                   detach_on_stop=True, confirm_detach=not args.yes,
                   metrics=args.metrics, metrics_allow_remote=args.metrics_allow_remote)
    sup = Supervisor(LinuxSystem(exec_mode=True, attach_datagrams=datagrams), opts)
    sup.open_metrics()  # a refused --metrics address before the server is touched
    sup.adopt(pid)
    log.info(f"pid {os.getpid()}: supervising pid {pid}; reload with `hupt reload {pid}`")
    return sup.run()


def _env_pair(entry: bytes) -> tuple[str, str]:
    k, _, v = entry.partition(b"=")
    return os.fsdecode(k), os.fsdecode(v)


def _attach_program(server: Server, argv: list[str], env: dict[str, str]) -> str | None:
    """The file to exec: argv[0] as the server's PATH finds it if that is what runs now.

    Otherwise (argv rewritten by the server, a binary reached through another
    name) the executable's own path, /proc/PID/exe.
    """
    from hupt.system import find_program

    try:
        found = find_program(argv[0], env.get("PATH"), server.cwd)
    except HuptError:
        return server.exe
    return None if os.path.realpath(found) == os.path.realpath(server.exe) else server.exe


def rewritten(argv: list[str], env: dict[str, str], cwd: str) -> str | None:
    """Why ``argv`` (from /proc/PID/cmdline) looks like a process title, not a command;
    None if it looks like the command.

    A title is one string with spaces ("nginx: master process ...") or a name no
    exec could run (node's process.title, setproctitle): argv[0] is not an
    executable file, by path or on the server's PATH.
    """
    from hupt.system import find_program

    shown = " ".join(argv)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    if len(argv) == 1 and " " in argv[0]:
        return f"{shown!r} is one string with spaces"
    try:
        find_program(argv[0], env.get("PATH"), cwd)
    except HuptError:
        return f"{argv[0]!r} is not an executable file"
    return None


def _given_program(argv: list[str], env: dict[str, str], cwd: str) -> str:
    """The program an explicit attach command runs: checked now, once."""
    from hupt.system import find_program

    try:
        return find_program(argv[0], env.get("PATH"), cwd)
    except HuptError as e:
        raise UsageError(f"hupt attach: the command given: {e}") from e


def _confirm_attach(server: Server, yes: bool, argv: list[str]) -> None:
    from hupt.supervisor import filtered_calls
    from hupt.system import AttachRefused

    cmd = " ".join(argv)
    others = len(server.processes) - 1
    calls = filtered_calls({lst.address for lst in server.listeners})
    print(f"hupt attach: pid {server.pid} ({cmd})"
          + (f" and {others} child process(es)" if others else "")
          + f", listening on {', '.join(str(lst.address) for lst in server.listeners)}.\n"
          f"hupt will stop it for a few milliseconds to install a seccomp filter that hands "
          f"its {calls} calls to hupt. The filter cannot be removed: if this hupt attach is "
          f"stopped (TERM/INT, after asking), the server runs on without it and every {calls} "
          f"call in it fails (ENOSYS). `hupt stop {server.pid}` stops the server instead.",
          file=sys.stderr)
    if yes:
        return
    if not sys.stdin.isatty():
        raise AttachRefused("not confirmed: stdin is not a terminal (pass --yes)")
    sys.stderr.write("Attach? [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise AttachRefused("not confirmed")
def cmd_status(args: argparse.Namespace) -> int:
    from hupt import status

    doc = status.collect(resolve(args, required=False))
    if args.json:
        status.dump(doc)
    else:
        status.render(doc)
    return 1 if doc.get("unanswered") else 0  # the listing is incomplete


# -- hupt completion --------------------------------------------------------------------------

COMPLETION_EPILOG = """\
install (bash):
  hupt completion bash > /etc/bash_completion.d/hupt
  eval "$(hupt completion bash)"                # or in ~/.bashrc
install (zsh):
  hupt completion zsh > "${fpath[1]}/_hupt"     # then compinit
  source <(hupt completion zsh)                 # or in ~/.zshrc, after compinit
"""


def _add_completion_parser(sub: argparse._SubParsersAction[_Parser], help: str) -> None:
    c = sub.add_parser(
        "completion", help=help, description=(
            "Print a completion script for SHELL, generated from this hupt's own command "
            "line: commands, options, signal names, files, --ready policies, and the "
            "names and PIDs of this user's running instances."),
        epilog=COMPLETION_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("shell", choices=["bash", "zsh"], metavar="SHELL",
                   help="bash or zsh")


def cmd_completion(args: argparse.Namespace) -> int:
    from hupt.completion import script

    sys.stdout.write(script(args.shell))
    return 0


# -- hupt signal, hupt reload --wait-old, hupt run --prefix-output ------------------------------

SIGNAL_EPILOG = """\
The signal goes where a signal sent to the server's own PID would: to the
main process hupt started (each copy's with --multi; a server that
daemonized: every process of its generation), not to every worker. With
--all, to each live generation's: the one starting, the serving one and
those still draining (log reopening reaches the old code too). hupt
forwards the same signals when they are sent to hupt itself (see hupt run
--help); hupt signal also sends those hupt uses (HUP, TERM, INT, USR2...)
and reports which generations and PIDs got it.

examples:
  hupt signal web USR1          # reopen the logs (logrotate's postrotate)
  hupt signal --all web USR1
  hupt signal --pidfile /run/web.pid 10
"""


def _add_signal_parser(sub: argparse._SubParsersAction[_Parser], help: str) -> None:
    sg = sub.add_parser(
        "signal", help=help, description=(
            "Send SIG to the serving generation's main process(es), through hupt's control "
            "socket; say which generation and PIDs got it. Exit 0 once sent, 1 if no "
            "generation serves, 2 if PID|NAME is not a hupt instance of this user or SIG "
            "is not a signal."),
        epilog=SIGNAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_target(sg)
    sg.add_argument("sig", type=_signal, metavar="SIG",
                    help="a signal's name (USR1 or SIGUSR1) or number (10), as --stop-signal "
                         "takes it")
    sg.add_argument("--all", action="store_true",
                    help="every live generation (starting, serving, draining), not only the "
                         "serving one")


def cmd_signal(args: argparse.Namespace) -> int:
    return _talk(_required(resolve(args)), {"cmd": "signal", "signal": args.sig,
                                            "all": args.all}, None, "signal")


def _add_wait_old(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-old", action="store_true",
                   help="once the new generation serves, wait on until the old generation(s) "
                        "it replaced have exited, and print their drain figures (how long, "
                        "what ended it, connections open then, how it exited); a failed "
                        "reload is reported at once, as without it")


def _add_prefix_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-output", action=argparse.BooleanOptionalAction, default=None,
                   help="pass the server's stdout and stderr through hupt, each line "
                        "prefixed with its generation ('[gen 3] '), so that overlapping "
                        "generations' logs can be told apart and `hupt reload` can show "
                        "the last lines a failed generation wrote to stderr; "
                        "--no-prefix-output hands hupt's own stdout and stderr to the "
                        "server as they are (default: prefixed unless a terminal, each "
                        "stream on its own)")


def _output(asked: bool | None) -> Output | None:
    """The generations' output through hupt, with its keeper (hupt/output.py), if any
    stream is prefixed: ``asked`` (--prefix-output or --no-prefix-output), by default
    each of hupt's stdout and stderr that is open and not a terminal."""
    prefix = (_prefixed(1, asked), _prefixed(2, asked))
    if not any(prefix):
        return None
    from hupt.output import Output, start_keeper

    return Output(prefix, keeper=start_keeper())


def _prefixed(fd: int, asked: bool | None) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False  # closed: the server gets it closed too, as without hupt
    return asked if asked is not None else not os.isatty(fd)
