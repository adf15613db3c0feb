"""Facts about child subreapers.

A process marked with PR_SET_CHILD_SUBREAPER receives the orphans of its
descendants instead of init: a server that daemonizes (double fork, setsid)
stays under hupt, which is how a generation keeps every process it made and
how ``hupt reload PID`` finds the hupt of any server process by walking up
the parent chain.  The flag is not inherited by children and survives until
hupt exits; hupt must then reap those orphans itself (waitpid(-1)).
"""

from __future__ import annotations

from hupt.tracer.abi import PR_SET_CHILD_SUBREAPER
from hupt.tracer.libc import prctl


def become_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)
