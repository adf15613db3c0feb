"""hupt.tracer.procfs against real processes: children set something up, print
what they did as one JSON line, and wait; the test reads it back through /proc.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from harness import Procs, python_child

from hupt.errors import KernelError, NoSuchProcess
from hupt.tracer import procfs
from hupt.tracer.abi import EPOLLERR, EPOLLET, EPOLLHUP, EPOLLONESHOT, O_CLOEXEC, O_NONBLOCK

WAIT = 10.0


def reaped_pid() -> int:
    """The pid of a process that existed and has been reaped."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait(WAIT)
    return p.pid


# --- processes and threads ----------------------------------------------------------


def test_tgid_of_threads_and_status() -> None:
    ready = threading.Event()
    done = threading.Event()
    tids: list[int] = []

    def run() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        done.wait(WAIT)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert ready.wait(WAIT)
        tid = tids[0]
        assert tid != os.getpid()
        assert procfs.tgid_of(tid) == os.getpid()
        assert procfs.tgid_of(os.getpid()) == os.getpid()
        assert tid in procfs.threads(os.getpid())
        assert procfs.status_fields(tid)["Pid"] == str(tid)
    finally:
        done.set()
        t.join(WAIT)


def test_parents_threads_and_hostile_comm(procs: Procs) -> None:
    # comm with spaces and parentheses, set on the process and on a second thread.
    c, info = python_child(procs, """
        import threading
        with open("/proc/self/comm", "w") as f:
            f.write("a) (b c")
        ev = threading.Event()
        tids = []
        def run():
            tids.append(threading.get_native_id())
            with open(f"/proc/self/task/{tids[0]}/comm", "w") as f:
                f.write(") x (")
            ev.set()
            hold()
        threading.Thread(target=run, daemon=True).start()
        ev.wait()
        report({"tid": tids[0]})
        hold()
    """)
    me = os.getpid()
    assert procfs.ppid_of(c.pid) == me
    parents = procfs.parent_map()
    assert parents[c.pid] == me
    assert parents[me] == os.getppid()
    assert info["tid"] not in parents  # threads are not processes
    assert procfs.threads(c.pid) == sorted([c.pid, info["tid"]])
    assert procfs.tgid_of(info["tid"]) == c.pid
    assert procfs.ppid_of(info["tid"]) == me
    assert procfs.status_fields(c.pid)["Name"] == "a) (b c"


def test_parent_map_survives_churn() -> None:
    # Processes exiting while the map is built must be skipped, not raise.
    kids: list[subprocess.Popen[bytes]] = []
    deadline = time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline and len(kids) < 40:
            kids.append(subprocess.Popen(["true"]))
            parents = procfs.parent_map()
            assert parents[os.getpid()] == os.getppid()
    finally:
        for k in kids:
            k.wait(WAIT)


def test_tracer_pid_and_seccomp_filters(procs: Procs) -> None:
    plain, _ = python_child(procs, "report({}); hold()")
    assert procfs.tracer_pid(plain.pid) == 0
    assert procfs.seccomp_filters(plain.pid) == 0

    traced, _ = python_child(procs, """
        import ctypes
        PTRACE_TRACEME = 0
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.ptrace(PTRACE_TRACEME, 0, None, None) == 0
        report({})
        hold()
    """)
    assert procfs.tracer_pid(traced.pid) == os.getpid()

    filtered, _ = python_child(procs, """
        import ctypes
        from hupt.tracer import bpf, libc
        from hupt.tracer.abi import SOCK_FPROG, SYS, Ret, SeccompOp
        prog = ctypes.create_string_buffer(bpf.pack([bpf.ret(Ret.ALLOW)]))
        fprog = ctypes.create_string_buffer(SOCK_FPROG.pack(1, ctypes.addressof(prog)))
        libc.syscall(SYS.seccomp, SeccompOp.SET_MODE_FILTER, 0, fprog)
        report({})
        hold()
    """)
    assert procfs.seccomp_filters(filtered.pid) == 1
    # A traced child stops on SIGTERM instead of dying: kill it outright.
    traced.signal(signal.SIGKILL)
    traced.popen.wait(WAIT)


