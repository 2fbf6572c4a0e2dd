"""Failure paths: bad input is a clear typed error (API misuse) or an architectural value (guest
faults, failed entries), never a crash of the host. References: Linux arch/x86/kvm/cpuid.c
kvm_set_cpuid(); x86.c kvm_msr_ignored_check(); SDM 6.15 (#DF/triple fault), 26.5.1 (VMX-
preemption timer), 27.1-27.3 (VM-entry checks); the ELF gABI (program loading)."""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.exit_reasons import VMX_EXIT_REASONS_FAILED_VMENTRY, ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.kvm.cpuid import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, CpuidEntry, CpuidError, default_cpuid
from pyvmx.kvm.exits import (
    KVM_INTERNAL_ERROR_EMULATION,
    DebugExit,
    FailEntry,
    HltExit,
    InternalError,
    MmioExit,
    ShutdownExit,
    TimeLimitExit,
)
from pyvmx.kvm import host_time
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.loader import ElfLoadError, load_elf
from pyvmx.vmx.caps import CpuProfile

from tests.kvm.hv.elf_builder import EM_AARCH64, ET_DYN, PT_NOTE, ElfSpec, Segment, build_elf
from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, new_guest, source_image, u32, u64


# --- CPUID tables (KVM_SET_CPUID2) --------------------------------------------------------------
def engine_less_vcpu():  # type: ignore[no-untyped-def]
    return Kvm(engine=False).create_vm(memory_size=1 << 20).create_vcpu()


@pytest.mark.parametrize(
    "entries, message",
    [
        ([CpuidEntry(0, eax=1), CpuidEntry(0, eax=2)], "duplicate leaf 0x0"),
        ([CpuidEntry(7, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX), CpuidEntry(7, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX)], "duplicate leaf 0x7"),
        ([CpuidEntry(7, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX), CpuidEntry(7)], "duplicate leaf 0x7"),
        ([CpuidEntry(4, 1)], "no KVM_CPUID_FLAG_SIGNIFCANT_INDEX"),
        ([CpuidEntry(1, eax=1 << 32)], "32-bit"),
        ([CpuidEntry(1, ebx=-1)], "32-bit"),
        ([CpuidEntry(1, flags=0x100)], "unknown flags"),
        ([{"function": 1, "eaxx": 3}], "unknown fields"),
        ([{"index": 0}], "no 'function'"),
        (["leaf 1"], "neither a CpuidEntry nor a dict"),
        ([CpuidEntry(0x80000008, eax=(48 << 8) | 52)], "MAXPHYADDR"),
        ([CpuidEntry(0x80000008, eax=(48 << 8) | 20)], "MAXPHYADDR"),
        ([CpuidEntry(0x80000008, eax=(50 << 8) | 40)], "virtual-address width"),
        ([CpuidEntry(i) for i in range(257)], "E2BIG"),
    ],
)
def test_bad_cpuid_tables_are_refused(entries: list, message: str) -> None:  # type: ignore[type-arg]
    """kvm_set_cpuid()/kvm_check_cpuid(): a bad table is a CpuidError (a ValueError) that names
    the rule and the entry, and the vCPU keeps its table."""
    vcpu = engine_less_vcpu()
    before = vcpu.cpuid
    with pytest.raises(CpuidError, match=message) as info:
        vcpu.set_cpuid(entries)
    assert isinstance(info.value, ValueError)
    assert vcpu.cpuid is before


def test_cpuid_table_is_frozen_after_the_first_run() -> None:
    """KVM_SET_CPUID2 after KVM_RUN: EBUSY unless the table is identical."""
    vm, vcpu, _ = new_guest("uart_hello.S")
    vcpu.set_cpuid(default_cpuid(maxphyaddr=40))
    vcpu.run(time_limit=DEFAULT_LIMIT)
    vcpu.set_cpuid(default_cpuid(maxphyaddr=40))  # same table: fine
    with pytest.raises(CpuidError, match="EBUSY"):
        vcpu.set_cpuid(default_cpuid(maxphyaddr=39))


def test_cpuid_lookup_out_of_range_uses_the_highest_basic_leaf() -> None:
    """get_out_of_range_cpuid_entry(): on an Intel guest a leaf above the maximum of its class
    answers as the highest basic leaf (0x16 here); an undefined leaf in range is zeros."""
    table = default_cpuid()
    assert table.lookup(0x20, 0)[0] == table.lookup(0x16, 0)[0] != (0, 0, 0, 0)
    assert table.lookup(0x80000009, 0)[0] == table.lookup(0x16, 0)[0]
    assert table.lookup(0x5, 0) == ((0, 0, 0, 0), False)


