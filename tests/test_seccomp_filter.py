"""hupt's seccomp filter, run in userspace by the BPF interpreter.

Every decision is checked against a reference model written out plainly
below, over every syscall number of both arches and a few thousand random
inputs; integration/test_seccomp_notify.py checks the kernel agrees.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterable

import pytest

from hupt.tracer import bpf
from hupt.tracer.abi import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    SECCOMP_DATA,
    SOCK_FPROG,
    SYS,
    SYS_I386,
    X32_SYSCALL_BIT,
    Ret,
    SocketCall,
    ret_errno,
)
from hupt.tracer.bpf import Insn
from hupt.tracer.seccomp import build_filter, sock_fprog

ALLOW = int(Ret.ALLOW)
NOTIFY = int(Ret.USER_NOTIF)
ENOSYS = ret_errno(errno.ENOSYS)
KILL = int(Ret.KILL_PROCESS)
AUDIT_ARCH_AARCH64 = 0xC00000B7

BIND_LISTEN = (SYS.bind, SYS.listen)
ALL_GUARDED = (SYS.bind, SYS.listen, SYS.unlink, SYS.unlinkat)
I386_TWIN = {SYS.bind: SYS_I386.bind, SYS.listen: SYS_I386.listen,
             SYS.unlink: SYS_I386.unlink, SYS.unlinkat: SYS_I386.unlinkat}
SOCKETCALL_TWIN = {SYS.bind: SocketCall.BIND, SYS.listen: SocketCall.LISTEN}


def data(nr: int, arch: int = AUDIT_ARCH_X86_64, *args: int) -> bytes:
    a = [*args, 0, 0, 0, 0, 0, 0][:6]
    nr32 = nr & 0xFFFFFFFF
    return SECCOMP_DATA.pack(nr32 - (1 << 32) if nr32 >= 1 << 31 else nr32, arch,
                             0x7F00_1234_5678, *a)


def decide(prog: list[Insn], nr: int, arch: int = AUDIT_ARCH_X86_64, *args: int) -> int:
    return bpf.run(prog, data(nr, arch, *args))


def model(notify: Iterable[SYS], nr: int, arch: int, arg0: int,
          level: int = 0, optname: int = 0) -> int:
    """What the filter must answer, written as plainly as possible."""
    notify = set(notify)
    nr &= 0xFFFFFFFF
    if arch == AUDIT_ARCH_X86_64:
        if nr >= X32_SYSCALL_BIT:
            return ENOSYS
        if nr == SYS.getsockopt:  # the SO_ACCEPTCONN question only, by its low words
            acceptconn = level & 0xFFFFFFFF == 1 and optname & 0xFFFFFFFF == 30
            return NOTIFY if acceptconn else ALLOW
        return NOTIFY if nr in notify else ALLOW
    if arch == AUDIT_ARCH_I386:
        if nr in {I386_TWIN[s] for s in notify}:
            return ENOSYS
        if nr == SYS_I386.socketcall and arg0 & 0xFFFFFFFF in {
                SOCKETCALL_TWIN[s] for s in notify if s in SOCKETCALL_TWIN}:
            return ENOSYS
        return ALLOW
    return KILL


@pytest.fixture(scope="module")
def prog() -> list[Insn]:
    return build_filter(BIND_LISTEN)


def test_filter_passes_the_kernel_rules(prog: list[Insn]) -> None:
    bpf.check(prog, SECCOMP_DATA.size)
    bpf.check(build_filter(ALL_GUARDED), SECCOMP_DATA.size)
    bpf.check(build_filter([]), SECCOMP_DATA.size)


def test_arch_is_loaded_before_nr(prog: list[Insn]) -> None:
    assert prog[0] == bpf.ld_abs(4)
    assert prog[1].code == bpf.JMP_JEQ_K and prog[1].k == AUDIT_ARCH_X86_64


def test_bind_and_listen_are_notified(prog: list[Insn]) -> None:
    assert decide(prog, SYS.bind, AUDIT_ARCH_X86_64, 3, 0x7FFF0000, 16) == NOTIFY
    assert decide(prog, SYS.listen, AUDIT_ARCH_X86_64, 3, 128) == NOTIFY


@pytest.mark.parametrize("nr", [s for s in SYS if s not in BIND_LISTEN])
def test_everything_else_is_allowed(prog: list[Insn], nr: SYS) -> None:
    assert decide(prog, nr) == ALLOW


def test_unlink_is_notified_only_when_asked(prog: list[Insn]) -> None:
    assert decide(prog, SYS.unlink) == ALLOW
    assert decide(prog, SYS.unlinkat) == ALLOW
    with_unlink = build_filter(ALL_GUARDED)
    assert decide(with_unlink, SYS.unlink) == NOTIFY
    assert decide(with_unlink, SYS.unlinkat) == NOTIFY
    assert decide(with_unlink, SYS.bind) == NOTIFY
    assert decide(with_unlink, SYS.getsockname) == ALLOW


@pytest.mark.parametrize("nr", [X32_SYSCALL_BIT | SYS.bind, X32_SYSCALL_BIT | SYS.getsockname,
                                X32_SYSCALL_BIT, 0x7FFFFFFF, -1, -(1 << 31)])
def test_x32_and_negative_numbers_get_enosys(prog: list[Insn], nr: int) -> None:
    assert decide(prog, nr) == ENOSYS
    assert decide(build_filter([]), nr) == ENOSYS


def test_highest_plain_number_is_not_x32(prog: list[Insn]) -> None:
    assert decide(prog, X32_SYSCALL_BIT - 1) == ALLOW


def test_i386_twins_of_notified_calls_get_enosys(prog: list[Insn]) -> None:
    assert decide(prog, SYS_I386.bind, AUDIT_ARCH_I386) == ENOSYS
    assert decide(prog, SYS_I386.listen, AUDIT_ARCH_I386) == ENOSYS
    assert decide(prog, SYS_I386.socketcall, AUDIT_ARCH_I386, SocketCall.BIND) == ENOSYS
    assert decide(prog, SYS_I386.socketcall, AUDIT_ARCH_I386, SocketCall.LISTEN) == ENOSYS


def test_socketcall_dispatch_uses_only_the_low_word(prog: list[Insn]) -> None:
    assert decide(prog, SYS_I386.socketcall, AUDIT_ARCH_I386,
                  0xDEAD_0000_0000 | SocketCall.BIND) == ENOSYS


def test_other_i386_calls_are_allowed(prog: list[Insn]) -> None:
    assert decide(prog, SYS_I386.getpid, AUDIT_ARCH_I386) == ALLOW
    assert decide(prog, SYS_I386.socketcall, AUDIT_ARCH_I386, SocketCall.SOCKET) == ALLOW
    # i386 49 is geteuid, 50 getegid: the x86_64 numbers mean nothing there
    assert decide(prog, SYS.bind, AUDIT_ARCH_I386) == ALLOW
    assert decide(prog, SYS.listen, AUDIT_ARCH_I386) == ALLOW
    # unlink is not guarded unless asked, on either arch
    assert decide(prog, SYS_I386.unlink, AUDIT_ARCH_I386) == ALLOW


def test_i386_unlink_is_refused_when_unlink_is_notified() -> None:
    p = build_filter(ALL_GUARDED)
    assert decide(p, SYS_I386.unlink, AUDIT_ARCH_I386) == ENOSYS
    assert decide(p, SYS_I386.unlinkat, AUDIT_ARCH_I386) == ENOSYS
    # i386 87 is swapon, 263 clock_settime: allowed
    assert decide(p, SYS.unlink, AUDIT_ARCH_I386) == ALLOW
    assert decide(p, SYS.unlinkat, AUDIT_ARCH_I386) == ALLOW


def test_unlink_only_filter_leaves_socketcall_alone() -> None:
    p = build_filter([SYS.unlink])
    assert decide(p, SYS_I386.socketcall, AUDIT_ARCH_I386, SocketCall.BIND) == ALLOW
    assert decide(p, SYS_I386.bind, AUDIT_ARCH_I386) == ALLOW
    assert decide(p, SYS_I386.unlink, AUDIT_ARCH_I386) == ENOSYS


@pytest.mark.parametrize("arch", [AUDIT_ARCH_AARCH64, 0, 0x4000003E, 0xFFFFFFFF])
def test_unknown_arch_is_killed(prog: list[Insn], arch: int) -> None:
    assert decide(prog, SYS.getpid, arch) == KILL
    assert decide(prog, SYS.bind, arch) == KILL


def test_args_and_ip_do_not_matter_on_x86_64(prog: list[Insn]) -> None:
    for args in [(0,), (0xFFFFFFFF_FFFFFFFF,) * 6, (SocketCall.BIND,)]:
        assert decide(prog, SYS.bind, AUDIT_ARCH_X86_64, *args) == NOTIFY
        assert decide(prog, SYS.connect, AUDIT_ARCH_X86_64, *args) == ALLOW


@pytest.mark.parametrize("notify", [(), BIND_LISTEN, ALL_GUARDED, (SYS.unlink,), (SYS.listen,)])
def test_every_number_of_both_arches_matches_the_model(notify: tuple[SYS, ...]) -> None:
    p = build_filter(notify)
    for arch in (AUDIT_ARCH_X86_64, AUDIT_ARCH_I386):
        for nr in range(1024):
            for arg0 in (0, SocketCall.BIND, SocketCall.LISTEN):
                assert decide(p, nr, arch, arg0) == model(notify, nr, arch, arg0), (arch, nr, arg0)


def test_random_inputs_match_the_model() -> None:
    rng = random.Random(20240917)
    interesting_nrs = [*SYS, *SYS_I386, X32_SYSCALL_BIT, X32_SYSCALL_BIT | SYS.bind, -1]
    archs = [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386, AUDIT_ARCH_AARCH64]
    for _ in range(3000):
        notify = rng.sample(ALL_GUARDED, rng.randint(0, 4))
        p = build_filter(notify)
        nr = rng.choice([rng.choice(interesting_nrs), rng.getrandbits(32) - (1 << 31)])
        arch = rng.choice([*archs, rng.getrandbits(32)])
        args = [rng.choice([rng.getrandbits(64), rng.randint(0, 20)]) for _ in range(6)]
        assert decide(p, nr, arch, *args) == model(notify, nr, arch, args[0], args[1],
                                                   args[2]), (notify, nr, arch)


def test_order_and_duplicates_do_not_change_the_program() -> None:
    assert build_filter([SYS.listen, SYS.bind, SYS.bind]) == build_filter(BIND_LISTEN)


def test_a_syscall_without_a_known_i386_twin_is_refused() -> None:
    with pytest.raises(ValueError, match="connect"):
        build_filter([SYS.bind, SYS.connect])


def test_filter_stays_short() -> None:
    # it runs on every syscall of every server: a handful of instructions
    assert len(build_filter(ALL_GUARDED)) <= 40
    # and an ordinary syscall takes the first few only: arch, nr, x32, one test per call
    assert bpf.run_count(build_filter(ALL_GUARDED), data(SYS.read)) <= 10


def test_only_the_so_acceptconn_question_of_getsockopt_is_notified(prog: list[Insn]) -> None:
    from hupt.tracer.seccomp import INJECTION_COOKIE

    assert decide(prog, SYS.getsockopt, AUDIT_ARCH_X86_64, 3, 1, 30) == NOTIFY
    # the high halves of level and optname are ignored (ints in 64-bit registers)
    assert decide(prog, SYS.getsockopt, AUDIT_ARCH_X86_64, 3, 1 | 7 << 32, 30 | 1 << 40) == NOTIFY
    assert decide(prog, SYS.getsockopt, AUDIT_ARCH_X86_64, 3, 1, 4) == ALLOW  # SO_ERROR
    assert decide(prog, SYS.getsockopt, AUDIT_ARCH_X86_64, 3, 6, 30) == ALLOW  # IPPROTO_TCP
    assert decide(prog, SYS.getsockopt, AUDIT_ARCH_X86_64, 3, 1, 30, 0, 0,
                  INJECTION_COOKIE) == ALLOW
    assert decide(build_filter(BIND_LISTEN, acceptconn=False), SYS.getsockopt,
                  AUDIT_ARCH_X86_64, 3, 1, 30) == ALLOW


def test_sock_fprog_layout() -> None:
    raw = sock_fprog(0x7F12_3456_7000, 19)
    assert len(raw) == SOCK_FPROG.size == 16
    assert raw[:2] == (19).to_bytes(2, "little")
    assert raw[2:8] == bytes(6)
    assert raw[8:] == (0x7F12_3456_7000).to_bytes(8, "little")
    with pytest.raises(ValueError):
        sock_fprog(0x1000, 0)
    with pytest.raises(ValueError):
        sock_fprog(0x1000, 4097)


def test_injected_calls_carrying_the_cookie_pass_through() -> None:
    """hupt's own injected bind/listen (dummy listener) must not wait for an answer."""
    from hupt.tracer.abi import SECCOMP_DATA
    from hupt.tracer.bpf import run
    from hupt.tracer.seccomp import INJECTION_COOKIE

    prog = build_filter([SYS.bind, SYS.listen])

    def verdict(nr: int, arg5: int) -> int:
        data = SECCOMP_DATA.pack(nr, AUDIT_ARCH_X86_64, 0, 3, 0, 0, 0, 0, arg5)
        return run(prog, data)

    for nr in (SYS.bind, SYS.listen):
        assert verdict(nr, INJECTION_COOKIE) == int(Ret.ALLOW)
        assert verdict(nr, 0) == NOTIFY
        assert verdict(nr, INJECTION_COOKIE & 0xFFFFFFFF) == NOTIFY  # both halves must match
        assert verdict(nr, INJECTION_COOKIE ^ (1 << 40)) == NOTIFY


