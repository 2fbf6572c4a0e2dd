"""What ``Vcpu.run()`` returns: one exit value whose variant carries its data (rust-vmm's
``VcpuExit``; Linux's ``struct kvm_run`` and its ``KVM_EXIT_*`` reasons, include/uapi/linux/kvm.h).

``run()`` handles every VM exit it can inside the hypervisor -- as KVM does in
``vcpu_enter_guest()`` / ``vmx_handle_exit()`` -- and returns only when the user (the VMM) has to
act: an I/O port or MMIO address no in-kernel device claims, a halt nothing can end, a triple
fault, a failed VM entry, an exit the hypervisor does not know how to handle.

The exit handlers of :mod:`pyvmx.kvm.exit_handlers` also return internal outcomes, never seen
by the user: :class:`Resume` (re-enter the guest), :class:`Halt` (the vCPU executed HLT and has
nothing to do: block it) and :class:`Reschedule` (give the physical CPU up: time slice over,
PAUSE loop, yield hypercall).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvmx.vmx.outcomes import VmExitInfo


class IoDirection(enum.Enum):
    """``KVM_EXIT_IO_IN`` / ``KVM_EXIT_IO_OUT``."""

    IN = 0
    OUT = 1


class VcpuExit:
    """Base class of the values ``Vcpu.run()`` returns."""

    __slots__ = ()


@dataclass(eq=False)
class IoExit(VcpuExit):
    """``KVM_EXIT_IO``: a port access no in-kernel device claims.

    ``data`` holds ``count * size`` bytes, little-endian. For OUT (and OUTS) it is what the guest
    wrote. For IN the user fills it in before the next ``run()``, which completes the
    instruction with it (``complete_fast_pio_in()`` / the emulator's ``pio_in_emulated()``); it
    starts as all ones, what a read of an empty bus returns. ``count`` is larger than 1 only for
    REP INS/OUTS."""

    port: int
    size: int
    direction: IoDirection
    data: bytearray
    count: int = 1

    @property
    def value(self) -> int:
        """The first element of ``data`` as an integer (the whole access of IN/OUT)."""
        return int.from_bytes(self.data[: self.size], "little")

    @value.setter
    def value(self, v: int) -> None:
        self.data[: self.size] = (v & ((1 << (8 * self.size)) - 1)).to_bytes(self.size, "little")

    def __repr__(self) -> str:
        return (
            f"IoExit(port={self.port:#x}, size={self.size}, {self.direction.name}, "
            f"data={bytes(self.data)!r}, count={self.count})"
        )


@dataclass(eq=False)
class MmioExit(VcpuExit):
    """``KVM_EXIT_MMIO``: a load or store to a guest-physical address with no memslot and no
    in-kernel device. For a load the user fills ``data`` before the next ``run()``."""

    gpa: int
    size: int
    is_write: bool
    data: bytearray

    @property
    def value(self) -> int:
        return int.from_bytes(self.data[: self.size], "little")

    @value.setter
    def value(self, v: int) -> None:
        self.data[: self.size] = (v & ((1 << (8 * self.size)) - 1)).to_bytes(self.size, "little")

    def __repr__(self) -> str:
        kind = "write" if self.is_write else "read"
        return f"MmioExit(gpa={self.gpa:#x}, size={self.size}, {kind}, data={bytes(self.data)!r})"


@dataclass(frozen=True)
class HltExit(VcpuExit):
    """``KVM_EXIT_HLT``: the guest halted and nothing can wake it (interrupts disabled, or no
    interrupt source armed). The vCPU stays halted; a later ``run()`` blocks again until an
    interrupt or NMI is injected (``vcpu.inject_nmi()``, ``vm.set_irq()``)."""

    rip: int = 0
    reason: str = "halted with no wake-up event"


@dataclass(frozen=True)
class ShutdownExit(VcpuExit):
    """``KVM_EXIT_SHUTDOWN``: a triple fault (SDM 6.15 "Double Fault Exception"; exit reason 2)."""

    rip: int = 0
    reason: str = "triple fault"


@dataclass(frozen=True)
class InternalError(VcpuExit):
    """``KVM_EXIT_INTERNAL_ERROR``: the hypervisor could not handle an exit.

    ``suberror`` follows Linux's KVM_INTERNAL_ERROR_* (1 EMULATION, 2 SIMUL_EX, 3 DELIVERY_EV,
    4 UNEXPECTED_EXIT_REASON); ``dump`` is a plain-text dump of the VMCS by area."""

    suberror: int
    reason: str
    exit_reason: int = 0
    dump: str = ""
    exception: Exception | None = field(default=None, compare=False)  # a host exception behind it


KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4


@dataclass(frozen=True)
class DebugExit(VcpuExit):
    """The guest asked to stop with an exit code: through the debug-exit port (QEMU's
    isa-debug-exit) or the exit hypercall. (Not KVM_EXIT_DEBUG: see :class:`GuestDebugExit`.)"""

    code: int
    via: str = "port"


@dataclass(frozen=True)
class GuestDebugExit(VcpuExit):
    """``KVM_EXIT_DEBUG``: a #DB or #BP while guest debugging (KVM_SET_GUEST_DEBUG) is on."""

    vector: int
    rip: int
    dr6: int = 0


