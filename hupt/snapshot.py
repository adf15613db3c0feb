"""``hupt status``: the supervisor's state as one JSON document (see hupt/status.py
for how the CLI shows it)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from hupt.draining import oldest_connection, signal_name
from hupt.generations import Generation, State
from hupt.system import System
from hupt.upgrade import ReloadRecord

if TYPE_CHECKING:
    from hupt.options import Options

_COUNTED = (State.SERVING, State.DRAINING, State.RETIRING, State.FAILED)


def generation(g: Generation) -> dict[str, Any]:
    return {"number": g.number, "pid": g.pid, "pids": sorted(g.pids), "state": g.state.value,
            "listening": sorted(str(a) for a in g.listened)}


def deploy_fields(opts: Options) -> dict[str, Any]:
    """What a deploy changes (hupt/command.py): --chdir, --env-file, and the
    environment changes kept from hupt reload --env/--unset-env (null: unset)."""
    return {"chdir": opts.chdir, "env_file": opts.env_file,
            "env_changes": dict(opts.env_changes)}


def snapshot(system: System, gens: list[Generation], *, command: list[str], exec_mode: bool,
             state: str, uptime: float, history: list[ReloadRecord]) -> dict[str, Any]:
    now = system.now()
    out = []
    for g in gens:
        if not g.alive:
            continue
        doc = generation(g)
        doc.update({
            "command": list(g.argv),
            "age_s": round(now - g.started_at, 3),
            "ready_ms": (round((g.ready_at - g.started_at) * 1000, 1)
                         if g.ready_at is not None else None),
            "in_flight": system.in_flight(g.pids, g.listened) if g.state in _COUNTED else None,
            # What holds a drain: for how long it has drained, and what it was asked.
            "draining_s": (round(now - g.drain_started_at, 3)
                           if g.state is State.DRAINING and g.drain_started_at is not None
                           else None),
            "drain_signal": (signal_name(g.drain_signal) if g.drain_signal is not None
                             else None),
            "oldest_connection_s": (round(o, 3) if (o := oldest_connection(g, now)) is not None
                                    else None)})
        out.append(doc)
    return {
        "hupt_pid": os.getpid(), "command": command, "mode": "exec" if exec_mode else "fork",
        "state": state, "uptime_s": round(uptime, 3), "tracking": system.tracking(),
        "generations": out, "listeners": system.listener_stats(),
        "reloads": [{"at": r.at, "duration_ms": round(r.duration_ms, 1), "ok": r.ok,
                     "reason": r.reason, "generation": r.generation} for r in history]}
