"""The VM entry being checked, and a record of every input each rule reads.

A rule sees the entry only through :class:`EntryContext`: VMCS fields (``read``, ``segment`` and
the decoded controls), physical memory (``read_physical``), the state of the processor executing
VMLAUNCH/VMRESUME (``host_ia32e_mode``), the CPU profile and the current-VMCS pointer.  The
context notes each input a rule reads; :meth:`EntryContext.take_inputs` hands the record of one
rule to the entry-check cache (:mod:`pyvmx.vmx.entry_cache`), which re-runs a rule exactly when
one of the inputs it read has changed.  Because a rule is a deterministic function of what it
reads, and what it reads next depends only on what it read before, equal inputs give the same
path through the rule and the same answer: the cache is exact by construction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmx.arch.controls import (
    INTR_INFO_INTR_TYPE_MASK,
    INTR_INFO_VALID_MASK,
    INTR_INFO_VECTOR_MASK,
    InterruptionType,
)
from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.controls import VmEntryControls as E
from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.vmcs_fields import VmcsField
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import VMX_AR_G_MASK, VMX_AR_UNUSABLE_MASK, Efer, Rflags
from pyvmx.vmx.state import SEGMENT_NAMES, Segment

if TYPE_CHECKING:
    from pyvmx.vmx.caps import CpuProfile
    from pyvmx.vmx.memory import PhysicalMemory
    from pyvmx.vmx.vmcs import VmcsRegion

U64 = (1 << 64) - 1

# Segment selectors (SDM 3.4.2). TODO(arch): move (Linux SEGMENT_RPL_MASK / SEGMENT_TI_MASK).
SEGMENT_RPL_MASK = 0x3
SEGMENT_TI_MASK = 0x4

# IA32_EFER bits an Intel 64 processor implements (SDM 2.2.1): SCE, LME, LMA, NXE.  (The arch
# EFER_RESERVED_MASK also allows AMD's SVME/LMSLE/FFXSR/TCE, which WRMSR rejects on Intel.)
_EFER_SUPPORTED = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NX)

# IA32_PAT memory types WRMSR accepts (SDM 11.12.2): UC, WC, WT, WP, WB, UC-.
_PAT_MEMORY_TYPES = frozenset({0, 1, 4, 5, 6, 7})

# The flags the decoded controls test, as plain ints: an IntFlag operand makes every & an enum
# operation, and the rules run at every VM entry that changed their inputs.
_ACTIVATE_SECONDARY_CONTROLS = int(C.ACTIVATE_SECONDARY_CONTROLS)
_UNRESTRICTED_GUEST = int(S.UNRESTRICTED_GUEST)
_ENABLE_EPT = int(S.ENABLE_EPT)
_VIRTUAL_NMIS = int(P.VIRTUAL_NMIS)
_HOST_ADDR_SPACE_SIZE = int(X.HOST_ADDR_SPACE_SIZE)
_IA32E_MODE = int(E.IA32E_MODE)
_LOAD_DEBUG_CONTROLS = int(E.LOAD_DEBUG_CONTROLS)
_RFLAGS_VM = int(Rflags.VM)
_AR_UNUSABLE = int(VMX_AR_UNUSABLE_MASK)

_SEGMENT_FIELDS: tuple[tuple[VmcsField, VmcsField, VmcsField, VmcsField], ...] = tuple(
    (
        VmcsField[f"GUEST_{name}_SELECTOR"],
        VmcsField[f"GUEST_{name}_BASE"],
        VmcsField[f"GUEST_{name}_LIMIT"],
        VmcsField[f"GUEST_{name}_AR_BYTES"],
    )
    for name in SEGMENT_NAMES
)


class ProcessorInput(enum.Enum):
    """State of the logical processor (not of the VMCS) that a VM-entry rule reads."""

    HOST_IA32E_MODE = "IA32_EFER.LMA of the processor executing VMLAUNCH/VMRESUME (SDM 27.2.4)"


# A physical-memory read: (address, size in bytes).  Its recorded value is -1 when the bytes lie
# outside physical memory (such reads return all ones; the rule decides what that means).
MemoryRead = tuple[int, int]


@dataclass(frozen=True)
class CheckInputs:
    """Everything one rule read during one evaluation, with the memory and processor values."""

    fields: frozenset[VmcsField]
    memory: tuple[tuple[MemoryRead, int], ...]
    processor: tuple[tuple[ProcessorInput, bool], ...]


class EntryContext:
    """The current VMCS of one VM entry, with the VMX controls decoded into typed predicates
    (Bochs' VMCS cache).  The secondary processor-based controls read as 0 unless "activate
    secondary controls" is 1, as the processor then behaves (SDM 27.2.1.1).  Field values are
    read once per entry (the checks do not change the VMCS); each access is still recorded."""

    def __init__(
        self,
        vmcs: VmcsRegion,
        profile: CpuProfile,
        memory: PhysicalMemory | None = None,
        *,
        host_ia32e_mode: bool = True,
    ) -> None:
        self._vmcs = vmcs
        self.profile = profile
        self._memory = memory
        self._host_ia32e_mode = host_ia32e_mode
        self._values: dict[VmcsField, int] = {}
        self._segments: dict[int, Segment] = {}
        self._fields_read: set[VmcsField] = set()
        self._segments_read: set[int] = set()  # segment() reads the segment's four fields
        self._memory_read: dict[MemoryRead, int] = {}
        self._processor_read: dict[ProcessorInput, bool] = {}

    # --- inputs ------------------------------------------------------------------------------
    def read(self, field: VmcsField) -> int:
        """VMCS ``field``."""
        self._fields_read.add(field)
        value = self._values.get(field)
        if value is None:
            value = self._values[field] = self._vmcs.read(field)
        return value

    def read_physical(self, address: int, size: int) -> int:
        """``size`` bytes of physical memory at ``address`` (little endian); all ones when they
        lie outside physical memory, as such reads return."""
        value = self._memory_read[(address, size)] = physical_value(self._memory, address, size)
        return (1 << (8 * size)) - 1 if value < 0 else value

    @property
    def host_ia32e_mode(self) -> bool:
        """Whether the processor executing VMLAUNCH/VMRESUME is in IA-32e mode (IA32_EFER.LMA)."""
        self._processor_read[ProcessorInput.HOST_IA32E_MODE] = self._host_ia32e_mode
        return self._host_ia32e_mode

    @property
    def vmcs_address(self) -> int:
        """The current-VMCS pointer (fixed for the VMCS being checked)."""
        return self._vmcs.address

    def take_inputs(self) -> CheckInputs:
        """What was read since the last call (one rule's inputs); starts a new record."""
        fields = self._fields_read
        for index in self._segments_read:
            fields.update(_SEGMENT_FIELDS[index])
        inputs = CheckInputs(frozenset(fields), tuple(self._memory_read.items()), tuple(self._processor_read.items()))
        self._fields_read = set()
        self._segments_read = set()
        self._memory_read = {}
        self._processor_read = {}
        return inputs

    # --- decoded controls --------------------------------------------------------------------
    @property
    def pin(self) -> int:
        return self.read(F.PIN_BASED_VM_EXEC_CONTROL)

    @property
    def proc(self) -> int:
        return self.read(F.CPU_BASED_VM_EXEC_CONTROL)

    @property
    def secondary(self) -> int:
        if not self.proc & _ACTIVATE_SECONDARY_CONTROLS:
            return 0
        return self.read(F.SECONDARY_VM_EXEC_CONTROL)

    @property
    def exit_controls(self) -> int:
        return self.read(F.VM_EXIT_CONTROLS)

    @property
    def entry_controls(self) -> int:
        return self.read(F.VM_ENTRY_CONTROLS)

    @property
    def unrestricted_guest(self) -> bool:
        return bool(self.secondary & _UNRESTRICTED_GUEST)

    @property
    def ept(self) -> bool:
        return bool(self.secondary & _ENABLE_EPT)

    @property
    def virtual_nmis(self) -> bool:
        return bool(self.pin & _VIRTUAL_NMIS)

    @property
    def host_addr_space_size(self) -> bool:
        return bool(self.exit_controls & _HOST_ADDR_SPACE_SIZE)

    @property
    def ia32e_mode_guest(self) -> bool:
        return bool(self.entry_controls & _IA32E_MODE)

    @property
    def load_debug_controls(self) -> bool:
        return bool(self.entry_controls & _LOAD_DEBUG_CONTROLS)

    # --- widths of the profile ---------------------------------------------------------------
    def beyond_phys_width(self, address: int) -> bool:
        """Whether ``address`` sets a bit at or above the physical-address width (MAXPHYADDR)."""
        return bool(address >> self.profile.physical_address_width)

    def canonical(self, address: int) -> bool:
        """Whether ``address`` is canonical: bits 63:N-1 identical, N the linear-address width."""
        return self.profile.canonical(address)

    # --- VM-entry event injection (SDM 25.8.3) -----------------------------------------------
    @property
    def intr_info(self) -> int:
        return self.read(F.VM_ENTRY_INTR_INFO_FIELD)

    @property
    def injecting(self) -> bool:
        return bool(self.intr_info & INTR_INFO_VALID_MASK)

    @property
    def event_type(self) -> int:
        return (self.intr_info & INTR_INFO_INTR_TYPE_MASK) >> 8

    @property
    def vector(self) -> int:
        return self.intr_info & INTR_INFO_VECTOR_MASK

    def injecting_type(self, kind: InterruptionType) -> bool:
        return self.injecting and self.event_type == kind

    # --- guest state -------------------------------------------------------------------------
    @property
    def guest_cr0(self) -> int:
        return self.read(F.GUEST_CR0)

    @property
    def guest_cr4(self) -> int:
        return self.read(F.GUEST_CR4)

    @property
    def guest_rflags(self) -> int:
        return self.read(F.GUEST_RFLAGS)

    @property
    def v8086(self) -> bool:
        """The guest will be in virtual-8086 mode (RFLAGS.VM = 1 in the RFLAGS field)."""
        return bool(self.guest_rflags & _RFLAGS_VM)

    @property
    def interruptibility(self) -> int:
        return self.read(F.GUEST_INTERRUPTIBILITY_INFO)

    @property
    def activity_state(self) -> int:
        return self.read(F.GUEST_ACTIVITY_STATE)

    def segment(self, index: int) -> Segment:
        """Guest ES, CS, SS, DS, FS, GS, LDTR or TR from the guest-state area (state.py order)."""
        self._segments_read.add(index)
        seg = self._segments.get(index)
        if seg is None:
            selector, base, limit, ar = (self.read(field) for field in _SEGMENT_FIELDS[index])
            seg = self._segments[index] = Segment(selector=selector, base=base, limit=limit, ar=ar)
        return seg

    def usable(self, index: int) -> bool:
        return not self.segment(index).ar & _AR_UNUSABLE


def physical_value(memory: PhysicalMemory | None, address: int, size: int) -> int:
    """``size`` bytes at ``address`` as an unsigned integer, or -1 outside physical memory."""
    if memory is None or not memory.contains(address, size):
        return -1
    return int.from_bytes(memory.read(address, size), "little")


# --- value rules shared by several areas -----------------------------------------------------
def upper_bits_identical(address: int, linear_address_width: int) -> bool:
    """Whether bits 63:N of ``address`` are identical (the guest-RIP rule of SDM 27.3.1.4: one
    bit weaker than canonical, which also includes bit N-1); no check with 64 bits."""
    if linear_address_width >= 64:
        return True
    top = (address & U64) >> linear_address_width
    return top == 0 or top == (1 << (64 - linear_address_width)) - 1


def limit_granularity_ok(limit: int, ar: int) -> bool:
    """The limit/G consistency rule of SDM 27.3.1.2: if any of limit bits 11:0 is 0, G must be
    0; if any of limit bits 31:20 is 1, G must be 1."""
    g = bool(ar & VMX_AR_G_MASK)
    if limit & 0xFFF != 0xFFF and g:
        return False
    if limit & 0xFFF00000 and not g:
        return False
    return True


def pat_valid(pat: int) -> bool:
    """Each byte of IA32_PAT must be a valid memory type: 0 (UC), 1 (WC), 4 (WT), 5 (WP), 6 (WB)
    or 7 (UC-) -- what WRMSR accepts at CPL 0 (SDM 11.12.2)."""
    return all((pat >> (8 * i)) & 0xFF in _PAT_MEMORY_TYPES for i in range(8))


def efer_reserved(efer: int) -> int:
    return efer & ~_EFER_SUPPORTED & U64


def fixed_bits_ok(value: int, fixed0: int, fixed1: int) -> bool:
    """IA32_VMX_CRx_FIXED0/FIXED1: bits 1 in FIXED0 must be 1, bits 0 in FIXED1 must be 0
    (the upper half of a 64-bit control register is reserved, SDM 24.8 and A.7/A.8)."""
    value, fixed0, fixed1 = int(value), int(fixed0), int(fixed1)  # plain ints: ~ on an IntFlag
    return value & fixed0 == fixed0 and value & ~fixed1 & U64 == 0  # inverts only its members
