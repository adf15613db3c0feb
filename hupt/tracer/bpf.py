"""Facts about classic BPF as seccomp runs it: a tiny assembler and interpreter.

A seccomp filter is a classic BPF program (``struct sock_filter[]``) that the
kernel runs at every syscall entry over ``struct seccomp_data``; the value of
the RET it reaches is the action.  The things that matter here:

* The kernel checks a program once, when it is installed, and refuses the
  whole program (EINVAL) if any instruction is bad, reached or not: a load
  outside ``seccomp_data`` or not 4-byte aligned, a jump past the end, an
  opcode seccomp does not allow, or a last instruction that is not a RET.
  ``check`` applies the same rules (for the subset of opcodes hupt uses), so a
  filter that passes ``run`` in a unit test also installs.
* Jumps only go forward, conditional offsets are 8 bits (at most 255
  instructions ahead), so every program terminates and straight-line code
  longer than 255 instructions needs JA trampolines.  ``assemble`` resolves
  symbolic labels and refuses what cannot be encoded rather than wrapping.
* Loads are 32-bit words in the CPU's byte order (little endian here),
  unlike socket filters, which read packets in network order.  A 64-bit
  syscall argument is two loads; an i386 argument is the low word.
* Filters cannot be removed and every one installed runs on every syscall of
  the process and its descendants, so they must stay short and obviously
  right: this module lets tests run them in userspace, the way gVisor tests
  its filters, instead of trusting a hand count of jump offsets.

One socket program is attached here too: a SO_REUSEPORT group's selector,
"return 0", which sends every datagram to the group's first socket
(``attach_reuseport_selector``).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from hupt.tracer.abi import BPF_MAXINSNS, SO_ATTACH_REUSEPORT_CBPF, SOCK_FILTER, SOCK_FPROG

# Opcode fields (include/uapi/linux/bpf_common.h); only those hupt emits.
LD = 0x00
ALU = 0x04
JMP = 0x05
RET = 0x06
W = 0x00
ABS = 0x20
AND = 0x50
JA = 0x00
JEQ = 0x10
JGT = 0x20
JGE = 0x30
JSET = 0x40
K = 0x00

LD_W_ABS = LD | W | ABS
ALU_AND_K = ALU | AND | K
JMP_JA = JMP | JA
JMP_JEQ_K = JMP | JEQ | K
JMP_JGT_K = JMP | JGT | K
JMP_JGE_K = JMP | JGE | K
JMP_JSET_K = JMP | JSET | K
RET_K = RET | K

_CONDITIONS: dict[int, Callable[[int, int], bool]] = {
    JMP_JEQ_K: lambda a, k: a == k,
    JMP_JGT_K: lambda a, k: a > k,
    JMP_JGE_K: lambda a, k: a >= k,
    JMP_JSET_K: lambda a, k: a & k != 0,
}
_OPCODES = frozenset({LD_W_ABS, ALU_AND_K, JMP_JA, RET_K, *_CONDITIONS})

# seccomp_data words are read in host order.
_WORD = struct.Struct("<I")


class InvalidProgram(ValueError):
    """A program the kernel's checker would refuse, or one that cannot be encoded."""


# Tuples, not dataclasses: this module is on `hupt run`'s path to the server's
# exec, and importing dataclasses (inspect, ast, dis...) costs that path ~5 ms.
class _InsnFields(NamedTuple):
    code: int
    jt: int
    jf: int
    k: int


class Insn(_InsnFields):
    """One ``struct sock_filter``: jt/jf are forward offsets from the next instruction."""

    __slots__ = ()

    def __new__(cls, code: int, jt: int = 0, jf: int = 0, k: int = 0) -> Insn:
        if not (0 <= code <= 0xFFFF and 0 <= jt <= 0xFF and 0 <= jf <= 0xFF
                and 0 <= k <= 0xFFFFFFFF):
            raise InvalidProgram(f"field out of range in Insn(code={code}, jt={jt}, jf={jf}, "
                                 f"k={k})")
        return super().__new__(cls, code, jt, jf, k)


class Jump(NamedTuple):
    """A jump whose targets are label names, resolved by ``assemble``; None = next insn.

    For JA the target is ``jt``.
    """

    code: int
    k: int = 0
    jt: str | None = None
    jf: str | None = None


class Label(NamedTuple):
    """Marks the position of the instruction that follows it."""

    name: str


def ld_abs(offset: int) -> Insn:
    """A = the 32-bit word at ``offset`` of seccomp_data."""
    return Insn(LD_W_ABS, k=offset)


def and_k(mask: int) -> Insn:
    return Insn(ALU_AND_K, k=mask)


def ret(value: int) -> Insn:
    return Insn(RET_K, k=value)


def ja(target: str) -> Jump:
    return Jump(JMP_JA, jt=target)


def jeq(k: int, jt: str | None = None, jf: str | None = None) -> Jump:
    return Jump(JMP_JEQ_K, k, jt, jf)


