"""Raw syscalls through libc's syscall(2), with errno turned into hupt.errors.

Python's os module lacks seccomp(), pidfd_getfd(), ioctl with a writable
buffer of our choosing on an arbitrary fd, and prctl().  One ctypes entry
point covers them all; its result is checked here and nowhere else.
"""

from __future__ import annotations

import ctypes
import fcntl
from typing import Any

from hupt.errors import from_errno
from hupt.tracer.abi import SYS


def _load_libc() -> ctypes.CDLL:
    """glibc by its soname; else whatever libc find_library names.  Not find_library
    first: on Linux it runs ``ldconfig -p`` (a process, milliseconds) at every start."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _load_libc()
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# The same function called through PyDLL: the GIL stays held across the call
# (CDLL releases it), as os.fork holds it across fork() (hupt/tracer/clone.py).
_syscall_gil = ctypes.PyDLL(_libc._name, use_errno=True).syscall
_syscall_gil.restype = ctypes.c_long


def syscall(nr: SYS, *args: Any, op: str = "", notify: bool = False) -> int:
    """Call syscall ``nr``; return its non-negative result or raise a KernelError."""
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    res = int(_syscall(ctypes.c_long(int(nr)), *cargs))
    if res == -1:
        err = ctypes.get_errno()
        raise from_errno(err, op or nr.name, notify=notify)
    return res


def syscall_holding_gil(nr: SYS, *args: Any, op: str = "") -> int:
    """``syscall`` without releasing the GIL: for a call that makes a process."""
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    res = int(_syscall_gil(ctypes.c_long(int(nr)), *cargs))
    if res == -1:
        raise from_errno(ctypes.get_errno(), op or nr.name)
    return res


def bind(fd: int, sockaddr: bytes) -> None:
    """bind(2) with a raw ``struct sockaddr`` (as a notification carries it), for
    the families Python's socket.bind cannot spell from bytes."""
    buf = ctypes.create_string_buffer(sockaddr, len(sockaddr))
    syscall(SYS.bind, fd, buf, len(sockaddr), op="bind")


def ioctl_buf(fd: int, request: int, buf: bytearray, *, op: str, notify: bool = False) -> int:
    """ioctl with an in/out buffer (mutated in place)."""
    try:
        return int(fcntl.ioctl(fd, request, buf, True))
    except OSError as e:
        assert e.errno is not None
        raise from_errno(e.errno, op, notify=notify) from e


def ioctl_int(fd: int, request: int, value: int, *, op: str, notify: bool = False) -> int:
    """ioctl whose argument is passed by value (SET_FLAGS); pointers go through ioctl_buf."""
    try:
        return fcntl.ioctl(fd, request, value)
    except OSError as e:
        assert e.errno is not None
        raise from_errno(e.errno, op, notify=notify) from e


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    res = int(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                          ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)))
    if res == -1:
        raise from_errno(ctypes.get_errno(), f"prctl({option})")
    return res
