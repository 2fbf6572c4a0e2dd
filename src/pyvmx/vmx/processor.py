"""A logical processor with VMX: root-operation state and the VMX instructions (SDM ch. 31).

Each instruction follows the SDM's pseudocode for a 64-bit processor in VMX root operation and
returns a :class:`VmxResult` -- architectural outcomes are values, never Python exceptions.
VMLAUNCH/VMRESUME run the VM-entry checks (:mod:`pyvmx.vmx.entry_checks`) and then hand the
guest to a :class:`GuestExecutor` (the CPU engine), which returns when a VM exit happens.
"""

from __future__ import annotations

import struct
from typing import Protocol

from pyvmx.arch.controls import FEAT_CTL_LOCKED, FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX
from pyvmx.arch.exit_reasons import VMX_EXIT_REASONS_FAILED_VMENTRY, ExitReason
from pyvmx.arch.msr import Msr
from pyvmx.arch.vm_instruction_errors import VmInstructionError as Err
from pyvmx.arch.vmcs_fields import VmcsField, VmcsWidth
from pyvmx.arch.x86 import Cr0, Cr4, Efer, ExceptionVector
from pyvmx.vmx.entry_cache import EntryCheckCache
from pyvmx.vmx.entry_checks import CheckArea, eptp_is_valid, load_msrs
from pyvmx.vmx.host_state import HostState, HostStateLoader
from pyvmx.vmx.interrupts import InterruptQueue
from pyvmx.vmx.caps import INVEPT_TYPE_CAPS, INVVPID_TYPE_CAPS, CpuProfile
from pyvmx.vmx.memory import PhysicalMemory, page_aligned
from pyvmx.vmx.outcomes import (
    FAIL_INVALID,
    SUCCEED,
    StallKind,
    VmcsWidthError,
    VmExitInfo,
    VmxInstructionFailed,
    VmxResult,
    VmxStatus,
    fail_valid,
    fault,
)
from pyvmx.vmx.vmcs import (
    FIELD_SLOTS,
    LAUNCH_STATE_CLEAR,
    LAUNCH_STATE_LAUNCHED,
    VMCS_SHADOW_INDICATOR,
    VmcsRegion,
    is_supported_encoding,
)

INVALID_VMCS_POINTER = 0xFFFFFFFFFFFFFFFF
_U64 = struct.Struct("<Q")
# As plain ints: every VMX instruction tests them, and IntFlag's & is slow.
_CR0_PE = int(Cr0.PE)
_EFER_LMA = int(Efer.LMA)


class GuestExecutor(Protocol):
    """The CPU engine under VMLAUNCH/VMRESUME: loads the (already checked) guest state of the
    current VMCS, runs the guest until something causes a VM exit, performs the exit (SDM 28)
    and returns what it wrote to the VM-exit information fields."""

    def run_guest(self, processor: Processor, vmcs: VmcsRegion, launch: bool) -> VmExitInfo: ...

    def invalidate_translations(self, processor: Processor, kind: str, tag: int) -> None: ...

    def tsc(self) -> int: ...

    def stall_reason(self) -> str: ...

    def stall_kind(self) -> StallKind: ...

    def charge_tsc(self, ticks: int) -> None: ...

    def read_gpr(self, index: int) -> int: ...

    def write_gpr(self, index: int, value: int) -> None: ...

    def save_register_file(self) -> bytes: ...

    def restore_register_file(self, blob: bytes) -> None: ...