def test_environ_cmdline_cwd_exe(procs: Procs, tmp_path: Any) -> None:
    c, _ = python_child(procs, "report({}); hold()", env={"HUPT_PROCFS_TEST": "x=y z"},
                        cwd=tmp_path)
    env = procfs.environ(c.pid)
    assert b"HUPT_PROCFS_TEST=x=y z" in env
    argv = procfs.cmdline(c.pid)
    assert argv[0] == os.fsencode(sys.executable)
    assert argv[1] == b"-c"
    assert procfs.cwd(c.pid) == str(tmp_path)
    assert procfs.exe(c.pid) == os.path.realpath(sys.executable)


# --- file descriptors ---------------------------------------------------------------


def test_fd_flags_and_socket_inodes(procs: Procs) -> None:
    c, info = python_child(procs, """
        import socket
        a = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        b = socket.socket()
        os.set_inheritable(b.fileno(), True)  # clears FD_CLOEXEC
        r, w = os.pipe()
        report({"a": a.fileno(), "b": b.fileno(), "pipe": r,
                "ino": {a.fileno(): os.fstat(a.fileno()).st_ino,
                        b.fileno(): os.fstat(b.fileno()).st_ino}})
        hold()
    """)
    fa, fb = procfs.fd_flags(c.pid, info["a"]), procfs.fd_flags(c.pid, info["b"])
    assert fa & O_NONBLOCK and fa & O_CLOEXEC
    assert not fb & O_NONBLOCK and not fb & O_CLOEXEC
    socks = procfs.socket_inodes(c.pid)
    assert socks == {int(fd): ino for fd, ino in info["ino"].items()}
    assert info["pipe"] not in socks

    # A closed fd of a live process is "no such fd", not "no such process".
    with pytest.raises(KernelError) as e:
        procfs.fd_flags(c.pid, 999)
    assert e.value.errno == errno.ENOENT
    assert not isinstance(e.value, NoSuchProcess)


def test_epoll_registrations(procs: Procs) -> None:
    c, info = python_child(procs, """
        import ctypes, select, socket, struct
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        r, w = os.pipe()
        ep = select.epoll()
        ep.register(lst.fileno(), select.EPOLLIN | select.EPOLLET)
        ep.register(r, select.EPOLLIN | select.EPOLLONESHOT)
        # select.epoll always stores the fd as data: register one with a chosen
        # 64-bit data value through epoll_ctl itself.
        ep2 = select.epoll()
        libc = ctypes.CDLL(None, use_errno=True)
        ev = ctypes.create_string_buffer(struct.pack("<IQ", select.EPOLLIN, 0xDEADBEEFCAFE1234))
        EPOLL_CTL_ADD = 1
        assert libc.epoll_ctl(ep2.fileno(), EPOLL_CTL_ADD, lst.fileno(), ev) == 0
        report({"ep": ep.fileno(), "ep2": ep2.fileno(), "lst": lst.fileno(), "r": r,
                "lst_ino": os.fstat(lst.fileno()).st_ino, "r_ino": os.fstat(r).st_ino})
        hold()
    """)
    assert procfs.epoll_fds(c.pid) == sorted([info["ep"], info["ep2"]])
    regs = {e.tfd: e for e in procfs.epoll_registrations(c.pid, info["ep"])}
    assert set(regs) == {info["lst"], info["r"]}
    lst, pipe = regs[info["lst"]], regs[info["r"]]
    assert lst.ino == info["lst_ino"] and pipe.ino == info["r_ino"]
    assert lst.events & EPOLLET and not lst.events & EPOLLONESHOT
    assert pipe.events & EPOLLONESHOT and not pipe.events & EPOLLET
    assert lst.events & (EPOLLERR | EPOLLHUP) == EPOLLERR | EPOLLHUP
    # CPython fills only data.fd (the low half of the union).
    assert lst.data & 0xFFFFFFFF == info["lst"]
    (custom,) = procfs.epoll_registrations(c.pid, info["ep2"])
    assert (custom.tfd, custom.data, custom.ino) == (info["lst"], 0xDEADBEEFCAFE1234,
                                                    info["lst_ino"])
    assert procfs.epoll_registrations(c.pid, info["lst"]) == []  # not an epoll fd


