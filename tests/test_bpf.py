"""The classic-BPF assembler, checker and interpreter (no kernel involved).

The checker's rules are the kernel's; integration/test_seccomp_notify.py
shows the kernel refusing the same programs.
"""

from __future__ import annotations

import struct

import pytest

from hupt.tracer import bpf
from hupt.tracer.abi import BPF_MAXINSNS, SECCOMP_DATA, SOCK_FILTER, seccomp_data_arg
from hupt.tracer.bpf import (
    Insn,
    InvalidProgram,
    Jump,
    Label,
    and_k,
    assemble,
    ja,
    jeq,
    jge,
    jgt,
    jset,
    ld_abs,
    ret,
)

DATA = SECCOMP_DATA.pack(49, 0xC000003E, 0x1122334455667788, 7, 0xAABBCCDD_00000002, 0, 0, 0,
                         0xFFFFFFFF_FFFFFFFF)


def run(items: list[Insn | Jump | Label], data: bytes = DATA) -> int:
    return bpf.run(assemble(items), data)


def test_opcode_values_are_the_kernels() -> None:
    # include/uapi/linux/filter.h / bpf_common.h, as libseccomp emits them
    assert bpf.LD_W_ABS == 0x20
    assert bpf.JMP_JA == 0x05
    assert bpf.JMP_JEQ_K == 0x15
    assert bpf.JMP_JGT_K == 0x25
    assert bpf.JMP_JGE_K == 0x35
    assert bpf.JMP_JSET_K == 0x45
    assert bpf.ALU_AND_K == 0x54
    assert bpf.RET_K == 0x06


def test_load_reads_little_endian_words() -> None:
    assert run([ld_abs(0), Jump(bpf.JMP_JEQ_K, 49, "y"), ret(0), Label("y"), ret(1)]) == 1
    for off, want in [(4, 0xC000003E), (8, 0x55667788), (12, 0x11223344),
                      (seccomp_data_arg(1), 2), (seccomp_data_arg(1, high=True), 0xAABBCCDD),
                      (seccomp_data_arg(5, high=True), 0xFFFFFFFF)]:
        prog = assemble([ld_abs(off), jeq(want, jt="y"), ret(0), Label("y"), ret(1)])
        assert bpf.run(prog, DATA) == 1, off


def test_ret_returns_k_unchanged() -> None:
    for k in (0, 1, 0x7FFF0000, 0x80000000, 0xFFFFFFFF):
        assert bpf.run([ret(k)], DATA) == k


@pytest.mark.parametrize(("a", "k", "eq", "gt", "ge", "bit"), [
    (5, 5, True, False, True, True),
    (5, 4, False, True, True, True),
    (4, 5, False, False, False, True),
    (8, 7, False, True, True, False),
    (0, 0, True, False, True, False),
    # comparisons are unsigned: -1 (0xffffffff) is the largest value
    (0xFFFFFFFF, 0x40000000, False, True, True, True),
])
def test_conditional_jumps(a: int, k: int, eq: bool, gt: bool, ge: bool, bit: bool) -> None:
    data = SECCOMP_DATA.pack(a - (1 << 32) if a >= 1 << 31 else a, 0, 0, 0, 0, 0, 0, 0, 0)
    for op, want in [(jeq, eq), (jgt, gt), (jge, ge), (jset, bit)]:
        prog: list[Insn | Jump | Label] = [ld_abs(0), op(k, jt="t", jf="f"), Label("t"), ret(1),
                                           Label("f"), ret(2)]
        assert run(prog, data) == (1 if want else 2), (op.__name__, a, k)


def test_fallthrough_targets_are_offset_zero() -> None:
    prog = assemble([ld_abs(0), jeq(49, jf="no"), ret(1), Label("no"), ret(2)])
    assert prog[1] == Insn(bpf.JMP_JEQ_K, 0, 1, 49)
    assert bpf.run(prog, DATA) == 1


def test_ja_is_unconditional() -> None:
    prog = assemble([ja("end"), ret(1), ret(2), Label("end"), ret(3)])
    assert prog[0] == Insn(bpf.JMP_JA, k=2)
    assert bpf.run(prog, DATA) == 3


def test_and_masks_the_accumulator() -> None:
    prog: list[Insn | Jump | Label] = [ld_abs(seccomp_data_arg(1, high=True)), and_k(0xFF00),
                                       jeq(0xCC00, jt="y"), ret(0), Label("y"), ret(1)]
    assert run(prog) == 1


def test_accumulator_starts_at_zero() -> None:
    assert run([jeq(0, jt="y"), ret(0), Label("y"), ret(1)]) == 1


def test_pack_unpack_round_trip_and_layout() -> None:
    prog = [Insn(0x20, 0, 0, 4), Insn(0x15, 1, 2, 0xC000003E), ret(0x7FFF0000)]
    raw = bpf.pack(prog)
    assert len(raw) == 3 * SOCK_FILTER.size == 24
    assert raw[8:16] == struct.pack("<HBBI", 0x15, 1, 2, 0xC000003E)
    assert bpf.unpack(raw) == prog
    with pytest.raises(InvalidProgram):
        bpf.unpack(raw[:-1])


