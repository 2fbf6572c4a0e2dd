"""Exit reasons (SDM Appendix C), control bits (SDM 25.6-25.8, Appendix A), MSR names,
VM-instruction errors (SDM 31.4).  Expected values are written out independently: Linux's hex
constants from asm/vmx.h, bit numbers from vmxfeatures.h and the SDM's default1 lists."""

from __future__ import annotations

from enum import IntFlag

import pytest

import pyvmx.arch
from pyvmx.arch import controls as c
from pyvmx.arch.exit_reasons import (
    EXIT_REASON_DESCRIPTIONS,
    VM_ENTRY_FAILURE_REASONS,
    VMX_EXIT_REASON_BASIC_MASK,
    VMX_EXIT_REASONS_FAILED_VMENTRY,
    VMX_EXIT_REASONS_SGX_ENCLAVE_MODE,
    ExitReason,
)
from pyvmx.arch.msr import (
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    KVM_PV_REASON_PAGE_READY,
    Msr,
    UnknownNameError,
    msr_by_name,
)
from pyvmx.arch.vm_instruction_errors import VM_INSTRUCTION_ERROR_DESCRIPTIONS, VmInstructionError

# --- Exit reasons -------------------------------------------------------------------------------


def test_vmx_instruction_exit_reasons_are_18_to_27_in_order() -> None:
    names = ["VMCALL", "VMCLEAR", "VMLAUNCH", "VMPTRLD", "VMPTRST", "VMREAD", "VMRESUME", "VMWRITE", "VMXOFF", "VMXON"]
    assert [ExitReason[n] for n in names] == list(range(18, 28))


def test_linux_vmoff_vmon_names_are_canonical() -> None:
    assert ExitReason["VMXOFF"] is ExitReason["VMOFF"] and ExitReason(26).name == "VMOFF"
    assert ExitReason["VMXON"] is ExitReason["VMON"] and ExitReason(27).name == "VMON"


# Contiguous runs of SDM Table C-1, written out as (first number, names...).
APPENDIX_C_RUNS: list[tuple[int, list[str]]] = [
    (0, ["EXCEPTION_NMI", "EXTERNAL_INTERRUPT", "TRIPLE_FAULT", "INIT_SIGNAL", "SIPI_SIGNAL", "IO_SMI",
         "OTHER_SMI", "INTERRUPT_WINDOW", "NMI_WINDOW", "TASK_SWITCH", "CPUID", "GETSEC", "HLT", "INVD",
         "INVLPG", "RDPMC", "RDTSC", "RSM", "VMCALL", "VMCLEAR", "VMLAUNCH", "VMPTRLD", "VMPTRST",
         "VMREAD", "VMRESUME", "VMWRITE", "VMOFF", "VMON", "CR_ACCESS", "DR_ACCESS", "IO_INSTRUCTION",
         "MSR_READ", "MSR_WRITE", "INVALID_STATE", "MSR_LOAD_FAIL"]),
    (36, ["MWAIT_INSTRUCTION", "MONITOR_TRAP_FLAG"]),
    (39, ["MONITOR_INSTRUCTION", "PAUSE_INSTRUCTION", "MCE_DURING_VMENTRY"]),
    (43, ["TPR_BELOW_THRESHOLD", "APIC_ACCESS", "EOI_INDUCED", "GDTR_IDTR", "LDTR_TR", "EPT_VIOLATION",
          "EPT_MISCONFIG", "INVEPT", "RDTSCP", "PREEMPTION_TIMER", "INVVPID", "WBINVD", "XSETBV",
          "APIC_WRITE", "RDRAND", "INVPCID", "VMFUNC", "ENCLS", "RDSEED", "PML_FULL", "XSAVES", "XRSTORS",
          "PCONFIG", "SPP", "UMWAIT", "TPAUSE", "LOADIWKEY", "ENCLV"]),
    (72, ["ENQCMD_PASID", "ENQCMDS_PASID", "BUS_LOCK", "NOTIFY", "SEAMCALL", "TDCALL", "RDMSRLIST",
          "WRMSRLIST", "URDMSR", "UWRMSR"]),
    (84, ["MSR_READ_IMM", "MSR_WRITE_IMM"]),
]