def test_noop_filter_turns_only_unlink_into_success() -> None:
    from hupt.tracer.abi import SECCOMP_DATA
    from hupt.tracer.bpf import run
    from hupt.tracer.seccomp import build_noop_filter

    prog = build_noop_filter([SYS.unlink, SYS.unlinkat])
    for nr, want in [(SYS.unlink, int(Ret.ERRNO)), (SYS.unlinkat, int(Ret.ERRNO)),
                     (SYS.bind, int(Ret.ALLOW)), (SYS.read, int(Ret.ALLOW))]:
        assert run(prog, SECCOMP_DATA.pack(nr, AUDIT_ARCH_X86_64, 0, 0, 0, 0, 0, 0, 0)) == want


def test_noop_filter_lets_hupts_own_unlink_through() -> None:
    """A paused unix listener's stand-in is bound to a path whose file hupt's injected
    unlink removes at once: a retiring process's no-op filter must not swallow it."""
    from hupt.tracer.abi import SECCOMP_DATA
    from hupt.tracer.bpf import run
    from hupt.tracer.seccomp import INJECTION_COOKIE, build_noop_filter

    prog = build_noop_filter([SYS.unlink, SYS.unlinkat])

    def verdict(nr: int, r9: int) -> int:
        return run(prog, SECCOMP_DATA.pack(nr, AUDIT_ARCH_X86_64, 0, 0, 0, 0, 0, 0, r9))

    for nr in (SYS.unlink, SYS.unlinkat):
        assert verdict(nr, INJECTION_COOKIE) == int(Ret.ALLOW)
        assert verdict(nr, INJECTION_COOKIE & 0xFFFFFFFF) == int(Ret.ERRNO)
        assert verdict(nr, 0) == int(Ret.ERRNO)
