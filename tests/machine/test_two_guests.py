"""Two guests alternating on one processor, the way a hypervisor time-slices vCPUs: one VMCS
per guest, switched with VMPTRLD (no field is copied), VMLAUNCH the first time and VMRESUME
after, and the VMX-preemption timer giving each guest its slice.

SDM references: 25.5.1 (the VMX-preemption timer counts down by 1 each time TSC bit X changes,
X = IA32_VMX_MISC[4:0]; a VM exit when it reaches 0), 25.7.1 ("save VMX-preemption timer
value"), 25.11.3 (VMPTRLD makes a VMCS current; each VMCS keeps its guest state), 31.3 VMRESUME
(VMfailValid(5) on a VMCS whose launch state is not "launched"), 26.1.3 (HLT exiting).
"""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vm_instruction_errors import VmInstructionError
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.guest.sandbox import GUEST_CODE, VmxSandbox
from pyvmx.vmx.outcomes import VmxStatus

pytestmark = pytest.mark.machine

COUNTER = """
spin: inc %rax          # two instructions per count
      jmp spin
"""
WORKER = """
      mov $2000, %ecx
work: inc %rbx          # 2000 x (inc, loop): 4001 instructions before the HLT
      loop work
stop: hlt
"""
SLICE = {"counter": 100, "worker": 50}  # timer ticks per slice


def _guests() -> tuple[VmxSandbox, VmxSandbox]:
    counter = VmxSandbox("long", COUNTER)
    worker = counter.add_guest("long", WORKER)
    for guest in (counter, worker):
        assert guest.make_current().succeeded
        guest.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
        guest.set_bits(F.VM_EXIT_CONTROLS, X.SAVE_VMX_PREEMPTION_TIMER)
        guest.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    return counter, worker


def test_each_guest_has_its_own_vmcs_ept_and_memory() -> None:
    counter, worker = _guests()
    assert counter.vmcs_address != worker.vmcs_address
    assert counter.make_current().succeeded
    counter_eptp = counter.read(F.EPT_POINTER)
    assert worker.make_current().succeeded
    assert worker.read(F.EPT_POINTER) != counter_eptp
    # Both programs live at guest-physical GUEST_CODE, in different host memory.
    assert worker.ram_hpa != counter.ram_hpa
    assert counter.memory.read(counter.ram_hpa + GUEST_CODE, len(counter.image.code)) == counter.image.code
    assert worker.memory.read(worker.ram_hpa + GUEST_CODE, len(worker.image.code)) == worker.image.code


def test_vmresume_of_a_vmcs_never_launched_fails_with_error_5() -> None:
    """SDM 31.3 VMRESUME: the current VMCS's launch state is "clear" -> VMfailValid(5), and the
    error number is in the current VMCS's VM-instruction error field."""
    counter, worker = _guests()
    assert counter.make_current().succeeded
    assert counter.enter().status is VmxStatus.VM_EXIT  # VMLAUNCH of the first guest
    assert worker.make_current().succeeded
    result = worker.cpu.vmresume()
    assert result.status is VmxStatus.FAIL_VALID
    assert result.error is VmInstructionError.VMRESUME_NONLAUNCHED_VMCS and int(result.error) == 5
    assert worker.read(F.VM_INSTRUCTION_ERROR) == 5
    assert worker.cpu.vmlaunch().status is VmxStatus.VM_EXIT  # launching it works


def test_two_guests_alternate_with_preemption_timer_slices() -> None:
    """A round-robin hypervisor loop: reload the slice before each entry, save and restore the
    registers the VMCS does not hold, stop scheduling a guest once it exits on HLT.

    The machine is deterministic, so progress is exact: with IA32_VMX_MISC[4:0] = 5 a slice of
    V ticks entered at TSC t runs V*32 - (t mod 32) instructions (SDM 25.5.1).  Entries here
    happen at multiples of 32 until the worker halts, so the counter counts 1600 per slice (two
    instructions per count) and the worker 800 (its slice is half as long)."""
    counter, worker = _guests()
    cpu = counter.cpu
    rate = cpu.profile.preemption_timer_rate
    assert rate == 5
    names = {id(counter): "counter", id(worker): "worker"}
    registers = {}
    for guest in (counter, worker):  # each guest starts with its own zeroed registers
        for reg in ("rax", "rbx", "rcx"):
            cpu.gpr[reg] = 0
        registers[id(guest)] = cpu.save_register_file()

    runnable = [counter, worker]
    log = []
    for _ in range(5):
        for guest in list(runnable):
            name = names[id(guest)]
            assert guest.make_current().succeeded
            cpu.restore_register_file(registers[id(guest)])
            guest.write(F.VMX_PREEMPTION_TIMER_VALUE, SLICE[name])
            entry_tsc = cpu.read_tsc()
            result = guest.enter()  # VMLAUNCH the first time, VMRESUME after
            registers[id(guest)] = cpu.save_register_file()
            assert result.exit is not None and not result.exit.failed_vmentry
            ran = cpu.read_tsc() - entry_tsc
            log.append((name, result.exit.exit_reason, ran, cpu.gpr["rax"], cpu.gpr["rbx"]))
            if result.exit.exit_reason is ExitReason.PREEMPTION_TIMER:
                assert ran == SLICE[name] * 32 - entry_tsc % 32  # SDM 25.5.1
                assert guest.read(F.VMX_PREEMPTION_TIMER_VALUE) == 0  # saved at the exit
            if result.exit.exit_reason is ExitReason.HLT:
                runnable.remove(guest)

    timer = ExitReason.PREEMPTION_TIMER
    assert log[:6] == [
        ("counter", timer, 3200, 1600, 0),
        ("worker", timer, 1600, 0, 800),
        ("counter", timer, 3200, 3200, 0),
        ("worker", timer, 1600, 0, 1600),
        ("counter", timer, 3200, 4800, 0),
        ("worker", ExitReason.HLT, 801, 0, 2000),  # mov + 2000 x (inc, loop), then HLT exits
    ]
    # Once the worker halted only the counter runs; the first slice after it is one
    # instruction short (entered at TSC = 1 mod 32), the counts stay exact.
    assert log[6:] == [
        ("counter", timer, 3199, 6400, 0),
        ("counter", timer, 3200, 8000, 0),
    ]
    # Progress in proportion to the slices while both ran: 1600:800 counts = 100:50 ticks.
    counter_step = log[2][3] - log[0][3]
    worker_step = log[3][4] - log[1][4]
    assert counter_step * SLICE["worker"] == worker_step * SLICE["counter"]

    # Each VMCS kept its own guest state: RIP in its own program.
    assert worker.make_current().succeeded
    assert worker.rip == worker.symbol("stop")
    assert worker.read(F.GUEST_ACTIVITY_STATE) == 0  # HLT exiting: the HLT did not execute
    assert counter.make_current().succeeded
    assert counter.symbol("spin") <= counter.rip <= counter.symbol("spin") + 3
