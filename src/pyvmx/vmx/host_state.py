"""The processor's state in VMX root operation, and how a VM exit loads it (SDM 28.5).

The host is a real processor state, not an assumption: VM entry checks the host-state area
against its current IA32_EFER.LMA (SDM 27.2.4), and a VM exit loads the host state on top of
its current CR0/CR4 -- the bits the SDM says a VM exit does not modify keep their values -- with
IA-32e mode (EFER.LMA/LME, CS.L) following the "host address-space size" VM-exit control.  So
a 32-bit host (IA32_EFER.LMA = 0, "host address-space size" = 0) works as a 64-bit one does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.vmcs_fields import VmcsFieldType
from pyvmx.arch.x86 import Cr0, Cr4, Efer
from pyvmx.vmx.caps import CpuProfile
from pyvmx.vmx.vmcs import VmcsRegion

_U64 = (1 << 64) - 1
_EFER_LMA_LME = int(Efer.LMA | Efer.LME)
# As plain ints: every VM exit tests them, and IntFlag's & is slow.
_HOST_ADDR_SPACE_SIZE = int(X.HOST_ADDR_SPACE_SIZE)
_LOAD_IA32_EFER = int(X.LOAD_IA32_EFER)
_LOAD_IA32_PAT = int(X.LOAD_IA32_PAT)
_CR4_PAE = int(Cr4.PAE)
_CR4_PCIDE = int(Cr4.PCIDE)
# CR0 bits a VM exit does not modify (SDM 28.5.1): ET, CD, NW; bits 63:32, 28:19, 17 and 15:6
# (and the bits fixed in VMX operation, added per profile).
_CR0_KEPT = int(Cr0.ET | Cr0.CD | Cr0.NW) | (_U64 & ~0xFFFFFFFF) | 0x1FF80000 | (1 << 17) | 0xFFC0
_HOST_SELECTORS = ("ES", "CS", "SS", "DS", "FS", "GS", "TR")
_HOST_BASES = ("FS", "GS", "TR", "GDTR", "IDTR")


@dataclass
class HostState:
    """Root-operation state of the (Python) host software: what VM exits load (SDM 28.5).

    The host runs in 64-bit mode at CPL 0 unless a test says otherwise (a 32-bit host: EFER.LMA
    = 0, CS.L = 0); these fields decide the #UD/#GP checks at the top of every VMX instruction
    and the host-mode rules of the VM-entry checks."""

    cr0: int = int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG)
    cr3: int = 0
    cr4: int = int(Cr4.PAE)
    efer: int = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NX)
    rip: int = 0
    rsp: int = 0
    rflags: int = 0x2
    cpl: int = 0
    cs_l: bool = True
    selectors: dict[str, int] = field(default_factory=dict)
    bases: dict[str, int] = field(default_factory=dict)
    pat: int = 0x0007040600070406
    sysenter_cs: int = 0
    sysenter_esp: int = 0
    sysenter_eip: int = 0


def _fill_upper_bits(address: int, linear_address_width: int) -> int:
    """Bits 63:N set to bit N-1 (SDM 28.5.1, IA32_SYSENTER_ESP/EIP on a processor with N < 64
    linear-address bits)."""
    if linear_address_width >= 64:
        return address & _U64
    low = address & ((1 << linear_address_width) - 1)
    if address >> (linear_address_width - 1) & 1:
        low |= _U64 & ~((1 << linear_address_width) - 1)
    return low


@dataclass(frozen=True)
class _HostFields:
    """The host-state area as a VM exit reads it."""

    cr0: int
    cr3: int
    cr4: int
    rip: int
    rsp: int
    efer: int
    pat: int
    selectors: dict[str, int]
    bases: dict[str, int]
    sysenter_cs: int
    sysenter_esp: int
    sysenter_eip: int

    @classmethod
    def read(cls, vmcs: VmcsRegion) -> _HostFields:
        read = vmcs.read
        return cls(
            read(F.HOST_CR0), read(F.HOST_CR3), read(F.HOST_CR4), read(F.HOST_RIP), read(F.HOST_RSP),
            read(F.HOST_IA32_EFER), read(F.HOST_IA32_PAT),
            {seg: read(F[f"HOST_{seg}_SELECTOR"]) for seg in _HOST_SELECTORS},
            {seg: read(F[f"HOST_{seg}_BASE"]) for seg in _HOST_BASES},
            read(F.HOST_IA32_SYSENTER_CS), read(F.HOST_IA32_SYSENTER_ESP), read(F.HOST_IA32_SYSENTER_EIP),
        )


class HostStateLoader:
    """SDM 28.5.1-28.5.3 for one processor.  The host-state area is read again only when its
    bytes changed since the last exit from that VMCS (a pure function of those bytes)."""

    def __init__(self) -> None:
        self._fields: dict[int, tuple[bytes, _HostFields]] = {}

    def _read(self, vmcs: VmcsRegion) -> _HostFields:
        area = vmcs.area_bytes(VmcsFieldType.HOST_STATE)
        cached = self._fields.get(vmcs.address)
        if cached is None or cached[0] != area:
            cached = self._fields[vmcs.address] = (area, _HostFields.read(vmcs))
        return cached[1]

    def load(self, host: HostState, vmcs: VmcsRegion, profile: CpuProfile) -> None:
        exit_controls = vmcs.read(F.VM_EXIT_CONTROLS)
        fields = self._read(vmcs)
        long_mode = bool(exit_controls & _HOST_ADDR_SPACE_SIZE)
        # SDM 28.5.1: CR0 and CR4 from the fields except the bits a VM exit does not modify.
        cr0_kept = _CR0_KEPT | profile.cr0_fixed0 | (~profile.cr0_fixed1 & 0xFFFFFFFF)
        host.cr0 = (fields.cr0 & ~cr0_kept | host.cr0 & cr0_kept) & _U64
        cr4_kept = profile.cr4_fixed0 | (~profile.cr4_fixed1 & _U64)
        cr4 = (fields.cr4 & ~cr4_kept | int(host.cr4) & cr4_kept) & _U64  # int: IntFlag arithmetic is slow
        host.cr4 = cr4 | _CR4_PAE if long_mode else cr4 & ~_CR4_PCIDE
        # CR3: bits beyond the physical-address width are cleared.
        host.cr3 = fields.cr3 & ((1 << profile.physical_address_width) - 1)
        # IA32_EFER.LMA and LME follow "host address-space size", unless "load IA32_EFER" loads
        # the whole MSR (whose LMA/LME the VM-entry checks made equal to that control).
        if exit_controls & _LOAD_IA32_EFER:
            host.efer = fields.efer
        elif long_mode:
            host.efer |= _EFER_LMA_LME
        else:
            host.efer &= ~_EFER_LMA_LME
        if exit_controls & _LOAD_IA32_PAT:
            host.pat = fields.pat
        host.sysenter_cs = fields.sysenter_cs
        host.sysenter_esp = _fill_upper_bits(fields.sysenter_esp, profile.linear_address_width)
        host.sysenter_eip = _fill_upper_bits(fields.sysenter_eip, profile.linear_address_width)
        # SDM 28.5.2: selectors and bases; CS.L is "host address-space size".  SDM 28.5.3: RIP,
        # RSP from the fields, RFLAGS cleared except bit 1.
        host.cs_l = long_mode
        host.selectors.update(fields.selectors)
        host.bases.update(fields.bases)
        host.rip, host.rsp, host.rflags = fields.rip, fields.rsp, 0x2
