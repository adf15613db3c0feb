"""The seccomp filter and notify fd against the real kernel.

Each test forks a child that installs hupt's filter, passes the notify fd up
over a socketpair (SCM_RIGHTS, received with MSG_CMSG_CLOEXEC), then runs a
small body; the test answers its notifications.  Children die with the test
process (PR_SET_PDEATHSIG), every wait is bounded, and each child is killed
by pid and reaped at the end of its test whatever happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import pytest
from harness import fdinfo_flags

from hupt.address import Address, parse_sockaddr
from hupt.errors import KernelError, NotificationGone
from hupt.tracer import bpf
from hupt.tracer.abi import (
    AUDIT_ARCH_X86_64,
    O_CLOEXEC,
    PR_SET_PDEATHSIG,
    SECCOMP_DATA,
    SYS,
    SYS_I386,
    Ret,
    SocketCall,
)
from hupt.tracer.bpf import Insn, ld_abs, ret
from hupt.tracer.libc import prctl
from hupt.tracer.notify import Notification, NotifyFd
from hupt.tracer.seccomp import build_filter, install, install_listener

TIMEOUT = 5.0
BIND_LISTEN = (SYS.bind, SYS.listen)
ALL_GUARDED = (SYS.bind, SYS.listen, SYS.unlink, SYS.unlinkat)
LOCALHOST = "127.0.0.1"
_libc = ctypes.CDLL(None, use_errno=True)

Body = Callable[[socket.socket], None]


# -- the child side -------------------------------------------------------------------


def say(chan: socket.socket, **report: Any) -> None:
    chan.sendall(json.dumps(report).encode() + b"\n")


def wait_go(chan: socket.socket) -> None:
    if chan.recv(1) != b"g":
        raise RuntimeError("parent went away")


def _child(chan: socket.socket, body: Body, notify: Sequence[SYS], install: bool,
           wait_killable: bool, tsync: bool) -> NoReturn:
    code = 70
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if install:
            fd = install_listener(build_filter(notify), wait_killable=wait_killable, tsync=tsync)
            cloexec = bool(os.get_inheritable(fd) is False)
            chan.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
            os.close(fd)
            say(chan, notify_fd_cloexec=cloexec)
        body(chan)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


# -- the parent side ------------------------------------------------------------------


@dataclass
class Child:
    pid: int
    chan: socket.socket
    lines: BinaryIO
    notify: NotifyFd | None
    status: int | None = None

    @property
    def nfd(self) -> NotifyFd:
        assert self.notify is not None
        return self.notify

    def hear(self) -> dict[str, Any]:
        line = self.lines.readline()
        assert line, f"child {self.pid} said nothing more (exit status {self.exit_status()})"
        report: dict[str, Any] = json.loads(line)
        return report

    def go(self) -> None:
        self.chan.sendall(b"g")

    def next(self, timeout: float = TIMEOUT) -> Notification:
        """The next notification, waiting at most ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if poll(self.nfd, left) & select.POLLIN and (n := self.nfd.recv()) is not None:
                return n
        raise AssertionError(f"no notification from child {self.pid} within {timeout}s")

    def exit_status(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                raise AssertionError(f"child {self.pid} did not exit within {timeout}s")
            else:
                time.sleep(0.01)
        return self.status


def poll(nfd: NotifyFd, timeout: float) -> int:
    p = select.poll()
    p.register(nfd.fileno(), select.POLLIN)
    events = p.poll(timeout * 1000)
    return events[0][1] if events else 0


@contextlib.contextmanager
def child(body: Body, notify: Sequence[SYS] = BIND_LISTEN, *, install: bool = True,
          wait_killable: bool = True, tsync: bool = False) -> Iterator[Child]:
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ours.close()
        _child(theirs, body, notify, install, wait_killable, tsync)
    theirs.close()
    c = Child(pid, ours, ours.makefile("rb"), None)
    try:
        ours.settimeout(TIMEOUT)
        if install:
            _, anc, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
            assert anc, "the child sent no notify fd"
            (fd,) = struct.unpack("i", anc[0][2][:4])
            c.notify = NotifyFd(fd)
            assert not os.get_inheritable(fd), "MSG_CMSG_CLOEXEC was not honoured"
            assert c.hear() == {"notify_fd_cloexec": True}
        yield c
    finally:
        if c.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if c.notify is not None:
            c.notify.close()
        c.lines.close()
        ours.close()


def read_memory(tid: int, addr: int, n: int) -> bytes:
    fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, n, addr)
    finally:
        os.close(fd)


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise KeyError(name)


