"""The instruction decoder the machine uses to find sensitive instructions (pyvmx.vmx.decode).

Encodings are real x86 byte sequences (SDM Vol. 2), decoded in the code sizes where they are
valid; the expected operands come from the SDM's instruction formats, not from the decoder.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmx.vmx.decode import (
    SEG_CS,
    SEG_DS,
    SEG_ES,
    SEG_FS,
    SEG_GS,
    SEG_SS,
    DecodedInsn,
    DecodeError,
    InsnKind,
    MemAccess,
    MemOperand,
    decode,
    effective_address,
    memory_operands,
    scan_block,
)

K = InsnKind
ALL_MODES = (16, 32, 64)
LEGACY_MODES = (16, 32)

# (bytes, kind, code sizes where the encoding is valid)
KIND_ENCODINGS: list[tuple[str, InsnKind, tuple[int, ...]]] = [
    ("0fa2", K.CPUID, ALL_MODES),
    ("0f37", K.GETSEC, ALL_MODES),
    ("0f08", K.INVD, ALL_MODES),
    ("0f01d1", K.XSETBV, ALL_MODES),
    ("0f01c1", K.VMCALL, ALL_MODES),
    ("660fc730", K.VMCLEAR, ALL_MODES),
    ("0f01c2", K.VMLAUNCH, ALL_MODES),
    ("0fc730", K.VMPTRLD, ALL_MODES),
    ("0fc738", K.VMPTRST, ALL_MODES),
    ("0f78c1", K.VMREAD, ALL_MODES),
    ("0f01c3", K.VMRESUME, ALL_MODES),
    ("0f79c1", K.VMWRITE, ALL_MODES),
    ("0f01c4", K.VMXOFF, ALL_MODES),
    ("f30fc730", K.VMXON, ALL_MODES),
    ("660f388000", K.INVEPT, ALL_MODES),
    ("660f388100", K.INVVPID, ALL_MODES),
    ("0f01d4", K.VMFUNC, ALL_MODES),
    ("0f01cf", K.ENCLS, ALL_MODES),
    ("0f01c0", K.ENCLV, ALL_MODES),
    ("f4", K.HLT, ALL_MODES),
    ("0f0138", K.INVLPG, ALL_MODES),
    ("660f388200", K.INVPCID, ALL_MODES),
    ("0f01c9", K.MWAIT, ALL_MODES),
    ("0f01c8", K.MONITOR, ALL_MODES),
    ("0f33", K.RDPMC, ALL_MODES),
    ("0f31", K.RDTSC, ALL_MODES),
    ("0f01f9", K.RDTSCP, ALL_MODES),
    ("f30fc7f8", K.RDPID, ALL_MODES),
    ("f390", K.PAUSE, ALL_MODES),
    ("0f09", K.WBINVD, ALL_MODES),
    ("f30f09", K.WBNOINVD, ALL_MODES),
    ("0fc7f0", K.RDRAND, ALL_MODES),
    ("0fc7f8", K.RDSEED, ALL_MODES),
    ("0f0110", K.LGDT, ALL_MODES),
    ("0f0118", K.LIDT, ALL_MODES),
    ("0f0100", K.SGDT, ALL_MODES),
    ("0f0108", K.SIDT, ALL_MODES),
    ("0f00d0", K.LLDT, ALL_MODES),
    ("0f00d8", K.LTR, ALL_MODES),
    ("0f00c0", K.SLDT, ALL_MODES),
    ("0f00c8", K.STR, ALL_MODES),
    ("ec", K.IN, ALL_MODES),
    ("e460", K.IN, ALL_MODES),
    ("ee", K.OUT, ALL_MODES),
    ("e680", K.OUT, ALL_MODES),
    ("6c", K.INS, ALL_MODES),
    ("6e", K.OUTS, ALL_MODES),
    ("0f32", K.RDMSR, ALL_MODES),
    ("0f30", K.WRMSR, ALL_MODES),
    ("0f22c0", K.MOV_TO_CR, ALL_MODES),
    ("0f20c0", K.MOV_FROM_CR, ALL_MODES),
    ("0f06", K.CLTS, ALL_MODES),
    ("0f01f0", K.LMSW, ALL_MODES),
    ("0f01e0", K.SMSW, ALL_MODES),
    ("0f23c0", K.MOV_TO_DR, ALL_MODES),
    ("0f21c0", K.MOV_FROM_DR, ALL_MODES),
    ("0fc728", K.XSAVES, ALL_MODES),
    ("0fc718", K.XRSTORS, ALL_MODES),
    ("f20faef0", K.UMWAIT, ALL_MODES),
    ("660faef0", K.TPAUSE, ALL_MODES),
    ("f30faef0", K.UMONITOR, ALL_MODES),
    ("f1", K.INT1, ALL_MODES),
    ("fb", K.STI, ALL_MODES),
    ("9d", K.POPF, ALL_MODES),
    ("cf", K.IRET, ALL_MODES),
    ("8ed0", K.MOV_SS, ALL_MODES),
    ("17", K.POP_SS, LEGACY_MODES),
    ("440f22c0", K.MOV_TO_CR, (64,)),  # mov cr8, rax
    ("0f05", K.SYSCALL, ALL_MODES),
    ("0f07", K.SYSRET, ALL_MODES),
    ("0f34", K.SYSENTER, ALL_MODES),
    ("0f35", K.SYSEXIT, ALL_MODES),
    ("480f35", K.SYSEXIT, (64,)),  # sysexitq
    ("f3480faed0", K.WRFSBASE, (64,)),  # wrfsbase rax
    ("f3480faed8", K.WRGSBASE, (64,)),  # wrgsbase rax
    ("440f20c0", K.MOV_FROM_CR, (64,)),  # mov rax, cr8
]

CASES = [(hexbytes, kind, bits) for hexbytes, kind, modes in KIND_ENCODINGS for bits in modes]


def d(hexbytes: str, bits: int = 64, address: int = 0x1000) -> DecodedInsn:
    return decode(bytes.fromhex(hexbytes), address, bits)


def test_the_table_names_every_kind() -> None:
    assert {kind for _, kind, _ in KIND_ENCODINGS} == set(InsnKind)


@pytest.mark.parametrize(("hexbytes", "kind", "bits"), CASES, ids=[f"{k.name}-{h}-{b}" for h, k, b in CASES])
def test_every_kind_is_recognised_in_every_code_size(hexbytes: str, kind: InsnKind, bits: int) -> None:
    insn = d(hexbytes, bits)
    assert insn.kind is kind
    assert insn.raw == bytes.fromhex(hexbytes)
    assert insn.length == len(insn.raw)
    assert insn.address == 0x1000
    assert insn.bitness == bits


@pytest.mark.parametrize(
    ("hexbytes", "bits", "text"),
    [
        ("90", 64, "nop"),
        ("4889c8", 64, "mov rax, rcx"),
        ("0f20d0", 64, "mov rax, cr2"),  # CR2 accesses cannot be intercepted
        ("0f22d0", 32, "mov cr2, eax"),
        ("cc", 32, "int3"),
        ("cd80", 32, "int 0x80"),
        ("0f0b", 64, "ud2"),
        ("0f01d9", 64, "vmmcall"),  # AMD's VMCALL: #UD on Intel
        ("0f01d7", 64, "enclu"),  # no VMX control intercepts ENCLU
        ("0f01fa", 64, "monitorx"),  # AMD
        ("8ed8", 32, "mov ds, ax"),  # only SS loads block events
        ("1f", 32, "pop ds"),
        ("0fb210", 32, "lss edx, [eax]"),  # LSS does not block by MOV SS
        ("fa", 64, "cli"),
        ("9c", 64, "pushfq"),
    ],
)
def test_instructions_that_are_not_sensitive(hexbytes: str, bits: int, text: str) -> None:
    insn = d(hexbytes, bits)
    assert insn.kind is None
    assert insn.text == text


@pytest.mark.parametrize(
    ("hexbytes", "bits"),
    [
        ("f00f20c0", 64),  # LOCK MOV CR: AMD's CR8 alias, #UD on Intel
        ("0f22c8", 64),  # MOV CR1
        ("0f22e8", 64),  # MOV CR5
        ("440f21c0", 64),  # MOV DR8
        ("17", 64),  # POP SS does not exist in 64-bit mode
        ("0f01", 64),  # truncated
        ("", 64),
        ("0f0b", 33),
    ],
)
def test_bytes_that_are_not_an_instruction_raise_decode_error(hexbytes: str, bits: int) -> None:
    with pytest.raises(ValueError) as info:
        d(hexbytes, bits)
    if bits in ALL_MODES:
        assert isinstance(info.value, DecodeError)
        assert info.value.address == 0x1000


# --- operands --------------------------------------------------------------------------------
def test_out_imm8() -> None:
    insn = d("e680")
    assert (insn.kind, insn.text, insn.port, insn.io_size, insn.rep, insn.memory) == (
        K.OUT, "out 0x80, al", 0x80, 1, False, None,
    )


def test_in_al_dx_has_its_port_in_dx() -> None:
    insn = d("ec", 32)
    assert (insn.kind, insn.text, insn.port, insn.io_size) == (K.IN, "in al, dx", None, 1)


@pytest.mark.parametrize(("bits", "size", "text"), [(64, 2, "out dx, ax"), (32, 2, "out dx, ax"), (16, 4, "out dx, eax")])
def test_operand_size_prefix_sets_the_io_size(bits: int, size: int, text: str) -> None:
    insn = d("66ef", bits)
    assert (insn.kind, insn.io_size, insn.text, insn.port) == (K.OUT, size, text, None)


def test_in_eax_imm8() -> None:
    insn = d("e571", 32)
    assert (insn.kind, insn.port, insn.io_size, insn.operand_size) == (K.IN, 0x71, 4, 32)


def test_rep_outsb_reads_ds_rsi() -> None:
    insn = d("f36e")
    assert (insn.kind, insn.rep, insn.io_size, insn.address_size) == (K.OUTS, True, 1, 64)
    assert insn.memory == MemOperand(SEG_DS, 6, None, 1, 0, 64, False, 64)
    assert not insn.is_write_to_memory


def test_outs_honours_a_segment_override_and_the_address_size_prefix() -> None:
    insn = d("2e6766f36f", 64)  # rep outsw dx, cs:[esi]
    assert (insn.kind, insn.rep, insn.io_size, insn.address_size) == (K.OUTS, True, 2, 32)
    assert insn.memory == MemOperand(SEG_CS, 6, None, 1, 0, 32, False, 64)


def test_ins_writes_es_rdi_and_ignores_segment_overrides() -> None:
    insn = d("64f26d", 16)  # repne insw es:[di], dx (REPNE repeats INS like REP)
    assert (insn.kind, insn.rep, insn.io_size, insn.address_size) == (K.INS, True, 2, 16)
    assert insn.memory == MemOperand(SEG_ES, 7, None, 1, 0, 16, False, 16)
    assert insn.is_write_to_memory


@pytest.mark.parametrize(
    ("hexbytes", "bits", "kind", "cr", "gpr", "size"),
    [
        ("0f22c0", 64, K.MOV_TO_CR, 0, 0, 64),
        ("0f22c0", 32, K.MOV_TO_CR, 0, 0, 32),
        ("410f22d8", 64, K.MOV_TO_CR, 3, 8, 64),  # mov cr3, r8
        ("0f22e3", 32, K.MOV_TO_CR, 4, 3, 32),  # mov cr4, ebx
        ("440f20c0", 64, K.MOV_FROM_CR, 8, 0, 64),  # mov rax, cr8
        ("450f22c7", 64, K.MOV_TO_CR, 8, 15, 64),  # mov cr8, r15
        ("0f20d9", 64, K.MOV_FROM_CR, 3, 1, 64),  # mov rcx, cr3
    ],
)
def test_mov_cr_operands(hexbytes: str, bits: int, kind: InsnKind, cr: int, gpr: int, size: int) -> None:
    insn = d(hexbytes, bits)
    assert (insn.kind, insn.cr, insn.gpr, insn.operand_size, insn.dr) == (kind, cr, gpr, size, None)


@pytest.mark.parametrize(
    ("hexbytes", "bits", "kind", "dr", "gpr"),
    [
        ("0f21f8", 64, K.MOV_FROM_DR, 7, 0),  # mov rax, dr7
        ("0f23c3", 32, K.MOV_TO_DR, 0, 3),  # mov dr0, ebx
        ("410f23f1", 64, K.MOV_TO_DR, 6, 9),  # mov dr6, r9
        ("0f21e0", 64, K.MOV_FROM_DR, 4, 0),  # DR4: MOV-DR exiting beats the CR4.DE #UD
    ],
)
def test_mov_dr_operands(hexbytes: str, bits: int, kind: InsnKind, dr: int, gpr: int) -> None:
    insn = d(hexbytes, bits)
    assert (insn.kind, insn.dr, insn.gpr, insn.cr) == (kind, dr, gpr, None)


def test_clts_lmsw_smsw() -> None:
    assert d("0f06").kind is K.CLTS
    lmsw = d("0f01f0")
    assert (lmsw.kind, lmsw.gpr, lmsw.memory, lmsw.text) == (K.LMSW, 0, None, "lmsw ax")
    lmsw_mem = d("0f0133", 32)  # lmsw [ebx]
    assert lmsw_mem.gpr is None
    assert lmsw_mem.memory == MemOperand(SEG_DS, 3, None, 1, 0, 32, False, 32)
    assert not lmsw_mem.is_write_to_memory
    smsw = d("0f01263412", 16)  # smsw [0x1234] (ModRM 26: disp16 in 16-bit addressing)
    assert (smsw.kind, smsw.is_write_to_memory) == (K.SMSW, True)
    assert smsw.memory == MemOperand(SEG_DS, None, None, 1, 0x1234, 16, False, 16)
    smsw_reg = d("480f01e2")  # smsw rdx
    assert (smsw_reg.gpr, smsw_reg.operand_size, smsw_reg.memory) == (2, 64, None)


@pytest.mark.parametrize(
    ("hexbytes", "bits", "gpr", "size"),
    [("0fc7f0", 64, 0, 32), ("480fc7f3", 64, 3, 64), ("660fc7f1", 64, 1, 16), ("490fc7fa", 64, 10, 64), ("0fc7f6", 16, 6, 16)],
)
def test_rdrand_rdseed_destination(hexbytes: str, bits: int, gpr: int, size: int) -> None:
    insn = d(hexbytes, bits)
    assert insn.kind in (K.RDRAND, K.RDSEED)
    assert (insn.gpr, insn.operand_size) == (gpr, size)


def test_rdtscp_and_rdmsr_wrmsr_have_no_operands() -> None:
    for hexbytes, kind in (("0f01f9", K.RDTSCP), ("0f32", K.RDMSR), ("0f30", K.WRMSR)):
        insn = d(hexbytes)
        assert (insn.kind, insn.gpr, insn.memory, insn.port) == (kind, None, None, None)


def test_vmread_register_form_names_reg1_and_reg2() -> None:
    insn = d("0f78c1")  # vmread rcx, rax: r/m = rcx (Reg1), reg = rax (Reg2, the encoding)
    assert (insn.kind, insn.gpr, insn.reg2, insn.memory, insn.operand_size) == (K.VMREAD, 1, 0, None, 64)


def test_vmread_to_memory_writes_memory() -> None:
    insn = d("0f7818", 32)  # vmread [eax], ebx
    assert (insn.gpr, insn.reg2, insn.is_write_to_memory, insn.operand_size) == (None, 3, True, 32)
    assert insn.memory == MemOperand(SEG_DS, 0, None, 1, 0, 32, False, 32)


def test_vmwrite_from_memory() -> None:
    insn = d("0f790424")  # vmwrite rax, [rsp]
    assert (insn.kind, insn.gpr, insn.reg2, insn.is_write_to_memory) == (K.VMWRITE, None, 0, False)
    assert insn.memory == MemOperand(SEG_SS, 4, None, 1, 0, 64, False, 64)


def test_invept_type_register_and_sib_operand() -> None:
    insn = d("660f38804cda10")  # invept rcx, [rdx+rbx*8+0x10]
    assert (insn.kind, insn.reg2, insn.gpr) == (K.INVEPT, 1, None)
    assert insn.memory == MemOperand(SEG_DS, 2, 3, 8, 0x10, 64, False, 64)


def test_rip_relative_operand_keeps_the_raw_displacement() -> None:
    insn = d("0f0115f0ffffff", 64, address=0x401000)  # lgdt [rip-0x10]
    assert insn.memory == MemOperand(SEG_DS, None, None, 1, -16, 64, True, 64)
    assert insn.text == "lgdt [rip-0x10]"
    assert (insn.operand_size, insn.is_write_to_memory) == (64, False)


def test_sib_with_displacement_and_segment_override() -> None:
    insn = d("640f015488f0")  # lgdt fs:[rax+rcx*4-0x10]
    assert insn.memory == MemOperand(SEG_FS, 0, 1, 4, -0x10, 64, False, 64)


def test_sixteen_bit_addressing_bp_defaults_to_ss() -> None:
    insn = d("0f0156fe", 16)  # lgdt [bp-2]
    assert insn.memory == MemOperand(SEG_SS, 5, None, 1, -2, 16, False, 16)
    assert insn.operand_size == 16
    assert d("660f0156fe", 16).operand_size == 32


def test_address_size_prefix_in_64_bit_mode() -> None:
    insn = d("670f0100")  # sgdt [eax]
    assert (insn.kind, insn.address_size, insn.is_write_to_memory) == (K.SGDT, 32, True)
    assert insn.memory == MemOperand(SEG_DS, 0, None, 1, 0, 32, False, 64)


def test_descriptor_table_register_forms() -> None:
    ltr = d("0f00d8")  # ltr ax
    assert (ltr.kind, ltr.gpr, ltr.memory) == (K.LTR, 0, None)
    sldt = d("410f00c5")  # sldt r13d
    assert (sldt.kind, sldt.gpr, sldt.memory) == (K.SLDT, 13, None)
    lldt = d("0f0010", 32)  # lldt [eax]
    assert (lldt.gpr, lldt.memory) == (None, MemOperand(SEG_DS, 0, None, 1, 0, 32, False, 32))


def test_monitor_uses_seg_rax() -> None:
    insn = d("640f01c8", 32)  # fs monitor: address in FS:[EAX]
    assert insn.memory == MemOperand(SEG_FS, 0, None, 1, 0, 32, False, 32)


def test_mov_ss_source_and_pop_ss() -> None:
    mov = d("8ed3", 32)  # mov ss, bx
    assert (mov.kind, mov.gpr) == (K.MOV_SS, 3)
    mov_mem = d("8e10", 32)  # mov ss, [eax]
    assert mov_mem.memory == MemOperand(SEG_DS, 0, None, 1, 0, 32, False, 32)
    assert d("17", 16).kind is K.POP_SS


def test_observed_instructions() -> None:
    assert [d(h).kind for h in ("fb", "9d", "669d", "cf", "48cf", "f1")] == [
        K.STI, K.POPF, K.POPF, K.IRET, K.IRET, K.INT1,
    ]


def test_decode_ignores_trailing_bytes() -> None:
    insn = decode(bytes.fromhex("0fa2" "ffffffffffffffffffffffffff"), 0x7000, 64)
    assert (insn.kind, insn.length, insn.raw) == (K.CPUID, 2, b"\x0f\xa2")


# --- scan_block ------------------------------------------------------------------------------
BLOCK = bytes.fromhex(
    "4889c8"  # 0x1000 mov rax, rcx
    "0fa2"  # 0x1003 cpuid
    "4883c001"  # 0x1005 add rax, 1
    "e680"  # 0x1009 out 0x80, al
    "8b05f0ffffff"  # 0x100b mov eax, [rip-0x10]
    "f390"  # 0x1011 pause
    "ebeb"  # 0x1013 jmp
)
BLOCK_ADDRESSES = [0x1000, 0x1003, 0x1005, 0x1009, 0x100B, 0x1011, 0x1013]


def test_scan_block_addresses_and_sensitive_instructions() -> None:
    addresses, sensitive = scan_block(BLOCK, 0x1000, 64, 100)
    assert addresses == BLOCK_ADDRESSES
    assert [(i.address, i.kind) for i in sensitive] == [(0x1003, K.CPUID), (0x1009, K.OUT), (0x1011, K.PAUSE)]
    assert sensitive[1] == decode(BLOCK[9:], 0x1009, 64)


def test_scan_block_stops_at_max_instructions() -> None:
    addresses, sensitive = scan_block(BLOCK, 0x1000, 64, 3)
    assert addresses == BLOCK_ADDRESSES[:3]
    assert [i.kind for i in sensitive] == [K.CPUID]
    assert scan_block(BLOCK, 0x1000, 64, 0) == ([], [])


def test_scan_block_stops_at_a_truncated_or_invalid_instruction() -> None:
    addresses, sensitive = scan_block(BLOCK[:10], 0x1000, 64, 100)  # "e6" without its imm8
    assert addresses == BLOCK_ADDRESSES[:3]
    assert [i.kind for i in sensitive] == [K.CPUID]
    addresses, _ = scan_block(bytes.fromhex("0fa2" "f00f20c0" "0fa2"), 0x1000, 64, 100)
    assert addresses == [0x1000]
    assert scan_block(b"", 0x1000, 64, 100) == ([], [])


def test_scan_block_in_16_bit_code() -> None:
    code = bytes.fromhex("b80100" "66ef" "ec" "17" "fb" "f4")  # mov ax,1; out dx,eax; in; pop ss; sti; hlt
    addresses, sensitive = scan_block(code, 0xFFF0, 16, 100)
    assert addresses == [0xFFF0, 0xFFF3, 0xFFF5, 0xFFF6, 0xFFF7, 0xFFF8]
    assert [(i.kind, i.io_size) for i in sensitive] == [
        (K.OUT, 4), (K.IN, 1), (K.POP_SS, None), (K.STI, None), (K.HLT, None),
    ]


@given(st.binary(max_size=48), st.sampled_from(ALL_MODES), st.integers(0, 2**32))
def test_random_bytes_never_crash_the_scanner(code: bytes, bits: int, address: int) -> None:
    addresses, sensitive = scan_block(code, address, bits, 64)
    assert addresses == sorted(set(addresses))
    assert all(address <= a < address + len(code) for a in addresses)
    assert {i.address for i in sensitive} <= set(addresses)
    for insn in sensitive:
        offset = insn.address - address
        assert decode(code[offset:], insn.address, bits) == insn
    for a in addresses:
        decode(code[a - address :], a, bits)  # every listed address decodes


@given(st.binary(max_size=16), st.sampled_from(ALL_MODES))
def test_random_bytes_decode_or_raise_decode_error(code: bytes, bits: int) -> None:
    try:
        insn = decode(code, 0, bits)
    except DecodeError:
        return
    assert insn.raw == code[: insn.length]
    memory_operands(code, 0, bits)


# --- memory accesses and linear addresses ----------------------------------------------------------
def test_memory_operands_of_push() -> None:
    assert memory_operands(bytes.fromhex("50"), 0x1000, 64) == [
        MemAccess(SEG_SS, 4, None, 1, -8, 64, 8, True, False, 64),
    ]
    assert memory_operands(bytes.fromhex("6650"), 0x1000, 16) == [  # push eax in 16-bit code
        MemAccess(SEG_SS, 4, None, 1, -4, 16, 4, True, False, 16),
    ]


def test_memory_operands_of_push_from_memory() -> None:
    assert memory_operands(bytes.fromhex("ff30"), 0, 64) == [  # push qword [rax]
        MemAccess(SEG_DS, 0, None, 1, 0, 64, 8, False, False, 64),
        MemAccess(SEG_SS, 4, None, 1, -8, 64, 8, True, False, 64),
    ]


def test_memory_operands_of_movs() -> None:
    assert memory_operands(bytes.fromhex("48a5"), 0, 64) == [  # movsq
        MemAccess(SEG_ES, 7, None, 1, 0, 64, 8, True, False, 64),
        MemAccess(SEG_DS, 6, None, 1, 0, 64, 8, False, False, 64),
    ]
    assert memory_operands(bytes.fromhex("f3a4"), 0, 32) == [  # rep movsb: one element each
        MemAccess(SEG_ES, 7, None, 1, 0, 32, 1, True, False, 32),
        MemAccess(SEG_DS, 6, None, 1, 0, 32, 1, False, False, 32),
    ]


def test_memory_operands_of_a_sib_access_with_displacement() -> None:
    assert memory_operands(bytes.fromhex("8b4c8810"), 0, 64) == [  # mov ecx, [rax+rcx*4+0x10]
        MemAccess(SEG_DS, 0, 1, 4, 0x10, 64, 4, False, False, 64),
    ]


def test_memory_operands_rip_relative_and_none() -> None:
    assert memory_operands(bytes.fromhex("8905f0ffffff"), 0x2000, 64) == [  # mov [rip-0x10], eax
        MemAccess(SEG_DS, None, None, 1, -16, 64, 4, True, True, 64),
    ]
    assert memory_operands(bytes.fromhex("488d0424"), 0, 64) == []  # lea: no access
    assert memory_operands(bytes.fromhex("4889c8"), 0, 64) == []


REGS = [0x1000 * (n + 1) for n in range(16)]  # rax = 0x1000, rcx = 0x2000, ...
BASES = [0x10000, 0x20000, 0x30000, 0x40000, 0x50000, 0x60000]  # ES CS SS DS FS GS


def test_effective_address_sib_in_64_bit_mode_ignores_ds_base() -> None:
    m = MemAccess(SEG_DS, 0, 1, 4, 0x10, 64, 4, False, False, 64)
    assert effective_address(m, REGS, BASES, 0) == 0x1000 + 0x2000 * 4 + 0x10


def test_effective_address_fs_base_counts_in_64_bit_mode() -> None:
    m = MemOperand(SEG_FS, 0, None, 1, -0x10, 64, False, 64)
    assert effective_address(m, REGS, BASES, 0) == 0x50000 + 0x1000 - 0x10


def test_effective_address_rip_relative() -> None:
    m = MemOperand(SEG_DS, None, None, 1, -16, 64, True, 64)
    assert effective_address(m, REGS, BASES, 0x401007) == 0x400FF7


def test_effective_address_wraps_at_16_bits_before_adding_the_base() -> None:
    regs = [0] * 16
    regs[3], regs[6] = 0xFFF0, 0x20  # bx, si
    m = MemOperand(SEG_DS, 3, 6, 1, 0x10, 16, False, 16)  # [bx+si+0x10]
    assert effective_address(m, regs, BASES, 0) == 0x40000 + 0x20


def test_effective_address_32_bit_wraps_linear_address() -> None:
    regs = [0] * 16
    regs[0] = 0x2000
    bases = [0, 0, 0, 0xFFFFF000, 0, 0]
    m = MemOperand(SEG_DS, 0, None, 1, 0, 32, False, 32)
    assert effective_address(m, regs, bases, 0) == 0x1000


def test_effective_address_of_a_decoded_operand() -> None:
    insn = d("0f0156fe", 16)  # lgdt [bp-2]
    regs = [0] * 16
    regs[5] = 0x0001
    assert insn.memory is not None
    assert effective_address(insn.memory, regs, BASES, 0) == 0x30000 + 0xFFFF
    assert SEG_GS == 5