@pytest.mark.parametrize("first, names", APPENDIX_C_RUNS)
def test_appendix_c_contiguous_runs(first: int, names: list[str]) -> None:
    assert [int(ExitReason[n]) for n in names] == list(range(first, first + len(names)))


def test_appendix_c_runs_cover_every_reason() -> None:
    listed = {name for _, names in APPENDIX_C_RUNS for name in names}
    assert {r.name for r in ExitReason} == listed


@pytest.mark.parametrize(
    "name, number",
    [("EXCEPTION_NMI", 0), ("INTERRUPT_WINDOW", 7), ("CPUID", 10), ("HLT", 12), ("CR_ACCESS", 28),
     ("IO_INSTRUCTION", 30), ("MSR_READ", 31), ("MSR_WRITE", 32), ("INVALID_STATE", 33),
     ("EPT_VIOLATION", 48), ("EPT_MISCONFIG", 49), ("PREEMPTION_TIMER", 52), ("XSETBV", 55),
     ("BUS_LOCK", 74), ("NOTIFY", 75), ("TDCALL", 77)],
)
def test_linux_uapi_numbers(name: str, number: int) -> None:
    assert ExitReason[name] == number


@pytest.mark.parametrize("unused", [35, 38, 42, 71, 82, 83])
def test_unused_reason_numbers_have_no_name(unused: int) -> None:
    with pytest.raises(ValueError):
        ExitReason(unused)


def test_every_exit_reason_is_described() -> None:
    assert max(ExitReason) >= 77
    assert set(EXIT_REASON_DESCRIPTIONS) == set(ExitReason)
    assert all(text.strip() for text in EXIT_REASON_DESCRIPTIONS.values())


def test_exit_reason_field_flags() -> None:
    assert VMX_EXIT_REASONS_FAILED_VMENTRY == 1 << 31
    assert VMX_EXIT_REASONS_SGX_ENCLAVE_MODE == 1 << 27
    assert VMX_EXIT_REASON_BASIC_MASK == 0xFFFF
    assert all(r <= VMX_EXIT_REASON_BASIC_MASK for r in ExitReason)
    assert VM_ENTRY_FAILURE_REASONS == {ExitReason(33), ExitReason(34), ExitReason(41)}


# --- Control bits -------------------------------------------------------------------------------
CONTROL_CLASSES: list[type[IntFlag]] = [
    c.PinBasedControls,
    c.ProcBasedControls,
    c.SecondaryProcBasedControls,
    c.TertiaryProcBasedControls,
    c.VmExitControls,
    c.SecondaryVmExitControls,
    c.VmEntryControls,
    c.GuestInterruptibility,
]


@pytest.mark.parametrize("cls", CONTROL_CLASSES, ids=lambda cls: cls.__name__)
def test_each_control_is_one_distinct_bit(cls: type[IntFlag]) -> None:
    assert len(cls.__members__) == len(list(cls)), "two names share a bit"
    for member in cls:
        assert bin(int(member)).count("1") == 1, member


@pytest.mark.parametrize("cls", CONTROL_CLASSES[:-2] + [c.VmEntryControls], ids=lambda cls: cls.__name__)
def test_32_bit_and_64_bit_control_fields(cls: type[IntFlag]) -> None:
    limit = 64 if cls in (c.TertiaryProcBasedControls, c.SecondaryVmExitControls) else 32
    assert all(int(m) < 1 << limit for m in cls)


def test_seed_002_control_bits() -> None:
    """Seed 002: HLT exiting is bit 7, use MSR bitmaps bit 28 of the primary controls."""
    assert c.ProcBasedControls.HLT_EXITING == 1 << 7
    assert c.ProcBasedControls.USE_MSR_BITMAPS == 1 << 28
    assert c.ProcBasedControls.UNCOND_IO_EXITING == 1 << 24
    assert c.ProcBasedControls.USE_IO_BITMAPS == 1 << 25
    assert int(c.PinBasedControls.EXT_INTR_MASK) == 1
    assert c.PinBasedControls.VMX_PREEMPTION_TIMER == 1 << 6