def open_files() -> set[str]:
    """What this process's fds point to (the fd listing /proc/self/fd itself vanishes)."""
    found = set()
    for f in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            found.add(os.readlink(f"/proc/self/fd/{f}"))
    return found


def sockaddr_in(port: int) -> bytes:
    return Address(socket.AF_INET, LOCALHOST, port).sockaddr()


# -- tests ----------------------------------------------------------------------------


def test_unlisted_syscalls_run_and_nothing_is_notified(tmp_path: Path) -> None:
    with socket.create_server((LOCALHOST, 0)) as server:
        port = server.getsockname()[1]

        def body(chan: socket.socket) -> None:
            with socket.create_connection((LOCALHOST, port), timeout=TIMEOUT) as s:
                s.sendall(b"x")
            (tmp_path / "f").write_text("data")
            out = subprocess.run(["/bin/sh", "-c", "echo $$"], capture_output=True, check=True,
                                 timeout=TIMEOUT).stdout
            say(chan, pid=os.getpid(), file=(tmp_path / "f").read_text(),
                sh_pid=int(out), seccomp=status_field(os.getpid(), "Seccomp"),
                filters=status_field(os.getpid(), "Seccomp_filters"))

        with child(body) as c:
            report = c.hear()
            conn, _ = server.accept()
            with conn:
                assert conn.recv(1) == b"x"
            assert report["pid"] == c.pid and report["file"] == "data" and report["sh_pid"] > 0
            assert (report["seccomp"], report["filters"]) == ("2", "1")
            assert c.exit_status() == 0
            assert c.nfd.recv() is None


