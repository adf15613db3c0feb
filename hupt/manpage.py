"""hupt(1), generated from the argparse definitions: ``python3 -m hupt.manpage``.

The page is checked in as docs/hupt.1 and shipped in the wheel
(share/man/man1); tests/test_manpage.py fails when it differs from what this
prints, and renders it with groff and man.  Regenerate it after changing a
command, an option or a help text::

    python3 -m hupt.manpage > docs/hupt.1

Everything about commands and options comes from the parser (through
hupt/clispec.py): descriptions, option help, epilogs (examples, signals,
exit statuses).  ENVIRONMENT, FILES and SEE ALSO are written here.
"""

from __future__ import annotations

import re
import sys

from hupt.clispec import Command, Option, Positional, hupt_commands

ENVIRONMENT = [
    ("NOTIFY_SOCKET", "set by systemd: hupt reports READY=1, RELOADING=1, STOPPING=1 and "
                      "STATUS= there (sd_notify); the servers and hooks do not see it."),
    ("XDG_RUNTIME_DIR", "for a user other than root, the runtime directory is "
                        "$XDG_RUNTIME_DIR/hupt (else /tmp/hupt-UID)."),
    ("HUPT_DEBUG", "when set, hupt logs as with -v."),
    ("HUPT_PID, HUPT_GENERATION", "set for --before-reload and --after-reload hooks: "
                                  "hupt's PID and the serving generation's number."),
    ("HUPT_GEN", "set by hupt in every generation's environment (hupt's PID and the "
                 "generation's number): how it tells whose a process is."),
]

FILES = [
    ("/run/hupt/PID.sock", "root's control sockets, one per running hupt (others: "
                           "$XDG_RUNTIME_DIR/hupt or /tmp/hupt-UID, a directory of mode 0700 "
                           "owned by the user)."),
    ("/run/hupt/NAME.name", "an instance's name (hupt run --name): a symbolic link to its "
                            "control socket."),
]

SEE_ALSO = ["systemd.service(5)", "sd_notify(3)", "seccomp_unotify(2)", "ptrace(2)",
            "pidfd_getfd(2)", "sock_diag(7)"]


def escape(text: str) -> str:
    """Roff for running text: backslashes, option hyphens (\\-), `code` in bold."""
    text = text.replace("\\", "\\e")
    text = re.sub(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*|--(?![\w-]))",
                  lambda m: m.group(1).replace("-", "\\-"), text)
    return re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)


def _lines(text: str) -> str:
    """Roff lines: none may start with a control character."""
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def _metavar(name: str) -> str:
    """A metavariable in italics, its punctuation upright: [\\fIARGS\\fR...]."""
    out = re.sub(r"[A-Z][A-Z0-9_]*", lambda m: f"\\fI{m.group(0)}\\fR", name)
    return re.sub(r"(?<![\w\\])--(?![\w-])", r"\\fB\\-\\-\\fR", out)


def _option_synopsis(o: Option) -> str:
    s = f"\\fB{escape(o.strings[-1])}\\fR"
    if o.metavar is not None:
        s += f" {_metavar(o.metavar)}"
    return f"[{s}]" + ("..." if o.repeatable else "")


def _positional_synopsis(p: Positional) -> str:
    s = _metavar(p.name)
    return f"[{s}]" if p.optional else s


def _own(cmd: Command, root: Command) -> list[Option]:
    """The command's options, less the global ones (described once, under OPTIONS)."""
    shared = {s for o in root.options for s in o.strings}
    return [o for o in cmd.options if not set(o.strings) & shared]


def _synopsis(cmd: Command, root: Command) -> str:
    parts = [_option_synopsis(o) for o in _own(cmd, root)]
    parts += [_positional_synopsis(p) for p in cmd.positionals]
    return f".SY \"hupt {cmd.name}\"\n" + "\n".join(parts) + "\n.YS"


def _option_item(o: Option) -> str:
    names = ", ".join(f"\\fB{escape(s)}\\fR" for s in o.strings)
    if o.metavar is not None:
        names += f" {_metavar(o.metavar)}"
    return f".TP\n{names}\n{_lines(escape(o.help))}"


