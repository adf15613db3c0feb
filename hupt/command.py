"""What a generation runs, and how a deploy changes it.

Each generation is started from the *command*: an argv and an environment,
in a working directory.  Three things make a deploy change what runs
without restarting hupt:

* ``hupt run --chdir DIR``: every generation starts in DIR, entered afresh
  by its path (the string, symlinks and all), never by the directory hupt
  itself resolved once.  After a symlink swap (``current -> releases/r2``)
  the next generation runs in r2, and a relative program (``./server``) or
  a relative PATH entry is looked up there too.
* ``hupt run --env-file PATH``: KEY=VALUE lines added to the environment,
  read again at every reload (and revive); a file that is missing or
  malformed fails the reload in one line, and nothing is started.
* ``hupt reload --env K=V / --unset-env K / -- ARGV...`` (a ``Change``):
  the command for this reload and every later one, kept only if the reload
  succeeds; a reload that fails leaves the command as it was.

A generation's environment, in order: hupt's own at start (or an attached
server's), then the env file, then every ``--env``/``--unset-env`` kept so
far (the operator's latest word wins over the file).

Imported by ``hupt reload`` too: nothing here but the standard library's
lightest modules.
"""

from __future__ import annotations

import os
import re

from hupt.errors import HuptError, UsageError

# hupt's marker in the environment of every process it starts: "<hupt pid>.<generation>".
GEN_ENV = "HUPT_GEN"
# hupt's own debugging switch (hupt/loop.py): invariant violations raise.
STRICT_ENV = "HUPT_STRICT"


def servers_env() -> dict[str, str]:
    """hupt's environment minus what is hupt's alone: the service manager's
    NOTIFY_SOCKET (hupt answers to systemd; a generation that wrote to it would
    report READY for hupt), and hupt's own debugging switch."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.pop(STRICT_ENV, None)
    return env

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_key(key: str, what: str = "--unset-env") -> str:
    """``key`` if it can name an environment variable (UsageError in one line)."""
    if not _KEY.fullmatch(key):
        raise UsageError(f"{what} {key!r}: not a variable name (letters, digits and '_', "
                         f"not starting with a digit)")
    return key


def env_pair(text: str, what: str = "--env") -> tuple[str, str]:
    """``K=V`` as (K, V); UsageError in one line if it is not one."""
    key, sep, value = text.partition("=")
    if not sep:
        raise UsageError(f"{what} {text!r}: expected KEY=VALUE")
    check_key(key, what)
    if "\0" in value:
        raise UsageError(f"{what} {key}: a value cannot hold a NUL byte")
    return key, value


def read_env_file(path: str) -> dict[str, str]:
    """The variables of an env file (HuptError in one line if it cannot be used).

    One ``KEY=VALUE`` per line; blank lines and lines starting with ``#``
    (after spaces) are ignored, as is an ``export`` before the key.  The
    value is everything after the first ``=``, as is: no quotes removed, no
    expansion (as ``docker run --env-file``).  The error names the line, never
    its value (a secret, often).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise HuptError(f"--env-file {path}: no such file") from None
    except IsADirectoryError:
        raise HuptError(f"--env-file {path}: a directory, not a file") from None
    except OSError as e:
        raise HuptError(f"--env-file {path}: {e.strerror}") from None
    out: dict[str, str] = {}
    for n, raw in enumerate(data.split(b"\n"), 1):
        line = os.fsdecode(raw.removesuffix(b"\r"))
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export ") or stripped.startswith("export\t"):
            stripped = stripped[len("export"):].lstrip()
        key, sep, value = stripped.partition("=")
        if not sep or not _KEY.fullmatch(key):
            shown = key if sep and len(key) <= 40 else ""
            raise HuptError(f"--env-file {path} line {n}: expected KEY=VALUE"
                            + (f" (invalid name {shown!r})" if shown else ""))
        if "\0" in value:
            raise HuptError(f"--env-file {path} line {n}: {key}'s value holds a NUL byte")
        out[key] = value
    return out


