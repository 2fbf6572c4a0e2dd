"""vCPUs sharing physical CPUs (seed 002's last question). One VMCS per vCPU, switched with
VMPTRLD; time slices by the VMX-preemption timer (SDM 26.5.1); HLT takes a vCPU off the run
queue until its timer interrupt; with two CPUs, VMCSs migrate with VMCLEAR + VMPTRLD + VMLAUNCH
(SDM 25.11.3, 31.3; Linux arch/x86/kvm/vmx/vmx.c vmx_vcpu_load_vmcs(), loaded_vmcs_clear())."""

from __future__ import annotations

import pytest

from pyvmx.arch.vm_instruction_errors import VmInstructionError
from pyvmx.kvm.exits import Halt, IoExit, VcpuExit
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.scheduler import ScheduleReport, Scheduler
from pyvmx.kvm.vcpu import MpState, Vcpu
from pyvmx.kvm.vm import Vm
from pyvmx.vmx.outcomes import VmxStatus

from tests.kvm.hv.guests import boot, image, source_image, u32, u64

pytestmark = pytest.mark.machine

SLICE = 200_000
DURATION = 6_000_000
TICK = 1_000_000_000 * 1193 // 1193182  # the PIT period in TSC ticks


def busy_smp_vm(kvm: Kvm) -> tuple[Vm, list[Vcpu], int]:
    """An SMP VM: two vCPUs spinning with interrupts off in the same code, each counting in its
    own slot of one shared array (RBX = vCPU number)."""
    vm = kvm.create_vm(memory_size=4 << 20, platform=False, name="busy")
    img = image("busy.S")
    vcpus = []
    for i in range(2):
        v = boot(vm, img, stack=0xA000 - 0x1000 * i)
        v.set_gpr("rbx", i)
        vcpus.append(v)
    return vm, vcpus, img.symbol("counters")


def sleepy_vm(kvm: Kvm) -> tuple[Vm, Vcpu, int]:
    """A one-vCPU VM that halts between PIT ticks, forever (target far away)."""
    vm = kvm.create_vm(memory_size=4 << 20, name="sleepy")
    img = image("pit_ticks.S")
    v = boot(vm, img)
    vm.write_guest(img.symbol("target"), (10**6).to_bytes(4, "little"))
    return vm, v, img.symbol("ticks")


def run_mix(cpus: int) -> tuple[Kvm, ScheduleReport, list[Vcpu], Vcpu, int, int, Vm, Vm]:
    kvm = Kvm(cpus=cpus)
    kvm.vmx_log = []
    busy_vm, busy, counters = busy_smp_vm(kvm)
    sleep_vm, sleeper, ticks = sleepy_vm(kvm)
    sched = Scheduler(kvm, slice_tsc=SLICE)
    for v in [*busy, sleeper]:
        sched.add(v)
    report = sched.run(duration=DURATION)
    return kvm, report, busy, sleeper, counters, ticks, busy_vm, sleep_vm


def assert_fair_and_woken(report: ScheduleReport, busy: list[Vcpu], sleeper: Vcpu, cpus: int) -> None:
    a, b = (report.share(v).run_tsc for v in busy)
    assert abs(a - b) <= 0.10 * max(a, b), (a, b)
    # the busy vCPUs use nearly all the CPU time there is
    assert a + b >= 0.9 * cpus * DURATION - report.share(sleeper).run_tsc
    s = report.share(sleeper)
    assert s.halts >= DURATION // TICK - 1 and s.wakeups >= DURATION // TICK - 2
    assert s.run_tsc < 0.01 * DURATION  # it only ever ran its interrupt handler


def test_two_busy_one_halted_on_one_cpu() -> None:
    """One CPU: the two busy vCPUs split the time within 10% by guest time run, whatever their
    RFLAGS.IF (the preemption timer preempts them); the halted vCPU is off the run queue between
    its PIT ticks and is woken by each one (its ticks counter advances)."""
    kvm, report, busy, sleeper, counters, ticks, busy_vm, sleep_vm = run_mix(1)
    assert report.stopped_because == "duration reached"
    assert_fair_and_woken(report, busy, sleeper, 1)
    assert u32(sleep_vm, ticks) == report.share(sleeper).wakeups
    # one shared memory: both counters are in the one VM's RAM and both advanced
    assert u64(busy_vm, counters) > 0 and u64(busy_vm, counters + 8) > 0
    assert report.share(busy[0]).migrations == 0
    # switching vCPUs on one CPU is VMPTRLD only: no VMCLEAR after creation
    assert not [e for e in kvm.vmx_log if e[0] == "VMCLEAR"]