# Bit numbers of Linux's vmxfeatures.h (word*32 + bit) for the pin-based, primary and secondary
# controls.
VMXFEATURES_BITS: list[tuple[type[IntFlag], dict[str, int]]] = [
    (c.PinBasedControls, {"EXT_INTR_MASK": 0, "NMI_EXITING": 3, "VIRTUAL_NMIS": 5, "VMX_PREEMPTION_TIMER": 6,
                          "POSTED_INTR": 7}),
    (c.ProcBasedControls, {
        "INTR_WINDOW_EXITING": 2, "USE_TSC_OFFSETTING": 3, "HLT_EXITING": 7, "INVLPG_EXITING": 9,
        "MWAIT_EXITING": 10, "RDPMC_EXITING": 11, "RDTSC_EXITING": 12, "CR3_LOAD_EXITING": 15,
        "CR3_STORE_EXITING": 16, "ACTIVATE_TERTIARY_CONTROLS": 17, "CR8_LOAD_EXITING": 19,
        "CR8_STORE_EXITING": 20, "TPR_SHADOW": 21, "NMI_WINDOW_EXITING": 22, "MOV_DR_EXITING": 23,
        "UNCOND_IO_EXITING": 24, "USE_IO_BITMAPS": 25, "MONITOR_TRAP_FLAG": 27, "USE_MSR_BITMAPS": 28,
        "MONITOR_EXITING": 29, "PAUSE_EXITING": 30, "ACTIVATE_SECONDARY_CONTROLS": 31}),
    (c.SecondaryProcBasedControls, {
        "VIRTUALIZE_APIC_ACCESSES": 0, "ENABLE_EPT": 1, "DESC": 2, "ENABLE_RDTSCP": 3,
        "VIRTUALIZE_X2APIC_MODE": 4, "ENABLE_VPID": 5, "WBINVD_EXITING": 6, "UNRESTRICTED_GUEST": 7,
        "APIC_REGISTER_VIRT": 8, "VIRTUAL_INTR_DELIVERY": 9, "PAUSE_LOOP_EXITING": 10, "RDRAND_EXITING": 11,
        "ENABLE_INVPCID": 12, "ENABLE_VMFUNC": 13, "SHADOW_VMCS": 14, "ENCLS_EXITING": 15,
        "RDSEED_EXITING": 16, "ENABLE_PML": 17, "EPT_VIOLATION_VE": 18, "PT_CONCEAL_VMX": 19,
        "ENABLE_XSAVES": 20, "MODE_BASED_EPT_EXEC": 22, "PT_USE_GPA": 24, "TSC_SCALING": 25,
        "ENABLE_USR_WAIT_PAUSE": 26, "ENABLE_ENCLV": 28, "BUS_LOCK_DETECTION": 30, "NOTIFY_VM_EXITING": 31}),
    (c.TertiaryProcBasedControls, {"IPI_VIRT": 4}),
]


@pytest.mark.parametrize("cls, bits", VMXFEATURES_BITS, ids=lambda x: getattr(x, "__name__", ""))
def test_bit_numbers_match_linux_vmxfeatures(cls: type[IntFlag], bits: dict[str, int]) -> None:
    for name, bit in bits.items():
        assert cls[name] == 1 << bit, name


