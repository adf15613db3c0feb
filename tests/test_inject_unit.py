"""Pure parts of the ptrace injection: register arithmetic, wait statuses, session states.

No root and no tracee: everything here is computed from values whose meaning
ptrace(2) and arch/x86 define (the real-kernel side is integration/test_inject.py).
"""

from __future__ import annotations

import os
import signal
import struct

import pytest

from hupt.tracer import inject
from hupt.tracer.abi import PTRACE_EVENT_EXEC, PTRACE_EVENT_STOP, SYS
from hupt.tracer.accepting import exec_image
from hupt.tracer.inject import (
    IllegalTransition,
    Lifecycle,
    State,
    Tracee,
    syscall_regs,
    syscall_result,
)
from hupt.tracer.ptrace import Regs, StopKind, classify, signed, unsigned
from hupt.tracer.seccomp import INJECTION_COOKIE
from tests.fakes import state_of

U64 = (1 << 64) - 1


# --- injected registers and results ------------------------------------------------------


def test_syscall_regs_follow_the_x86_64_convention() -> None:
    saved = Regs().replace(rax=1, rbx=42, rsp=0x7FFC_0000, orig_rax=SYS.accept4)
    regs = syscall_regs(saved, 0x1000, SYS.dup3, (1, 2, 3, 4, 5, 6))
    assert (regs.rax, regs.rip) == (SYS.dup3, 0x1000)
    assert (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9) == (1, 2, 3, 4, 5, 6)
    assert regs.orig_rax == U64  # -1: no restart logic for injected registers
    assert (regs.rbx, regs.rsp) == (42, 0x7FFC_0000)  # the rest is the thread's own


def test_syscall_regs_negative_arguments_and_padding() -> None:
    regs = syscall_regs(Regs().replace(r9=99), 0x1000, SYS.mmap, (0, 4096, 3, 0x22, -1))
    assert regs.r8 == U64  # fd -1
    # the missing sixth argument carries the cookie that passes the notify filter
    assert regs.r9 == INJECTION_COOKIE
    assert syscall_regs(Regs().replace(r10=7), 0x1000, SYS.listen, (3, 5)).r10 == 0
    with pytest.raises(ValueError):
        syscall_regs(Regs(), 0x1000, SYS.mmap, (0,) * 7)


@pytest.mark.parametrize(("rax", "result"), [
    (unsigned(-9), -9),  # EBADF
    (unsigned(-4095), -4095),
    (0, 0),
    (0x7F12_3456_7000, 0x7F12_3456_7000),  # an mmap address
    (unsigned(-4096), U64 - 4095),  # not an errno: a (huge) value
])
def test_syscall_result(rax: int, result: int) -> None:
    assert syscall_result(rax) == result


def test_signed_and_unsigned() -> None:
    assert signed(U64) == -1
    assert signed(unsigned(-512)) == -512
    assert signed(1 << 62) == 1 << 62
    assert Regs().replace(rax=-1).rax == U64


# --- wait statuses ----------------------------------------------------------------------


def stop_status(sig: int, event: int = 0) -> int:
    return (event << 16) | (sig << 8) | 0x7F


def test_classify_interrupt_and_group_stops() -> None:
    assert classify(5, stop_status(signal.SIGTRAP, PTRACE_EVENT_STOP)).kind is StopKind.INTERRUPT
    for sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        stop = classify(5, stop_status(sig, PTRACE_EVENT_STOP))
        assert (stop.kind, stop.sig) == (StopKind.GROUP, sig)


def test_classify_signal_syscall_and_event_stops() -> None:
    stop = classify(5, stop_status(signal.SIGURG))
    assert (stop.kind, stop.sig) == (StopKind.SIGNAL, signal.SIGURG)
    assert classify(5, stop_status(signal.SIGTRAP)).kind is StopKind.SIGNAL  # a single step
    assert classify(5, stop_status(signal.SIGTRAP | 0x80)).kind is StopKind.SYSCALL
    stop = classify(5, stop_status(signal.SIGTRAP, PTRACE_EVENT_EXEC))
    assert (stop.kind, stop.event) == (StopKind.EVENT, PTRACE_EVENT_EXEC)


def test_classify_exits() -> None:
    stop = classify(5, 3 << 8)
    assert stop.kind is StopKind.EXITED and os.WEXITSTATUS(stop.exit_status or 0) == 3
    stop = classify(5, signal.SIGKILL)
    assert (stop.kind, stop.sig) == (StopKind.EXITED, signal.SIGKILL)


# --- session states ----------------------------------------------------------------------


def test_a_whole_session_and_nothing_after_it() -> None:
    life = Lifecycle()
    for state in (State.SEIZING, State.STOPPED):
        life.advance(state)
    life.begin_injection()
    assert life.state is State.INJECTING
    life.end_injection()
    assert state_of(life) is State.STOPPED
    life.advance(State.RELEASING)
    life.advance(State.RELEASED)
    for state in State:
        with pytest.raises(IllegalTransition):
            life.advance(state)
    with pytest.raises(IllegalTransition):
        life.begin_injection()