def test_bind_is_notified_then_continued() -> None:
    def body(chan: socket.socket) -> None:
        s = socket.socket()
        say(chan, fd=s.fileno())
        s.bind((LOCALHOST, 0))
        say(chan, port=s.getsockname()[1])
        s.listen(7)
        say(chan, listening=s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        wait_go(chan)

    with child(body) as c:
        assert c.nfd.enable_sync_wakeup() is True  # 6.6+
        fd = c.hear()["fd"]
        n = c.next()
        assert (n.nr, n.arch, n.pid) == (SYS.bind, AUDIT_ARCH_X86_64, c.pid)
        assert n.args[0] == fd and n.args[2] == 16
        raw = read_memory(n.pid, n.args[1], n.args[2])
        assert parse_sockaddr(raw) == Address(socket.AF_INET, LOCALHOST, 0)
        assert c.nfd.id_valid(n.id)
        c.nfd.send_continue(n.id)
        assert not c.nfd.id_valid(n.id)  # answered: gone
        port = c.hear()["port"]
        assert port > 0
        n = c.next()
        assert (n.nr, n.args[0], n.args[1]) == (SYS.listen, fd, 7)
        c.nfd.send_continue(n.id)
        # The SO_ACCEPTCONN question is notified too (servers that skip listen() on
        # a socket that listens already ask it), and no other getsockopt.
        n = c.next()
        assert (n.nr, n.args[0], n.args[1], n.args[2]) == (SYS.getsockopt, fd, 1, 30)
        c.nfd.send_continue(n.id)
        assert c.hear() == {"listening": 1}
        socket.create_connection((LOCALHOST, port), timeout=TIMEOUT).close()
        c.go()
        assert c.exit_status() == 0


def test_send_result_completes_without_running_the_syscall() -> None:
    def body(chan: socket.socket) -> None:
        s = socket.socket()
        try:
            s.bind((LOCALHOST, 0))
            say(chan, error=None)
        except OSError as e:
            say(chan, error=e.errno)
        s.bind((LOCALHOST, 0))  # answered "0" without running: still unbound
        say(chan, name=s.getsockname())

    with child(body) as c:
        n = c.next()
        c.nfd.send_result(n.id, error=errno.EADDRINUSE)
        assert c.hear() == {"error": errno.EADDRINUSE}
        n = c.next()
        c.nfd.send_result(n.id, 0)
        assert c.hear() == {"name": ["0.0.0.0", 0]}
        assert c.exit_status() == 0
        with pytest.raises(NotificationGone):
            c.nfd.send_continue(n.id)
        with pytest.raises(ValueError):
            c.nfd.send_result(n.id, error=-errno.EPERM)


@pytest.mark.parametrize("cloexec", [True, False])
def test_bind_handoff_installs_our_listening_socket(cloexec: bool) -> None:
    held = socket.create_server((LOCALHOST, 0))
    port = held.getsockname()[1]

    def body(chan: socket.socket) -> None:
        s = socket.socket()
        os.set_inheritable(s.fileno(), not cloexec)
        before = os.fstat(s.fileno()).st_ino
        say(chan, fd=s.fileno(), ino=before)
        s.bind((LOCALHOST, port))
        say(chan, ino=os.fstat(s.fileno()).st_ino, name=s.getsockname(),
            cloexec=not os.get_inheritable(s.fileno()),
            old_gone=f"socket:[{before}]" not in open_files())
        s.listen(4)
        s.settimeout(TIMEOUT)
        conn, peer = s.accept()
        say(chan, peer=peer, data=conn.recv(10).decode())

    with held, child(body) as c:
        first = c.hear()
        n = c.next()
        assert n.nr == SYS.bind and n.args[0] == first["fd"]
        assert parse_sockaddr(read_memory(n.pid, n.args[1], n.args[2])) == Address(
            socket.AF_INET, LOCALHOST, port)
        flags = fdinfo_flags(n.pid, first["fd"])
        assert bool(flags & O_CLOEXEC) == cloexec
        assert c.nfd.id_valid(n.id)
        assert c.nfd.addfd(n.id, held.fileno(), first["fd"], cloexec=bool(flags & O_CLOEXEC)) \
            == first["fd"]
        c.nfd.send_result(n.id, 0)
        after = c.hear()
        assert after["ino"] == os.fstat(held.fileno()).st_ino != first["ino"]
        assert after["name"] == [LOCALHOST, port]
        assert after["cloexec"] is cloexec
        assert after["old_gone"] is True
        n = c.next()
        assert n.nr == SYS.listen
        c.nfd.send_result(n.id, 0)  # ours already listens
        with socket.create_connection((LOCALHOST, port), timeout=TIMEOUT) as client:
            client.sendall(b"hello")
            report = c.hear()
            assert report == {"peer": list(client.getsockname()), "data": "hello"}
        assert c.exit_status() == 0


def _signal_body(restart: bool) -> Body:
    def body(chan: socket.socket) -> None:
        handled = []
        signal.signal(signal.SIGUSR1, lambda *_: handled.append(1))
        signal.siginterrupt(signal.SIGUSR1, not restart)  # False = SA_RESTART
        s = socket.socket()
        addr = sockaddr_in(0)
        # libc's bind, not socket.bind: no retry in Python, the kernel decides
        res = _libc.bind(s.fileno(), addr, len(addr))
        err = ctypes.get_errno() if res < 0 else 0
        for _ in range(3):  # let the Python-level handler run
            time.sleep(0.001)
        say(chan, res=res, errno=err, handled=len(handled))

    return body


def test_signal_withdraws_a_notification_and_sa_restart_renotifies() -> None:
    with child(_signal_body(restart=True), wait_killable=False) as c:
        first = c.next()
        os.kill(c.pid, signal.SIGUSR1)
        second = c.next()
        assert second.id != first.id
        assert (second.nr, second.args) == (first.nr, first.args)
        assert not c.nfd.id_valid(first.id)
        with pytest.raises(NotificationGone):
            c.nfd.send_continue(first.id)
        with pytest.raises(NotificationGone):
            c.nfd.addfd(first.id, c.nfd.fileno(), 100, cloexec=True)
        assert c.nfd.id_valid(second.id)
        c.nfd.send_continue(second.id)
        assert c.hear() == {"res": 0, "errno": 0, "handled": 1}
        assert c.exit_status() == 0


def test_signal_without_sa_restart_fails_the_call_with_eintr() -> None:
    with child(_signal_body(restart=False), wait_killable=False) as c:
        first = c.next()
        os.kill(c.pid, signal.SIGUSR1)
        assert c.hear() == {"res": -1, "errno": errno.EINTR, "handled": 1}
        assert not c.nfd.id_valid(first.id)
        assert c.nfd.recv() is None
        assert c.exit_status() == 0


def test_wait_killable_recv_keeps_a_received_notification_through_signals() -> None:
    sigusr1_bit = 1 << (signal.SIGUSR1 - 1)
    with child(_signal_body(restart=True), wait_killable=True) as c:
        n = c.next()
        os.kill(c.pid, signal.SIGUSR1)
        deadline = time.monotonic() + TIMEOUT
        while not int(status_field(c.pid, "ShdPnd"), 16) & sigusr1_bit:
            assert time.monotonic() < deadline, "SIGUSR1 never became pending"
            time.sleep(0.01)
        assert poll(c.nfd, 0.2) == 0  # not withdrawn, so not re-notified
        assert c.nfd.id_valid(n.id)
        assert int(status_field(c.pid, "ShdPnd"), 16) & sigusr1_bit  # still undelivered
        c.nfd.send_continue(n.id)
        assert c.hear() == {"res": 0, "errno": 0, "handled": 1}
        assert c.exit_status() == 0


def test_pollhup_when_the_last_filtered_task_exits() -> None:
    def body(chan: socket.socket) -> None:
        grandchild = os.fork()
        if grandchild == 0:
            os._exit(0 if chan.recv(1) == b"g" else 1)
        say(chan, grandchild=grandchild)
        _, status = os.waitpid(grandchild, 0)
        say(chan, grandchild_status=status)
        wait_go(chan)

    with child(body) as c:
        c.hear()
        assert poll(c.nfd, 0.1) == 0
        c.go()  # the grandchild exits, the child still uses the filter
        assert c.hear() == {"grandchild_status": 0}
        assert poll(c.nfd, 0.1) == 0
        c.go()
        assert poll(c.nfd, TIMEOUT) & select.POLLHUP
        # measured: POLLHUP shows as the child exits, before anyone reaps it
        assert c.status is None and Path(f"/proc/{c.pid}").exists()
        assert c.nfd.recv() is None
        assert c.exit_status() == 0


def test_closing_the_notify_fd_makes_filtered_calls_fail_enosys() -> None:
    def body(chan: socket.socket) -> None:
        wait_go(chan)
        s = socket.socket()
        try:
            s.bind((LOCALHOST, 0))
            say(chan, bind=0)
        except OSError as e:
            say(chan, bind=e.errno)
        say(chan, getpid=os.getpid())

    with child(body) as c:
        c.nfd.close()
        c.go()
        assert c.hear() == {"bind": errno.ENOSYS}
        assert c.hear() == {"getpid": c.pid}
        assert c.exit_status() == 0


def test_a_second_listener_is_refused_with_ebusy() -> None:
    def body(chan: socket.socket) -> None:
        try:
            os.close(install_listener(build_filter(BIND_LISTEN)))
            say(chan, errno=0)
        except KernelError as e:
            say(chan, errno=e.errno)

    with child(body) as c:
        assert c.hear() == {"errno": errno.EBUSY}
        assert c.exit_status() == 0


def test_tsync_filters_every_thread_and_pid_is_the_tid() -> None:
    def body(chan: socket.socket) -> None:
        go = threading.Event()

        def worker() -> None:
            go.wait(TIMEOUT)
            with socket.socket() as s:
                s.bind((LOCALHOST, 0))
            say(chan, thread=threading.get_native_id())

        t = threading.Thread(target=worker)
        t.start()  # before the filter exists: only TSYNC reaches this thread
        fd = install_listener(build_filter(BIND_LISTEN), tsync=True)
        chan.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        os.close(fd)
        go.set()
        t.join(TIMEOUT)

    with child(body, install=False) as c:
        _, anc, _, _ = c.chan.recvmsg(1, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
        c.notify = NotifyFd(struct.unpack("i", anc[0][2][:4])[0])
        n = c.next()
        assert n.nr == SYS.bind and n.pid != c.pid
        assert Path(f"/proc/{c.pid}/task/{n.pid}").exists()
        assert status_field(n.pid, "Seccomp_filters") == "1"
        c.nfd.send_continue(n.id)
        assert c.hear() == {"thread": n.pid}
        assert c.exit_status() == 0


BAD_PROGRAMS: list[tuple[str, list[Insn]]] = [
    ("load past seccomp_data", [ld_abs(SECCOMP_DATA.size), ret(Ret.ALLOW)]),
    ("unaligned load", [ld_abs(2), ret(Ret.ALLOW)]),
    ("jump past the end", [Insn(bpf.JMP_JEQ_K, 1, 0, 0), ret(Ret.ALLOW)]),
    ("JA past the end", [Insn(bpf.JMP_JA, k=1), ret(Ret.ALLOW)]),
    ("no final RET", [ret(Ret.ALLOW), ld_abs(0)]),
    ("16-bit load", [Insn(bpf.LD | 0x08 | bpf.ABS, k=0), ret(Ret.ALLOW)]),
]


def test_the_kernel_refuses_what_the_checker_refuses() -> None:
    for _, prog in BAD_PROGRAMS:
        with pytest.raises(bpf.InvalidProgram):
            bpf.check(prog, SECCOMP_DATA.size)

    def body(chan: socket.socket) -> None:
        results = {}
        for what, prog in BAD_PROGRAMS:
            try:
                os.close(install_listener(prog))
                results[what] = 0
            except KernelError as e:
                results[what] = e.errno
        # the last load slot and a plain program are accepted: EINVAL above is the checker's
        os.close(install_listener([ld_abs(SECCOMP_DATA.size - 4), ret(Ret.ALLOW)]))
        say(chan, results=results, filters=status_field(os.getpid(), "Seccomp_filters"))

    with child(body, install=False) as c:
        report = c.hear()
        assert report["results"] == {what: errno.EINVAL for what, _ in BAD_PROGRAMS}
        assert report["filters"] == "1"
        assert c.exit_status() == 0


MAP_32BIT = 0x40  # x86_64 mmap flag: pointers an i386 syscall can carry


class I386:
    """Makes i386 syscalls with `int 0x80` from this 64-bit process."""

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, 8192, flags=mmap.MAP_PRIVATE | MAP_32BIT,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.page))
        assert self.base + 8192 <= 1 << 32
        self._call = ctypes.CFUNCTYPE(ctypes.c_int)(self.base)
        self._used = 4096

    def put(self, data: bytes) -> int:
        """Copy ``data`` below 4 GiB; return its address."""
        at = self._used
        self.page[at:at + len(data)] = data
        self._used += (len(data) + 15) & ~15
        return self.base + at

    def __call__(self, nr: int, ebx: int = 0, ecx: int = 0, edx: int = 0) -> int:
        def u32(v: int) -> bytes:
            return (v & 0xFFFFFFFF).to_bytes(4, "little")

        code = (b"\x53"                       # push rbx (callee-saved)
                + b"\xb8" + u32(nr)           # mov eax, nr
                + b"\xbb" + u32(ebx)          # mov ebx, arg0
                + b"\xb9" + u32(ecx)          # mov ecx, arg1
                + b"\xba" + u32(edx)          # mov edx, arg2
                + b"\xcd\x80"                 # int 0x80
                + b"\x5b\xc3")                # pop rbx; ret
        self.page[:len(code)] = code
        return int(self._call())


