"""Run a command under a one-instruction seccomp filter that allows every syscall.

    python3 bench/allow_all.py CMD [ARGS...]

The benchmark's control for the filter's cost: any filter at all puts every
syscall of the process on the kernel's slow path, so the difference between
this and hupt's filter is what hupt's own filter program costs (the kernel's
action cache answers both without running them).
"""

from __future__ import annotations

import os
import sys

from hupt.tracer import bpf, seccomp
from hupt.tracer.abi import Ret


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: allow_all.py CMD [ARGS...]")
    seccomp.install([bpf.ret(Ret.ALLOW)])
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