# --- memory -------------------------------------------------------------------------

MEMORY_CHILD = """
import ctypes, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS = 1, 2, 0x02, 0x20
buf = ctypes.create_string_buffer(b"hello world\\0tail", 64)
tids = []
ev = threading.Event()
def run():
    tids.append(threading.get_native_id())
    ev.set()
    hold()
threading.Thread(target=run, daemon=True).start()
ev.wait()
# A read-only page: /proc/PID/mem writes it anyway.
ro = libc.mmap(None, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
# Two pages, the second unmapped (last, so no later mapping fills the hole): a
# string that ends right before the hole.
edge = libc.mmap(None, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
ctypes.memmove(edge + 4092, b"abc\\0", 4)
assert libc.munmap(edge + 4096, 4096) == 0
report({"buf": ctypes.addressof(buf), "edge": edge, "ro": ro, "tid": tids[0]})
hold()
"""


def test_memory_read_write(procs: Procs) -> None:
    c, info = python_child(procs, MEMORY_CHILD)
    buf = info["buf"]
    with procfs.Memory(c.pid) as mem:
        assert mem.read(buf, 11) == b"hello world"
        assert mem.read_cstring(buf, 100) == b"hello world"
        assert mem.read_cstring(buf, 5) == b"hello"  # cut at the limit
        assert mem.read_cstring(buf + 12, 100) == b"tail"
        mem.write(buf, b"HELLO")
        assert mem.read(buf, 11) == b"HELLO world"
        with mem.patched(buf + 6, b"WORLD") as old:
            assert old == b"world"
            assert mem.read(buf, 11) == b"HELLO WORLD"
        assert mem.read(buf, 11) == b"HELLO world"
        # Ends 4 bytes before an unmapped page: read page by page, no EIO.
        assert mem.read_cstring(info["edge"] + 4092, 4096) == b"abc"
        with pytest.raises(KernelError) as e:
            mem.read(info["edge"] + 4092, 8)
        assert e.value.errno == errno.EIO
        mem.write(info["ro"], b"forced")
        assert mem.read(info["ro"], 6) == b"forced"
    # Through a thread id: same address space.
    with procfs.Memory(info["tid"]) as mem:
        assert mem.read(buf, 11) == b"HELLO world"


def test_memory_of_dead_process(procs: Procs) -> None:
    c, info = python_child(procs, MEMORY_CHILD)
    mem = procfs.Memory(c.pid)
    try:
        c.signal(signal.SIGKILL)
        c.popen.wait(WAIT)
        with pytest.raises(NoSuchProcess):
            mem.read(info["buf"], 4)
        with pytest.raises(NoSuchProcess):
            mem.write(info["buf"], b"x")
    finally:
        mem.close()
    with pytest.raises(NoSuchProcess):
        procfs.Memory(c.pid)


# --- processes that are gone --------------------------------------------------------


@pytest.mark.parametrize("call", [
    procfs.tgid_of, procfs.ppid_of, procfs.threads, procfs.status_fields, procfs.environ,
    procfs.cmdline, procfs.cwd, procfs.exe, procfs.socket_inodes, procfs.epoll_fds,
    lambda pid: procfs.fd_flags(pid, 0), lambda pid: procfs.epoll_registrations(pid, 0),
])
def test_reaped_process_is_no_such_process(call: Any) -> None:
    with pytest.raises(NoSuchProcess):
        call(reaped_pid())


def test_zombie_is_no_such_process() -> None:
    p = subprocess.Popen([sys.executable, "-c", ""])
    try:
        deadline = time.monotonic() + WAIT
        while procfs.status_fields(p.pid)["State"][0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for call in (procfs.cwd, procfs.exe, procfs.environ):
            with pytest.raises(NoSuchProcess):
                call(p.pid)
        with pytest.raises(NoSuchProcess):
            procfs.fd_flags(p.pid, 0)
        assert procfs.socket_inodes(p.pid) == {}
    finally:
        p.wait(WAIT)