def test_i386_calls_of_guarded_syscalls_get_enosys(tmp_path: Path) -> None:
    target = tmp_path / "victim"

    def i386_round(i386: I386) -> dict[str, Any]:
        target.write_text("x")
        path = i386.put(bytes(target) + b"\0")
        addr = i386.put(sockaddr_in(0))
        a, b = socket.socket(), socket.socket()
        args = i386.put(struct.pack("<III", b.fileno(), addr, 16))
        out = {
            "getpid": i386(SYS_I386.getpid),
            "bind": i386(SYS_I386.bind, a.fileno(), addr, 16),
            "bound": a.getsockname()[1] != 0,
            "listen": i386(SYS_I386.listen, a.fileno(), 1),
            "listening": _listening(a),
            "socketcall_bind": i386(SYS_I386.socketcall, SocketCall.BIND, args),
            "socketcall_bound": b.getsockname()[1] != 0,
            "unlink": i386(SYS_I386.unlink, path),
            "unlinked": not target.exists(),
        }
        sargs = i386.put(struct.pack("<III", socket.AF_INET, socket.SOCK_STREAM, 0))
        fd = i386(SYS_I386.socketcall, SocketCall.SOCKET, sargs)
        out["socketcall_socket_ok"] = fd >= 0
        if fd >= 0:
            os.close(fd)
        a.close()
        b.close()
        return out

    def body(chan: socket.socket) -> None:
        say(chan, after=i386_round(I386()))
        with socket.socket() as s:  # the x86_64 bind is still notified
            s.bind((LOCALHOST, 0))
        say(chan, x86_64_bind="ok")

    # without a filter: the numbers do what their names say
    before = _run_unfiltered(i386_round)
    assert before == {"getpid": before["getpid"], "bind": 0, "bound": True, "listen": 0,
                      "listening": 1, "socketcall_bind": 0, "socketcall_bound": True,
                      "unlink": 0, "unlinked": True, "socketcall_socket_ok": True}
    with child(body, ALL_GUARDED) as c:
        after = c.hear()["after"]
        assert after == {"getpid": c.pid, "bind": -errno.ENOSYS, "bound": False,
                         "listen": -errno.ENOSYS, "listening": 0,
                         "socketcall_bind": -errno.ENOSYS, "socketcall_bound": False,
                         "unlink": -errno.ENOSYS, "unlinked": False,
                         "socketcall_socket_ok": True}
        n = c.next()
        assert n.nr == SYS.bind and n.arch == AUDIT_ARCH_X86_64
        c.nfd.send_continue(n.id)
        assert c.hear() == {"x86_64_bind": "ok"}
        assert c.exit_status() == 0


