"""Injection target: binds a fresh socket each time it gets SIGUSR1.

Four idle threads keep it multi-threaded (a filter must reach every thread).
Prints "ready" at start, then "bound PORT" or "bind failed ERRNO" per signal.
"""

import signal
import socket
import threading


def bind_one(sig: int, frame: object) -> None:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        print("bound", s.getsockname()[1], flush=True)
    except OSError as e:
        print("bind failed", e.errno, flush=True)
    finally:
        s.close()


signal.signal(signal.SIGUSR1, bind_one)
for _ in range(4):
    threading.Thread(target=threading.Event().wait, daemon=True).start()
print("ready", flush=True)
while True:
    signal.pause()