def logical_dir(path: str) -> str:
    """``path`` made absolute without resolving a symlink in it.

    A relative path is taken from the shell's idea of the current directory
    ($PWD, as ``pwd -L``) when it names the directory hupt runs in, so
    ``cd /srv/app/current && hupt run --chdir . ...`` follows the symlink
    at every reload; else from the directory itself.
    """
    if os.path.isabs(path):
        return os.path.normpath(path)
    base = os.environ.get("PWD", "")
    try:
        if not os.path.isabs(base) or not os.path.samestat(os.stat(base), os.stat(".")):
            base = os.getcwd()
    except OSError:
        base = os.getcwd()
    return os.path.normpath(os.path.join(base, path))


def environment(base: dict[str, str], env_file: str | None,
                changes: dict[str, str | None]) -> dict[str, str]:
    """A generation's environment: ``base``, then the env file (read now), then
    the changes kept so far (None: unset).  HuptError if the file cannot be used."""
    env = dict(base)
    if env_file is not None:
        env.update(read_env_file(env_file))
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Change:
    """A reload's change to the command: a new argv, variables set and unset.

    On the wire (hupt/control.py's protocol, command ``change``): ``argv``
    (a list of strings, or absent), ``env`` (an object of strings) and
    ``unset_env`` (a list of names).
    """

    def __init__(self, argv: list[str] | None = None, env: dict[str, str] | None = None,
                 unset: list[str] | None = None) -> None:
        self.argv = list(argv) if argv is not None else None
        self.env = dict(env or {})
        self.unset = list(unset or [])
        both = sorted(set(self.env) & set(self.unset))
        if both:
            raise UsageError(f"{both[0]}: both set (--env) and unset (--unset-env)")
        if self.argv is not None and (not self.argv or not self.argv[0]):
            raise UsageError("the new command is empty")
        if self.argv is not None and any("\0" in a for a in self.argv):
            raise UsageError("the new command holds a NUL byte")

    def __bool__(self) -> bool:
        return self.argv is not None or bool(self.env) or bool(self.unset)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Change) and self.wire() == other.wire()

    __hash__ = None  # type: ignore[assignment]

    def wire(self) -> dict[str, object]:
        out: dict[str, object] = {"env": self.env, "unset_env": self.unset}
        if self.argv is not None:
            out["argv"] = self.argv
        return out

    @classmethod
    def from_wire(cls, msg: dict[str, object]) -> Change:
        """The change a control request asks for (UsageError if malformed)."""
        argv, env, unset = msg.get("argv"), msg.get("env", {}), msg.get("unset_env", [])
        if argv is not None and not (isinstance(argv, list)
                                     and all(isinstance(a, str) for a in argv)):
            raise UsageError("malformed change: argv must be a list of strings")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in env.items()):
            raise UsageError("malformed change: env must map names to strings")
        if not isinstance(unset, list) or not all(isinstance(k, str) for k in unset):
            raise UsageError("malformed change: unset_env must be a list of names")
        for k, v in env.items():
            env_pair(f"{k}={v}")
        for k in unset:
            check_key(k)
        return cls(argv, env, unset)

    def changes(self, kept: dict[str, str | None]) -> dict[str, str | None]:
        """The environment changes kept so far, with this one's on top."""
        out = dict(kept)
        for k in self.unset:
            out[k] = None
        out.update(self.env)
        return out

    def describe(self, *, argv: bool = True) -> str:
        parts = []
        if argv and self.argv is not None:
            parts.append(f"command {' '.join(self.argv)}")
        parts += [f"{k}={v}" for k, v in self.env.items()]
        parts += [f"unset {k}" for k in self.unset]
        return ", ".join(parts) or "nothing"

    def __repr__(self) -> str:
        return f"Change({self.describe()})"