def _listening(sock: socket.socket) -> int:
    """1 if ``sock`` listens, asked without getsockopt(SO_ACCEPTCONN) (which the filter
    notifies): accept() on a listening socket with nothing queued says EAGAIN."""
    sock.setblocking(False)
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return 1
    except OSError:
        return 0
    return 1


def _run_unfiltered(fn: Callable[[I386], dict[str, Any]]) -> dict[str, Any]:
    def body(chan: socket.socket) -> None:
        out = fn(I386())
        out["getpid"] = out["getpid"] == os.getpid()
        say(chan, out=out)

    with child(body, install=False) as c:
        out: dict[str, Any] = c.hear()["out"]
        assert c.exit_status() == 0
    assert out["getpid"] is True
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged uid")
def test_unprivileged_install_sets_no_new_privs() -> None:
    def body(chan: socket.socket) -> None:
        before = status_field(os.getpid(), "NoNewPrivs")
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        os.close(install_listener(build_filter(BIND_LISTEN)))
        say(chan, before=before, after=status_field(os.getpid(), "NoNewPrivs"),
            filters=status_field(os.getpid(), "Seccomp_filters"))

    with child(body, install=False) as c:
        assert c.hear() == {"before": "0", "after": "1", "filters": "1"}
        assert c.exit_status() == 0


def test_root_install_leaves_no_new_privs_alone() -> None:
    if os.geteuid() != 0:
        pytest.skip("as non-root no_new_privs is required: covered by the test above")

    def body(chan: socket.socket) -> None:
        say(chan, nnp=status_field(os.getpid(), "NoNewPrivs"))

    with child(body) as c:
        assert c.hear() == {"nnp": "0"}
        assert c.exit_status() == 0


def test_a_filter_without_a_listener_stacks_on_the_notifying_one() -> None:
    # seccomp.install: no notify fd (bench/allow_all.py, the control for the
    # filter's cost).  Filters stack and the strictest action wins, so bind is
    # still notified under a later allow-all.
    def body(chan: socket.socket) -> None:
        install([ret(Ret.ALLOW)])
        say(chan, filters=status_field(os.getpid(), "Seccomp_filters"))
        s = socket.socket()
        s.bind((LOCALHOST, 0))
        say(chan, bound=True)

    with child(body) as c:
        assert c.hear() == {"filters": "2"}
        n = c.next()
        assert n.nr == SYS.bind
        c.nfd.send_continue(n.id)
        assert c.hear() == {"bound": True}
        assert c.exit_status() == 0
