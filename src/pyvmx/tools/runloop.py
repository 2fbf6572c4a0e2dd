"""The exit-handling loop the tools share, and the record its handlers receive.

A handler is a plain function ``handler(record: ExitRecord) -> Outcome``.  Handlers compose the
way hvpp's do: statistics and tracing wrap the real handler and pass the record on::

    handler = tracer.wrap(stats.wrap(SeedHypervisor()))
    run_sandbox(sb, handler)

Any loop that runs a guest can feed these handlers: it builds one :class:`ExitRecord` per VM exit
(the exit information, RIP and guest TSC at the exit, RIP and TSC at the entry before it, the
instruction bytes at RIP) and calls the handler.  :func:`run_sandbox` is that loop for a
:class:`~pyvmx.guest.sandbox.VmxSandbox`; the hypervisor's vCPU run loop builds the same record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pyvmx.arch.controls import ProcBasedControls
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.vmx.exitinfo import decode_qualification, reason_name
from pyvmx.tools.guestmem import GuestMemory, guest_bitness, rip_linear
from pyvmx.vmx.outcomes import StallKind, VmExitInfo

if TYPE_CHECKING:
    from pyvmx.engine.deadline import HostDeadline
    from pyvmx.guest.sandbox import VmxSandbox


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a handler did with an exit: resume the guest, or stop the run; ``note`` says what
    happened, for traces ("serial <- 'H'", "guest halted")."""

    action: Literal["resume", "stop"]
    note: str = ""

    @classmethod
    def resume(cls, note: str = "") -> Outcome:
        return cls("resume", note)

    @classmethod
    def stop(cls, note: str = "") -> Outcome:
        return cls("stop", note)

    @property
    def stops(self) -> bool:
        return self.action == "stop"

    def __str__(self) -> str:
        return f"{self.action}: {self.note}" if self.note else self.action


@dataclass(slots=True)
class ExitRecord:
    """One VM exit as the handlers see it."""

    exit: VmExitInfo
    rip: int  # GUEST_RIP at the exit
    tsc_exit: int  # guest TSC (before offsetting) at the exit
    tsc_entry: int  # ... at the VM entry this exit ended
    entry_rip: int = 0
    code: bytes = b""  # up to 15 bytes at CS:RIP, for disassembly (b"" if unreadable)
    bitness: int = 64
    vcpu_id: int = 0
    vm_id: int = 0
    index: int = 0  # the number of this exit on this vCPU, from 0
    target: Any = None  # what ran the guest (a VmxSandbox; the hypervisor's vCPU)

    @property
    def reason(self) -> ExitReason | int:
        return self.exit.exit_reason

    @property
    def reason_name(self) -> str:
        return reason_name(self.exit.reason)

    @property
    def guest_tsc(self) -> int:
        """Guest TSC ticks from the entry to this exit: how long the guest ran."""
        return self.tsc_exit - self.tsc_entry

    def qualification_fields(self) -> dict[str, int | bool | str]:
        return decode_qualification(self.exit.reason, self.exit.qualification, self.exit.intr_info)


ExitHandler = Callable[[ExitRecord], Outcome]


# --- the sandbox loop --------------------------------------------------------------------------
@dataclass(slots=True)
class RunResult:
    exits: int
    outcome: Outcome | None = None  # the handler's stop, if a handler stopped the run
    stall: str | None = None  # the processor reported no exit will come (halted forever, budget)
    error: str | None = None  # VM entry failed as an instruction (VMfailValid/VMfailInvalid)
    timed_out: float | None = None  # the host's wall-clock limit (seconds) passed

    @property
    def ended_by(self) -> str:
        if self.timed_out is not None:
            return f"wall-clock limit of {self.timed_out:g} s reached"
        if self.outcome is not None:
            return str(self.outcome)
        if self.stall is not None:
            return f"stalled: {self.stall}"
        if self.error is not None:
            return f"VM entry failed: {self.error}"
        return "exit limit reached"


