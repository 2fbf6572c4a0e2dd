"""Seed 002's intercepts, each set up through the vCPU API with one call, with what the guest sees
and which VM exits the hypervisor took. SDM references: 25.6 (VM-execution controls), 26.1-26.2
(instructions and events that cause VM exits), 28.2.1 (exit qualifications), 26.5.1 (the
VMX-preemption timer); Linux arch/x86/kvm/vmx/vmx.c for the defaults these calls change."""

from __future__ import annotations

import pytest

from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import Msr
from pyvmx.arch.x86 import Cr0, Efer, ExceptionVector
from pyvmx.kvm.cpuid import default_cpuid
from pyvmx.kvm.exits import DebugExit, HltExit, TimeLimitExit, TraceRecord
from pyvmx.kvm.vcpu import Vcpu

from tests.kvm.hv.guests import DEFAULT_LIMIT, new_guest, u32, u64

pytestmark = pytest.mark.machine


def traced(vcpu: Vcpu) -> list[TraceRecord]:
    records: list[TraceRecord] = []
    vcpu.tracer = records.append
    return records


# --- HLT ----------------------------------------------------------------------------------------
def test_hlt_exiting_is_on_by_default() -> None:
    """KVM_REQUIRED_VMX_CPU_BASED_VM_EXEC_CONTROL has HLT exiting: each HLT exits (reason 12),
    the vCPU sleeps until its PIT tick and the tick's interrupt is injected."""
    vm, vcpu, _ = new_guest("pit_ticks.S")
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(5)
    assert vcpu.stats.exits["HLT"] == 5
    assert vcpu.stats.irq_injections == 5


def test_hlt_not_intercepted_halts_inside_the_processor() -> None:
    """``intercept_hlt(False)``: HLT puts the guest in the HLT activity state (SDM 27.7.4) with
    no exit; the VMX-preemption timer armed for the PIT tick wakes it (exit reason 52) and the
    injected IRQ 0 ends the HLT state -- the guest counts the same five ticks."""
    vm, vcpu, _ = new_guest("pit_ticks.S")
    vcpu.intercept_hlt(False)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(5)
    assert "HLT" not in vcpu.stats.exits
    assert vcpu.stats.exits["PREEMPTION_TIMER"] >= 5


# --- PAUSE --------------------------------------------------------------------------------------
def test_pause_exiting() -> None:
    """``intercept_pause()``: "PAUSE exiting" (bit 30) -- every PAUSE exits (reason 40) and the
    vCPU yields (handle_pause()); the guest's loop still completes."""
    vm, vcpu, _ = new_guest("pause_loop.S")
    vcpu.intercept_pause()
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(10)
    assert vcpu.stats.exits["PAUSE_INSTRUCTION"] == 10
    vm2, plain, _ = new_guest("pause_loop.S", kvm=vm.kvm)
    assert plain.run(time_limit=DEFAULT_LIMIT) == DebugExit(10)
    assert "PAUSE_INSTRUCTION" not in plain.stats.exits


# --- external interrupts and RFLAGS.IF ---------------------------------------------------------
@pytest.mark.parametrize("intercept", [True, False])
def test_external_interrupt_exiting(intercept: bool) -> None:
    """``intercept_external_interrupts()`` (pin-based bit 0, on in KVM): a host interrupt exits
    (reason 1, acknowledged on exit -- SDM 25.7.1) and the guest never sees it; off, it is
    delivered through the guest's IDT (vector 0x40) with no exit."""
    vm, vcpu, _ = new_guest("ext_irq.S")
    vcpu.intercept_external_interrupts(intercept)
    vcpu.set_interrupt_flag(True)
    processor = vcpu.pcpu.processor
    processor.raise_interrupt(0x40, at_tsc=processor.read_tsc() + 20_000)
    outcome = vcpu.run(time_limit=DEFAULT_LIMIT)
    if intercept:
        assert outcome == DebugExit(0)
        assert vcpu.stats.exits["EXTERNAL_INTERRUPT"] == 1 and vcpu.host_irqs == {0x40: 1}
    else:
        assert outcome == DebugExit(1)
        assert "EXTERNAL_INTERRUPT" not in vcpu.stats.exits