class Processor:
    """One logical processor: simulated physical memory, a CPU profile, VMX operation state."""

    def __init__(
        self,
        memory: PhysicalMemory,
        profile: CpuProfile | None = None,
        *,
        feature_control: int = FEAT_CTL_LOCKED | FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX,
        executor: GuestExecutor | None = None,
        cpu_id: int = 0,
        recheck_entry_checks: bool | None = None,
    ) -> None:
        """``recheck_entry_checks``: also run every VM-entry check from scratch at every entry and
        assert the cached answer agrees (default: the ``PYVMX_RECHECK`` environment variable)."""
        self.memory = memory
        self.profile = profile or CpuProfile.default()
        self.executor = executor
        self.cpu_id = cpu_id
        self.host = HostState()
        self.msrs: dict[int, int] = {Msr.IA32_FEAT_CTL: feature_control}
        self.in_vmx_operation = False
        self.in_non_root = False
        self.vmxon_pointer: int | None = None
        self.current_vmcs_pointer = INVALID_VMCS_POINTER
        self.blocking_by_mov_ss = False
        self.last_entry_failure: object | None = None  # the EntryCheckFailure of the last VM entry
        self._session = 0  # counts VMXON; a VMCS remembers the session that launched it
        self._maxphyaddr_mask = ~((1 << self.profile.physical_address_width) - 1)
        self.vmcs = CurrentVmcs(self)
        self.interrupts = InterruptQueue()
        self.entry_msr_loads: list[tuple[int, int]] = []
        self.gpr = GeneralRegisters(self)
        self.stall_reason: str | None = None
        self.entry_check_cache = EntryCheckCache(recheck_entry_checks)
        self._host_state_loader = HostStateLoader()

    # --- the physical platform behind the processor ------------------------------------------
    def port_read(self, port: int, size: int) -> int:
        """An I/O read that did not cause a VM exit reaches the platform; nothing answers here,
        so the bus floats high (all ones)."""
        return (1 << (8 * size)) - 1

    def port_write(self, port: int, size: int, value: int) -> None:
        """An I/O write that did not cause a VM exit: no device, it is dropped."""

    def raise_interrupt(self, vector: int, at_tsc: int | None = None) -> None:
        """Signal an external interrupt (from a device, the host's timer, an IPI) now or at a
        future TSC value; in non-root operation the VM-execution controls decide its fate."""
        self.interrupts.raise_at(self.read_tsc() if at_tsc is None else at_tsc, vector)

    def raise_nmi(self) -> None:
        self.interrupts.nmi_pending = True

    def acknowledge_interrupt(self) -> int | None:
        """The host's INTA: take the highest-priority pending interrupt, if any."""
        now = self.read_tsc()
        vector = self.interrupts.pending(now)
        if vector is not None:
            self.interrupts.acknowledge(vector, now)
        return vector

    def read_tsc(self) -> int:
        """The time-stamp counter: deterministic virtual time (retired guest instructions)."""
        return self.executor.tsc() if self.executor is not None else 0

    def advance_tsc(self, ticks: int) -> None:
        """Let ``ticks`` of time pass with no guest instruction retiring: the host's own work in
        VMX root operation (an emulated string instruction's elements, ...), so that what the
        host does for a guest costs the guest time too."""
        if self.executor is not None:
            self.executor.charge_tsc(ticks)

    def save_register_file(self) -> bytes:
        """XSAVE-like: general, FPU and SIMD registers, which VM entries and exits do not switch
        (a hypervisor saves them when it switches vCPUs, as KVM does)."""
        return self.executor.save_register_file() if self.executor is not None else bytes(self.gpr.snapshot_bytes())

    def restore_register_file(self, blob: bytes) -> None:
        if self.executor is not None:
            self.executor.restore_register_file(blob)
        else:
            self.gpr.restore_bytes(blob)

    # --- MSRs ------------------------------------------------------------------------------
    def rdmsr(self, index: int) -> int:
        """RDMSR from the host: capability MSRs come from the profile."""
        value = self.profile.rdmsr(index)
        if value is not None:
            return value
        if index == Msr.EFER:
            return self.host.efer
        if index in self.msrs:
            return self.msrs[index]
        raise KeyError(f"MSR {index:#x} is not modelled on the host side")

    def wrmsr(self, index: int, value: int) -> None:
        if index == Msr.IA32_FEAT_CTL and self.msrs[index] & FEAT_CTL_LOCKED:
            raise PermissionError("IA32_FEATURE_CONTROL is locked (a write would #GP)")
        if index == Msr.EFER:
            self.host.efer = value
            return
        if self.profile.rdmsr(index) is not None:
            raise PermissionError(f"VMX capability MSR {index:#x} is read-only (a write would #GP)")
        self.msrs[index] = value

    # --- helpers for the instruction pseudocode ---------------------------------------------
    def _ud_conditions(self) -> bool:
        """The #UD test shared by the VMX instructions: CR0.PE = 0, RFLAGS.VM = 1, or
        IA32_EFER.LMA = 1 and CS.L = 0 (compatibility mode)."""
        h = self.host
        return (
            not h.cr0 & _CR0_PE
            or bool(h.rflags & (1 << 17))
            or (bool(h.efer & _EFER_LMA) and not h.cs_l)
        )

    def _bad_physical_address(self, addr: int) -> bool:
        return not page_aligned(addr) or bool(addr & self._maxphyaddr_mask) or not self.memory.contains(addr, 4096)

    @property
    def host_ia32e_mode(self) -> bool:
        """Whether the processor (in VMX root operation) is in IA-32e mode: IA32_EFER.LMA."""
        return bool(self.host.efer & _EFER_LMA)

    @property
    def current_vmcs_valid(self) -> bool:
        return self.current_vmcs_pointer != INVALID_VMCS_POINTER

    def _vmfail(self, error: Err) -> VmxResult:
        """VMfail(ErrorNumber): VMfailValid with the error in the current VMCS if there is one."""
        if not self.current_vmcs_valid:
            return FAIL_INVALID
        self.current_vmcs_region().write(VmcsField.VM_INSTRUCTION_ERROR, int(error))
        return fail_valid(error)

    def _prologue(self, needs_vmx: bool = True) -> VmxResult | None:
        """The common head of the VMX instructions executed by host software."""
        if (needs_vmx and not self.in_vmx_operation) or self._ud_conditions():
            return fault(ExceptionVector.UD)
        if self.host.cpl > 0:
            return fault(ExceptionVector.GP)
        return None

    def current_vmcs_region(self) -> VmcsRegion:
        if not self.current_vmcs_valid:
            raise RuntimeError("no current VMCS")
        return VmcsRegion(self.memory, self.current_vmcs_pointer)

    def _revision_ok(self, addr: int) -> bool:
        rev = self.memory.read32(addr)
        return rev & 0x7FFFFFFF == self.profile.revision_id and not rev & VMCS_SHADOW_INDICATOR

    # --- VMXON / VMXOFF ---------------------------------------------------------------------
    def vmxon(self, addr: int) -> VmxResult:
        """VMXON (SDM 31.3): enter VMX root operation with the VMXON region at ``addr``."""
        h = self.host
        if self._ud_conditions() or not h.cr4 & Cr4.VMXE:
            return fault(ExceptionVector.UD)
        if self.in_vmx_operation:
            if h.cpl > 0:
                return fault(ExceptionVector.GP)
            return self._vmfail(Err.VMXON_IN_VMX_ROOT_OPERATION)
        feat = self.msrs[Msr.IA32_FEAT_CTL]
        if (
            h.cpl > 0
            or not self._cr_values_supported()
            or not feat & FEAT_CTL_LOCKED
            or not feat & FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX
        ):
            return fault(ExceptionVector.GP)
        if self._bad_physical_address(addr) or not self._revision_ok(addr):
            return FAIL_INVALID
        self.vmxon_pointer = addr
        self.current_vmcs_pointer = INVALID_VMCS_POINTER
        self.in_vmx_operation = True
        self._session += 1
        return SUCCEED

    def _cr_values_supported(self) -> bool:
        """CR0 and CR4 against IA32_VMX_CR0/CR4_FIXED0/1 (SDM 24.8)."""
        p, h = self.profile, self.host
        return (
            h.cr0 & p.cr0_fixed0 == p.cr0_fixed0
            and h.cr0 & ~p.cr0_fixed1 & 0xFFFFFFFF == 0
            and h.cr4 & p.cr4_fixed0 == p.cr4_fixed0
            and h.cr4 & ~p.cr4_fixed1 == 0
        )

    def vmxoff(self) -> VmxResult:
        """VMXOFF: leave VMX operation (the current VMCS is forgotten, not cleared)."""
        if (r := self._prologue()) is not None:
            return r
        self.in_vmx_operation = False
        self.vmxon_pointer = None
        self.current_vmcs_pointer = INVALID_VMCS_POINTER
        return SUCCEED

    # --- VMCS pointer instructions ----------------------------------------------------------
    def vmclear(self, addr: int) -> VmxResult:
        """VMCLEAR: launch state "clear", data flushed to memory; clears the current-VMCS pointer
        if it was this VMCS."""
        if (r := self._prologue()) is not None:
            return r
        if self._bad_physical_address(addr):
            return self._vmfail(Err.VMCLEAR_INVALID_ADDRESS)
        if addr == self.vmxon_pointer:
            return self._vmfail(Err.VMCLEAR_VMXON_POINTER)
        VmcsRegion(self.memory, addr).initialize_data()
        if addr == self.current_vmcs_pointer:
            self.current_vmcs_pointer = INVALID_VMCS_POINTER
        return SUCCEED

    def vmptrld(self, addr: int) -> VmxResult:
        """VMPTRLD: make the VMCS at ``addr`` current."""
        if (r := self._prologue()) is not None:
            return r
        if self._bad_physical_address(addr):
            return self._vmfail(Err.VMPTRLD_INVALID_ADDRESS)
        if addr == self.vmxon_pointer:
            return self._vmfail(Err.VMPTRLD_VMXON_POINTER)
        if not self._revision_ok(addr):
            return self._vmfail(Err.VMPTRLD_INCORRECT_VMCS_REVISION_ID)
        self.current_vmcs_pointer = addr
        return SUCCEED

    def vmptrst(self) -> VmxResult:
        """VMPTRST: the current-VMCS pointer (FFFFFFFF_FFFFFFFFH if none) in ``value``."""
        if (r := self._prologue()) is not None:
            return r
        return VmxResult(VmxStatus.SUCCEED, value=self.current_vmcs_pointer)

    # --- VMREAD / VMWRITE -------------------------------------------------------------------
    def vmread(self, encoding: int) -> VmxResult:
        """VMREAD: the field's value, zero-extended, in ``value``."""
        if (r := self._prologue()) is not None:
            return r
        if not self.current_vmcs_valid:
            return FAIL_INVALID
        if not is_supported_encoding(encoding):
            return self._vmfail(Err.UNSUPPORTED_VMCS_COMPONENT)
        value = VmcsRegion(self.memory, self.current_vmcs_pointer).read_encoding(encoding)
        return VmxResult(VmxStatus.SUCCEED, value=value)

    def vmwrite(self, encoding: int, value: int) -> VmxResult:
        """VMWRITE: store ``value`` truncated to the field's width."""
        if (r := self._prologue()) is not None:
            return r
        if not self.current_vmcs_valid:
            return FAIL_INVALID
        if not is_supported_encoding(encoding):
            return self._vmfail(Err.UNSUPPORTED_VMCS_COMPONENT)
        if (encoding >> 10) & 3 == 1 and not self.profile.vmwrite_any_field:
            return self._vmfail(Err.VMWRITE_READ_ONLY_VMCS_COMPONENT)
        VmcsRegion(self.memory, self.current_vmcs_pointer).write_encoding(encoding, value)
        return SUCCEED

    # --- VMLAUNCH / VMRESUME ----------------------------------------------------------------
    def vmlaunch(self) -> VmxResult:
        return self._vm_entry(launch=True)

    def vmresume(self) -> VmxResult:
        return self._vm_entry(launch=False)

    def _vm_entry(self, launch: bool) -> VmxResult:
        """VMLAUNCH/VMRESUME (SDM 31.3) and the VM-entry checks of SDM 27.2-27.4."""
        if (r := self._prologue()) is not None:
            return r
        if not self.current_vmcs_valid:
            return FAIL_INVALID
        if self.blocking_by_mov_ss:
            return self._vmfail(Err.ENTRY_EVENTS_BLOCKED_BY_MOV_SS)
        vmcs = self.current_vmcs_region()
        if launch and vmcs.launch_state != LAUNCH_STATE_CLEAR:
            return self._vmfail(Err.VMLAUNCH_NONCLEAR_VMCS)
        if not launch and vmcs.launch_state != LAUNCH_STATE_LAUNCHED:
            return self._vmfail(Err.VMRESUME_NONLAUNCHED_VMCS)
        if not launch and vmcs.session != self._session:
            return self._vmfail(Err.VMRESUME_AFTER_VMXOFF)

        # SDM 27.2-27.3: every check, on every entry (the cache re-runs exactly those whose
        # inputs changed); the processor's own mode is one of the inputs (SDM 27.2.4).
        failure = self.entry_check_cache.check(vmcs, self.profile, self.memory, host_ia32e_mode=self.host_ia32e_mode)
        if failure is not None and failure.area in (CheckArea.CONTROLS, CheckArea.HOST_STATE):
            self.last_entry_failure = failure
            return self._vmfail(failure.error)
        if failure is None:
            failure = load_msrs(vmcs, self)
        self.last_entry_failure = failure
        if failure is not None:
            return self._entry_failure_exit(vmcs, failure.exit_reason, failure.qualification)

        if launch:
            vmcs.launch_state = LAUNCH_STATE_LAUNCHED
            vmcs.session = self._session
        if self.executor is None:
            # No CPU engine attached: the entry succeeded and guest state was loaded; there is
            # nothing to run, so report the entry itself.
            return SUCCEED
        self.in_non_root = True
        self.stall_reason = None
        try:
            exit_info = self.executor.run_guest(self, vmcs, launch)
        finally:
            self.in_non_root = False
        if exit_info.reason < 0:
            # Not a VM exit: the guest waits forever (HLT with nothing to wake it) or ran past
            # the instruction budget.  The guest state is saved; VMRESUME continues it.
            self.stall_reason = self.executor.stall_reason()
            return VmxResult(VmxStatus.STALLED, stall=self.stall_reason, stall_kind=self.executor.stall_kind())
        return VmxResult(VmxStatus.VM_EXIT, exit=exit_info)

    def _entry_failure_exit(self, vmcs: VmcsRegion, reason: ExitReason, qualification: int) -> VmxResult:
        """A VM entry that fails after the controls/host checks (SDM 27.8): exit reason with bit
        31 set, the exit qualification, and host state loaded; guest state is not saved."""
        full_reason = int(reason) | VMX_EXIT_REASONS_FAILED_VMENTRY
        vmcs.write(VmcsField.VM_EXIT_REASON, full_reason)
        vmcs.write(VmcsField.EXIT_QUALIFICATION, qualification)
        self.load_host_state(vmcs)
        return VmxResult(VmxStatus.VM_EXIT, exit=VmExitInfo(reason=full_reason, qualification=qualification))

    def load_host_state(self, vmcs: VmcsRegion) -> None:
        """SDM 28.5: a VM exit loads the host state onto this processor (:mod:`.host_state`)."""
        self._host_state_loader.load(self.host, vmcs, self.profile)
        self.blocking_by_mov_ss = False

    # --- INVEPT / INVVPID -------------------------------------------------------------------
    def invept(self, inv_type: int, eptp: int, reserved: int = 0) -> VmxResult:
        """INVEPT with a 128-bit descriptor (EPTP, reserved): invalidate EPT-derived translations."""
        if (r := self._prologue()) is not None:
            return r
        cap_bit = INVEPT_TYPE_CAPS.get(inv_type)
        if cap_bit is None or not self.profile.ept_vpid_cap & cap_bit:
            return self._vmfail(Err.INVALID_OPERAND_TO_INVEPT_INVVPID)
        if inv_type == 1 and not eptp_is_valid(eptp, self.profile):
            return self._vmfail(Err.INVALID_OPERAND_TO_INVEPT_INVVPID)
        if self.executor is not None:
            self.executor.invalidate_translations(self, "ept-single" if inv_type == 1 else "ept-all", eptp)
        return SUCCEED

    def invvpid(self, inv_type: int, vpid: int, linear_address: int = 0) -> VmxResult:
        """INVVPID with a descriptor (VPID in bits 15:0, bits 63:16 reserved, linear address)."""
        if (r := self._prologue()) is not None:
            return r
        cap_bit = INVVPID_TYPE_CAPS.get(inv_type)
        if cap_bit is None or not self.profile.ept_vpid_cap & cap_bit:
            return self._vmfail(Err.INVALID_OPERAND_TO_INVEPT_INVVPID)
        if vpid >> 16:
            return self._vmfail(Err.INVALID_OPERAND_TO_INVEPT_INVVPID)
        if inv_type == 0 and (vpid == 0 or not self.profile.canonical(linear_address)):
            return self._vmfail(Err.INVALID_OPERAND_TO_INVEPT_INVVPID)
        if inv_type in (1, 3) and vpid == 0:
            return self._vmfail(Err.INVALID_OPERAND_TO_INVEPT_INVVPID)
        if self.executor is not None:
            kind = {0: "vpid-address", 1: "vpid-single", 2: "vpid-all", 3: "vpid-single"}[inv_type]
            self.executor.invalidate_translations(self, kind, vpid if inv_type != 0 else linear_address)
        return SUCCEED


GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class GeneralRegisters:
    """The 16 general-purpose registers.  They are not part of the VMCS: VM entry and VM exit
    leave them alone, so after an exit they hold the guest's values and before an entry the
    guest gets whatever the host leaves in them -- exactly as on hardware.  (RSP is the
    exception: VM entry loads GUEST_RSP and VM exit loads HOST_RSP.)"""

    def __init__(self, processor: Processor) -> None:
        self._cpu = processor
        self._local = [0] * 16

    @staticmethod
    def _index(reg: int | str) -> int:
        if isinstance(reg, str):
            try:
                return GPR_NAMES.index(reg.lower())
            except ValueError:
                raise KeyError(f"unknown general-purpose register {reg!r}") from None
        if not 0 <= reg < 16:
            raise KeyError(f"general-purpose register number {reg} is outside 0..15")
        return reg

    def __getitem__(self, reg: int | str) -> int:
        i = self._index(reg)
        ex = self._cpu.executor
        return ex.read_gpr(i) if ex is not None else self._local[i]

    def __setitem__(self, reg: int | str, value: int) -> None:
        i = self._index(reg)
        ex = self._cpu.executor
        if ex is not None:
            ex.write_gpr(i, value & 0xFFFFFFFFFFFFFFFF)
        else:
            self._local[i] = value & 0xFFFFFFFFFFFFFFFF

    def snapshot(self) -> list[int]:
        return [self[i] for i in range(16)]

    def restore(self, values: list[int]) -> None:
        for i, v in enumerate(values):
            self[i] = v

    def snapshot_bytes(self) -> bytes:
        return b"".join(v.to_bytes(8, "little") for v in self.snapshot())

    def restore_bytes(self, blob: bytes) -> None:
        self.restore([int.from_bytes(blob[i : i + 8], "little") for i in range(0, 128, 8)])