class _Watchdog:
    """Stops the CPU engine from another thread when one guest run takes longer than
    ``after`` seconds of wall time, so the engine's instruction budget is checked and a guest
    spinning forever ends as a stall instead of hanging the tool."""

    def __init__(self, sb: VmxSandbox, after: float) -> None:
        self._stop_cpu = getattr(getattr(getattr(sb, "executor", None), "cpu", None), "stop", None)
        self.after = after
        self._armed_at: float | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        if self._stop_cpu is not None and after > 0:
            self._thread = threading.Thread(target=self._loop, name="pyvmx-watchdog", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(0.05):
            armed = self._armed_at
            if armed is not None and time.monotonic() - armed > self.after and self._stop_cpu is not None:
                self._stop_cpu()

    def arm(self) -> None:
        self._armed_at = time.monotonic()

    def disarm(self) -> None:
        self._armed_at = None

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(1.0)


def make_record(sb: VmxSandbox, exit: VmExitInfo, tsc_entry: int, entry_rip: int, *, index: int = 0, vcpu_id: int = 0, vm_id: int = 0) -> ExitRecord:
    """The record of an exit that ``sb`` just took."""
    code = GuestMemory(sb).read_code(rip_linear(sb))
    return ExitRecord(
        exit=exit, rip=sb.rip, tsc_exit=sb.cpu.read_tsc(), tsc_entry=tsc_entry, entry_rip=entry_rip,
        code=code, bitness=guest_bitness(sb), vcpu_id=vcpu_id, vm_id=vm_id, index=index, target=sb,
    )


def entry_failure_text(rec: ExitRecord) -> str:
    """A VM-entry failure exit (SDM 27.8) as a person reads it: the exit reason, the exit
    qualification (SDM Table 28-1 note: which MSR-load entry or 0/2/3/4 for guest state) and the
    rule that failed (``Processor.last_entry_failure``)."""
    failure = getattr(rec.target, "cpu", None) and rec.target.cpu.last_entry_failure
    rule = f": {failure}" if failure else ""
    return f"VM entry failed: {rec.reason_name}, exit qualification {rec.exit.qualification:#x}{rule}"


def run_sandbox(
    sb: VmxSandbox,
    handler: ExitHandler,
    *,
    max_exits: int = 10_000,
    vcpu_id: int = 0,
    vm_id: int = 0,
    before_entry: Callable[[VmxSandbox, int], None] | None = None,
    watchdog_after: float = 1.0,
    wall_deadline: HostDeadline | None = None,
) -> RunResult:
    """Enter the guest, hand each exit to ``handler``, resume until the handler stops, the
    processor stalls, an entry fails, ``max_exits`` exits have been handled or ``wall_deadline``
    (host wall-clock time, polled at each exit and by the engine) passes.
    ``before_entry(sb, exit_index)`` runs before every entry (asynchronous inputs, timer re-arm)."""
    dog = _Watchdog(sb, watchdog_after)
    executor = getattr(sb, "executor", None)
    if wall_deadline is not None and executor is not None:
        executor.host_deadline = wall_deadline
    try:
        for index in range(max_exits):
            if wall_deadline is not None and wall_deadline.passed():
                return RunResult(index, timed_out=wall_deadline.seconds)
            if before_entry is not None:
                before_entry(sb, index)
            tsc_entry, entry_rip = sb.cpu.read_tsc(), sb.rip
            dog.arm()
            try:
                result = sb.enter()
            finally:
                dog.disarm()
            if result.exit is None:
                if result.stall_kind is StallKind.HOST_DEADLINE and wall_deadline is not None:
                    return RunResult(index, timed_out=wall_deadline.seconds)
                if result.stall is not None:
                    return RunResult(index, stall=result.stall)
                failure = sb.cpu.last_entry_failure  # the SDM rule, as the Python API names it
                return RunResult(index, error=f"{result}" + (f": {failure}" if failure is not None else ""))
            record = make_record(sb, result.exit, tsc_entry, entry_rip, index=index, vcpu_id=vcpu_id, vm_id=vm_id)
            outcome = handler(record)
            if outcome.stops:
                return RunResult(index + 1, outcome=outcome)
        return RunResult(max_exits)
    finally:
        dog.close()
        if wall_deadline is not None and executor is not None:
            executor.host_deadline = None


# --- a minimal hypervisor for the intercept questions ------------------------------------------------
# Exits for which the VM-exit instruction length is valid and the hypervisor skips the
# instruction after emulating it (SDM 28.2.4).
INSTRUCTION_EXITS: frozenset[int] = frozenset({
    ExitReason.CPUID, ExitReason.GETSEC, ExitReason.HLT, ExitReason.INVD, ExitReason.INVLPG, ExitReason.RDPMC,
    ExitReason.RDTSC, ExitReason.RSM, ExitReason.VMCALL, ExitReason.VMCLEAR, ExitReason.VMLAUNCH, ExitReason.VMPTRLD,
    ExitReason.VMPTRST, ExitReason.VMREAD, ExitReason.VMRESUME, ExitReason.VMWRITE, ExitReason.VMOFF, ExitReason.VMON,
    ExitReason.CR_ACCESS, ExitReason.DR_ACCESS, ExitReason.IO_INSTRUCTION, ExitReason.MSR_READ, ExitReason.MSR_WRITE,
    ExitReason.MWAIT_INSTRUCTION, ExitReason.MONITOR_INSTRUCTION, ExitReason.PAUSE_INSTRUCTION, ExitReason.GDTR_IDTR,
    ExitReason.LDTR_TR, ExitReason.INVEPT, ExitReason.RDTSCP, ExitReason.INVVPID, ExitReason.WBINVD, ExitReason.XSETBV,
    ExitReason.RDRAND, ExitReason.INVPCID, ExitReason.VMFUNC, ExitReason.ENCLS, ExitReason.RDSEED, ExitReason.XSAVES,
    ExitReason.XRSTORS, ExitReason.PCONFIG, ExitReason.UMWAIT, ExitReason.TPAUSE, ExitReason.LOADIWKEY,
    ExitReason.ENCLV, ExitReason.RDMSRLIST, ExitReason.WRMSRLIST,
})
# Exits that leave RIP at the next instruction to run: resume as is.
ASYNC_EXITS: frozenset[int] = frozenset({
    ExitReason.EXTERNAL_INTERRUPT, ExitReason.PREEMPTION_TIMER, ExitReason.INTERRUPT_WINDOW,
    ExitReason.NMI_WINDOW, ExitReason.MONITOR_TRAP_FLAG, ExitReason.TPR_BELOW_THRESHOLD,
})
COM1_DATA = 0x3F8


@dataclass
class SeedHypervisor:
    """The smallest useful exit handler: what a hypervisor answering the intercept questions does.
    It emulates just enough (OUT to COM1 is guest output, IN reads all ones, RDMSR of EFER
    reads the guest's EFER and other MSRs 0, WRMSR and CR writes are dropped, CPUID returns
    zeros), skips the instruction, and stops at HLT, at exceptions and at anything it cannot
    resume from (triple fault, failed VM entry, EPT violation ...)."""

    output: str = ""
    notes: list[str] = field(default_factory=list)

    def __call__(self, rec: ExitRecord) -> Outcome:
        sb = rec.target
        reason = rec.exit.basic_reason
        if rec.exit.failed_vmentry:
            return Outcome.stop(entry_failure_text(rec))
        if reason == ExitReason.HLT:
            return Outcome.stop("guest halted")
        if reason in ASYNC_EXITS:
            if reason == ExitReason.INTERRUPT_WINDOW:
                sb.clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, ProcBasedControls.INTR_WINDOW_EXITING)
            elif reason == ExitReason.NMI_WINDOW:
                sb.clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, ProcBasedControls.NMI_WINDOW_EXITING)
            return Outcome.resume()
        if reason not in INSTRUCTION_EXITS:
            return Outcome.stop(f"unhandled {rec.reason_name}")
        note = self.emulate(sb, rec)
        sb.skip_instruction()
        return Outcome.resume(note)

    def emulate(self, sb: Any, rec: ExitRecord) -> str:
        """Emulate the exiting instruction just enough; returns a note for traces."""
        reason = rec.exit.basic_reason
        gpr = sb.gpr
        if reason == ExitReason.IO_INSTRUCTION:
            io = rec.qualification_fields()
            size, port = int(io["size"]), int(io["port"])
            if io["string"]:
                return f"{'ins' if io['direction'] == 'in' else 'outs'} port {port:#x} (not emulated)"
            mask = (1 << (8 * size)) - 1
            if io["direction"] == "in":
                gpr["rax"] = (gpr["rax"] & ~mask) | mask
                return f"in port {port:#x} -> {mask:#x}"
            value = gpr["rax"] & mask
            if port == COM1_DATA and size == 1:
                self.output += chr(value)
                return f"serial <- {chr(value)!r}"
            return f"out port {port:#x} <- {value:#x}"
        if reason == ExitReason.MSR_READ:
            msr = gpr["rcx"] & 0xFFFFFFFF
            value = sb.read(F.GUEST_IA32_EFER) if msr == Msr.EFER else 0
            gpr["rax"], gpr["rdx"] = value & 0xFFFFFFFF, value >> 32
            return f"rdmsr {msr:#x} -> {value:#x}"
        if reason == ExitReason.MSR_WRITE:
            msr = gpr["rcx"] & 0xFFFFFFFF
            value = (gpr["rdx"] & 0xFFFFFFFF) << 32 | (gpr["rax"] & 0xFFFFFFFF)
            return f"wrmsr {msr:#x} <- {value:#x} (dropped)"
        if reason == ExitReason.CPUID:
            leaf = gpr["rax"] & 0xFFFFFFFF
            for reg in ("rax", "rbx", "rcx", "rdx"):
                gpr[reg] = 0
            return f"cpuid {leaf:#x} -> zeros"
        if reason == ExitReason.CR_ACCESS:
            cr = rec.qualification_fields()
            return f"{cr['access']} cr{cr['cr']} (not emulated)"
        return ""
