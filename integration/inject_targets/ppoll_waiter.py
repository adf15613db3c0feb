"""Injection target: one thread inside ppoll() with a temporary signal mask.

The thread blocks SIGUSR1 for good, then waits in ppoll() on a listener with
a temporary mask of {SIGUSR2} (the kernel swaps it back on return, which
PTRACE_SETSIGMASK would prevent).  Prints "PORT" when waiting; once a
connection arrives it prints its mask after ppoll returned, as signal numbers.
"""

import ctypes
import signal
import socket
import struct

libc = ctypes.CDLL(None, use_errno=True)
POLLIN = 1
signal.pthread_sigmask(signal.SIG_SETMASK, {signal.SIGUSR1})
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
pollfd = ctypes.create_string_buffer(struct.pack("<ihh", s.fileno(), POLLIN, 0))
temporary = ctypes.c_uint64(1 << (signal.SIGUSR2 - 1))
print(s.getsockname()[1], flush=True)
while True:
    n = libc.ppoll(pollfd, 1, None, ctypes.byref(temporary))
    if n > 0:
        break
mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
print(" ".join(str(int(sig)) for sig in sorted(mask)), flush=True)
s.accept()[0].close()
signal.pause()
