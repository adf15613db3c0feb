"""Injection target: three threads blocked in accept() on a blocking listener.

Prints "MAIN_PORT AUX_PORT" once both listeners are up.  Every connection on
either port gets one HTTP/1.0 answer after the request has been read.  The
aux port is never paused: it shows the process still works.

With "--inheritable": also holds a pipe whose two ends (fds >= 3) are
inheritable, without FD_CLOEXEC, as a server that passes fds to its children
would (Python marks every fd it opens close-on-exec otherwise).
"""

import os
import socket
import sys
import threading

ANSWER = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def serve(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.settimeout(5)
            conn.recv(4096)
            conn.sendall(ANSWER)


main, aux = listener(), listener()
if "--inheritable" in sys.argv[1:]:
    for end in os.pipe():
        os.set_inheritable(end, True)
for _ in range(3):
    threading.Thread(target=serve, args=(main,), daemon=True).start()
threading.Thread(target=serve, args=(aux,), daemon=True).start()
print(main.getsockname()[1], aux.getsockname()[1], flush=True)
threading.Event().wait()
