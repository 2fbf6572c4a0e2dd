"""VM-exit decisions and exit-information encoders (pyvmx.vmx.exits), one test per SDM rule.

SDM Vol. 3C (Dec 2023): 26.1 instructions that cause VM exits, 26.2 other causes (the exception
bitmap), 26.3 changes to instruction behaviour, 28.2.1 exit qualifications, 28.2.5 VM-exit
instruction information.  The bitmap decisions are also checked against naive references.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmx.arch.controls import (
    PinBasedControls as P,
    ProcBasedControls as C,
    SecondaryProcBasedControls as S,
)
from pyvmx.arch.exit_reasons import ExitReason as R
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, PageFaultErrorCode
from pyvmx.vmx import exits as ex
from pyvmx.vmx.decode import DecodedInsn, InsnKind, decode
from pyvmx.vmx.exits import (
    CrAccessQualification,
    CrAccessType,
    ExecControls,
    InjectUD,
    InstructionInfo,
    IoQualification,
    MovDrQualification,
    PauseLoopState,
)
from pyvmx.vmx.memory import PhysicalMemory
from pyvmx.vmx.vmcs import VmcsRegion

K = InsnKind
IO_A, IO_B, MSR_PAGE = 0x1000, 0x2000, 0x3000
MEMORY_SIZE = 0x10000
EFER = 0xC0000080
PG, PE, MP, EM, TS = int(Cr0.PG), int(Cr0.PE), int(Cr0.MP), int(Cr0.EM), int(Cr0.TS)


def memory() -> PhysicalMemory:
    return PhysicalMemory(MEMORY_SIZE)


def io_ctl() -> ExecControls:
    return ExecControls(proc=C.USE_IO_BITMAPS, io_bitmap_a=IO_A, io_bitmap_b=IO_B)


def msr_ctl() -> ExecControls:
    return ExecControls(proc=C.USE_MSR_BITMAPS, msr_bitmap=MSR_PAGE)


def d(hexbytes: str, bits: int = 64) -> DecodedInsn:
    return decode(bytes.fromhex(hexbytes), 0x1000, bits)


# --- I/O bitmaps (SDM 26.1.3 "I/O instructions", 25.6.4) ----------------------------------------------
def serial_port_intercepted() -> PhysicalMemory:
    mem = memory()
    mem.write8(IO_A + 0x3F8 // 8, 1 << (0x3F8 % 8))  # only port 3F8H
    return mem


@pytest.mark.parametrize(
    ("port", "size", "exits"),
    [
        (0x3F8, 1, True),  # the intercepted port itself
        (0x3F7, 2, True),  # 3F7H-3F8H covers 3F8H
        (0x3F6, 2, False),  # 3F6H-3F7H
        (0x3F5, 4, True),  # 3F5H-3F8H
        (0x3F4, 4, False),  # 3F4H-3F7H
        (0x3F9, 1, False),
        (0x3F8 + 0x8000, 1, False),  # the same bit position in bitmap B is clear
    ],
)
def test_io_exits_if_any_accessed_port_is_set_in_the_bitmap(port: int, size: int, exits: bool) -> None:
    assert ex.io_exits(io_ctl(), serial_port_intercepted(), port, size) is exits


@pytest.mark.parametrize(("port", "size", "exits"), [(0xFFFE, 4, True), (0xFFFD, 4, True), (0xFFFE, 2, False), (0xFFFF, 1, False), (0xFFFF, 2, True)])
def test_io_access_wrapping_past_ffff_always_exits(port: int, size: int, exits: bool) -> None:
    assert ex.io_exits(io_ctl(), memory(), port, size) is exits


def test_io_access_at_7fff_straddles_bitmaps_a_and_b() -> None:
    mem = memory()
    assert not ex.io_exits(io_ctl(), mem, 0x7FFF, 2)
    mem.write8(IO_B, 1)  # port 8000H: bit 0 of bitmap B
    assert ex.io_exits(io_ctl(), mem, 0x7FFF, 2)
    assert ex.io_exits(io_ctl(), mem, 0x7FFE, 4)
    assert not ex.io_exits(io_ctl(), mem, 0x7FFF, 1)
    mem.write8(IO_B, 0)
    mem.write8(IO_A + 0xFFF, 0x80)  # port 7FFFH: last bit of bitmap A
    assert ex.io_exits(io_ctl(), mem, 0x7FFF, 2)
    assert not ex.io_exits(io_ctl(), mem, 0x8000, 4)


def test_without_io_bitmaps_unconditional_io_exiting_decides() -> None:
    mem = serial_port_intercepted()
    assert ex.io_exits(ExecControls(proc=C.UNCOND_IO_EXITING), mem, 0x80, 1)
    assert not ex.io_exits(ExecControls(), mem, 0x3F8, 1)


def test_with_io_bitmaps_unconditional_io_exiting_is_ignored() -> None:
    ctl = ExecControls(proc=C.USE_IO_BITMAPS | C.UNCOND_IO_EXITING, io_bitmap_a=IO_A, io_bitmap_b=IO_B)
    assert not ex.io_exits(ctl, memory(), 0x80, 1)


def test_io_bitmap_outside_memory_reads_as_all_ones() -> None:
    ctl = ExecControls(proc=C.USE_IO_BITMAPS, io_bitmap_a=0x100000000, io_bitmap_b=IO_B)
    assert ex.io_exits(ctl, memory(), 0x80, 1)
    assert not ex.io_exits(ctl, memory(), 0x8080, 1)


@pytest.mark.parametrize(("port", "size"), [(-1, 1), (0x10000, 1), (0x80, 3), (0x80, 8)])
def test_io_exits_rejects_impossible_accesses(port: int, size: int) -> None:
    with pytest.raises(ValueError):
        ex.io_exits(io_ctl(), memory(), port, size)


def _naive_io_reference(intercepted: set[int], port: int, size: int) -> bool:
    return any(p > 0xFFFF or p in intercepted for p in range(port, port + size))


@given(
    st.sets(st.integers(0, 0xFFFF), max_size=40) | st.sets(st.integers(0x7FF0, 0x8010), max_size=8),
    st.integers(0, 0xFFFF) | st.sampled_from([0x7FFD, 0x7FFE, 0x7FFF, 0xFFFD, 0xFFFE, 0xFFFF]),
    st.sampled_from([1, 2, 4]),
)
def test_io_exits_matches_a_naive_reference(intercepted: set[int], port: int, size: int) -> None:
    mem = memory()
    for p in intercepted:  # SDM 25.6.4: A holds ports 0000H-7FFFH, B holds 8000H-FFFFH
        page = IO_A if p < 0x8000 else IO_B
        offset = (p - (0 if p < 0x8000 else 0x8000)) // 8
        mem.write8(page + offset, mem.read8(page + offset) | 1 << (p % 8))
    assert ex.io_exits(io_ctl(), mem, port, size) is _naive_io_reference(intercepted, port, size)


# --- MSR bitmaps (SDM 26.1.3 "RDMSR"/"WRMSR", 25.6.9) ---------------------------------------------------
def efer_write_intercepted() -> PhysicalMemory:
    mem = memory()
    mem.write8(MSR_PAGE + 0xC10, 1)  # write bitmap for high MSRs (C00H) + 80H / 8, bit 80H % 8
    return mem


@pytest.mark.parametrize(
    ("msr", "write", "exits"),
    [
        (EFER, True, True),
        (EFER, False, False),
        (0xC0000081, True, False),  # IA32_STAR
        (0x80, True, False),  # the same bit position among the low MSRs
        (0x40000000, False, True),  # outside both ranges: always
        (0x40000000, True, True),
        (0x2000, False, True),  # just past the low range
        (0xC0002000, True, True),  # just past the high range
        (0xBFFFFFFF, False, True),
        (0x1FFF, False, False),
        (0xC0001FFF, True, False),
        (0xFFFFFFFF_C0000080, True, True),  # RCX[63:32] is ignored: still EFER
    ],
)
def test_msr_exits_for_only_wrmsr_efer_intercepted(msr: int, write: bool, exits: bool) -> None:
    assert ex.msr_exits(msr_ctl(), efer_write_intercepted(), msr, write) is exits


@pytest.mark.parametrize("msr", [0x10, 0x1B, EFER, 0xC0000100, 0x40000000])
def test_without_msr_bitmaps_every_rdmsr_and_wrmsr_exits(msr: int) -> None:
    assert ex.msr_exits(ExecControls(), memory(), msr, False)
    assert ex.msr_exits(ExecControls(), memory(), msr, True)


MSR_RANGES = [  # (first, last, read-bitmap offset, write-bitmap offset), SDM 25.6.9
    (0x00000000, 0x00001FFF, 0x000, 0x800),
    (0xC0000000, 0xC0001FFF, 0x400, 0xC00),
]
MSRS = (
    st.integers(0, 0x2100)
    | st.integers(0xBFFFFF00, 0xC0002100)
    | st.integers(0, 2**64 - 1)
    | st.sampled_from([int(m) for m in Msr])
)


@given(st.sets(st.tuples(MSRS, st.booleans()), max_size=30), MSRS, st.booleans())
def test_msr_exits_matches_a_naive_reference(intercepted: set[tuple[int, bool]], msr: int, write: bool) -> None:
    mem = memory()
    wanted: set[tuple[int, bool]] = set()
    for m, w in intercepted:
        for first, last, read_off, write_off in MSR_RANGES:
            if first <= m & 0xFFFFFFFF <= last:
                n = (m & 0xFFFFFFFF) - first
                byte = MSR_PAGE + (write_off if w else read_off) + n // 8
                mem.write8(byte, mem.read8(byte) | 1 << (n % 8))
                wanted.add((m & 0xFFFFFFFF, w))
    ecx = msr & 0xFFFFFFFF
    in_range = any(first <= ecx <= last for first, last, _, _ in MSR_RANGES)
    expected = not in_range or (ecx, write) in wanted
    assert ex.msr_exits(msr_ctl(), mem, msr, write) is expected


# --- control registers (SDM 26.1.3, 26.3) -------------------------------------------------------------
PG_OWNED = ExecControls(cr0_mask=PG, cr0_shadow=PG | PE)  # only CR0.PG intercepted, shadow PG = 1


def test_mov_to_cr0_changing_only_guest_owned_bits_does_not_exit() -> None:
    assert not ex.mov_to_cr0_exits(PG_OWNED, PG | PE | TS)
    assert not ex.mov_to_cr0_exits(PG_OWNED, PG)


def test_mov_to_cr0_changing_a_host_owned_bit_exits() -> None:
    assert ex.mov_to_cr0_exits(PG_OWNED, PE | TS)


def test_mov_to_cr0_with_an_empty_mask_never_exits() -> None:
    assert not ex.mov_to_cr0_exits(ExecControls(cr0_shadow=PG), 0)


def test_mov_from_cr0_reads_the_shadow_for_host_owned_bits() -> None:
    real = PE | TS  # the real CR0 has PG = 0 (e.g. the host runs the guest unpaged)
    assert ex.cr_read_value(real, PG_OWNED.cr0_mask, PG_OWNED.cr0_shadow) == PG | PE | TS


def test_mov_to_cr0_that_does_not_exit_keeps_host_owned_bits() -> None:
    assert ex.cr_write_result(PE | PG, PE | TS, PG) == PE | PG | TS
    assert ex.cr_write_result(PE, PG | PE, PG) == PE
    high = 1 << 40
    assert ex.cr_write_result(high | PE, PE | TS, PG) == PE | TS  # bit 40 is guest-owned


def test_mov_to_cr4_exits_on_host_owned_bits_that_differ_from_the_shadow() -> None:
    vmxe = 1 << 13
    ctl = ExecControls(cr4_mask=vmxe, cr4_shadow=0)
    assert ex.mov_to_cr4_exits(ctl, vmxe)
    assert not ex.mov_to_cr4_exits(ctl, 1 << 5)
    assert ex.cr_read_value(vmxe | (1 << 5), vmxe, 0) == 1 << 5


def test_clts_exits_if_ts_is_set_in_both_mask_and_shadow() -> None:
    assert ex.clts_exits(ExecControls(cr0_mask=TS, cr0_shadow=TS))
    assert not ex.clts_exits(ExecControls(cr0_mask=TS, cr0_shadow=0))
    assert not ex.clts_exits(ExecControls(cr0_mask=0, cr0_shadow=TS))


def test_clts_that_does_not_exit_leaves_a_host_owned_ts_alone() -> None:
    assert ex.clts_result(PE | TS, TS) == PE | TS
    assert ex.clts_result(PE | TS | (1 << 40), 0) == PE | (1 << 40)


@pytest.mark.parametrize(
    ("mask", "shadow", "source", "exits"),
    [
        (PE, 0, PE, True),  # would set a host-owned PE the shadow has clear
        (PE, 0, 0, False),
        (PE, PE, 0, False),  # LMSW cannot clear PE: no change, no exit
        (PE, PE, PE, False),
        (MP, 0, MP, True),  # MP/EM/TS: any difference from the shadow
        (MP, MP, 0, True),
        (EM | TS, EM, EM, False),
        (EM | TS, EM, EM | TS, True),
        (0, 0, PE | MP | EM | TS, False),  # nothing owned
        (PG, 0, 0xFFFF, False),  # LMSW cannot touch bits above 3
    ],
)
def test_lmsw_exits(mask: int, shadow: int, source: int, exits: bool) -> None:
    assert ex.lmsw_exits(ExecControls(cr0_mask=mask, cr0_shadow=shadow), source) is exits


def test_lmsw_that_does_not_exit_loads_guest_bits_3_0_and_cannot_clear_pe() -> None:
    assert ex.lmsw_result(PE | PG, 0, 0) == PE | PG  # PE stays set
    assert ex.lmsw_result(PG, PE | MP | EM | TS, 0) == PG | PE | MP | EM | TS
    assert ex.lmsw_result(PG | TS, 0xFFF0, 0) == PG  # only bits 3:0 are loaded
    assert ex.lmsw_result(PG | TS, PE, TS) == PG | TS | PE  # host-owned TS kept


def test_mov_to_cr3_exits_unless_the_value_is_a_cr3_target() -> None:
    ctl = ExecControls(proc=C.CR3_LOAD_EXITING, cr3_targets=(0x1000, 0x2000))
    assert not ex.mov_to_cr3_exits(ctl, 0x2000)
    assert ex.mov_to_cr3_exits(ctl, 0x3000)
    assert ex.mov_to_cr3_exits(ExecControls(proc=C.CR3_LOAD_EXITING), 0x1000)  # count 0
    assert not ex.mov_to_cr3_exits(ExecControls(cr3_targets=()), 0x3000)  # no CR3-load exiting


def test_from_vmcs_keeps_only_cr3_target_count_targets() -> None:
    mem = memory()
    vmcs = VmcsRegion(mem, 0x4000)
    for i, field in enumerate((F.CR3_TARGET_VALUE0, F.CR3_TARGET_VALUE1, F.CR3_TARGET_VALUE2, F.CR3_TARGET_VALUE3)):
        vmcs.write(field, 0x1000 * (i + 1))
    vmcs.write(F.CR3_TARGET_COUNT, 2)
    vmcs.write(F.CPU_BASED_VM_EXEC_CONTROL, C.CR3_LOAD_EXITING)
    ctl = ExecControls.from_vmcs(vmcs)
    assert ctl.cr3_targets == (0x1000, 0x2000)
    assert ex.mov_to_cr3_exits(ctl, 0x3000)


def test_from_vmcs_ignores_secondary_controls_unless_activated() -> None:
    mem = memory()
    vmcs = VmcsRegion(mem, 0x4000)
    vmcs.write(F.SECONDARY_VM_EXEC_CONTROL, S.ENABLE_EPT | S.ENABLE_RDTSCP)
    vmcs.write(F.PIN_BASED_VM_EXEC_CONTROL, P.NMI_EXITING | P.VIRTUAL_NMIS)
    vmcs.write(F.IO_BITMAP_A, IO_A)
    vmcs.write(F.PAGE_FAULT_ERROR_CODE_MATCH, 1)
    ctl = ExecControls.from_vmcs(vmcs)
    assert (ctl.proc2, ctl.ept_enabled, ctl.rdtscp_enabled) == (0, False, False)
    assert (ctl.nmi_exiting, ctl.virtual_nmis, ctl.io_bitmap_a, ctl.pfec_match) == (True, True, IO_A, 1)
    vmcs.write(F.CPU_BASED_VM_EXEC_CONTROL, C.ACTIVATE_SECONDARY_CONTROLS)
    ctl = ExecControls.from_vmcs(vmcs)
    assert (ctl.ept_enabled, ctl.rdtscp_enabled, ctl.unrestricted_guest) == (True, True, False)


# --- the exception bitmap (SDM 26.2) ---------------------------------------------------------------
PRESENT = int(PageFaultErrorCode.PRESENT)
WRITE = int(PageFaultErrorCode.WRITE)
PF_BIT = 1 << 14


@pytest.mark.parametrize(
    ("bitmap", "error_code", "exits"),
    [
        (PF_BIT, PRESENT | WRITE, True),  # KVM's selective #PF trap: present faults exit
        (PF_BIT, WRITE, False),  # non-present faults go to the guest
        (0, PRESENT | WRITE, False),  # bit 14 clear: the opposite
        (0, WRITE, True),
    ],
)
def test_page_fault_error_code_mask_and_match(bitmap: int, error_code: int, exits: bool) -> None:
    ctl = ExecControls(exception_bitmap=bitmap, pfec_mask=PRESENT, pfec_match=PRESENT)
    assert ex.exception_exits(ctl, 14, error_code) is exits


def test_page_faults_with_mask_and_match_zero_follow_bit_14() -> None:
    assert ex.exception_exits(ExecControls(exception_bitmap=PF_BIT), 14, 0x1F)
    assert not ex.exception_exits(ExecControls(), 14, 0x1F)


def test_page_fault_mask_match_that_can_never_match_inverts_bit_14() -> None:
    ctl = ExecControls(exception_bitmap=0, pfec_mask=0, pfec_match=0xFFFFFFFF)
    assert ex.exception_exits(ctl, 14, 0)  # KVM's "all #PF exit" with bit 14 = 0


@pytest.mark.parametrize(("vector", "exits"), [(13, True), (6, True), (3, False), (1, False), (32, False), (0x80, False)])
def test_other_exceptions_follow_their_bit(vector: int, exits: bool) -> None:
    ctl = ExecControls(exception_bitmap=(1 << 13) | (1 << 6))
    assert ex.exception_exits(ctl, vector) is exits


# --- instructions decided by the controls alone (SDM 26.1.2, 26.1.3, 26.3) ----------------------------
UNCONDITIONAL = [
    ("0fa2", R.CPUID), ("0f37", R.GETSEC), ("0f08", R.INVD), ("0f01d1", R.XSETBV),
    ("0f01c1", R.VMCALL), ("660fc730", R.VMCLEAR), ("0f01c2", R.VMLAUNCH), ("0fc730", R.VMPTRLD),
    ("0fc738", R.VMPTRST), ("0f78c1", R.VMREAD), ("0f01c3", R.VMRESUME), ("0f79c1", R.VMWRITE),
    ("0f01c4", R.VMXOFF), ("f30fc730", R.VMXON), ("660f388000", R.INVEPT), ("660f388100", R.INVVPID),
]


@pytest.mark.parametrize(("hexbytes", "reason"), UNCONDITIONAL)
def test_instructions_that_exit_unconditionally(hexbytes: str, reason: R) -> None:
    assert ex.instruction_exits(ExecControls(), d(hexbytes)) is reason


CONDITIONAL = [  # (bytes, controls that make it exit, reason)
    ("f4", ExecControls(proc=C.HLT_EXITING), R.HLT),
    ("0f0138", ExecControls(proc=C.INVLPG_EXITING), R.INVLPG),
    ("0f01c9", ExecControls(proc=C.MWAIT_EXITING), R.MWAIT_INSTRUCTION),
    ("0f01c8", ExecControls(proc=C.MONITOR_EXITING), R.MONITOR_INSTRUCTION),
    ("0f33", ExecControls(proc=C.RDPMC_EXITING), R.RDPMC),
    ("0f31", ExecControls(proc=C.RDTSC_EXITING), R.RDTSC),
    ("0f01f9", ExecControls(proc=C.RDTSC_EXITING, proc2=S.ENABLE_RDTSCP), R.RDTSCP),
    ("0f09", ExecControls(proc2=S.WBINVD_EXITING), R.WBINVD),
    ("f30f09", ExecControls(proc2=S.WBINVD_EXITING), R.WBINVD),
    ("0fc7f0", ExecControls(proc2=S.RDRAND_EXITING), R.RDRAND),
    ("0fc7f8", ExecControls(proc2=S.RDSEED_EXITING), R.RDSEED),
    ("0f0110", ExecControls(proc2=S.DESC), R.GDTR_IDTR),
    ("0f0118", ExecControls(proc2=S.DESC), R.GDTR_IDTR),
    ("0f0100", ExecControls(proc2=S.DESC), R.GDTR_IDTR),
    ("0f0108", ExecControls(proc2=S.DESC), R.GDTR_IDTR),
    ("0f00d0", ExecControls(proc2=S.DESC), R.LDTR_TR),
    ("0f00d8", ExecControls(proc2=S.DESC), R.LDTR_TR),
    ("0f00c0", ExecControls(proc2=S.DESC), R.LDTR_TR),
    ("0f00c8", ExecControls(proc2=S.DESC), R.LDTR_TR),
    ("0f23c0", ExecControls(proc=C.MOV_DR_EXITING), R.DR_ACCESS),
    ("0f21c0", ExecControls(proc=C.MOV_DR_EXITING), R.DR_ACCESS),
    ("660f388200", ExecControls(proc=C.INVLPG_EXITING, proc2=S.ENABLE_INVPCID), R.INVPCID),
    ("440f22c0", ExecControls(proc=C.CR8_LOAD_EXITING), R.CR_ACCESS),
    ("440f20c0", ExecControls(proc=C.CR8_STORE_EXITING), R.CR_ACCESS),
    ("0f20d8", ExecControls(proc=C.CR3_STORE_EXITING), R.CR_ACCESS),
    ("f20faef0", ExecControls(proc=C.RDTSC_EXITING, proc2=S.ENABLE_USR_WAIT_PAUSE), R.UMWAIT),
    ("660faef0", ExecControls(proc=C.RDTSC_EXITING, proc2=S.ENABLE_USR_WAIT_PAUSE), R.TPAUSE),
]


@pytest.mark.parametrize(("hexbytes", "ctl", "reason"), CONDITIONAL)
def test_instructions_that_exit_on_their_control(hexbytes: str, ctl: ExecControls, reason: R) -> None:
    assert ex.instruction_exits(ctl, d(hexbytes)) is reason


@pytest.mark.parametrize(("hexbytes", "ctl", "reason"), CONDITIONAL)
def test_the_same_instructions_without_their_exiting_control(hexbytes: str, ctl: ExecControls, reason: R) -> None:
    # keep only the "enable" controls: the instruction then executes (or is emulated)
    enables = S.ENABLE_RDTSCP | S.ENABLE_INVPCID | S.ENABLE_USR_WAIT_PAUSE
    assert ex.instruction_exits(ExecControls(proc2=ctl.proc2 & enables), d(hexbytes)) is None


def test_mov_cr8_load_and_store_exiting_are_separate() -> None:
    assert ex.instruction_exits(ExecControls(proc=C.CR8_STORE_EXITING), d("440f22c0")) is None
    assert ex.instruction_exits(ExecControls(proc=C.CR8_LOAD_EXITING), d("440f20c0")) is None
    assert ex.instruction_exits(ExecControls(proc=C.CR3_LOAD_EXITING), d("0f20d8")) is None


@pytest.mark.parametrize(
    "hexbytes",
    ["0f01f9", "f30fc7f8", "660f388200", "f20faef0", "660faef0", "f30faef0", "0fc728", "0fc718", "0f01d4"],
)
def test_instructions_whose_enable_control_is_0_cause_ud(hexbytes: str) -> None:
    # RDTSCP, RDPID, INVPCID, UMWAIT, TPAUSE, UMONITOR, XSAVES, XRSTORS, VMFUNC (SDM 26.3)
    everything_else = ExecControls(proc=C.RDTSC_EXITING | C.INVLPG_EXITING)
    assert ex.instruction_exits(everything_else, d(hexbytes)) is InjectUD


@pytest.mark.parametrize(
    ("hexbytes", "kind"),
    [("ec", K.IN), ("0f32", K.RDMSR), ("0f06", K.CLTS), ("0f01f0", K.LMSW), ("f390", K.PAUSE), ("0f22c0", K.MOV_TO_CR), ("0f01e0", K.SMSW), ("fb", K.STI), ("f1", K.INT1), ("90", None)],
)
def test_instructions_left_to_the_specific_decisions(hexbytes: str, kind: InsnKind | None) -> None:
    everything = ExecControls(proc=0xFFFFFFFF & ~C.USE_IO_BITMAPS & ~C.USE_MSR_BITMAPS, proc2=0xFFFFFFFF)
    insn = d(hexbytes)
    assert insn.kind is kind
    assert ex.instruction_exits(everything, insn) is None


def test_vmread_and_vmwrite_under_vmcs_shadowing() -> None:
    mem = memory()
    ctl = ExecControls(proc2=S.SHADOW_VMCS, vmread_bitmap=0x4000, vmwrite_bitmap=0x5000)
    assert ex.instruction_exits(ctl, d("0f78c1")) is None
    mem.set_bit(0x5000, int(F.GUEST_RIP))
    assert not ex.vmcs_shadowing_exits(ctl, mem, F.GUEST_RIP, write=False)
    assert ex.vmcs_shadowing_exits(ctl, mem, F.GUEST_RIP, write=True)
    assert ex.vmcs_shadowing_exits(ctl, mem, 1 << 15, write=False)  # bits above 14 set
    assert ex.vmcs_shadowing_exits(ExecControls(), mem, F.GUEST_RIP, write=False)


def test_xsaves_vmfunc_encls_decisions_need_operands() -> None:
    ctl = ExecControls(proc2=S.ENABLE_XSAVES | S.ENABLE_VMFUNC | S.ENCLS_EXITING, xss_exit_bitmap=1 << 8,
                       vm_function_controls=1, encls_exiting_bitmap=(1 << 2) | (1 << 63))
    assert ex.xsaves_exits(ctl, 1 << 8, 1 << 8)
    assert not ex.xsaves_exits(ctl, 1 << 8, 0)  # IA32_XSS does not enable the component
    assert not ex.vmfunc_exits(ctl, 0)  # EPTP switching enabled
    assert ex.vmfunc_exits(ctl, 1) and ex.vmfunc_exits(ctl, 64)
    assert ex.encls_exits(ctl, 2) and not ex.encls_exits(ctl, 3)
    assert ex.encls_exits(ctl, 63) and ex.encls_exits(ctl, 0x1000)  # bit 63 for all leaves >= 63
    assert not ex.enclv_exits(ctl, 2)


def test_pause_exiting_and_pause_loop_exiting() -> None:
    assert ex.pause_exits(ExecControls(proc=C.PAUSE_EXITING), 3, 0, PauseLoopState())[0]
    ple = ExecControls(proc2=S.PAUSE_LOOP_EXITING, ple_gap=10, ple_window=100)
    state = PauseLoopState()
    exited, state = ex.pause_exits(ple, 0, 1000, state)
    assert not exited
    for now in range(1005, 1100, 5):  # a spin loop: gaps of 5 <= PLE_Gap
        exited, state = ex.pause_exits(ple, 0, now, state)
        assert not exited
    exited, _ = ex.pause_exits(ple, 0, 1101, state)
    assert exited  # more than PLE_Window since the first PAUSE of the loop
    exited, state = ex.pause_exits(ple, 0, 1200, state)  # gap > PLE_Gap: a new loop
    assert not exited and state.loop_start == 1200
    assert not ex.pause_exits(ple, 3, 5000, PauseLoopState(last=4999, loop_start=0))[0]  # CPL > 0


def test_guest_tsc_offsetting_and_scaling() -> None:
    assert ex.guest_tsc(ExecControls(tsc_offset=5), 100) == 100  # offsetting off
    assert ex.guest_tsc(ExecControls(proc=C.USE_TSC_OFFSETTING, tsc_offset=2**64 - 50), 100) == 50
    scaled = ExecControls(proc=C.USE_TSC_OFFSETTING, proc2=S.TSC_SCALING, tsc_multiplier=2 << 48, tsc_offset=7)
    assert ex.guest_tsc(scaled, 100) == 207


# --- exit qualifications (SDM 28.2.1) -----------------------------------------------------------------
def test_cr_access_qualification_layout() -> None:
    assert ex.cr_access_qualification(0, CrAccessType.MOV_TO_CR, 3) == 0x300
    assert ex.cr_access_qualification(8, CrAccessType.MOV_FROM_CR, 15) == 0xF00 | 0x10 | 8
    assert ex.cr_access_qualification(4, 0, 9) == 0x904
    assert ex.cr_access_qualification(0, CrAccessType.CLTS, 0) == 0x20
    assert ex.cr_access_qualification(0, CrAccessType.LMSW, 0, lmsw_source=0x1234, lmsw_memory=True) == 0x12340070
    assert ex.cr_access_qualification(0, CrAccessType.LMSW, 0, lmsw_source=0xF) == 0xF0030
    # fields that do not belong to the access type are cleared
    assert ex.cr_access_qualification(3, CrAccessType.CLTS, 5, lmsw_source=0xFF) == 0x20


def test_mov_dr_qualification_layout() -> None:
    assert ex.mov_dr_qualification(7, True, 0) == 0x007
    assert ex.mov_dr_qualification(7, False, 3) == 0x317
    assert ex.mov_dr_qualification(0, False, 15) == 0xF10


def test_io_qualification_layout() -> None:
    assert ex.io_qualification(1, False, False, False, True, 0x80) == 0x0080_0040
    assert ex.io_qualification(2, True, False, False, False, 0x3F8) == 0x03F8_0009
    assert ex.io_qualification(1, False, True, True, False, 0x3F8) == 0x03F8_0030
    assert ex.io_qualification(4, True, True, True, False, 0x1F0) == 0x01F0_003B


def test_mwait_qualification() -> None:
    assert (ex.mwait_qualification(True), ex.mwait_qualification(False)) == (1, 0)


@given(st.integers(0, 15), st.sampled_from(list(CrAccessType)), st.integers(0, 15), st.booleans(), st.integers(0, 0xFFFF))
def test_cr_access_qualification_round_trips(cr: int, access: CrAccessType, gpr: int, memory_operand: bool, source: int) -> None:
    value = CrAccessQualification(cr, access, gpr, memory_operand, source).encode()
    back = CrAccessQualification.decode(value)
    assert back.access_type is access
    assert back.encode() == value


@given(st.sampled_from([1, 2, 4]), st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 0xFFFF))
def test_io_qualification_round_trips(size: int, is_in: bool, string: bool, rep: bool, imm: bool, port: int) -> None:
    record = IoQualification(size, is_in, string, rep, imm, port)
    assert IoQualification.decode(record.encode()) == record


@given(st.integers(0, 7), st.booleans(), st.integers(0, 15))
def test_mov_dr_qualification_round_trips(dr: int, to_dr: bool, gpr: int) -> None:
    record = MovDrQualification(dr, to_dr, gpr)
    assert MovDrQualification.decode(record.encode()) == record


def test_qualification_encoders_reject_impossible_fields() -> None:
    with pytest.raises(ValueError):
        ex.io_qualification(3, False, False, False, False, 0)
    with pytest.raises(ValueError):
        ex.mov_dr_qualification(8, True, 0)
    with pytest.raises(ValueError):
        ex.cr_access_qualification(0, 4, 0)


def test_displacement_qualification() -> None:
    assert ex.exit_qualification_for_memory_operand(None, 0x1000) == 0
    lgdt_rip = d("0f0115f0ffffff")  # lgdt [rip-0x10]: displacement + RIP of the next instruction
    assert ex.exit_qualification_for_memory_operand(lgdt_rip.memory, 0x1007) == 0xFF7
    vmptrld = d("0fc770f0")  # vmptrld [rax-0x10]: sign-extended to 64 bits
    assert ex.exit_qualification_for_memory_operand(vmptrld.memory, 0x1004) == 0xFFFF_FFFF_FFFF_FFF0
    assert ex.exit_qualification_for_memory_operand(d("0f0156fe", 16).memory, 0) == 2**64 - 2


# --- VM-exit instruction information (SDM 28.2.5) --------------------------------------------------------
ADDR16, ADDR32, ADDR64 = 0 << 7, 1 << 7, 2 << 7
SEG = {name: n << 15 for n, name in enumerate(("ES", "CS", "SS", "DS", "FS", "GS"))}
INDEX_INVALID, BASE_INVALID, REGISTER = 1 << 22, 1 << 27, 1 << 10


def index(n: int) -> int:
    return n << 18


def base(n: int) -> int:
    return n << 23


def reg2(n: int) -> int:
    return n << 28


def test_ins_outs_instruction_info() -> None:
    assert ex.ins_outs_instruction_info(64, 3) == ADDR64 | SEG["DS"]
    assert ex.ins_outs_instruction_info(16, 0) == 0
    assert ex.ins_outs_instruction_info(32, 5) == ADDR32 | SEG["GS"]


@pytest.mark.parametrize(
    ("hexbytes", "bits", "expected"),
    [
        # vmread rcx, rax: Reg1 = rcx, register operand, Reg2 = rax
        ("0f78c1", 64, (1 << 3) | REGISTER | reg2(0)),
        # vmwrite rax, [rsp]
        ("0f790424", 64, ADDR64 | SEG["SS"] | INDEX_INVALID | base(4) | reg2(0)),
        # vmread [eax], ebx (32-bit)
        ("0f7818", 32, ADDR32 | SEG["DS"] | INDEX_INVALID | base(0) | reg2(3)),
        # invept rcx, [rdx+rbx*8+0x10]: scaling 3
        ("660f38804cda10", 64, 3 | ADDR64 | SEG["DS"] | index(3) | base(2) | reg2(1)),
        # invvpid r9, fs:[r12+r13*2]
        ("6466470f38810c6c", 64, 1 | ADDR64 | SEG["FS"] | index(13) | base(12) | reg2(9)),
        # invpcid eax, [bx+si] in 16-bit code
        ("660f388200", 16, ADDR16 | SEG["DS"] | index(6) | base(3) | reg2(0)),
        # vmptrld [rip+0x100]: neither base nor index
        ("0fc73500010000", 64, ADDR64 | SEG["DS"] | INDEX_INVALID | BASE_INVALID),
        # vmxon [rax], vmclear [rsi], vmptrst [rdi] (bit 10 = 0: memory)
        ("f30fc730", 64, ADDR64 | SEG["DS"] | INDEX_INVALID | base(0)),
        ("660fc736", 64, ADDR64 | SEG["DS"] | INDEX_INVALID | base(6)),
        ("0fc73f", 32, ADDR32 | SEG["DS"] | INDEX_INVALID | base(7)),
        # xsaves [rbp+8]: SS by default
        ("0fc76d08", 64, ADDR64 | SEG["SS"] | INDEX_INVALID | base(5)),
    ],
)
def test_vmx_instruction_info_layouts(hexbytes: str, bits: int, expected: int) -> None:
    assert ex.vmx_instruction_info(d(hexbytes, bits)) == expected


@pytest.mark.parametrize(
    ("hexbytes", "bits", "expected"),
    [
        # lgdt [rax] in 64-bit mode (operand-size bit undefined there: set)
        ("0f0110", 64, ADDR64 | (1 << 11) | SEG["DS"] | INDEX_INVALID | base(0) | reg2(2)),
        # sidt [eax] in 32-bit code
        ("0f0108", 32, ADDR32 | (1 << 11) | SEG["DS"] | INDEX_INVALID | base(0) | reg2(1)),
        # sgdt [bx+si] in 16-bit code, 16-bit operand size
        ("0f0100", 16, ADDR16 | SEG["DS"] | index(6) | base(3) | reg2(0)),
        # lidt [bp+di+4] with a 66 prefix in 16-bit code (32-bit operand size)
        ("660f015b04", 16, ADDR16 | (1 << 11) | SEG["SS"] | index(7) | base(5) | reg2(3)),
        # ltr ax, sldt r13d (register forms)
        ("0f00d8", 64, REGISTER | reg2(3)),
        ("410f00c5", 64, (13 << 3) | REGISTER | reg2(0)),
        # str [rcx+rdx], lldt gs:[ebx]
        ("0f000c11", 64, ADDR64 | SEG["DS"] | index(2) | base(1) | reg2(1)),
        ("65670f0013", 64, ADDR32 | SEG["GS"] | INDEX_INVALID | base(3) | reg2(2)),
    ],
)
def test_descriptor_table_instruction_info_layouts(hexbytes: str, bits: int, expected: int) -> None:
    assert ex.descriptor_table_instruction_info(d(hexbytes, bits)) == expected


def test_instruction_info_rejects_other_instructions() -> None:
    with pytest.raises(ValueError):
        ex.vmx_instruction_info(d("0fa2"))
    with pytest.raises(ValueError):
        ex.descriptor_table_instruction_info(d("0f01c1"))


def test_rdrand_instruction_info_layout() -> None:
    assert ex.rdrand_instruction_info(3, 64) == (3 << 3) | (2 << 11)
    assert ex.rdrand_instruction_info(0, 32) == 1 << 11
    assert ex.rdrand_instruction_info(15, 16) == 15 << 3
    insn = d("660fc7f1")  # rdrand cx
    assert ex.rdrand_instruction_info(insn.gpr or 0, insn.operand_size) == 1 << 3


@given(st.integers(0, 2**32 - 1))
def test_instruction_info_decode_encode_round_trips(value: int) -> None:
    never_defined = (1 << 2) | (1 << 13) | (1 << 14)  # undefined in every layout
    assert InstructionInfo.decode(value).encode() == value & ~never_defined


def test_instruction_info_decoded_by_a_hypervisor() -> None:
    info = InstructionInfo.decode(ex.vmx_instruction_info(d("660f38804cda10")))
    assert (info.scale, info.address_size_bits, info.segment) == (8, 64, 3)
    assert (info.index_register, info.base_register, info.reg2) == (3, 2, 1)
    info = InstructionInfo.decode(ex.vmx_instruction_info(d("0fc73500010000")))
    assert (info.index_register, info.base_register) == (None, None)


def test_exec_controls_is_immutable() -> None:
    with pytest.raises(AttributeError):
        ExecControls().proc = 1  # type: ignore[misc]
