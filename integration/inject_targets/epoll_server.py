"""Injection target: one thread, a non-blocking epoll loop.

Usage: epoll_server.py FLAGS where FLAGS is "plain", "et" (EPOLLET) or
"exclusive" (EPOLLEXCLUSIVE): how the main listener is registered.  A second
epoll instance also watches the main listener (level-triggered, never
waited on), so that a listener registered in several instances is covered.
Prints "MAIN_PORT AUX_PORT"; answers one HTTP/1.0 response per connection.
"""

import select
import socket
import sys

ANSWER = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
FLAGS = {"plain": 0, "et": select.EPOLLET, "exclusive": select.EPOLLEXCLUSIVE}[sys.argv[1]]


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    s.setblocking(False)
    return s


def answer(conn: socket.socket) -> None:
    with conn:
        conn.setblocking(True)
        conn.settimeout(5)
        conn.recv(4096)
        conn.sendall(ANSWER)


main, aux = listener(), listener()
ep = select.epoll()
ep.register(main.fileno(), select.EPOLLIN | FLAGS)
ep.register(aux.fileno(), select.EPOLLIN)
spare = select.epoll()
spare.register(main.fileno(), select.EPOLLIN)
print(main.getsockname()[1], aux.getsockname()[1], flush=True)
while True:
    for fd, _ in ep.poll():
        sock = main if fd == main.fileno() else aux
        while True:  # drain: required with EPOLLET
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                break
            answer(conn)
