"""Injection target: one thread blocked in accept(), with Python signal handlers.

CPython installs its handlers without SA_RESTART: the blocked accept() must
fail with EINTR for the Python-level handler to run (then PEP 475 retries
the accept).  Prints "PORT" when ready, then "signal N" for each SIGUSR1 or
SIGUSR2 handled and "accepted" for each connection.
"""

import signal
import socket


def handler(sig: int, frame: object) -> None:
    print("signal", sig, flush=True)


signal.signal(signal.SIGUSR1, handler)
signal.signal(signal.SIGUSR2, handler)
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    s.accept()[0].close()
    print("accepted", flush=True)