# Linux's literal hex values from asm/vmx.h.
LINUX_EXIT_CONTROLS = {
    "SAVE_DEBUG_CONTROLS": 0x00000004, "HOST_ADDR_SPACE_SIZE": 0x00000200,
    "LOAD_IA32_PERF_GLOBAL_CTRL": 0x00001000, "ACK_INTR_ON_EXIT": 0x00008000, "SAVE_IA32_PAT": 0x00040000,
    "LOAD_IA32_PAT": 0x00080000, "SAVE_IA32_EFER": 0x00100000, "LOAD_IA32_EFER": 0x00200000,
    "SAVE_VMX_PREEMPTION_TIMER": 0x00400000, "CLEAR_BNDCFGS": 0x00800000, "PT_CONCEAL_PIP": 0x01000000,
    "CLEAR_IA32_RTIT_CTL": 0x02000000, "LOAD_CET_STATE": 0x10000000, "ACTIVATE_SECONDARY_CONTROLS": 0x80000000,
}
LINUX_ENTRY_CONTROLS = {
    "LOAD_DEBUG_CONTROLS": 0x00000004, "IA32E_MODE": 0x00000200, "SMM": 0x00000400,
    "DEACT_DUAL_MONITOR": 0x00000800, "LOAD_IA32_PERF_GLOBAL_CTRL": 0x00002000, "LOAD_IA32_PAT": 0x00004000,
    "LOAD_IA32_EFER": 0x00008000, "LOAD_BNDCFGS": 0x00010000, "PT_CONCEAL_PIP": 0x00020000,
    "LOAD_IA32_RTIT_CTL": 0x00040000, "LOAD_CET_STATE": 0x00100000, "LOAD_IA32_FRED": 0x00800000,
}


def test_exit_and_entry_controls_match_linux_hex() -> None:
    for name, value in LINUX_EXIT_CONTROLS.items():
        assert c.VmExitControls[name] == value, name
    for name, value in LINUX_ENTRY_CONTROLS.items():
        assert c.VmEntryControls[name] == value, name
    assert int(c.SecondaryVmExitControls.SAVE_IA32_FRED) == 1
    assert int(c.SecondaryVmExitControls.LOAD_IA32_FRED) == 2


def _bits(*positions: int) -> int:
    return sum(1 << p for p in positions)


def test_default1_masks_match_appendix_a() -> None:
    """SDM A.3.1, A.3.2, A.4, A.5: the default1 controls when no TRUE MSRs exist."""
    assert c.PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR == _bits(1, 2, 4)
    assert c.CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR == _bits(1, 4, 5, 6, 8, 13, 14, 15, 16, 26)
    assert c.VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR == _bits(*range(0, 9), 10, 11, 13, 14, 16, 17)
    assert c.VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR == _bits(*range(0, 9), 12)


def test_default1_controls_that_are_real_controls() -> None:
    """The only named controls among the default1 bits: CR3-load/store exiting (A.3.2) and
    save/load debug controls (A.4, A.5).  The TRUE MSRs exist so these can be cleared."""
    pin = c.PinBasedControls(0)
    for m in c.PinBasedControls:
        if m & c.PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR:
            pin |= m
    assert pin == 0
    proc = [m for m in c.ProcBasedControls if m & c.CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR]
    assert proc == [c.ProcBasedControls.CR3_LOAD_EXITING, c.ProcBasedControls.CR3_STORE_EXITING]
    ex = [m for m in c.VmExitControls if m & c.VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR]
    assert ex == [c.VmExitControls.SAVE_DEBUG_CONTROLS]
    en = [m for m in c.VmEntryControls if m & c.VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR]
    assert en == [c.VmEntryControls.LOAD_DEBUG_CONTROLS]


def test_interruption_information_fields_partition_32_bits() -> None:
    parts = [c.INTR_INFO_VECTOR_MASK, c.INTR_INFO_INTR_TYPE_MASK, c.INTR_INFO_DELIVER_CODE_MASK,
             c.INTR_INFO_RESVD_BITS_MASK, c.INTR_INFO_VALID_MASK]
    assert sum(parts) == 0xFFFFFFFF
    assert all(a & b == 0 for i, a in enumerate(parts) for b in parts[i + 1:])
    assert c.INTR_INFO_UNBLOCK_NMI & c.INTR_INFO_RESVD_BITS_MASK  # reserved on entry, defined on exit
    assert [int(t) << c.INTR_INFO_INTR_TYPE_SHIFT for t in c.InterruptionType] == [
        0x000, 0x100, 0x200, 0x300, 0x400, 0x500, 0x600, 0x700]


