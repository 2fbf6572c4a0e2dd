"""Guests driving the PC devices through the hypervisor: a 16550 driver loop, PIT ticks while
halted, an interrupt held back by RFLAGS.IF until the interrupt window opens, string I/O.
References: PC16550D datasheet; Intel 8254/8259A datasheets; SDM 26.7.5 (interrupt-window
exiting), 27.6 (event injection); Linux arch/x86/kvm/x86.c kvm_check_and_inject_events()."""

from __future__ import annotations

import pytest

from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.kvm.exits import DebugExit, IoDirection, IoExit, TraceRecord
from pyvmx.kvm.kvm import Kvm

from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, new_guest, source_image, u32, u64

pytestmark = pytest.mark.machine


def test_uart_driver_loop_output_is_captured() -> None:
    """A real driver loop (LSR.THRE poll, THR write) against the 16550A at 0x3F8: the UART's
    transmitter gets every byte; the run ends at the debug-exit port."""
    vm, vcpu, _ = new_guest("uart_hello.S")
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x55)
    assert vm.serial_output == b"Hello from a 16550 driver!\n"
    assert vm.platform is not None and vm.platform.serial.baud_rate == 115200
    assert vm.platform.serial.line_settings.startswith("8")


def test_pit_ticks_counted_while_halting() -> None:
    """Channel 0 in mode 2 at 1193182/1193 Hz (~1 kHz) clocked by guest TSC (1 GHz): the guest
    sleeps in HLT between ticks -- the CPU idles to the next tick instead of running anything --
    and counts each IRQ 0 delivered through the 8259 at vector 0x20."""
    vm, vcpu, img = new_guest("pit_ticks.S")
    vm.write_guest(img.symbol("target"), (20).to_bytes(4, "little"))
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(20)
    assert u32(vm, img.symbol("ticks")) == 20
    period = 1_000_000_000 * 1193 // 1193182
    elapsed = vcpu.guest_tsc()
    assert 19 * period <= elapsed <= 21 * period
    assert vcpu.stats.halted_tsc > 0.99 * elapsed  # asleep, not spinning
    # Guest code ran for few ticks; the rest of the run time is the exits' round trips.
    assert vcpu.stats.run_tsc - vm.kvm.profile.vmexit_tsc_cost * vcpu.stats.entries < 2000


def test_interrupt_waits_for_the_window() -> None:
    """With RFLAGS.IF = 0 over several PIT periods the pending IRQ 0 cannot be injected: KVM arms
    interrupt-window exiting (enable_irq_window()); the window opens after STI's shadow, the exit
    comes (reason 7) and the interrupt is injected at ``after_sti`` -- exactly once, the periods
    that passed collapse in the PIC's edge latch."""
    vm, vcpu, img = new_guest("irq_window.S")
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(1)
    assert vcpu.stats.exits["INTERRUPT_WINDOW"] >= 1
    assert u64(vm, img.symbol("irq_rip")) == img.symbol("after_sti")


STRING_IO = r"""
    lea text(%rip), %rsi
    mov $0x3f8, %dx
    mov $6, %rcx
    rep outsb                  # to the UART: handled in the hypervisor
    lea text(%rip), %rsi
    mov $0x510, %dx
    mov $3, %rcx
    rep outsb                  # to a port nobody claims: one exit to the user
    lea buffer(%rip), %rdi
    mov $4, %rcx
    rep insb                   # from the user
    mov buffer(%rip), %eax
    cmp $0x64636261, %eax
    jne fail
    mov $0x77, %al
    out %al, $0xf4
fail:
    hlt
text:   .ascii "string"
buffer: .long 0
"""


def test_rep_string_io() -> None:
    """REP OUTSB/INSB (SDM 28.2.1: string, REP; instruction information for the address size
    and segment): elements go through the guest's paging; to a device they are handled inside,
    to no device the whole transfer is one KVM_EXIT_IO with count > 1, INS completing on the next
    run() -- RCX, RSI/RDI and RIP as the instruction leaves them."""
    kvm = Kvm()
    vm = kvm.create_vm(memory_size=4 << 20)
    img = source_image(STRING_IO)
    vcpu = boot(vm, img)
    out = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(out, IoExit) and out.direction is IoDirection.OUT
    assert (out.port, out.size, out.count, bytes(out.data)) == (0x510, 1, 3, b"str")
    assert vm.serial_output == b"string"
    inp = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(inp, IoExit) and inp.direction is IoDirection.IN and inp.count == 4
    inp.data[:] = b"abcd"
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x77)
    assert vcpu.get_gpr("rcx") == 0


def test_stats_and_tracer_agree() -> None:
    """Per-vCPU exit statistics (kvm_stat) and the tracer see the same exits."""
    vm, vcpu, _ = new_guest("pit_ticks.S")
    records: list[TraceRecord] = []
    vcpu.tracer = records.append
    vcpu.run(time_limit=DEFAULT_LIMIT)
    counted: dict[str, int] = {}
    for r in records:
        counted[r.reason_name] = counted.get(r.reason_name, 0) + 1
    assert counted == vcpu.stats.exits
    assert [r.guest_tsc for r in records] == sorted(r.guest_tsc for r in records)
    assert all(r.reason != ExitReason.TRIPLE_FAULT for r in records)