# --- unknown MSR ----------------------------------------------------------------------------------
def test_unknown_msr_write_raises_gp_in_the_guest() -> None:
    """WRMSR of an MSR outside the bitmap ranges always exits (SDM 26.1.3); no such MSR here,
    so the hypervisor injects #GP(0) at the WRMSR (kvm_complete_insn_gp()) -- the guest's #GP
    handler runs, sees error code 0 and the WRMSR's address, skips it, and the guest goes on."""
    vm, vcpu, img = new_guest("gp_msr.S")
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(1)
    assert u32(vm, img.symbol("gp_error")) == 0
    assert u64(vm, img.symbol("gp_rip")) == img.symbol("bad_wrmsr")
    assert vcpu.stats.exits["MSR_WRITE"] == 2 and vcpu.stats.exception_injections == 1
    assert vcpu.get_msr(0x4B564D01) == 0x1001  # the known PV MSR took the second write


# --- triple fault -----------------------------------------------------------------------------------
def test_triple_fault_is_a_shutdown_exit() -> None:
    """#UD (intercepted by KVM's exception bitmap, reflected) with an empty IDT: #GP, #DF, then a
    triple fault -- exit reason 2, KVM_EXIT_SHUTDOWN."""
    vm, vcpu, _ = new_guest("triple_fault.S")
    outcome = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(outcome, ShutdownExit)
    assert vcpu.stats.exits["EXCEPTION_NMI"] == 1 and vcpu.stats.exits["TRIPLE_FAULT"] == 1


@pytest.mark.parametrize("mode, source, bits", [
    ("real", "ljmp $0xf4f4, $0xf4f4\n", 16),  # linear 0x104434: past the VM's 1 MiB of RAM
    ("long", "mov $0x40000000, %rax\njmp *%rax\n", 64),  # identity-mapped, no memslot
])
def test_code_fetched_from_no_ram_is_an_emulation_failure_not_a_fault_loop(mode: str, source: str, bits: int) -> None:
    """Found by tests/fuzz: a guest jumping to a guest-physical address with no RAM and no device
    makes the EPT violation/misconfiguration path emulate the instruction there, whose fetch
    fails. KVM's kvm_fetch_guest_virt() returns X86EMUL_IO_NEEDED and handle_emulation_failure()
    exits with KVM_INTERNAL_ERROR_EMULATION at CPL 0 (arch/x86/kvm/x86.c). The model injected
    #GP instead, which -- through a real-mode IVT full of the same address -- looped 1,000 VM
    entries into the no-progress guard."""
    kvm = Kvm()
    vm = kvm.create_vm(memory_size=1 << 20)
    vcpu = boot(vm, source_image(source, bits=bits), mode=mode)
    vm.write_guest(0, b"\xf4" * 0x400)  # real mode: every IVT vector is F4F4:F4F4 too
    outcome = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(outcome, InternalError) and outcome.suberror == KVM_INTERNAL_ERROR_EMULATION, outcome
    assert "not RAM" in outcome.reason
    assert vcpu.stats.entries < 10


def test_rep_stos_to_mmio_exits_advance_guest_time() -> None:
    """Found by tests/fuzz: REP STOSB with a huge RCX to a guest-physical address with no RAM
    and no device exits to the user once per element (KVM_EXIT_MMIO, completed by
    complete_emulated_mmio() without entering the guest). Each completion is host work that
    takes guest time (issue 11 item 4: every exit advances guest time), so a VMM that completes
    such exits under a guest-time budget reaches it; before, the clock stood still."""
    kvm = Kvm()
    vm = kvm.create_vm(memory_size=1 << 20)
    vcpu = boot(vm, source_image("mov $0x40000000, %rdi\nmov $0x10000000000, %rcx\nmov $0x55, %al\nrep stosb\nhlt\n"))
    clocks = []
    for _ in range(5):
        outcome = vcpu.run(time_limit=DEFAULT_LIMIT)
        assert isinstance(outcome, MmioExit) and outcome.is_write and outcome.size == 1
        clocks.append(vcpu.pcpu.clock())
    assert all(later > earlier for earlier, later in zip(clocks, clocks[1:])), clocks


# --- a guest that never yields ----------------------------------------------------------------------
def test_endless_loop_with_interrupts_off_is_stopped_by_the_time_limit() -> None:
    """``cli; jmp .`` cannot be interrupted by the guest's devices, but the VMX-preemption timer
    fires anyway (SDM 26.5.1): run() honours its limit (plus the round trip of the exit that
    ends it, CpuProfile.vmexit_tsc_cost)."""
    vm, vcpu, _ = new_guest("busy.S")
    outcome = vcpu.run(time_limit=1_000_000)
    assert isinstance(outcome, TimeLimitExit)
    rate = vm.kvm.config.preemption_timer_rate
    host_work = vcpu.stats.entries * host_time.EXIT_HANDLING_TSC  # the TSC runs on in the host too
    # ... and the round trip of the exit that ends the run (CpuProfile.vmexit_tsc_cost).
    last_exit = vm.kvm.profile.vmexit_tsc_cost
    assert 1_000_000 <= vcpu.stats.run_tsc + host_work <= 1_000_000 + (2 << rate) + 100 + last_exit
    assert vcpu.stats.exits["PREEMPTION_TIMER"] >= 1


