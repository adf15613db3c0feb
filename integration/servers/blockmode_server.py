"""An HTTP/1.1 server whose listener is blocking or not, chosen per start.

    blockmode_server.py HOST:PORT MODEFILE

MODEFILE, read once at start, says how this generation accepts:

nonblock   One thread, an epoll loop (selectors): the listener is made
           O_NONBLOCK before bind() and, once it is readable, accepted from
           until EAGAIN, as event loops do (nginx's multi_accept, Go, libuv).
           Given a blocking listener, that last accept() sleeps, and with it
           every connection the loop serves.
block      An acceptor thread in a bare accept() loop on a blocking listener,
           one thread per connection, as C servers and Java's ServerSocket do.
           Given a non-blocking listener, accept() says EAGAIN and the loop
           spins.

A second word "sick" makes /healthz answer 503 (200 otherwise).  Other routes:
see routes.py.

SIGTERM drains: no more accepting, each connection closed after the answer to
its next request (Connection: close) or once idle for IDLE_CLOSE s, then exit.
At the SIGTERM it prints its listener fd's fcntl(F_GETFL) flags (octal), at exit
"pid P eagain after term: N" to stdout: the accept() calls that
said EAGAIN after the SIGTERM (0 is what a blocking server must see: its
listener, or hupt's stand-in for it, sleeps).
"""

from __future__ import annotations

import fcntl
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from routes import respond

IDLE_CLOSE = 0.5
GIVE_UP = 30.0  # a drain that lasts longer is a bug the test reports

draining = threading.Event()
eagain_after_term = 0
live = 0
lock = threading.Lock()


def answer(head: bytes, sick: bool) -> bytes:
    target = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else "/"
    if target == "/healthz":
        status, body = (503, b"sick\n") if sick else (200, b"healthy\n")
    else:
        status, body = respond(target)
    close = draining.is_set()
    return (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n").encode() + body


# --- nonblock: one epoll loop ------------------------------------------------------------


def serve_nonblock(lst: socket.socket, sick: bool) -> None:
    global eagain_after_term
    sel = selectors.DefaultSelector()
    sel.register(lst, selectors.EVENT_READ, None)
    bufs: dict[socket.socket, bytearray] = {}
    seen: dict[socket.socket, float] = {}
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd)
    sel.register(rfd, selectors.EVENT_READ, "wake")
    listening = True

    def close(c: socket.socket) -> None:
        sel.unregister(c)
        c.close()
        del bufs[c], seen[c]

    deadline = None
    while True:
        if draining.is_set():
            deadline = deadline or time.monotonic() + GIVE_UP
            if listening:
                sel.unregister(lst)
                listening = False
            now = time.monotonic()
            for c in [c for c, t in seen.items() if now - t > IDLE_CLOSE]:
                close(c)
            if not bufs or now > deadline:
                return
        for key, _ in sel.select(0.1):
            if key.data == "wake":
                os.read(rfd, 64)
            elif key.fileobj is lst:
                while True:
                    try:
                        c, _ = lst.accept()  # sleeps here if the listener blocks
                    except BlockingIOError:
                        if draining.is_set():
                            eagain_after_term += 1
                        break
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ, None)
                    bufs[c], seen[c] = bytearray(), time.monotonic()
            else:
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                serve_ready(conn, bufs, seen, sick, close)


def serve_ready(c: socket.socket, bufs: dict[socket.socket, bytearray],
                seen: dict[socket.socket, float], sick: bool,
                close: Callable[[socket.socket], None]) -> None:
    try:
        data = c.recv(65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if not data:
        close(c)
        return
    buf = bufs[c]
    buf += data
    seen[c] = time.monotonic()
    while b"\r\n\r\n" in buf:
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        buf[:] = rest
        try:
            c.setblocking(True)
            c.sendall(answer(head, sick))
            c.setblocking(False)
        except OSError:
            close(c)
            return
        if draining.is_set():
            close(c)
            return


# --- block: an acceptor thread, a thread per connection ------------------------------------


def serve_connection(c: socket.socket, sick: bool) -> None:
    global live
    c.settimeout(IDLE_CLOSE)
    buf = b""
    try:
        while True:
            try:
                data = c.recv(65536)
            except TimeoutError:
                if draining.is_set() and not buf:
                    return
                continue
            if not data:
                return
            buf += data
            while b"\r\n\r\n" in buf:
                head, _, buf = buf.partition(b"\r\n\r\n")
                c.sendall(answer(head, sick))
                if draining.is_set():
                    return
    except OSError:
        return
    finally:
        c.close()
        with lock:
            live -= 1


def accept_forever(lst: socket.socket, sick: bool) -> None:
    global eagain_after_term, live
    while True:
        try:
            c, _ = lst.accept()
        except BlockingIOError:
            if draining.is_set():
                eagain_after_term += 1
            time.sleep(0.001)  # a C server would spin; counted either way
            continue
        if draining.is_set():
            c.close()  # only hupt's stand-in could still hand one out: none expected
            continue
        with lock:
            live += 1
        threading.Thread(target=serve_connection, args=(c, sick), daemon=True).start()


def serve_block(lst: socket.socket, sick: bool) -> None:
    threading.Thread(target=accept_forever, args=(lst, sick), daemon=True).start()
    while not draining.wait(1.0):
        pass
    deadline = time.monotonic() + GIVE_UP
    while time.monotonic() < deadline:
        with lock:
            if live == 0:
                return
        time.sleep(0.05)


def main() -> None:
    host, port = sys.argv[1].rsplit(":", 1)
    with open(sys.argv[2]) as f:
        words = f.read().split()
    mode, sick = words[0], "sick" in words[1:]

    lst = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)

    def on_term(signum: int, frame: FrameType | None) -> None:
        # What its fd holds now: under hupt, the stand-in of a paused listener.
        flags = fcntl.fcntl(lst.fileno(), fcntl.F_GETFL)
        os.write(1, f"pid {os.getpid()} listener flags at term: {flags:o}\n".encode())
        draining.set()

    signal.signal(signal.SIGTERM, on_term)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Before bind(): under hupt, bind() hands over the held socket with this mode.
    lst.setblocking(mode == "block")
    lst.bind((host.strip("[]"), int(port)))
    lst.listen(128)
    print(f"pid {os.getpid()} {mode} on fd {lst.fileno()}", flush=True)
    (serve_block if mode == "block" else serve_nonblock)(lst, sick)
    print(f"pid {os.getpid()} eagain after term: {eagain_after_term}", flush=True)
    os._exit(0)  # the acceptor thread may sleep in accept() for good


if __name__ == "__main__":
    main()