@pytest.mark.parametrize("interrupts_on", [True, False])
def test_opening_and_closing_guest_interrupts_via_rflags(interrupts_on: bool) -> None:
    """Seed 002 "open or close the guest's interrupts": RFLAGS.IF in the guest-state area. A
    device interrupt (IRQ 1 through the in-kernel 8259, KVM_IRQ_LINE) is injected only while
    IF = 1 (SDM 26.7.5; KVM's vmx_interrupt_allowed()); with IF = 0 it waits in the PIC and the
    hypervisor keeps interrupt-window exiting armed."""
    vm, vcpu, _ = new_guest("pic_irq.S")
    vcpu.set_interrupt_flag(interrupts_on)
    records = traced(vcpu)

    def raise_irq1(record: TraceRecord) -> None:
        records.append(record)
        if record.reason == ExitReason.IO_INSTRUCTION and record.qualification >> 16 == 0xA1:
            vm.set_irq(1, True)  # once the PIC is programmed

    vcpu.tracer = raise_irq1
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(1 if interrupts_on else 0)
    assert vcpu.stats.irq_injections == (1 if interrupts_on else 0)
    assert vm.platform is not None and vm.platform.pic.output() is not interrupts_on


# --- #PF ----------------------------------------------------------------------------------------
def test_page_fault_intercept() -> None:
    """``intercept_exception(PF)``: exception bitmap bit 14 with mask = match = 0, every #PF exits
    (reason 0, vector 14, qualification = the linear address -- SDM 26.2, 28.2.1); the hypervisor
    reflects it with CR2 and the error code, and the guest's handler sees exactly what it would
    have seen without the intercept."""
    vm, vcpu, img = new_guest("page_fault.S")
    vcpu.intercept_exception(ExceptionVector.PF)
    records = traced(vcpu)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(2)
    pf_exits = [r for r in records if r.reason == ExitReason.EXCEPTION_NMI]
    assert [r.qualification for r in pf_exits] == [0x100000000, 0x400000]
    assert [r.rip for r in pf_exits] == [img.symbol("not_present"), img.symbol("read_only")]
    recs = img.symbol("records")
    assert (u64(vm, recs), u64(vm, recs + 8)) == (0x100000000, 0)  # not present, read
    assert (u64(vm, recs + 16), u64(vm, recs + 24)) == (0x400000, 3)  # present, write


def test_page_faults_go_straight_to_the_guest_with_ept() -> None:
    """Without the intercept (EPT, equal MAXPHYADDRs) #PF is not in the bitmap: no exit."""
    vm, vcpu, img = new_guest("page_fault.S")
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(2)
    assert "EXCEPTION_NMI" not in vcpu.stats.exits
    assert u64(vm, img.symbol("records") + 24) == 3


def test_smaller_guest_maxphyaddr_traps_only_present_faults() -> None:
    """Seed 000: guest MAXPHYADDR (CPUID 80000008H) below the host's -> #PF in the bitmap with
    PFEC mask = match = PFERR_PRESENT: the write to the read-only page exits, the not-present
    fault does not (SDM 26.2); kvm_fixup_and_inject_pf_error() re-injects it."""
    vm, vcpu, img = new_guest("page_fault.S")
    vcpu.set_cpuid(default_cpuid(maxphyaddr=39))
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(2)
    assert vcpu.stats.exits["EXCEPTION_NMI"] == 1
    assert u64(vm, img.symbol("records") + 24) == 3


# --- I/O ----------------------------------------------------------------------------------------
def test_all_io_exits_by_default() -> None:
    """Unconditional I/O exiting (KVM's choice): every IN/OUT exits -- the LSR polls included."""
    vm, vcpu, _ = new_guest("uart_hello.S")
    records = traced(vcpu)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x55)
    ports = {r.qualification >> 16 for r in records if r.reason == ExitReason.IO_INSTRUCTION}
    assert {0x3F8, 0x3F9, 0x3FA, 0x3FB, 0x3FC, 0x3FD, 0xF4} <= ports