def test_injection_needs_stopped_threads_and_does_not_nest() -> None:
    life = Lifecycle()
    with pytest.raises(IllegalTransition):
        life.begin_injection()  # nothing seized yet
    life.advance(State.SEIZING)
    with pytest.raises(IllegalTransition):
        life.begin_injection()  # threads not all stopped yet
    life.advance(State.STOPPED)
    life.begin_injection()
    with pytest.raises(IllegalTransition):
        life.begin_injection()
    with pytest.raises(IllegalTransition):
        life.advance(State.SEIZING)


def test_injection_during_rollback_returns_to_rollback() -> None:
    life = Lifecycle()
    for state in (State.SEIZING, State.STOPPED, State.ROLLING_BACK):
        life.advance(state)
    life.begin_injection()
    life.end_injection()
    assert life.state is State.ROLLING_BACK
    with pytest.raises(IllegalTransition):
        life.advance(State.STOPPED)  # a rollback is not abandoned halfway
    with pytest.raises(IllegalTransition):
        life.end_injection()


def test_every_live_state_can_be_released() -> None:
    # Whatever happens, a session must be able to give the process back.
    for start in State:
        if start in (State.NEW, State.RELEASED):
            continue
        reachable: set[State] = {start}
        todo: list[State] = [start]
        while todo:
            for nxt in inject._ALLOWED[todo.pop()]:
                if nxt not in reachable:
                    reachable.add(nxt)
                    todo.append(nxt)
        assert State.RELEASED in reachable, start
        if start is not State.RELEASING:
            assert State.RELEASING in inject._ALLOWED[start], start


def test_an_unentered_tracee_refuses_everything() -> None:
    t = Tracee.seize(os.getpid())  # not entered: nothing is seized, no root needed
    assert t.state is State.NEW
    with pytest.raises(IllegalTransition):
        t.syscall(SYS.getpid)
    with pytest.raises(IllegalTransition):
        t.on_rollback("nothing", lambda: None)
    with pytest.raises(IllegalTransition):
        t.commit()
    with pytest.raises(IllegalTransition):
        t.write(0x1000, b"x")


def test_execve_has_its_own_entry_point() -> None:
    t = Tracee.seize(os.getpid())
    with pytest.raises(ValueError):
        t.syscall(SYS.execve, 0, 0, 0)  # would leave the session on a vanished image
    with pytest.raises(ValueError):
        t.execve(0, 0, 0)  # without PTRACE_O_TRACEEXEC the exec would go unnoticed


# --- the execve argument block ----------------------------------------------------------

BASE = 0x7F00_0000_0000


def _word(blob: bytes, addr: int) -> int:
    value: int = struct.unpack_from("<Q", blob, addr - BASE)[0]
    return value


def _cstring(blob: bytes, addr: int) -> bytes:
    start = addr - BASE
    return blob[start:blob.index(b"\0", start)]


def test_exec_image_layout() -> None:
    blob, path, argv, envp = exec_image(BASE, b"/usr/bin/x", [b"x", b"-v"], [b"A=1", b"B="])
    assert _cstring(blob, path) == b"/usr/bin/x"
    assert argv % 8 == 0 and envp % 8 == 0
    assert [_cstring(blob, _word(blob, argv + 8 * i)) for i in range(2)] == [b"x", b"-v"]
    assert _word(blob, argv + 16) == 0
    assert [_cstring(blob, _word(blob, envp + 8 * i)) for i in range(2)] == [b"A=1", b"B="]
    assert _word(blob, envp + 16) == 0
    assert BASE + len(blob) == path + sum(len(s) + 1 for s in (b"/usr/bin/x", b"x", b"-v",
                                                              b"A=1", b"B="))


def test_exec_image_edge_cases() -> None:
    blob, _, _, envp = exec_image(BASE, b"/x", [b"/x"], [])
    assert _word(blob, envp) == 0  # an empty environment is just the NULL
    assert len(exec_image(0, b"/x", [b"/x"], [])[0]) == len(blob)  # size does not depend on base
    with pytest.raises(ValueError):
        exec_image(BASE, b"/x", [b"a\0b"], [])


def test_stand_in_names_sit_next_to_the_listener_and_fit_sun_path() -> None:
    from hupt.tracer.accepting import stand_in_names

    assert stand_in_names(b"/run/app/app.sock", "0a1b2c3d") == [
        b"/run/app/app.sock.paused-0a1b2c3d", b"/run/app/.hupt-0a1b2c3d"]
    assert stand_in_names(b"app.sock", "0a1b2c3d") == [
        b"app.sock.paused-0a1b2c3d", b".hupt-0a1b2c3d"]
    long = b"/" + b"d" * 80 + b"/" + b"s" * 20
    assert stand_in_names(long, "0a1b2c3d") == [b"/" + b"d" * 80 + b"/.hupt-0a1b2c3d"]
    assert stand_in_names(b"/" + b"d" * 102 + b"/s", "0a1b2c3d") == []
    assert stand_in_names(b"\0abstract", "0a1b2c3d") == []  # keeps an abstract autobind
    assert stand_in_names(b"", "0a1b2c3d") == []
