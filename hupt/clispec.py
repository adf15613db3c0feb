"""The command line as data, read from the argparse definitions (hupt/cli.py).

What the shell completions (hupt/completion.py) and the man page
(hupt/manpage.py) are generated from, so that neither can drift from the
parser: every command, its options (their spellings, whether they take a
value and what kind of value), its positional arguments, and its texts.

argparse has no public API to walk a parser; ``_actions`` and the
subparsers action's ``choices`` are what every generator of this kind reads
(they have been stable since Python 3.2).
"""

from __future__ import annotations

import argparse
import signal
from dataclasses import dataclass, field

# What a value is, for completion: a signal name, a file, an instance (name or PID), a
# process ID, a --ready policy, a --metrics address, a command line, one of ``choices``,
# or free text ("").
SIGNAL, FILE, INSTANCE, PID, POLICY, ADDRESS, COMMAND, CHOICE = (
    "signal", "file", "instance", "pid", "policy", "address", "command", "choice")
_BY_METAVAR = {"SIG": SIGNAL, "PATH": FILE, "POLICY": POLICY, "ADDR": ADDRESS,
               "PID|NAME": INSTANCE, "PID": PID}
POLICIES = ("listen", "delay:", "notify", "http:")
ADDRESS_PREFIXES = ("127.0.0.1:", "[::1]:", "localhost:", "unix:")


def signal_names() -> list[str]:
    """Signal names as hupt takes them (TERM, QUIT...: --stop-signal, --drain-signal)."""
    names = {s.name.removeprefix("SIG") for s in signal.Signals
             if not s.name.startswith("SIG_") and s.name not in ("SIGRTMIN", "SIGRTMAX")}
    return sorted(names)


@dataclass
class Option:
    strings: list[str]  # ["-v", "--verbose"]
    help: str
    metavar: str | None = None  # None: a flag, no value
    kind: str = ""
    choices: list[str] = field(default_factory=list)
    repeatable: bool = False

    @property
    def takes_value(self) -> bool:
        return self.metavar is not None


@dataclass
class Positional:
    name: str  # as shown: PID|NAME, PID, -- CMD ARGS...
    help: str
    kind: str = ""
    choices: list[str] = field(default_factory=list)
    optional: bool = False
    rest: bool = False  # everything that follows (the server's command line)


@dataclass
class Command:
    name: str  # "" for hupt itself
    help: str
    description: str
    epilog: str
    options: list[Option]
    positionals: list[Positional]
    commands: list[Command] = field(default_factory=list)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    return "" if text == argparse.SUPPRESS else " ".join(text.split())


def _kind(action: argparse.Action, metavar: str | None) -> tuple[str, list[str]]:
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return CHOICE, [str(c) for c in action.choices]
    if action.nargs == argparse.REMAINDER:
        return COMMAND, []
    return _BY_METAVAR.get(metavar or "", ""), []


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, str):
        return action.metavar
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper()


def read(parser: argparse.ArgumentParser, name: str = "", help: str = "") -> Command:
    """``parser`` (hupt's, from cli.build_parser()) as a Command tree."""
    options: list[Option] = []
    positionals: list[Positional] = []
    commands: list[Command] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: _help(a) for a in action._choices_actions}
            for sub_name, sub in action.choices.items():
                commands.append(read(sub, sub_name, helps.get(sub_name, "")))
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            metavar = None if action.nargs == 0 else _metavar(action)
            kind, choices = _kind(action, metavar)
            options.append(Option(list(action.option_strings), _help(action), metavar, kind,
                                  choices, isinstance(action, argparse._AppendAction)))
        else:
            kind, choices = _kind(action, _metavar(action))
            positionals.append(Positional(
                _metavar(action), _help(action), kind, choices,
                optional=action.nargs in ("?", "*"), rest=action.nargs == argparse.REMAINDER))
    return Command(name, help, parser.description or "", parser.epilog or "", options,
                   positionals, commands)


def hupt_commands() -> Command:
    from hupt.cli import build_parser

    return read(build_parser(), help="zero-downtime restarts for unmodified Linux servers")
