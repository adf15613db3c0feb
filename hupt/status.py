"""``hupt status``: what every hupt instance of this user is doing.

The JSON document (``hupt status --json``) is a stable interface, schema 1.
Fields are only ever added within a schema version.  The listing of every
instance also has ``"unanswered": [{"hupt_pid": 1234, "reason": "..."}]``:
the instances that did not answer within ANSWER_WITHIN seconds::

    {"schema": 1, "version": "0.1.0",
     "instances": [
       {"hupt_pid": 1234, "name": "web", "version": "0.1.0",
        "command": ["python3", "-m", "http.server"],
        "chdir": "/srv/app/current", "env_file": "/etc/app.env",
        "env_changes": {"LOG_LEVEL": "debug", "OLD_FLAG": null},
        "mode": "fork", "state": "running" | "reloading" | "down" | "stopping",
        "uptime_s": 12.5, "tracking": "cgroup /sys/fs/cgroup/hupt.1234",
        "generations": [
          {"number": 3, "pid": 4321, "pids": [4321], "state": "serving",
           "command": ["python3", "-m", "http.server"],
           "age_s": 2.0, "ready_ms": 57.0, "in_flight": 0,
           "draining_s": null, "drain_signal": null, "oldest_connection_s": null,
           "listening": ["127.0.0.1:8000"]}],
        "listeners": [
          {"address": "127.0.0.1:8000", "inode": 99, "queued": 0, "backlog": 1024}],
        "reloads": [
          {"at": 1700000000.0, "duration_ms": 61.0, "ok": true,
           "reason": "generation 3 (pid 4321) is ready in 57 ms", "generation": 3}]}]}

``state`` of a generation is one of starting, serving, failed, draining,
retiring, exited.  ``queued`` is the listener's accept-queue length now
(``queued`` and ``backlog`` are null when the kernel's tables did not say),
``in_flight`` the generation's accepted connections still open (null when
not counted), ``draining_s`` for how long a draining generation has drained
(null unless draining), ``drain_signal`` the --drain-signal it was sent (a
name such as "SIGTERM", or null), ``oldest_connection_s`` how long the
longest-open of a draining generation's connections has been seen open (at
least; null unless draining), ``reloads`` the last 20, oldest first.
The top-level ``version`` is the CLI's; an instance's ``version`` is that of
the hupt running it (they differ after an upgrade until it restarts), its
``name`` the one given with ``hupt run --name`` (or null).  ``tracking`` says
how hupt tells which processes make a generation: ``cgroup PATH`` (a group
per generation below PATH), or ``process tree`` followed by why no cgroup
could be used, in parentheses (a server that daemonizes and rewrites its
title can then be lost); absent from a hupt older than it.

What a deploy changes (hupt/command.py): an instance's ``command`` is the one
the next reload runs (``hupt reload -- ARGV`` changes it once a reload with
it succeeded), a generation's ``command`` the one it was started with;
``chdir`` is ``hupt run --chdir`` (null without), ``env_file`` its
``--env-file`` (null without), ``env_changes`` every variable set (a string)
or unset (null) by ``hupt reload --env/--unset-env`` and kept so far.  A hupt
older than these fields leaves them out.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Any

from hupt import control
from hupt.errors import ControlError, ControlTimeout, Refused

SCHEMA = 1
# How long `hupt status` waits for each instance's answer.
ANSWER_WITHIN = 5.0


def collect(pid: int | None, timeout: float = ANSWER_WITHIN) -> dict[str, Any]:
    """Ask one instance (the hupt of ``pid``) or every instance of this user.

    Every instance: one that does not answer (a hupt stopped with SIGSTOP, or
    stuck) does not hide the others; it is listed under ``unanswered`` with
    the reason.  A socket nobody listens on is a hupt that died: skipped.
    """
    if pid is not None:
        pids = [control.find_instance(pid)]
    else:
        directory = control.existing_runtime_dir()
        if directory is None:
            return {"schema": SCHEMA, "version": control.version(), "instances": [],
                    "unanswered": []}
        control.clean_stale(directory)  # sockets of killed hupts: nobody answers
        # An attached server's pid names a symlink to its hupt's socket: one instance.
        # Only this PID namespace's: another one's PIDs mean nothing here.
        # (A walrus in a comprehension binds in this function: named apart from
        # ``pid``, which it overwrote once, turning a stuck instance into an error.)
        pids = sorted(found for p in glob.glob(os.path.join(directory, "*.sock"))
                      if (found := control.pid_of_socket(os.path.basename(p))) is not None
                      and not os.path.islink(p))
    instances = []
    unanswered = []
    for p in pids:
        try:
            for msg in control.request(p, {"cmd": "status"}, timeout=timeout):
                if msg.get("event") == "result" and isinstance(msg.get("status"), dict):
                    instances.append(msg["status"])
        except (ControlTimeout, Refused) as e:  # Refused: someone else's socket
            if pid is not None:
                raise
            unanswered.append({"hupt_pid": p, "reason": str(e)})
        except ControlError:
            if pid is not None:
                raise
            continue  # a stale socket of an instance that died
    doc: dict[str, Any] = {"schema": SCHEMA, "version": control.version(),
                           "instances": instances}
    if pid is None:
        doc["unanswered"] = unanswered
    return doc


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


# A drain this long (seconds) with connections open is named below the table.
SLOW_DRAIN = 5.0


def _holdups(inst: dict[str, Any]) -> list[str]:
    """What holds each slow drain: its open connections, and what would end it."""
    out = []
    for g in inst["generations"]:
        took, n = g.get("draining_s"), g.get("in_flight")
        if took is None or took < SLOW_DRAIN or n == 0:
            continue
        line = (f"generation {g['number']} has drained for {_age(took)} with "
                f"{'?' if n is None else n} connection(s) still open")
        if g.get("oldest_connection_s") is not None:
            line += f", the oldest for {_age(g['oldest_connection_s'])}"
        if g.get("drain_signal"):
            line += f" after {g['drain_signal']} (--drain-signal)"
        else:
            line += (" (keep-alive clients?): --drain-signal lets the server close them "
                     "itself" + (" and exit into its exec" if inst["mode"] == "exec" else ""))
        out.append(line)
    return out


def _fallback(inst: dict[str, Any]) -> str | None:
    """Said when generations are not tracked by cgroups (absent: an older hupt)."""
    how = inst.get("tracking")
    if not how or how.startswith("cgroup "):
        return None
    return (f"generations tracked by their {how}: a server that daemonizes and rewrites "
            "its title may be lost")


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _named(inst: dict[str, Any]) -> str:
    name = inst.get("name")  # absent from a hupt older than names
    return f" [{name}]" if name else ""


def render(doc: dict[str, Any]) -> None:
    """Tables on a terminal, plain text otherwise."""
    silent = doc.get("unanswered", [])
    for u in silent:
        print(f"hupt: warning: {u['reason']}: not listed (is it stopped? "
              f"`grep State /proc/{u['hupt_pid']}/status`)", file=sys.stderr)
    if not doc["instances"]:
        if not silent:
            print("no hupt instance of this user is running", file=sys.stderr)
        return
    if sys.stdout.isatty():
        _render_tty(doc)
    else:
        _render_plain(doc)


def _deploy(inst: dict[str, Any]) -> list[str]:
    """What a deploy changed (absent from a hupt older than --chdir/--env-file)."""
    out = []
    if inst.get("chdir"):
        out.append(f"chdir {inst['chdir']}")
    if inst.get("env_file"):
        out.append(f"env file {inst['env_file']}")
    changes = inst.get("env_changes") or {}
    if changes:
        out.append("env changed: " + ", ".join(
            f"{k}={v}" if v is not None else f"unset {k}" for k, v in changes.items()))
    return out


def _other_command(inst: dict[str, Any], g: dict[str, Any]) -> str | None:
    """A generation's command when it is not the instance's (started before a change)."""
    cmd = g.get("command")
    return " ".join(cmd) if cmd and cmd != inst["command"] else None


def _render_plain(doc: dict[str, Any]) -> None:
    for inst in doc["instances"]:
        print(f"hupt {inst['hupt_pid']}{_named(inst)} ({inst['mode']}, {inst['state']}, up "
              f"{_age(inst['uptime_s'])}): {' '.join(inst['command'])}")
        for line in _deploy(inst):
            print(f"  {line}")
        if fallback := _fallback(inst):
            print(f"  {fallback}")
        for g in inst["generations"]:
            fl = "-" if g["in_flight"] is None else g["in_flight"]
            took = g.get("draining_s")
            drain = f"draining {_age(took)} " if took is not None else ""
            print(f"  generation {g['number']:<3} {g['state']:<9} pid {g['pid']:<7} "
                  f"age {_age(g['age_s']):<8} in flight {fl:<4} {drain}"
                  f"{', '.join(g['listening'])}")
            other = _other_command(inst, g)
            if other:
                print(f"    runs {other}")
        for line in _holdups(inst):
            print(f"  {line}")
        for listener in inst["listeners"]:
            print(f"  listener {listener['address']:<24} queued "
                  f"{_or_dash(listener['queued']):<5} backlog {_or_dash(listener['backlog'])}")
        for r in inst["reloads"][-5:]:
            when = time.strftime("%H:%M:%S", time.localtime(r["at"]))
            print(f"  reload {when} {'ok' if r['ok'] else 'FAILED':<6} "
                  f"{r['duration_ms']:.0f} ms  {r['reason']}")


_STYLE = {"serving": "32", "starting": "36", "draining": "33", "retiring": "33",
          "failed": "31", "exited": "2"}


def _ansi(code: str, text: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if code else text


def _table(headers: list[str], rows: list[list[tuple[str, str]]]) -> list[str]:
    """Aligned columns, headers bold; each cell is (text, ANSI style code)."""
    widths = [max([len(h), *(len(r[i][0]) for r in rows)]) for i, h in enumerate(headers)]
    widths[-1] = 0  # the last column is not padded
    out = []
    for r in [[(h, "1") for h in headers], *rows]:
        out.append("  ".join(_ansi(code, text.ljust(w)) for (text, code), w
                             in zip(r, widths, strict=True)))
    return out


def _render_tty(doc: dict[str, Any]) -> None:
    """Tables for a person at a terminal (without rich: hupt status starts fast)."""
    for inst in doc["instances"]:
        head = f"hupt {inst['hupt_pid']}{_named(inst)}"
        print(f"{_ansi('1', head)} {inst['mode']} mode, {inst['state']}, up "
              f"{_age(inst['uptime_s'])}: "
              f"{_ansi('36', ' '.join(inst['command']))}")
        for line in _deploy(inst):
            print(_ansi("2", line))
        if fallback := _fallback(inst):
            print(_ansi("33", fallback))
        rows = []
        for g in inst["generations"]:
            st = g["state"]
            took = g.get("draining_s")
            listening = ", ".join(g["listening"])
            other = _other_command(inst, g)
            rows.append([(str(g["number"]), ""), (st, _STYLE.get(st, "")), (str(g["pid"]), ""),
                         (str(len(g["pids"])), ""), (_age(g["age_s"]), ""),
                         ("-" if g["in_flight"] is None else str(g["in_flight"]), ""),
                         ("-" if took is None else _age(took), ""),
                         (listening + (f" (runs {other})" if other else ""), "")])
        for line in _table(["gen", "state", "pid", "processes", "age", "in flight",
                            "draining", "listening"], rows):
            print(line)
        for line in _holdups(inst):
            print(_ansi("33", line))
        print("\n".join(_table(["listener", "queued", "backlog"], [
            [(lst["address"], ""), (_or_dash(lst["queued"]), ""), (_or_dash(lst["backlog"]), "")]
            for lst in inst["listeners"]])))
        if inst["reloads"]:
            rows = []
            for r in inst["reloads"][-5:]:
                when = time.strftime("%H:%M:%S", time.localtime(r["at"]))
                outcome = ("ok", "32") if r["ok"] else (f"failed: {r['reason']}", "31")
                rows.append([(when, ""), (f"{r['duration_ms']:.0f} ms", ""), outcome])
            print("\n".join(_table(["reload at", "took", "outcome"], rows)))
        print()


def dump(doc: dict[str, Any]) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