def test_guest_state_formats() -> None:
    assert [int(g) for g in c.GuestInterruptibility] == [1, 2, 4, 8, 16]
    assert [int(a) for a in c.GuestActivityState] == [0, 1, 2, 3]


def test_capability_msr_layouts() -> None:
    assert c.VMX_BASIC_TRUE_CTLS == 1 << 55 and c.VMX_BASIC_INOUT == 1 << 54
    assert c.VMX_BASIC_MEM_TYPE_MASK >> c.VMX_BASIC_MEM_TYPE_SHIFT == 0xF
    assert c.VMX_BASIC_VMCS_SIZE_MASK >> c.VMX_BASIC_VMCS_SIZE_SHIFT == 0x1FFF
    assert c.VMX_MISC_CR3_TARGET_COUNT_MASK >> c.VMX_MISC_CR3_TARGET_COUNT_SHIFT == 0x1FF
    assert (c.VMX_MISC_ACTIVITY_HLT, c.VMX_MISC_ACTIVITY_SHUTDOWN, c.VMX_MISC_ACTIVITY_WAIT_SIPI) == (
        1 << 6, 1 << 7, 1 << 8)
    # IA32_VMX_EPT_VPID_CAP: EPT bits are MSR positions; Linux's VPID bits count from bit 32.
    assert (c.VMX_EPT_INVEPT_BIT, c.VMX_EPT_AD_BIT, c.VMX_EPT_EXTENT_CONTEXT_BIT) == (1 << 20, 1 << 21, 1 << 25)
    assert c.VMX_VPID_INVVPID_BIT << c.VMX_VPID_CAP_SHIFT == 1 << 32
    assert c.VMX_VPID_EXTENT_SINGLE_CONTEXT_BIT << c.VMX_VPID_CAP_SHIFT == 1 << 41
    assert c.VMX_EPT_EXTENT_CONTEXT_BIT == 1 << (c.VMX_EPT_EXTENT_SHIFT + c.VMX_EPT_EXTENT_CONTEXT)


def test_ept_entry_and_eptp_formats() -> None:
    assert c.VMX_EPT_RWX_MASK == c.VMX_EPT_READABLE_MASK | c.VMX_EPT_WRITABLE_MASK | c.VMX_EPT_EXECUTABLE_MASK
    assert c.VMX_EPT_MT_MASK == 7 << c.VMX_EPT_MT_EPTE_SHIFT
    entry_bits = [c.VMX_EPT_IPAT_BIT, c.VMX_EPT_LARGE_PAGE_BIT, c.VMX_EPT_ACCESS_BIT, c.VMX_EPT_DIRTY_BIT,
                  c.VMX_EPT_USER_EXECUTABLE_MASK, c.VMX_EPT_SUPPRESS_VE_BIT]
    assert entry_bits == [1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10, 1 << 63]
    # EPTP: memory type 2:0, page-walk length minus 1 in 5:3, A/D enable bit 6.
    assert (c.VMX_EPTP_PWL_4, c.VMX_EPTP_PWL_5) == (0x18, 0x20)
    assert c.VMX_EPTP_MT_WB == 6 and c.VMX_EPTP_MT_UC == 0 and c.VMX_EPTP_AD_ENABLE_BIT == 0x40
    assert (c.VMX_EPT_EXTENT_CONTEXT, c.VMX_EPT_EXTENT_GLOBAL) == (1, 2)
    assert (c.VMX_VPID_EXTENT_INDIVIDUAL_ADDR, c.VMX_VPID_EXTENT_SINGLE_CONTEXT, c.VMX_VPID_EXTENT_ALL_CONTEXT,
            c.VMX_VPID_EXTENT_SINGLE_NON_GLOBAL) == (0, 1, 2, 3)


def test_feature_control_bits() -> None:
    assert (c.FEAT_CTL_LOCKED, c.FEAT_CTL_VMX_ENABLED_INSIDE_SMX, c.FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX) == (1, 2, 4)
    assert c.FEATURE_CONTROL_VMXON_ENABLED_OUTSIDE_SMX == c.FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX


# --- MSRs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["IA32_EFER", "EFER", "MSR_EFER", "msr_ia32_efer", " efer ", "Ia32_Efer", "MSR_IA32_EFER"]
)
def test_msr_by_name_accepts_common_spellings(name: str) -> None:
    assert msr_by_name(name) == 0xC0000080


@pytest.mark.parametrize(
    "name, index",
    [("mtrrcap", 0xFE), ("MSR_MTRRcap", 0xFE), ("IA32_PAT", 0x277), ("msr_ia32_cr_pat", 0x277),
     ("IA32_FEATURE_CONTROL", 0x3A), ("feat_ctl", 0x3A), ("IA32_LSTAR", 0xC0000082), ("tsc_aux", 0xC0000103),
     ("IA32_SYSENTER_CS", 0x174), ("MSR_KVM_ASYNC_PF_EN", 0x4B564D02), ("ia32_vmx_basic", 0x480)],
)
def test_msr_by_name_variants(name: str, index: int) -> None:
    assert msr_by_name(name) == index


@pytest.mark.parametrize("name", ["IA32_NOPE", "", "MSR_", "0x10"])
def test_msr_by_name_rejects_unknown(name: str) -> None:
    with pytest.raises(UnknownNameError) as info:
        msr_by_name(name)
    assert isinstance(info.value, KeyError)
    assert repr(name) in str(info.value)


def test_linux_names_are_canonical_and_sdm_names_are_aliases() -> None:
    assert Msr(0xC0000080).name == "EFER" and Msr["IA32_EFER"] is Msr["EFER"]
    assert Msr(0x277).name == "IA32_CR_PAT" and Msr["IA32_PAT"] is Msr["IA32_CR_PAT"]
    assert Msr(0x3A).name == "IA32_FEAT_CTL" and Msr["IA32_FEATURE_CONTROL"] is Msr["IA32_FEAT_CTL"]
    assert Msr(0xC0000103).name == "TSC_AUX" and Msr["IA32_TSC_AUX"] is Msr["TSC_AUX"]


def test_vmx_capability_msr_indices() -> None:
    names = ["BASIC", "PINBASED_CTLS", "PROCBASED_CTLS", "EXIT_CTLS", "ENTRY_CTLS", "MISC", "CR0_FIXED0",
             "CR0_FIXED1", "CR4_FIXED0", "CR4_FIXED1", "VMCS_ENUM", "PROCBASED_CTLS2", "EPT_VPID_CAP",
             "TRUE_PINBASED_CTLS", "TRUE_PROCBASED_CTLS", "TRUE_EXIT_CTLS", "TRUE_ENTRY_CTLS", "VMFUNC",
             "PROCBASED_CTLS3", "EXIT_CTLS2"]
    assert [int(Msr[f"IA32_VMX_{n}"]) for n in names] == list(range(0x480, 0x494))


def test_other_msr_indices() -> None:
    expected = {
        "IA32_TSC": 0x10, "IA32_APICBASE": 0x1B, "IA32_FEAT_CTL": 0x3A, "IA32_SPEC_CTRL": 0x48,
        "IA32_PRED_CMD": 0x49, "IA32_SYSENTER_CS": 0x174, "IA32_SYSENTER_ESP": 0x175, "IA32_SYSENTER_EIP": 0x176,
        "IA32_MISC_ENABLE": 0x1A0, "IA32_DEBUGCTLMSR": 0x1D9, "MTRRcap": 0xFE, "MTRRdefType": 0x2FF,
        "IA32_CR_PAT": 0x277, "CORE_PERF_GLOBAL_CTRL": 0x38F, "IA32_BNDCFGS": 0xD90, "IA32_XSS": 0xDA0,
        "IA32_TSC_DEADLINE": 0x6E0, "STAR": 0xC0000081, "LSTAR": 0xC0000082, "CSTAR": 0xC0000083,
        "SYSCALL_MASK": 0xC0000084, "FS_BASE": 0xC0000100, "GS_BASE": 0xC0000101,
        "KERNEL_GS_BASE": 0xC0000102, "TSC_AUX": 0xC0000103,
    }
    for name, index in expected.items():
        assert Msr[name] == index, name


