"""What the fuzz tests run inputs on, reused across inputs for throughput:

* :class:`HvTarget` -- one Kvm and one VM with 128 KiB of RAM at 0 and the PC devices; each input
  gets a fresh vCPU (KVM's reset state), zeroed RAM and fresh devices, so nothing of one input
  reaches the next. Runs go through ``vcpu.run()``.
* :class:`MachineTarget` -- one bare VT-x processor (VmxSandbox) per mode; each input starts from
  a snapshot of host memory taken with the VMCS clear (VMCLEAR, restore, VMPTRLD, VMLAUNCH), so
  it starts from the same VMCS, EPT tables and guest RAM.

Each input ends in an outcome *kind* (a string for the ledger). A Python exception escaping the
run (or reported by run() as an InternalError that is no documented limitation), a run past its
guest-time limit, a resumed run without guest-time progress, or an input past its wall-clock
limit is a failure. (While a fix was under way elsewhere, a ``known_bug_<name>`` predicate here
recognised the inputs that hit exactly that bug and counted them as ``known-bug:<name>``.)
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4, Rflags
from pyvmx.engine.deadline import HostDeadline
from pyvmx.guest.assemble import GuestImage
from pyvmx.guest.sandbox import GUEST_CODE, VmxSandbox
from pyvmx.kvm.boot import SEL_CODE16, setup_long_mode, setup_protected_mode, setup_real_mode
from pyvmx.kvm.devices.bus import IoBus
from pyvmx.kvm.exits import (
    KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_SIMUL_EX,
    InternalError,
    IoExit,
    MmioExit,
    VcpuExit,
    WallClockExit,
)
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.loader import load_flat
from pyvmx.kvm.msr_bitmap import MsrOutsideBitmapError
from pyvmx.kvm.platform import PcPlatform
from pyvmx.kvm.regs import Segment
from pyvmx.kvm.vcpu import Vcpu
from pyvmx.vmx.outcomes import VmxResult, VmxStatus
from tests.fuzz.ledger import FAILURE_KINDS
from tests.fuzz.strategies import RAM_SIZE, GuestMode, HvIntercepts, MachineControls

CODE_GPA = 0x10000
# Guest RAM outside the code and the boot tables holds HLT: a guest that runs off its code stops
# there (or loops through HLT exits) instead of executing a megabyte of ``add %al, (%rax)``.
RAM_FILL = b"\xf4"
PD32_GPA = 0x2000  # the 32-bit paging directory (the long-mode tables' PML4 page is unused then)
WALL_LIMIT_S = 10.0  # one input, wall clock: far above any input's normal time (milliseconds)
WATCHDOG_S = 30.0  # the test's own backstop, should the engine's HostDeadline not stop a run
RUN_TIME_LIMIT = 20_000  # guest TSC ticks per vcpu.run()
MAX_RUNS = 6  # vcpu.run() calls per input (a VMM completing I/O and MMIO exits and resuming)
# A run may end a little past its time limit: the instruction or emulated string operation in
# progress completes (at most 4096 elements per exit, SDM 20.3 "REP" restarts on the next).
TIME_LIMIT_SLACK = 8192


class Hang(BaseException):
    """An input ran past its wall-clock limit. A BaseException, so that no ``except Exception``
    inside the hypervisor turns it into an exit value."""


@contextmanager
def wall_clock_limit(seconds: float = WATCHDOG_S) -> Iterator[None]:
    """Raise :class:`Hang` in this (main) thread once ``seconds`` have passed, and every second
    after that (a Unicorn hook's ctypes callback swallows an exception raised inside it)."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"input still running after {seconds} s of wall-clock time")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- outcome kinds ----------------------------------------------------------------------------------
# InternalError exits that are documented limitations, not bugs:
# * EMULATION "MMIO emulation failed": an instruction touching MMIO that the emulator does not
#   handle -- KVM's handle_emulation_failure() ends KVM_RUN the same way (arch/x86/kvm/x86.c);
# * SIMUL_EX "exception N during delivery of another event": an intercepted exception (not a
#   #PF) raised while delivering an event; KVM's handle_exception_nmi() gives up the same way
#   (arch/x86/kvm/vmx/vmx.c, "vect_info & VECTORING_INFO_VALID_MASK");
# * DELIVERY_EV "no progress": vcpu.run()'s livelock guard (an exception reflected into a guest
#   that faults again delivering it; hardware and KVM would spin there for ever).
DOCUMENTED_INTERNAL_ERRORS = (
    (KVM_INTERNAL_ERROR_EMULATION, "MMIO emulation failed"),
    (KVM_INTERNAL_ERROR_SIMUL_EX, "exception"),
    (KVM_INTERNAL_ERROR_DELIVERY_EV, "no progress"),
    (KVM_INTERNAL_ERROR_EMULATION, "the CPU engine stopped: no progress"),
)


def exit_kind(exit: VcpuExit) -> str:
    if isinstance(exit, InternalError):
        for suberror, prefix in DOCUMENTED_INTERNAL_ERRORS:
            if exit.suberror == suberror and exit.reason.startswith(prefix):
                return f"InternalError:{prefix}"
        return f"UNDOCUMENTED-InternalError:{exit.suberror}:{exit.reason[:80]}"
    return type(exit).__name__


def is_failure(kind: str) -> bool:
    return kind.startswith(FAILURE_KINDS)


def exception_kind(exc: BaseException) -> str:
    if isinstance(exc, Hang):
        return "HANG"
    return f"HOST-EXCEPTION:{type(exc).__name__}: {str(exc)[:100]}"


# --- the KVM-style hypervisor ------------------------------------------------------------------------
def boot(vcpu: Vcpu, mode: GuestMode, entry: int = CODE_GPA) -> None:
    """Start ``vcpu`` at ``entry`` in ``mode`` (kvm/boot.py, plus 16-bit protected mode,
    virtual-8086 mode and 32-bit paging with 4-MiB pages, SDM 4.3)."""
    if mode is GuestMode.REAL:
        setup_real_mode(vcpu, entry)
        return
    if mode is GuestMode.LONG:
        setup_long_mode(vcpu, entry)
        return
    setup_protected_mode(vcpu, entry)
    sregs = vcpu.get_sregs()
    if mode is GuestMode.PROTECTED16:
        sregs.cs = Segment(base=entry, limit=0xFFFF, selector=SEL_CODE16, type=11, db=False, g=False)
        vcpu.set_sregs(sregs)
        vcpu.rip = 0
    elif mode is GuestMode.VIRTUAL8086:
        # SDM 27.3.1.2 for virtual-8086 guests: base = selector << 4, limit FFFFH, AR F3H.
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            selector = entry >> 4 if name == "cs" else 0
            setattr(sregs, name, Segment(base=selector << 4, limit=0xFFFF, selector=selector, type=3, dpl=3))
        vcpu.set_sregs(sregs)
        vcpu.rip = 0
        vcpu.vmcs_write(F.GUEST_RFLAGS, vcpu.vmcs_read(F.GUEST_RFLAGS) | Rflags.VM)
    elif mode is GuestMode.PROTECTED32_PAGING:
        pd = b"".join(struct.pack("<I", (i << 22) | 0x87) for i in range(1024))  # P, RW, US, PS
        vcpu.vm.write_guest(PD32_GPA, pd)
        sregs.cr3 = PD32_GPA
        sregs.cr4 |= int(Cr4.PSE)
        sregs.cr0 |= int(Cr0.PG | Cr0.WP)
        vcpu.set_sregs(sregs)


def apply_hv_intercepts(vcpu: Vcpu, ic: HvIntercepts) -> None:
    if ic.io is not None:
        vcpu.intercept_io(list(ic.io), only=True)
    if ic.all_msrs:
        vcpu.intercept_all_msrs()
    elif ic.msrs is not None:
        for msr, read, write in ic.msrs:
            try:
                vcpu.intercept_msr(msr, read=read, write=write)
            except MsrOutsideBitmapError:
                pass  # an MSR the bitmap cannot name always exits anyway (SDM 25.6.9)
    if ic.cr0_bits is not None:
        vcpu.intercept_cr0_bits(ic.cr0_bits, only=True)
    if ic.cr4_bits is not None:
        vcpu.intercept_cr4_bits(ic.cr4_bits, only=True)
    for vector in ic.exceptions:
        vcpu.intercept_exception(vector)
    vcpu.intercept_hlt(ic.hlt)
    vcpu.set_preemption_timer(ic.preemption)
    vcpu.intercept_external_interrupts(ic.external_interrupts)
    if ic.interrupt_flag is not None:
        vcpu.set_interrupt_flag(ic.interrupt_flag)
    if ic.guest_debug:
        vcpu.set_guest_debug(ic.guest_debug)
    if ic.nmi:
        vcpu.inject_nmi()
    if ic.irq is not None:
        vcpu.vm.set_irq(ic.irq, True)


class HvTarget:
    """One Kvm + one VM, reused; a fresh vCPU, zeroed RAM and fresh devices per input."""

    REBUILD_EVERY = 3000  # inputs; a new Kvm now and then keeps engine-side growth bounded

    def __init__(self) -> None:
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm(memory_size=RAM_SIZE)
        self.blank = RAM_FILL * RAM_SIZE
        self.vcpu: Vcpu | None = None
        self.inputs = 0

    def fresh_vcpu(self, mode: GuestMode, code: bytes) -> Vcpu:
        vm = self.vm
        if self.vcpu is not None:
            self.vcpu.close()
            vm.vcpus.remove(self.vcpu)
            self.vcpu = None
        vm.write_guest(0, self.blank)
        vm.io_bus = IoBus()
        vm.platform = PcPlatform(vm.io_bus, vm.clock, self.kvm.tsc_hz)
        vm.hypercall_output.clear()
        vcpu = vm.create_vcpu(0)
        load_flat(vm, code, CODE_GPA)
        boot(vcpu, mode)
        self.vcpu = vcpu
        self.inputs += 1
        return vcpu


_hv: HvTarget | None = None


def hv_target() -> HvTarget:
    global _hv
    if _hv is None or _hv.inputs >= HvTarget.REBUILD_EVERY:
        _hv = HvTarget()
    return _hv


def discard_hv_target() -> None:
    """After a host exception or a hang the target's state is unknown: build a new one."""
    global _hv
    _hv = None


@dataclass
class HvRun:
    kind: str
    runs: int
    detail: str = ""

    @property
    def ran_guest(self) -> bool:
        """Whether guest code ran (not: the first VM entry failed, or the harness itself did)."""
        return self.runs > 0 and not (self.runs == 1 and self.kind == "FailEntry")


def drive_vcpu(vcpu: Vcpu, *, runs: int = MAX_RUNS, time_limit: int = RUN_TIME_LIMIT) -> HvRun:
    """Run until an exit that ends the input, completing I/O and MMIO exits as a VMM would
    (reads answer all ones: an empty bus). Checks every run() returned a VcpuExit, stayed
    within its guest-time limit (``TimeLimitExit`` or earlier), moved guest time when resumed
    after a user exit, and ended before the input's wall-clock deadline (``WallClockExit``)."""
    kind = "no run"
    deadline = HostDeadline(WALL_LIMIT_S)
    for n in range(1, runs + 1):
        # Host time (the guest's own TSC jumps when it writes IA32_TSC): what time_limit bounds.
        before = vcpu.pcpu.clock()
        exit = vcpu.run(time_limit=time_limit, wall_deadline=deadline)
        used = vcpu.pcpu.clock() - before
        if not isinstance(exit, VcpuExit):
            return HvRun(f"NOT-AN-EXIT:{type(exit).__name__}", n)
        if isinstance(exit, WallClockExit):
            return HvRun("HANG:WallClockExit", n, f"run() still going after {WALL_LIMIT_S} s of wall-clock time")
        if used > time_limit + TIME_LIMIT_SLACK:
            return HvRun(f"TIME-LIMIT-OVERRUN:{type(exit).__name__}", n, f"{used} ticks for a limit of {time_limit}")
        if n > 1 and used == 0:
            # Resuming after an I/O or MMIO exit completes or continues an instruction: guest
            # time must move (issue 11 item 4), or a VMM looping on these exits never reaches
            # its time limit.
            what = type(exit).__name__ + (" (string I/O)" if isinstance(exit, IoExit) and exit.count > 1 else "")
            return HvRun(f"NO-TIME-PROGRESS:{what}", n, repr(exit))
        kind = exit_kind(exit)
        if not isinstance(exit, (IoExit, MmioExit)):
            return HvRun(kind, n)
    return HvRun(kind, runs)


def run_hv_input(mode: GuestMode, code: bytes, intercepts: HvIntercepts | None = None,
                 prepare: Callable[[Vcpu], None] | None = None) -> HvRun:
    """One input on the hypervisor: a fresh vCPU in ``mode`` running ``code``; never raises
    (a host exception or a hang becomes a failure kind, and the target is rebuilt)."""
    try:
        with wall_clock_limit():
            vcpu = hv_target().fresh_vcpu(mode, code)
            if intercepts is not None:
                apply_hv_intercepts(vcpu, intercepts)
            if prepare is not None:
                prepare(vcpu)
            return drive_vcpu(vcpu)
    except (Exception, Hang) as exc:
        discard_hv_target()
        return HvRun(exception_kind(exc), 0, f"{type(exc).__name__}: {exc}")


# --- the bare VT-x machine ----------------------------------------------------------------------------
MACHINE_MEMORY = 4 << 20
MACHINE_BUDGET = 20_000  # instructions per VM entry (the sandbox's safety net)
MACHINE_ENTRIES = 4


class MachineTarget:
    """A VmxSandbox in one mode, reset from a memory snapshot before each input."""

    def __init__(self, mode: GuestMode) -> None:
        sandbox_mode = {GuestMode.REAL: "real", GuestMode.PROTECTED32: "protected", GuestMode.LONG: "long"}[mode]
        base = 0 if mode is GuestMode.REAL else GUEST_CODE
        self.sb = VmxSandbox(sandbox_mode, GuestImage(b"\xf4", base, {}), guest_ram=RAM_SIZE, memory=MACHINE_MEMORY,
                             instruction_budget=MACHINE_BUDGET)  # type: ignore[arg-type]
        cpu = self.sb.cpu
        # HLT everywhere but the sandbox's GDT, TSS, IDT and page tables (0x1000-0x6000).
        self.sb.write_memory(0, RAM_FILL * 0x1000)
        self.sb.write_memory(0x6000, RAM_FILL * (RAM_SIZE - 0x6000))
        cpu.vmclear(self.sb.vmcs_address)
        self.memory = cpu.memory.read(0, MACHINE_MEMORY)
        self.regfile = cpu.save_register_file()
        self.inputs = 0

    def fresh(self, code: bytes) -> VmxSandbox:
        sb = self.sb
        cpu = sb.cpu
        cpu.vmclear(sb.vmcs_address)
        cpu.memory.write(0, self.memory)
        cpu.restore_register_file(self.regfile)
        cpu.gpr.restore([0] * 16)
        result = cpu.vmptrld(sb.vmcs_address)
        assert result.succeeded, result
        sb.launched = False
        sb.write_memory(GUEST_CODE, code[: RAM_SIZE - GUEST_CODE])
        self.inputs += 1
        return sb


_machines: dict[GuestMode, MachineTarget] = {}


def machine_target(mode: GuestMode) -> MachineTarget:
    target = _machines.get(mode)
    if target is None or target.inputs >= HvTarget.REBUILD_EVERY:
        target = _machines[mode] = MachineTarget(mode)
    return target


def discard_machine_target(mode: GuestMode) -> None:
    _machines.pop(mode, None)


def apply_machine_controls(sb: VmxSandbox, ctl: MachineControls) -> None:
    """Write optional controls through VMWRITE, masked to what the capability MSRs allow (a bit
    the processor cannot set is simply left out, as adjust_vmx_controls() does)."""
    if ctl.timer is not None:
        sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
        sb.write(F.VMX_PREEMPTION_TIMER_VALUE, ctl.timer)
    for bit in ctl.pin:
        sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, bit)
    for bit in ctl.proc:
        sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, bit)
    for bit in ctl.secondary:
        sb.set_bits(F.SECONDARY_VM_EXEC_CONTROL, bit)
    if ctl.secondary and any(bit == 1 << 5 for bit in ctl.secondary):  # ENABLE_VPID wants a VPID
        sb.write(F.VIRTUAL_PROCESSOR_ID, 1)
    sb.write(F.EXCEPTION_BITMAP, ctl.exception_bitmap)
    sb.write(F.CR0_GUEST_HOST_MASK, ctl.cr0_mask)
    sb.write(F.CR4_GUEST_HOST_MASK, ctl.cr4_mask | int(Cr4.VMXE))
    if ctl.io_ports is not None:
        sb.use_io_bitmaps(ctl.io_ports)
    if ctl.msr_bitmap is not None:
        sb.use_msr_bitmap(read=ctl.msr_bitmap, write=ctl.msr_bitmap)


