"""A stand-in server timing its own syscalls before and during a drain hupt follows.

    python3 bench/traced_syscalls.py PORT OUT UNTRACED_CALLS TRACED_CALLS

It times UNTRACED_CALLS getppid() calls in a Python loop, appends "untraced NS"
(ns per iteration) to OUT, then listens on 127.0.0.1:PORT and waits for
SIGTERM. On SIGTERM it times TRACED_CALLS calls, appends "traced NS" and
exits. Under `hupt run --exec --drain-signal TERM` hupt follows the server
with ptrace syscall-stops from that signal until its exit, which becomes the
exec of the next image (the same command, which starts over): the difference
between the two numbers is what every syscall costs while the server drains
traced. Both loops run under hupt's seccomp filter, so that cost cancels out.
SIGTERM is blocked from the first instruction on, so a reload that comes
early never kills it: sigwait() takes the signal when the server is ready.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time


def ns_per_call(calls: int) -> float:
    f, r = os.getppid, range(calls)
    t = time.perf_counter_ns()
    for _ in r:
        f()
    return (time.perf_counter_ns() - t) / calls


def record(out: str, what: str, ns: float) -> None:
    with open(out, "a") as f:
        f.write(f"{what} {ns:.1f}\n")


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        sys.exit("usage: traced_syscalls.py PORT OUT UNTRACED_CALLS TRACED_CALLS")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    port, out, untraced, traced = int(argv[0]), argv[1], int(argv[2]), int(argv[3])
    record(out, "untraced", ns_per_call(untraced))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    signal.sigwait({signal.SIGTERM})
    record(out, "traced", ns_per_call(traced))


if __name__ == "__main__":
    main(sys.argv[1:])