@pytest.mark.parametrize("fields", [(0x10000, 0, 0, 0), (0, 256, 0, 0), (0, 0, -1, 0),
                                    (0, 0, 0, 1 << 32), (0, 0, 0, -1)])
def test_insn_fields_are_range_checked(fields: tuple[int, int, int, int]) -> None:
    with pytest.raises(InvalidProgram):
        Insn(*fields)


# -- what the kernel's checker refuses ----------------------------------------

@pytest.mark.parametrize("offset", [SECCOMP_DATA.size, seccomp_data_arg(6), 62, 2, 1, 0xFFFFFFFC])
def test_out_of_range_or_unaligned_loads_are_refused(offset: int) -> None:
    prog = [ld_abs(offset), ret(0)]
    with pytest.raises(InvalidProgram, match="load at offset"):
        bpf.run(prog, DATA)


def test_a_bad_load_is_refused_even_if_never_reached() -> None:
    prog = [ret(0), ld_abs(64), ret(1)]
    with pytest.raises(InvalidProgram):
        bpf.run(prog, DATA)


def test_last_load_slot_is_allowed() -> None:
    assert bpf.run([ld_abs(60), ret(5)], DATA) == 5


@pytest.mark.parametrize("prog", [
    [Insn(bpf.JMP_JEQ_K, 1, 0, 0), ret(0)],          # jt past the end
    [Insn(bpf.JMP_JEQ_K, 0, 1, 0), ret(0)],          # jf past the end
    [Insn(bpf.JMP_JA, k=1), ret(0)],                 # JA past the end
    [Insn(bpf.JMP_JA, k=0xFFFFFFFF), ret(0)],        # JA "backwards" wraps: refused
])
def test_jumps_out_of_the_program_are_refused(prog: list[Insn]) -> None:
    with pytest.raises(InvalidProgram, match="leaves the program"):
        bpf.run(prog, DATA)


@pytest.mark.parametrize("code", [
    0x28,  # LD|H|ABS: seccomp only allows 32-bit loads
    0x30,  # LD|B|ABS
    0x40,  # LD|W|IND
    0x16,  # RET|A (valid for the kernel, unused by hupt: refused here)
    0x1D,  # JEQ|X
    0x34,  # ALU|DIV|K
    0xFFFF,
])
def test_unknown_opcodes_are_refused(code: int) -> None:
    with pytest.raises(InvalidProgram, match="opcode"):
        bpf.run([Insn(code), ret(0)], DATA)


def test_program_must_end_in_ret() -> None:
    with pytest.raises(InvalidProgram, match="RET"):
        bpf.run([ld_abs(0)], DATA)
    with pytest.raises(InvalidProgram, match="RET"):
        bpf.run([ret(0), ld_abs(0)], DATA)


def test_program_length_limits() -> None:
    with pytest.raises(InvalidProgram):
        bpf.run([], DATA)
    assert bpf.run([ret(7)] * BPF_MAXINSNS, DATA) == 7
    with pytest.raises(InvalidProgram):
        bpf.run([ret(7)] * (BPF_MAXINSNS + 1), DATA)


def test_input_shorter_than_a_load_is_refused() -> None:
    with pytest.raises(InvalidProgram):
        bpf.run([ld_abs(16), ret(0)], DATA[:16])


# -- the assembler ------------------------------------------------------------

def test_assembler_refuses_undefined_duplicate_and_backward_labels() -> None:
    with pytest.raises(InvalidProgram, match="undefined"):
        assemble([jeq(1, jt="nowhere"), ret(0)])
    with pytest.raises(InvalidProgram, match="twice"):
        assemble([Label("a"), Label("a"), ret(0)])
    with pytest.raises(InvalidProgram, match="cannot be encoded"):
        assemble([Label("back"), ret(0), jeq(1, jt="back"), ret(0)])


def test_assembler_refuses_conditional_jumps_beyond_255() -> None:
    filler = [ret(0)] * 255
    ok = assemble([jeq(1, jt="t"), *filler, Label("t"), ret(1)])
    assert ok[0].jt == 255
    with pytest.raises(InvalidProgram, match="cannot be encoded"):
        assemble([jeq(1, jt="t"), *filler, ret(0), Label("t"), ret(1)])
    # JA has a 32-bit offset and reaches further
    far = assemble([ja("t"), *filler, ret(0), Label("t"), ret(1)])
    assert far[0].k == 256
    assert bpf.run(far, DATA) == 1


def test_labels_resolve_to_the_next_instruction() -> None:
    prog = assemble([Label("start"), ld_abs(0), jeq(49, jt="end"), ret(0), Label("end"),
                     Label("alias"), ret(1)])
    assert len(prog) == 4
    assert prog[1].jt == 1