class CurrentVmcs:
    """Width-checked accessors on the current VMCS, as Linux's vmx_ops.h provides them.

    ``read(field)``/``write(field, value)`` use the field's own width; ``read16``/``read32``/
    ``read64``/``readl`` and the ``write*`` twins refuse a field of another width
    (:class:`VmcsWidthError`), as vmcs_check16/32/64/l do at build time.  A VMX instruction
    failure raises :class:`VmxInstructionFailed`."""

    __slots__ = ("_cpu",)

    def __init__(self, processor: Processor) -> None:
        self._cpu = processor

    def read(self, field: VmcsField) -> int:
        result = self._cpu.vmread(field)
        if result.value is None:
            raise VmxInstructionFailed(f"VMREAD {field.name}", result)
        return result.value

    def write(self, field: VmcsField, value: int) -> None:
        result = self._cpu.vmwrite(field, value)
        if not result.succeeded:
            raise VmxInstructionFailed(f"VMWRITE {field.name}", result)

    def root_read(self, field: VmcsField) -> int:
        """The hypervisor's own read of the current VMCS, straight from its bytes: what VMREAD
        returns for a supported full-access ``field`` in VMX root operation at CPL 0 (SDM 31.3),
        without re-running the instruction's checks.  No current VMCS: VMREAD's own failure."""
        cpu = self._cpu
        address = cpu.current_vmcs_pointer
        if address == INVALID_VMCS_POINTER:
            return self.read(field)
        offset, mask = FIELD_SLOTS[field]
        return int(_U64.unpack_from(cpu.memory._buf, address + offset)[0]) & mask

    def root_write(self, field: VmcsField, value: int) -> None:
        """:meth:`root_read`'s twin: VMWRITE's effect, truncated to the field's width; a
        read-only field (without "VMWRITE to any field") or no current VMCS goes through VMWRITE
        and fails as it does."""
        cpu = self._cpu
        address = cpu.current_vmcs_pointer
        if address == INVALID_VMCS_POINTER or ((field >> 10) & 3 == 1 and not cpu.profile.vmwrite_any_field):
            self.write(field, value)
            return
        offset, mask = FIELD_SLOTS[field]
        _U64.pack_into(cpu.memory._buf, address + offset, value & mask)

    @staticmethod
    def _check(field: VmcsField, width: VmcsWidth, accessor: str) -> None:
        if field.width is not width:
            raise VmcsWidthError(
                f"{accessor} used on {field.name} ({field.width.name} field, encoding {int(field):#06x})"
            )

    def read16(self, field: VmcsField) -> int:
        self._check(field, VmcsWidth.BITS16, "vmcs_read16")
        return self.read(field)

    def read32(self, field: VmcsField) -> int:
        self._check(field, VmcsWidth.BITS32, "vmcs_read32")
        return self.read(field)

    def read64(self, field: VmcsField) -> int:
        self._check(field, VmcsWidth.BITS64, "vmcs_read64")
        return self.read(field)

    def readl(self, field: VmcsField) -> int:
        self._check(field, VmcsWidth.NATURAL, "vmcs_readl")
        return self.read(field)

    def write16(self, field: VmcsField, value: int) -> None:
        self._check(field, VmcsWidth.BITS16, "vmcs_write16")
        self.write(field, value)

    def write32(self, field: VmcsField, value: int) -> None:
        self._check(field, VmcsWidth.BITS32, "vmcs_write32")
        self.write(field, value)

    def write64(self, field: VmcsField, value: int) -> None:
        self._check(field, VmcsWidth.BITS64, "vmcs_write64")
        self.write(field, value)

    def writel(self, field: VmcsField, value: int) -> None:
        self._check(field, VmcsWidth.NATURAL, "vmcs_writel")
        self.write(field, value)

    def set_bits(self, field: VmcsField, mask: int) -> None:
        self.write(field, self.read(field) | mask)

    def clear_bits(self, field: VmcsField, mask: int) -> None:
        self.write(field, self.read(field) & ~mask)
