"""The seccomp numbers and layouts in hupt/tracer/abi.py, checked three ways.

1. Against the running kernel: SECCOMP_GET_NOTIF_SIZES (needs no privilege).
2. Against the ioctl encoding rule, recomputed from the struct sizes.
3. Against the installed kernel headers, through the C compiler (the only
   way to evaluate their ioctl macros and sizeof).  The headers may be older
   than the kernel: constants they lack are listed, and the core ones must be
   there for the test to count.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hupt.tracer.abi import (
    ADDFD_FLAG_SEND,
    ADDFD_FLAG_SETFD,
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    BPF_MAXINSNS,
    IOCTL_NOTIF_ADDFD,
    IOCTL_NOTIF_ID_VALID,
    IOCTL_NOTIF_RECV,
    IOCTL_NOTIF_SEND,
    IOCTL_NOTIF_SET_FLAGS,
    NOTIF,
    NOTIF_ADDFD,
    NOTIF_ID,
    NOTIF_RESP,
    NOTIF_SIZES,
    SECCOMP_DATA,
    SOCK_FILTER,
    SOCK_FPROG,
    SYS,
    SYS_I386,
    USER_NOTIF_FD_SYNC_WAKE_UP,
    USER_NOTIF_FLAG_CONTINUE,
    X32_SYSCALL_BIT,
    FilterFlag,
    Ret,
    SeccompOp,
    SocketCall,
    seccomp_data_arg,
)
from hupt.tracer.seccomp import notif_sizes

_IOC_WRITE = 1
_IOC_READ = 2
SECCOMP_IOC_MAGIC = ord("!")


def ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (SECCOMP_IOC_MAGIC << 8) | nr


def test_struct_sizes_match_the_running_kernel() -> None:
    assert notif_sizes() == (NOTIF.size, NOTIF_RESP.size, SECCOMP_DATA.size) == (80, 24, 64)


def test_fixed_sizes() -> None:
    assert NOTIF_SIZES.size == 6
    assert NOTIF_ADDFD.size == 24
    assert NOTIF_ID.size == 8
    assert SOCK_FILTER.size == 8
    assert SOCK_FPROG.size == 16


def test_ioctl_numbers_follow_from_the_struct_sizes() -> None:
    rw = _IOC_READ | _IOC_WRITE
    assert ioc(rw, 0, NOTIF.size) == IOCTL_NOTIF_RECV
    assert ioc(rw, 1, NOTIF_RESP.size) == IOCTL_NOTIF_SEND
    assert ioc(_IOC_WRITE, 2, NOTIF_ID.size) == IOCTL_NOTIF_ID_VALID
    assert ioc(_IOC_WRITE, 3, NOTIF_ADDFD.size) == IOCTL_NOTIF_ADDFD
    assert ioc(_IOC_WRITE, 4, 8) == IOCTL_NOTIF_SET_FLAGS


def test_seccomp_data_offsets() -> None:
    raw = SECCOMP_DATA.pack(-2, 0x11223344, 0x5566, *range(100, 106))
    assert raw[0:4] == (-2).to_bytes(4, "little", signed=True)
    assert raw[4:8] == (0x11223344).to_bytes(4, "little")
    assert raw[8:16] == (0x5566).to_bytes(8, "little")
    for n in range(6):
        off = seccomp_data_arg(n)
        assert raw[off:off + 8] == (100 + n).to_bytes(8, "little")
        assert seccomp_data_arg(n, high=True) == off + 4


def test_notif_embeds_seccomp_data_at_16() -> None:
    raw = NOTIF.pack(7, 1234, 0, -2, 0x11223344, 0x5566, *range(100, 106))
    assert raw[16:] == SECCOMP_DATA.pack(-2, 0x11223344, 0x5566, *range(100, 106))
    assert raw[8:12] == (1234).to_bytes(4, "little")


def _compile_and_run(tmp: Path, source: str) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler: the kernel-header cross-check did not run")
    (tmp / "probe.c").write_text(source)
    build = subprocess.run([cc, "-o", str(tmp / "probe"), str(tmp / "probe.c")],
                           capture_output=True, text=True, timeout=60)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(tmp / "probe")], check=True, capture_output=True, text=True,
                         timeout=10).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def _header_defines(header: str) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler: the kernel-header cross-check did not run")
    out = subprocess.run([cc, "-E", "-dM", "-"], input=f"#include <{header}>\n",
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define __NR_(\w+) (\d+)$", out, re.M)}


HEADER_CONSTANTS: dict[str, int] = {
    "SECCOMP_SET_MODE_FILTER": SeccompOp.SET_MODE_FILTER,
    "SECCOMP_GET_NOTIF_SIZES": SeccompOp.GET_NOTIF_SIZES,
    "SECCOMP_FILTER_FLAG_TSYNC": FilterFlag.TSYNC,
    "SECCOMP_FILTER_FLAG_NEW_LISTENER": FilterFlag.NEW_LISTENER,
    "SECCOMP_FILTER_FLAG_TSYNC_ESRCH": FilterFlag.TSYNC_ESRCH,
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": FilterFlag.WAIT_KILLABLE_RECV,
    "SECCOMP_RET_KILL_PROCESS": Ret.KILL_PROCESS,
    "SECCOMP_RET_ERRNO": Ret.ERRNO,
    "SECCOMP_RET_USER_NOTIF": Ret.USER_NOTIF,
    "SECCOMP_RET_ALLOW": Ret.ALLOW,
    "SECCOMP_USER_NOTIF_FLAG_CONTINUE": USER_NOTIF_FLAG_CONTINUE,
    "SECCOMP_ADDFD_FLAG_SETFD": ADDFD_FLAG_SETFD,
    "SECCOMP_ADDFD_FLAG_SEND": ADDFD_FLAG_SEND,
    "SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP": USER_NOTIF_FD_SYNC_WAKE_UP,
    "SECCOMP_IOCTL_NOTIF_RECV": IOCTL_NOTIF_RECV,
    "SECCOMP_IOCTL_NOTIF_SEND": IOCTL_NOTIF_SEND,
    "SECCOMP_IOCTL_NOTIF_ID_VALID": IOCTL_NOTIF_ID_VALID,
    "SECCOMP_IOCTL_NOTIF_ADDFD": IOCTL_NOTIF_ADDFD,
    "SECCOMP_IOCTL_NOTIF_SET_FLAGS": IOCTL_NOTIF_SET_FLAGS,
    "AUDIT_ARCH_X86_64": AUDIT_ARCH_X86_64,
    "AUDIT_ARCH_I386": AUDIT_ARCH_I386,
    "__X32_SYSCALL_BIT": X32_SYSCALL_BIT,
    "BPF_MAXINSNS": BPF_MAXINSNS,
    "SYS_SOCKET": SocketCall.SOCKET,
    "SYS_BIND": SocketCall.BIND,
    "SYS_LISTEN": SocketCall.LISTEN,
}
HEADER_SIZES: dict[str, int] = {
    "sizeof(struct seccomp_data)": SECCOMP_DATA.size,
    "sizeof(struct seccomp_notif)": NOTIF.size,
    "sizeof(struct seccomp_notif_resp)": NOTIF_RESP.size,
    "sizeof(struct seccomp_notif_addfd)": NOTIF_ADDFD.size,
    "sizeof(struct seccomp_notif_sizes)": NOTIF_SIZES.size,
    "sizeof(struct sock_filter)": SOCK_FILTER.size,
    "sizeof(struct sock_fprog)": SOCK_FPROG.size,
    "offsetof(struct seccomp_notif, data)": 16,
    "offsetof(struct seccomp_data, args)": seccomp_data_arg(0),
    "offsetof(struct sock_fprog, filter)": 8,
}
# Present in any header recent enough to build hupt against: the test counts only if
# these were compared.
CORE = {"SECCOMP_RET_USER_NOTIF", "SECCOMP_IOCTL_NOTIF_RECV", "SECCOMP_IOCTL_NOTIF_ADDFD",
        "AUDIT_ARCH_I386", "SYS_BIND", "__X32_SYSCALL_BIT"}


def test_constants_match_the_kernel_headers(tmp_path: Path) -> None:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <sys/ioctl.h>",
             "#include <asm/unistd.h>",
             "#include <linux/audit.h>", "#include <linux/filter.h>", "#include <linux/net.h>",
             "#include <linux/seccomp.h>", "int main(void) {"]
    for name in HEADER_CONSTANTS:
        lines += [f"#ifdef {name}", f'  printf("{name} %llu\\n", (unsigned long long)({name}));',
                  "#endif"]
    for i, expr in enumerate(HEADER_SIZES):
        lines.append(f'  printf("expr{i} %zu\\n", {expr});')
    lines += ["  return 0;", "}"]
    got = _compile_and_run(tmp_path, "\n".join(lines) + "\n")
    assert got.keys() >= CORE
    mismatched = {n: (got[n], int(v)) for n, v in HEADER_CONSTANTS.items()
                  if n in got and got[n] != v}
    assert mismatched == {}
    sizes = {expr: got[f"expr{i}"] for i, expr in enumerate(HEADER_SIZES)}
    assert sizes == HEADER_SIZES
    missing = sorted(HEADER_CONSTANTS.keys() - got.keys())
    print("not in the installed headers (older than the kernel):", missing)


def test_i386_numbers_match_the_headers() -> None:
    nr32 = _header_defines("asm/unistd_32.h")
    assert {s.name: nr32[s.name] for s in SYS_I386} == {s.name: int(s) for s in SYS_I386}


def test_x86_64_numbers_match_the_headers() -> None:
    nr64 = _header_defines("asm/unistd_64.h")
    assert {s.name: nr64[s.name] for s in SYS} == {s.name: int(s) for s in SYS}
