"""Facts about the children an exec in place leaves behind, and how they are reaped.

* ``execve`` keeps the process's children: a pre-fork server's workers
  (gunicorn, node's cluster) stay children of the root pid after the root
  has exec'd a new image.  The new image never forked them and does not
  know their pids; many servers reap only the pids they know (node's libuv
  waits on its own children; gunicorn reaps through its worker table), so
  when hupt retires the old workers they stay zombies under the new image
  for as long as it runs: two per reload, for ever.
* A zombie is reaped only by its parent (or, once the parent dies, by the
  subreaper or init it is reparented to).  hupt is not the parent here, so
  it makes the parent reap: an injected ``wait4(pid, NULL, WNOHANG, NULL)``
  in the root, one per zombie, names exactly that child and no other, so no
  exit status the new image is waiting for is taken from it.
* ``WNOHANG``: a child not yet exited makes ``wait4`` return 0 instead of
  blocking the injected thread; ``ECHILD`` means someone reaped it already
  (the new image did waitpid(-1)): both are fine.
* The injection stops the root for a few hundred microseconds and leaves
  nothing behind: there is no change to undo.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from hupt.errors import InjectionError
from hupt.tracer.abi import SYS, WNOHANG
from hupt.tracer.inject import Tracee


def reap_for(parent: int, children: Iterable[int], *, timeout: float = 5.0) -> list[int]:
    """Make ``parent`` reap these exited children of its; return those reaped."""
    reaped: list[int] = []
    with Tracee.seize(parent, timeout=timeout) as t:
        for child in children:
            try:
                got = t.syscall(SYS.wait4, child, 0, WNOHANG, 0, op=f"wait4({child})")
            except InjectionError as e:
                if e.errno == errno.ECHILD:
                    continue  # reaped already, or not its child
                raise
            if got == child:
                reaped.append(child)
        t.commit()
    return reaped