def check_launch_discipline(log: list[tuple[str, int, int]]) -> tuple[int, int]:
    """Per VMCS: after a VMCLEAR (launch state clear) the next entry must be VMLAUNCH, and a
    VMRESUME happens only on the CPU where the VMCS was last entered and is still active."""
    state: dict[int, tuple[str, int | None]] = {}
    launches = clears = 0
    for instruction, cpu, vmcs in log:
        last, where = state.get(vmcs, ("clear", None))
        if instruction == "VMCLEAR":
            clears += 1
            state[vmcs] = ("clear", None)
        elif instruction == "VMLAUNCH":
            assert last == "clear", f"VMLAUNCH of a launched VMCS {vmcs:#x}"
            launches += 1
            state[vmcs] = ("launched", cpu)
        elif instruction == "VMRESUME":
            assert last == "launched" and where == cpu, f"VMRESUME of VMCS {vmcs:#x} on CPU {cpu} ({last}, {where})"
    return launches, clears


def test_two_cpus_migrate_vmcss_with_vmclear_and_vmlaunch() -> None:
    """Two CPUs, one global run queue: vCPUs move between CPUs; each move is VMCLEAR on the old
    CPU and VMLAUNCH -- never VMRESUME -- on the new one; fairness and wake-ups still hold."""
    kvm, report, busy, sleeper, counters, ticks, busy_vm, sleep_vm = run_mix(2)
    assert_fair_and_woken(report, busy, sleeper, 2)
    migrations = sum(report.share(v).migrations for v in [*busy, sleeper])
    assert migrations >= 3
    assert all(report.share(v).cpus == {0, 1} for v in busy)
    assert kvm.vmx_log is not None
    launches, clears = check_launch_discipline(kvm.vmx_log)
    assert clears >= migrations and launches >= migrations
    # the guest state survived the moves: the counters kept counting
    assert u64(busy_vm, counters) > 0 and u64(busy_vm, counters + 8) > 0


def test_vmresume_after_vmclear_fails_as_the_sdm_says() -> None:
    """What the discipline above avoids: after VMCLEAR the launch state is "clear", and VMRESUME
    of it (on any CPU) is VMfailValid with error 5, "VMRESUME with non-launched VMCS" (SDM 31.3
    VMRESUME; 31.4 Table 31-1). VMLAUNCH is the way back in, and the guest goes on where it was
    (VMCLEAR wrote the VMCS data back to memory)."""
    kvm = Kvm(cpus=2)
    vm, (v0, v1), counters = busy_smp_vm(kvm)
    v0.set_preemption_timer(50_000, exit_to_user=True)
    v0.run()
    before = u64(vm, counters)
    vmcs = v0.loaded_vmcs.address
    cpu0, cpu1 = kvm.pcpus
    assert v0.loaded_vmcs.cpu is cpu0 and v0.loaded_vmcs.launched
    v0.put()  # the hypervisor's VMCLEAR on CPU 0 (loaded_vmcs_clear())
    # What a careless hypervisor would do next on CPU 1:
    assert cpu1.processor.vmptrld(vmcs).succeeded
    result = cpu1.processor.vmresume()
    assert result.status is VmxStatus.FAIL_VALID
    assert result.error is VmInstructionError.VMRESUME_NONLAUNCHED_VMCS and int(result.error) == 5
    # What this one does: VMPTRLD on the new CPU, then VMLAUNCH; the guest goes on.
    v0.load(cpu1)
    v0.run()
    assert v0.loaded_vmcs.cpu is cpu1 and v0.stats.launches == 2
    assert u64(vm, counters) > before


def test_halted_vcpu_with_interrupts_off_needs_a_kick() -> None:
    """``cli; hlt`` can only be ended by an NMI or a kick (PV unhalt, KVM_HC_KICK_CPU): the
    scheduler keeps it off the CPUs until ``kick()``."""
    kvm = Kvm()
    vm = kvm.create_vm(memory_size=4 << 20, platform=False)
    img = source_image("cli\nhlt\nmov $0x33, %al\nout %al, $0xf4\nhlt\n")
    v = boot(vm, img)
    stopped: list[VcpuExit] = []

    def on_exit(vcpu: Vcpu, exit: VcpuExit) -> bool:
        stopped.append(exit)
        return False

    sched = Scheduler(kvm, slice_tsc=SLICE, on_exit=on_exit)
    sched.add(v)
    report = sched.run(duration=1_000_000)
    assert report.stopped_because == "every vCPU is halted with nothing to wake it"
    assert v.mp_state is MpState.HALTED and not stopped
    v.kick()
    report = sched.run(duration=1_000_000)
    # no platform devices in this VM: the port write goes to the user
    assert len(stopped) == 1 and isinstance(stopped[0], IoExit) and (stopped[0].port, stopped[0].value) == (0xF4, 0x33)


def test_run_slice_reports_halt() -> None:
    """The scheduler's unit of work: run until the slice ends, the vCPU halts, or the user is
    needed."""
    kvm = Kvm()
    vm = kvm.create_vm(memory_size=4 << 20, platform=False)
    v = boot(vm, source_image("sti\nhlt\n"))
    cpu = kvm.pcpus[0]
    assert isinstance(v.run_slice(cpu, cpu.clock() + SLICE), Halt)
    assert v.mp_state is MpState.HALTED