@dataclass(frozen=True)
class PageTrackExit(VcpuExit):
    """An access to a guest page the user tracks (:meth:`TdpMmu.track_gfn`, like Linux's
    kvm_page_track, which KVMGT uses for write tracking): the EPT violation (SDM 28.2.1) comes
    to the user before the instruction did anything, RIP at the instruction.  ``linear`` is
    the guest-linear address of the access when the processor gives one (qualification bit 7);
    ``translated`` is False for an access to a guest paging structure (bit 8)."""

    gpa: int
    linear: int | None
    read: bool
    write: bool
    fetch: bool
    translated: bool
    rip: int


@dataclass(frozen=True)
class FailEntry(VcpuExit):
    """``KVM_EXIT_FAIL_ENTRY``: VMLAUNCH/VMRESUME failed. ``hardware_entry_failure_reason`` is
    the VM-instruction error (VMfailValid) or the full exit reason with bit 31 set (a VM-entry
    failure after the guest-state checks, SDM 27.8); ``rule`` names the check that failed."""

    hardware_entry_failure_reason: int
    rule: str = ""
    dump: str = ""


@dataclass(frozen=True)
class TimeLimitExit(VcpuExit):
    """The time limit given to ``run()`` was reached (KVM returns -EINTR with KVM_EXIT_INTR
    when a signal interrupts KVM_RUN; here the "signal" is the caller's deadline)."""

    guest_tsc: int


@dataclass(frozen=True)
class WallClockExit(VcpuExit):
    """The host's wall-clock limit given to ``run()`` (a
    :class:`~pyvmx.engine.deadline.HostDeadline`) passed: the run cost more host time than
    allowed. The guest state is intact; another ``run()`` continues it."""

    guest_tsc: int
    seconds: float = 0.0


# --- internal outcomes of exit handlers ---------------------------------------------------------
@dataclass(frozen=True)
class Resume:
    """Handled: re-enter the guest. ``note`` says what the handler did (for tracers)."""

    note: str = ""


@dataclass(frozen=True)
class Halt:
    """The vCPU is halted (KVM_MP_STATE_HALTED) until an interrupt or NMI arrives."""

    note: str = "hlt"


@dataclass(frozen=True)
class Reschedule:
    """Give up the physical CPU (time slice over, PAUSE loop, yield); the vCPU stays runnable."""

    note: str = ""


HandlerOutcome = VcpuExit | Resume | Halt | Reschedule


@dataclass
class ExitStats:
    """Per-vCPU counters, as KVM's ``struct kvm_vcpu_stat`` and kvm_stat show them: exits by
    reason, guest time (TSC ticks) spent in VMX non-root operation (``run_tsc`` -- including a
    HLT the processor executed itself when HLT exiting is off) and blocked in an intercepted HLT
    (``halted_tsc``), injections, wake-ups, migrations between physical CPUs."""

    exits: dict[str, int] = field(default_factory=dict)
    run_tsc: int = 0
    halted_tsc: int = 0
    entries: int = 0
    launches: int = 0
    irq_injections: int = 0
    exception_injections: int = 0
    nmi_injections: int = 0
    halt_wakeups: int = 0
    migrations: int = 0

    def count(self, name: str) -> None:
        self.exits[name] = self.exits.get(name, 0) + 1

    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())


@dataclass(frozen=True)
class TraceRecord:
    """What a tracer callback receives after each handled VM exit (Linux's kvm_exit/kvm_entry
    tracepoints, folded into one record)."""

    vcpu_id: int
    reason: int
    reason_name: str
    qualification: int
    rip: int
    guest_tsc: int
    outcome: HandlerOutcome
    exit: VmExitInfo | None = None  # every VM-exit information field (SDM 25.9.1-25.9.4)
    handler_ns: int = 0  # host time in the exit handler (exit to the next entry)
    next_rip: int = 0  # the RIP the next VM entry enters at (after the handler)