def jgt(k: int, jt: str | None = None, jf: str | None = None) -> Jump:
    return Jump(JMP_JGT_K, k, jt, jf)


def jge(k: int, jt: str | None = None, jf: str | None = None) -> Jump:
    return Jump(JMP_JGE_K, k, jt, jf)


def jset(k: int, jt: str | None = None, jf: str | None = None) -> Jump:
    return Jump(JMP_JSET_K, k, jt, jf)


def assemble(items: Iterable[Insn | Jump | Label]) -> list[Insn]:
    """Resolve labels into forward offsets; refuse backward or too-long jumps."""
    body: list[Insn | Jump] = []
    where: dict[str, int] = {}
    for item in items:
        if isinstance(item, Label):
            if item.name in where:
                raise InvalidProgram(f"label {item.name!r} defined twice")
            where[item.name] = len(body)
        else:
            body.append(item)

    def offset(pc: int, target: str | None, limit: int) -> int:
        if target is None:
            return 0
        if target not in where:
            raise InvalidProgram(f"undefined label {target!r}")
        off = where[target] - pc - 1
        if not 0 <= off <= limit:
            raise InvalidProgram(f"jump from {pc} to {target!r} ({off:+d}) cannot be encoded")
        return off

    prog: list[Insn] = []
    for pc, item in enumerate(body):
        if isinstance(item, Insn):
            prog.append(item)
        elif item.code == JMP_JA:
            prog.append(Insn(JMP_JA, k=offset(pc, item.jt, 0xFFFFFFFF)))
        else:
            prog.append(Insn(item.code, offset(pc, item.jt, 0xFF), offset(pc, item.jf, 0xFF),
                             item.k))
    return prog


def pack(prog: Sequence[Insn]) -> bytes:
    """The program as the kernel reads it (an array of struct sock_filter)."""
    return b"".join(SOCK_FILTER.pack(i.code, i.jt, i.jf, i.k) for i in prog)


def unpack(raw: bytes) -> list[Insn]:
    if len(raw) % SOCK_FILTER.size:
        raise InvalidProgram(f"{len(raw)} bytes is not a whole number of instructions")
    return [Insn(*fields) for fields in SOCK_FILTER.iter_unpack(raw)]


def check(prog: Sequence[Insn], data_len: int) -> None:
    """Refuse ``prog`` as the kernel's seccomp checker would, for ``data_len``-byte input."""
    n = len(prog)
    if not 0 < n <= BPF_MAXINSNS:
        raise InvalidProgram(f"{n} instructions (1..{BPF_MAXINSNS} allowed)")
    for pc, i in enumerate(prog):
        if i.code not in _OPCODES:
            raise InvalidProgram(f"insn {pc}: opcode {i.code:#06x} not allowed")
        if i.code == LD_W_ABS and (i.k % 4 or i.k + 4 > data_len):
            raise InvalidProgram(f"insn {pc}: load at offset {i.k} is unaligned or out of range")
        if i.code == JMP_JA and pc + 1 + i.k >= n:
            raise InvalidProgram(f"insn {pc}: JA +{i.k} leaves the program")
        if i.code in _CONDITIONS and pc + 1 + max(i.jt, i.jf) >= n:
            raise InvalidProgram(f"insn {pc}: jump +{max(i.jt, i.jf)} leaves the program")
    if prog[-1].code != RET_K:
        raise InvalidProgram("the last instruction is not a RET")


def run(prog: Sequence[Insn], data: bytes) -> int:
    """Run ``prog`` over ``data`` (a packed seccomp_data) and return the RET value."""
    return _execute(prog, data)[0]


def run_count(prog: Sequence[Insn], data: bytes) -> int:
    """How many instructions ``prog`` executes over ``data`` (its cost for that syscall)."""
    return _execute(prog, data)[1]


def _execute(prog: Sequence[Insn], data: bytes) -> tuple[int, int]:
    check(prog, len(data))
    a = 0
    pc = 0
    steps = 0
    while pc < len(prog):
        i = prog[pc]
        pc += 1
        steps += 1
        if i.code == LD_W_ABS:
            (a,) = _WORD.unpack_from(data, i.k)
        elif i.code == ALU_AND_K:
            a &= i.k
        elif i.code == JMP_JA:
            pc += i.k
        elif i.code == RET_K:
            return i.k, steps
        else:
            pc += i.jt if _CONDITIONS[i.code](a, i.k) else i.jf
    raise InvalidProgram("fell off the end of the program")


def attach_reuseport_selector(sock: socket.socket) -> None:
    """Attach "return 0" as the SO_REUSEPORT group selector of bound ``sock``: the
    group's first socket gets every datagram (hupt/handoff.py's _steer_to_first)."""
    insn = ctypes.create_string_buffer(SOCK_FILTER.pack(RET_K, 0, 0, 0))
    fprog = SOCK_FPROG.pack(1, ctypes.addressof(insn))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
