"""MMIO: the instruction that touched a guest-physical address with no RAM behind it is emulated
(``x86_emulate_instruction()`` after RET_PF_EMULATE) against the VM's MMIO bus, or handed to
the user as an :class:`~pyvmx.kvm.exits.MmioExit` (KVM_EXIT_MMIO) when no in-kernel device
claims the address. The emulator itself is :class:`pyvmx.kvm.mmu.emulate.MmioEmulator`; this
module is the vCPU's side of its :class:`EmulatorContext` and turns its results into outcomes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import VMX_AR_DB_MASK, VMX_AR_L_MASK, Cr0, Efer, ExceptionVector, Rflags
from pyvmx.kvm import apic_bus, host_time
from pyvmx.kvm.exits import KVM_INTERNAL_ERROR_EMULATION, HandlerOutcome, InternalError, MmioExit, Resume, VcpuExit
from pyvmx.kvm.guest_memory import GuestMemoryError, read_linear, translate, write_linear
from pyvmx.kvm.mmu.emulate import EmulationOutcome, EmulationResult, code_bitness
from pyvmx.vmx.faults import X86Fault
from pyvmx.vmx.paging import Access

if TYPE_CHECKING:
    from pyvmx.kvm.vcpu import Vcpu

_SEGMENTS = ("ES", "CS", "SS", "DS", "FS", "GS")


class VcpuEmulatorContext:
    """The emulator's view of one vCPU (KVM's ``emulate_ops``)."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.state = vcpu.paging_state()

    def read_gpr(self, index: int) -> int:
        return self.vcpu.get_gpr(index)

    def write_gpr(self, index: int, value: int) -> None:
        self.vcpu.set_gpr(index, value)

    def read_rip(self) -> int:
        return self.vcpu.vmcs_read(F.GUEST_RIP)

    def write_rip(self, value: int) -> None:
        self.vcpu.vmcs_write(F.GUEST_RIP, value)

    def read_rflags(self) -> int:
        return self.vcpu.vmcs_read(F.GUEST_RFLAGS)

    def write_rflags(self, value: int) -> None:
        self.vcpu.vmcs_write(F.GUEST_RFLAGS, value | Rflags.FIXED)

    def bitness(self) -> int:
        v = self.vcpu
        ar = v.vmcs_read(F.GUEST_CS_AR_BYTES)
        return code_bitness(
            cr0_pe=bool(v.vmcs_read(F.GUEST_CR0) & Cr0.PE),
            efer_lma=bool(v.vmcs_read(F.GUEST_IA32_EFER) & Efer.LMA),
            cs_l=bool(ar & VMX_AR_L_MASK),
            cs_d=bool(ar & VMX_AR_DB_MASK),
            rflags_vm=bool(v.vmcs_read(F.GUEST_RFLAGS) & Rflags.VM),
        )

    def segment_base(self, segment: int) -> int:
        return self.vcpu.vmcs_read(F[f"GUEST_{_SEGMENTS[segment]}_BASE"])

    def read_linear(self, linear: int, size: int) -> bytes | None:
        try:
            return read_linear(self.vcpu.vm.memory, linear, size, self.state)
        except (X86Fault, GuestMemoryError):
            return None

    def write_linear(self, linear: int, data: bytes) -> bool:
        try:
            write_linear(self.vcpu.vm.memory, linear, data, self.state)
        except (X86Fault, GuestMemoryError):
            return False
        return True

    def translate(self, linear: int, write: bool) -> int | None:
        try:
            return translate(self.vcpu.vm.memory, linear, Access.WRITE if write else Access.READ, self.state).gpa
        except (X86Fault, GuestMemoryError):
            return None

    def is_mmio(self, gpa: int, write: bool) -> bool:
        return self.vcpu.vm.memory.is_mmio(gpa, write)

    def mmio_read(self, gpa: int, size: int) -> int | None:
        value = apic_bus.mmio_read(self.vcpu, gpa, size)  # vcpu_mmio_read(): the vCPU's APIC page first
        return self.vcpu.vm.mmio_bus.read(gpa, size) if value is None else value

    def mmio_write(self, gpa: int, size: int, value: int) -> bool:
        return apic_bus.mmio_write(self.vcpu, gpa, size, value) or self.vcpu.vm.mmio_bus.write(gpa, size, value)

    def port_read(self, port: int, size: int) -> int:
        """The port side of an INS the VMCS does not intercept: the physical platform's port, as
        when the processor executes it (``Processor.port_read``)."""
        return self.vcpu.pcpu.processor.port_read(port, size)

    def port_write(self, port: int, size: int, value: int) -> None:
        self.vcpu.pcpu.processor.port_write(port, size, value)


def _inject_fault(vcpu: Vcpu, linear: int, write: bool) -> Resume:
    """A linear address the emulator could not translate: inject the #PF the walk gives."""
    try:
        translate(vcpu.vm.memory, linear, Access.WRITE if write else Access.READ, vcpu.paging_state())
    except X86Fault as fault:
        vcpu.queue_exception(int(ExceptionVector.PF), fault.error_code, cr2=linear)
        return Resume(f"emulation: #PF at {linear:#x}")
    except GuestMemoryError:
        pass
    vcpu.queue_exception(int(ExceptionVector.GP), 0)
    return Resume(f"emulation: #GP at {linear:#x}")


def _outcome(vcpu: Vcpu, result: EmulationOutcome) -> HandlerOutcome:
    kind = result.result
    if kind is EmulationResult.DONE:
        return Resume(f"mmio: {result.text}")
    if kind is EmulationResult.FAULT:
        assert result.fault_address is not None
        return _inject_fault(vcpu, result.fault_address, result.fault_write)
    if kind is EmulationResult.USER_EXIT:
        mmio = result.mmio
        assert mmio is not None
        data = bytearray(mmio.data_bytes if mmio.is_write else b"\xff" * mmio.size)
        exit = MmioExit(mmio.gpa, mmio.size, mmio.is_write, data)
        vcpu.complete_userspace_io = lambda: complete_mmio(vcpu, exit)
        return exit
    return InternalError(KVM_INTERNAL_ERROR_EMULATION, f"MMIO emulation failed: {result.reason} ({result.text})",
                         dump=vcpu.dump_vmcs())


def emulate_mmio(vcpu: Vcpu, gpa: int) -> HandlerOutcome:
    """Emulate the instruction at RIP, whose access to ``gpa`` is MMIO."""
    return _outcome(vcpu, vcpu.mmio_emulator.emulate(VcpuEmulatorContext(vcpu), gpa))


def complete_mmio(vcpu: Vcpu, exit: MmioExit) -> VcpuExit | None:
    """``complete_emulated_mmio()``: carry the instruction out with the user's data (host work
    that costs guest time: the next piece may be another exit, with no VM entry between)."""
    host_time.charge(vcpu.pcpu, host_time.EMULATED_ACCESS_TSC)
    ctx = VcpuEmulatorContext(vcpu)
    result = vcpu.mmio_emulator.complete_userspace_io(ctx, None if exit.is_write else bytes(exit.data))
    outcome = _outcome(vcpu, result)
    return outcome if isinstance(outcome, VcpuExit) else None
