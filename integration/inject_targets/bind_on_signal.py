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
# Only the main thread takes SIGUSR1: delivered to an idle thread, the signal
# would leave the main thread asleep in pause(), and the handler, which Python
# runs in the main thread, would never run.  The threads inherit the mask.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
for _ in range(4):
    threading.Thread(target=threading.Event().wait, daemon=True).start()
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
print("ready", flush=True)
while True:
    signal.pause()