def test_endless_loop_on_a_cpu_without_preemption_timer() -> None:
    """Without the VMX-preemption timer the host's own timer interrupt (vector 0xEC) does the job
    through "external-interrupt exiting", as KVM's hrtimer-based timers do."""
    kvm = Kvm(profile=CpuProfile.default().without(P.VMX_PREEMPTION_TIMER))
    vm, vcpu, _ = new_guest("busy.S", kvm=kvm)
    assert isinstance(vcpu.run(time_limit=1_000_000), TimeLimitExit)
    assert vcpu.stats.exits.get("EXTERNAL_INTERRUPT", 0) >= 1 and "PREEMPTION_TIMER" not in vcpu.stats.exits


def test_halt_with_interrupts_off_returns_to_the_user() -> None:
    """``cli; hlt``: nothing can wake the vCPU, so run() returns HltExit instead of sleeping."""
    kvm = Kvm()
    vm = kvm.create_vm(memory_size=4 << 20)
    vcpu = boot(vm, source_image("cli\nhlt\n"))
    outcome = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(outcome, HltExit) and "interrupts disabled" in outcome.reason


# --- failed VM entries -------------------------------------------------------------------------------
def test_invalid_guest_state_is_a_fail_entry() -> None:
    """A guest-state check that fails (SDM 27.3.1.5: activity state 5 is reserved) is a VM exit
    with bit 31 set and reason 33 -- KVM_EXIT_FAIL_ENTRY with the full reason, the rule named."""
    vm, vcpu, _ = new_guest("busy.S")
    vcpu.vmcs_write(F.GUEST_ACTIVITY_STATE, 5)
    outcome = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(outcome, FailEntry)
    assert outcome.hardware_entry_failure_reason == VMX_EXIT_REASONS_FAILED_VMENTRY | ExitReason.INVALID_STATE
    assert "activity state" in outcome.rule and "GUEST_ACTIVITY_STATE" in outcome.dump


def test_invalid_control_is_a_fail_entry_with_the_instruction_error() -> None:
    """A control-field check that fails is VMfailValid(7) (SDM 27.2.1.1): FailEntry(7)."""
    vm, vcpu, _ = new_guest("busy.S")
    vcpu.vmcs_write(F.PIN_BASED_VM_EXEC_CONTROL, 0xFFFFFFFF)
    outcome = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(outcome, FailEntry) and outcome.hardware_entry_failure_reason == 7


# --- malformed ELF --------------------------------------------------------------------------------------
GOOD = ElfSpec(entry=0x10000, segments=[Segment(0x10000, b"\x90\xf4")])


@pytest.mark.parametrize(
    "data, message",
    [
        (b"MZ\x90\x00" + bytes(100), "not an ELF file"),
        (build_elf(GOOD)[:40], "malformed ELF"),
        (build_elf(ElfSpec(0x10000, GOOD.segments, machine=EM_AARCH64)), "not x86"),
        (build_elf(ElfSpec(0x10000, GOOD.segments, e_type=ET_DYN)), "not an executable"),
        (build_elf(ElfSpec(0x10000, [Segment(0x10000, b"\x90", p_type=PT_NOTE)])), "no PT_LOAD"),
        (build_elf(ElfSpec(0x10000, [Segment(0x10000, b"\x90\xf4", filesz=0x10000, memsz=0x20000)])), "past the end of the file"),
        (build_elf(ElfSpec(0x10000, [Segment(0x10000, b"\x90\xf4", memsz=1)])), "larger than p_memsz"),
        (build_elf(ElfSpec(0x10000, [Segment(0x10000, b"\x90\xf4", memsz=0x10000000)])), "not guest RAM"),
        (build_elf(ElfSpec(0x50000, GOOD.segments)), "entry point"),
    ],
)
def test_malformed_elf_gives_one_clear_error(data: bytes, message: str) -> None:
    """load_elf(): any malformed or unsuitable file is an ElfLoadError (a ValueError) naming the
    problem, and nothing is written to guest memory."""
    kvm = Kvm(engine=False)
    vm = kvm.create_vm(memory_size=1 << 20)
    with pytest.raises(ElfLoadError, match=message) as info:
        load_elf(vm, data)
    assert isinstance(info.value, ValueError)
    assert vm.read_guest(0x10000, 2) == b"\0\0"


def test_missing_elf_file_is_the_same_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An unreadable file is the same ElfLoadError (ELF gABI loading cannot even start)."""
    vm = Kvm(engine=False).create_vm(memory_size=1 << 20)
    with pytest.raises(ElfLoadError, match="cannot read"):
        load_elf(vm, tmp_path / "nothing.elf")