def _epilog(text: str) -> str:
    """An epilog as argparse prints it: prose lines flow, indented lines stay as they are."""
    out: list[str] = []
    prose: list[str] = []
    pre: list[str] = []

    def flush() -> None:
        if prose:
            out.append(".PP\n" + _lines(escape(" ".join(prose))))
            prose.clear()
        if pre:
            body = "\n".join(escape(line.strip()) for line in pre)
            out.append(".PP\n.RS 4\n.nf\n" + _lines(body) + "\n.fi\n.RE")
            pre.clear()

    for line in text.rstrip().split("\n"):
        if not line.strip():
            flush()
        elif line.startswith(" "):
            if prose:
                flush()
            pre.append(line)
        else:
            if pre:
                flush()
            prose.append(line.strip())
    flush()
    return "\n".join(out)


def _exit_statuses(epilog: str) -> str:
    """hupt --help's "exit status:" list as tagged paragraphs."""
    items: list[list[str]] = []
    for line in epilog.split("\n"):
        m = re.match(r"\s+(\d+)\s+(.*)", line)
        if m:
            items.append([m.group(1), m.group(2)])
        elif line.strip() and items:
            items[-1][1] += " " + line.strip()
    return "\n".join(f".TP\n.B {code}\n{_lines(escape(text))}" for code, text in items)


def _tagged(items: list[tuple[str, str]]) -> str:
    return "\n".join(f".TP\n.B {escape(tag)}\n{_lines(escape(text))}" for tag, text in items)


def render(root: Command | None = None) -> str:
    from hupt import __version__

    root = root or hupt_commands()
    out = [
        ".\\\" Generated by `python3 -m hupt.manpage` from hupt's command-line",
        ".\\\" definitions (hupt/cli.py); do not edit: regenerate.",
        ".\\\" No hyphenation and a ragged right margin: options and paths are copied",
        ".\\\" from man pages (groff's man macros read HY and AD).",
        ".nr HY 0",
        ".ds AD l",
        f".TH HUPT 1 \"\" \"hupt {__version__}\" \"User Commands\"",
        ".ad l",
        ".SH NAME",
        f"hupt \\- {escape(root.help)}",
        ".SH SYNOPSIS",
        ".SY hupt",
        " ".join(_option_synopsis(o) for o in root.options if o.strings[-1] != "--version"),
        "\\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGS\\fR]",
        ".YS",
        *[_synopsis(c, root) for c in root.commands],
        ".SY hupt",
        "\\fB\\-\\-version\\fR",
        ".YS",
        ".SH DESCRIPTION",
        _epilog(root.description),
        ".SH OPTIONS",
        ".PP",
        "These go before the command's name or after it (\\fBhupt \\-v run\\fR and "
        "\\fBhupt run \\-v\\fR alike); everything after \\fB\\-\\-\\fR, or after the "
        "server's program name, is the server's own.",
        *[_option_item(o) for o in root.options],
        ".SH COMMANDS",
    ]
    for cmd in root.commands:
        out += [f".SS \"hupt {cmd.name}\"", _epilog(cmd.description)]
        own = _own(cmd, root)
        if own or cmd.positionals:
            out += [*[_option_item(o) for o in own]]
            out += [f".TP\n{_positional_synopsis(p)}\n{_lines(escape(p.help))}"
                    for p in cmd.positionals]
        if cmd.epilog:
            out.append(_epilog(cmd.epilog))
    out += [".SH \"EXIT STATUS\"", _exit_statuses(root.epilog),
            ".SH ENVIRONMENT", _tagged(ENVIRONMENT),
            ".SH FILES", _tagged(FILES),
            ".SH \"SEE ALSO\"",
            ",\n".join(f".BR {ref[:ref.index('(')]} {ref[ref.index('('):]}"
                       for ref in SEE_ALSO)]
    return "\n".join(part for part in out if part) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