def entry_kind(result: VmxResult) -> str:
    if result.status is VmxStatus.VM_EXIT and result.exit is not None:
        exit = result.exit
        if exit.failed_vmentry:
            return f"ENTRY-FAILURE:{exit.basic_reason}"
        reason = exit.exit_reason
        return f"VM_EXIT:{reason.name if isinstance(reason, ExitReason) else exit.basic_reason}"
    if result.status is VmxStatus.STALLED:
        stall = result.stall or ""
        return f"STALL:{stall.split(':')[0][:40]}"
    return f"{result.status.name}:{result.error.name if result.error is not None else ''}"


@dataclass
class MachineRun:
    kind: str
    entries: int
    detail: str = ""
    ran_guest: bool = False  # some VM entry succeeded (guest code ran)


Between = Callable[[VmxSandbox, int], None]


def drive_machine(sb: VmxSandbox, timer: int | None, *, entries: int = MACHINE_ENTRIES, between: Between | None = None) -> MachineRun:
    """VMLAUNCH, then VMRESUME after each VM exit (skipping an intercepted instruction as a
    hypervisor does), up to ``entries`` times. Every entry must end in a typed outcome: a VM
    exit (SDM 28), a failed entry (VMfailValid/VMfailInvalid, SDM 31.2; or an exit with bit 31
    set, SDM 27.8), or a reported stall."""
    kind = "no entry"
    ran = False
    for n in range(1, entries + 1):
        if between is not None:
            between(sb, n)
        if timer is not None:
            sb.write(F.VMX_PREEMPTION_TIMER_VALUE, timer)
        result = sb.enter()
        if not isinstance(result, VmxResult):
            return MachineRun(f"NOT-AN-EXIT:{type(result).__name__}", n, ran_guest=ran)
        kind = entry_kind(result)
        exit = result.exit
        ran = ran or result.status is VmxStatus.STALLED or (exit is not None and not exit.failed_vmentry)
        if result.status is not VmxStatus.VM_EXIT or exit is None or exit.failed_vmentry:
            return MachineRun(kind, n, ran_guest=ran)
        if exit.exit_reason is ExitReason.TRIPLE_FAULT:
            return MachineRun(kind, n, ran_guest=ran)
        if exit.instruction_length and exit.exit_reason is not ExitReason.EXCEPTION_NMI:
            sb.skip_instruction()
    return MachineRun(kind, entries, ran_guest=ran)


def run_machine_input(mode: GuestMode, code: bytes, controls: MachineControls,
                      prepare: Callable[[VmxSandbox], None] | None = None, between: Between | None = None) -> MachineRun:
    """One input on the bare machine; never raises (see run_hv_input)."""
    try:
        with wall_clock_limit():
            sb = machine_target(mode).fresh(code)
            apply_machine_controls(sb, controls)
            if prepare is not None:
                prepare(sb)
            return drive_machine(sb, controls.timer, between=between)
    except (Exception, Hang) as exc:
        discard_machine_target(mode)
        return MachineRun(exception_kind(exc), 0, f"{type(exc).__name__}: {exc}")