def test_kvm_paravirtual_msrs_and_async_pf_constants() -> None:
    names = ["WALL_CLOCK_NEW", "SYSTEM_TIME_NEW", "ASYNC_PF_EN", "STEAL_TIME", "PV_EOI_EN", "POLL_CONTROL",
             "ASYNC_PF_INT", "ASYNC_PF_ACK"]
    assert [int(Msr[f"KVM_{n}"]) for n in names] == list(range(0x4B564D00, 0x4B564D08))
    assert (KVM_ASYNC_PF_ENABLED, KVM_ASYNC_PF_SEND_ALWAYS, KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT,
            KVM_ASYNC_PF_DELIVERY_AS_INT) == (1, 2, 4, 8)
    assert (KVM_PV_REASON_PAGE_NOT_PRESENT, KVM_PV_REASON_PAGE_READY) == (1, 2)


# --- VM-instruction errors ----------------------------------------------------------------------
SDM_31_4 = {
    1: "VMCALL_IN_VMX_ROOT_OPERATION", 2: "VMCLEAR_INVALID_ADDRESS", 3: "VMCLEAR_VMXON_POINTER",
    4: "VMLAUNCH_NONCLEAR_VMCS", 5: "VMRESUME_NONLAUNCHED_VMCS", 6: "VMRESUME_AFTER_VMXOFF",
    7: "ENTRY_INVALID_CONTROL_FIELD", 8: "ENTRY_INVALID_HOST_STATE_FIELD", 9: "VMPTRLD_INVALID_ADDRESS",
    10: "VMPTRLD_VMXON_POINTER", 11: "VMPTRLD_INCORRECT_VMCS_REVISION_ID", 12: "UNSUPPORTED_VMCS_COMPONENT",
    13: "VMWRITE_READ_ONLY_VMCS_COMPONENT", 15: "VMXON_IN_VMX_ROOT_OPERATION",
    16: "ENTRY_INVALID_EXECUTIVE_VMCS_POINTER", 17: "ENTRY_NONLAUNCHED_EXECUTIVE_VMCS",
    18: "ENTRY_EXECUTIVE_VMCS_POINTER_NOT_VMXON_POINTER", 19: "VMCALL_NONCLEAR_VMCS",
    20: "VMCALL_INVALID_VM_EXIT_CONTROL_FIELDS", 22: "VMCALL_INCORRECT_MSEG_REVISION_ID",
    23: "VMXOFF_UNDER_DUAL_MONITOR_TREATMENT_OF_SMIS_AND_SMM", 24: "VMCALL_INVALID_SMM_MONITOR_FEATURES",
    25: "ENTRY_INVALID_VM_EXECUTION_CONTROL_FIELDS_IN_EXECUTIVE_VMCS", 26: "ENTRY_EVENTS_BLOCKED_BY_MOV_SS",
    28: "INVALID_OPERAND_TO_INVEPT_INVVPID",
}


def test_vm_instruction_error_numbers() -> None:
    assert {int(e): e.name for e in VmInstructionError} == SDM_31_4
    for unused in (0, 14, 21, 27, 29):
        with pytest.raises(ValueError):
            VmInstructionError(unused)


def test_vm_instruction_errors_are_described() -> None:
    assert set(VM_INSTRUCTION_ERROR_DESCRIPTIONS) == set(VmInstructionError)
    assert VM_INSTRUCTION_ERROR_DESCRIPTIONS[VmInstructionError(4)] == "VMLAUNCH with non-clear VMCS"
    assert VM_INSTRUCTION_ERROR_DESCRIPTIONS[VmInstructionError(13)] == "VMWRITE to read-only VMCS component"


# --- Package ------------------------------------------------------------------------------------


def test_package_reexports() -> None:
    for name in pyvmx.arch.__all__:
        assert hasattr(pyvmx.arch, name), name
    assert int(pyvmx.arch.VmcsField.GUEST_RIP) == 0x681E