def test_only_the_serial_port_exits() -> None:
    """``intercept_io(0x3F8, only=True)``: I/O bitmap A with only bit 0x3F8 set (SDM 25.6.4).
    THR writes exit and reach the UART -- the text appears; the LSR polls, the UART set-up and
    the debug-exit port go to the platform without an exit, so the guest runs on to its HLT.
    (The divisor-latch write to 0x3F8 exits too; as the LCR.DLAB write before it never reached
    the UART, the UART takes it as a THR write: the output starts with that byte, 0x01.)"""
    vm, vcpu, _ = new_guest("uart_hello.S")
    vcpu.intercept_io(0x3F8, only=True)
    records = traced(vcpu)
    outcome = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(outcome, HltExit)
    message = b"Hello from a 16550 driver!\n"
    assert vm.serial_output == b"\x01" + message
    io = [r for r in records if r.reason == ExitReason.IO_INSTRUCTION]
    assert {r.qualification >> 16 for r in io} == {0x3F8}
    assert len(io) == 1 + len(message)


# --- MSRs ---------------------------------------------------------------------------------------
def test_all_msr_accesses_exit() -> None:
    """``intercept_all_msrs()``: the MSR bitmap all ones -- RDMSR and WRMSR of EFER exit."""
    vm, vcpu, _ = new_guest("to_long_mode.S", mode="protected")
    vcpu.intercept_all_msrs()
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x64)
    assert vcpu.stats.exits["MSR_READ"] == 2 and vcpu.stats.exits["MSR_WRITE"] == 1


def test_only_efer_writes_exit_and_the_long_mode_switch_is_seen() -> None:
    """``intercept_msr("EFER", read=False, only=True)``: only bit 0x80 of the write-high bitmap
    (byte 0xC00 + 0x80/8). The guest's RDMSRs run without exits; its WRMSR of EFER.LME exits and
    the hypervisor sees the long-mode switch (then CR0.PG makes EFER.LMA, vmx_set_cr0())."""
    vm, vcpu, img = new_guest("to_long_mode.S", mode="protected")
    vcpu.intercept_msr("EFER", read=False, only=True)
    assert vm.kvm.memory.read8(vcpu.msr_bitmap.address + 0xC10) == 1
    records = traced(vcpu)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x64)
    msr_exits = [r for r in records if r.reason in (ExitReason.MSR_READ, ExitReason.MSR_WRITE)]
    assert len(msr_exits) == 1 and msr_exits[0].reason == ExitReason.MSR_WRITE
    assert msr_exits[0].rip == img.symbol("efer_write") and "0x100" in msr_exits[0].outcome.note  # type: ignore[union-attr]
    assert u32(vm, img.symbol("efer_seen")) & (Efer.LME | Efer.LMA) == Efer.LME | Efer.LMA
    assert vcpu.get_msr(Msr.EFER) & Efer.LMA and vcpu.is_64_bit_mode()


def test_only_cr0_pg_writes_exit() -> None:
    """``intercept_cr0_bits(Cr0.PG, only=True)``: CR0 guest/host mask = PG. The one MOV to CR0
    that sets PG exits (CR access, qualification CR0 / MOV to CR / EAX) and is emulated with the
    long-mode activation of vmx_set_cr0(); the guest reads CR0 with no exit."""
    vm, vcpu, img = new_guest("to_long_mode.S", mode="protected")
    vcpu.intercept_cr0_bits(Cr0.PG, only=True)
    records = traced(vcpu)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x64)
    cr0 = [r for r in records if r.reason == ExitReason.CR_ACCESS and r.qualification & 0xF == 0]
    assert [(r.rip, r.qualification) for r in cr0] == [(img.symbol("cr0_write"), 0)]
    assert vcpu.get_sregs().cr0 & Cr0.PG


# --- VMX-preemption timer ------------------------------------------------------------------------
def test_preemption_timer_takes_the_cpu_back_from_a_cli_loop() -> None:
    """``set_preemption_timer(ticks, exit_to_user=True)``: pin-based bit 6 with the timer value
    for the slice (SDM 26.5.1): an endless loop with interrupts off still exits (reason 52).  The
    timer counts in VMX non-root operation only; the run also holds each exit's round trip
    (CpuProfile.vmexit_tsc_cost)."""
    vm, vcpu, _ = new_guest("busy.S")
    vcpu.set_preemption_timer(100_000, exit_to_user=True)
    outcome = vcpu.run()
    assert isinstance(outcome, TimeLimitExit)
    assert vcpu.stats.exits["PREEMPTION_TIMER"] == 1
    round_trips = vm.kvm.profile.vmexit_tsc_cost * sum(vcpu.stats.exits.values())
    assert 100_000 + round_trips <= vcpu.stats.run_tsc <= 100_000 + round_trips + 2 ** vm.kvm.config.preemption_timer_rate + 64
