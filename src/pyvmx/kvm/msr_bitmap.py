"""The per-vCPU MSR bitmap (SDM 25.6.9), as KVM keeps it (arch/x86/kvm/vmx/vmx.c:
alloc_loaded_vmcs() fills the page with ones, vmx_vcpu_create() opens the pass-through MSRs with
vmx_disable_intercept_for_msr()).

One 4-KiB page, four 1-KiB bitmaps:

=========  ==========================================
offset     bitmap
=========  ==========================================
0x000      read,  MSRs 00000000H-00001FFFH
0x400      read,  MSRs C0000000H-C0001FFFH
0x800      write, MSRs 00000000H-00001FFFH
0xC00      write, MSRs C0000000H-C0001FFFH
=========  ==========================================

Bit ``msr & 0x1FFF`` of the right bitmap set means the access exits. MSRs outside both ranges
always exit, whatever the bitmap says (SDM 26.1.3).
"""

from __future__ import annotations

from collections.abc import Iterable

from pyvmx.arch.msr import Msr, msr_by_name
from pyvmx.vmx.memory import PAGE_SIZE, PhysicalMemory

MSR_BITMAP_READ_LOW = 0x000
MSR_BITMAP_READ_HIGH = 0x400
MSR_BITMAP_WRITE_LOW = 0x800
MSR_BITMAP_WRITE_HIGH = 0xC00
MSR_LOW_RANGE = range(0x0000_0000, 0x0000_2000)
MSR_HIGH_RANGE = range(0xC000_0000, 0xC000_2000)

MsrLike = int | str | Msr


class MsrOutsideBitmapError(ValueError):
    """An MSR the bitmap cannot describe: outside 0-1FFFH and C0000000H-C0001FFFH it always
    exits (SDM 26.1.3), so it cannot be passed through."""


def msr_index(msr: MsrLike) -> int:
    """An MSR given by number, :class:`Msr` member, or name ("EFER", "MSR_LSTAR", "IA32_PAT")."""
    if isinstance(msr, str):
        return int(msr_by_name(msr))
    if not 0 <= int(msr) <= 0xFFFFFFFF:
        raise ValueError(f"MSR index {int(msr):#x} does not fit in ECX's 32 bits")
    return int(msr)


def msr_bitmap_position(msr: int, write: bool) -> tuple[int, int] | None:
    """(byte offset in the page, bit in that byte) of ``msr``'s read or write intercept bit, or
    None when the MSR is outside both ranges. EFER (C0000080H) write: (0xC00 + 0x80 // 8, 0) =
    (0xC10, 0)."""
    if msr in MSR_LOW_RANGE:
        base = MSR_BITMAP_WRITE_LOW if write else MSR_BITMAP_READ_LOW
    elif msr in MSR_HIGH_RANGE:
        base = MSR_BITMAP_WRITE_HIGH if write else MSR_BITMAP_READ_HIGH
    else:
        return None
    bit = msr & 0x1FFF
    return base + (bit >> 3), bit & 7


# vmx_vcpu_create(): the MSRs KVM passes through from the start (MSR_TYPE_R / MSR_TYPE_RW).
KVM_PASSTHROUGH_MSRS: tuple[tuple[Msr, bool, bool], ...] = (
    (Msr.IA32_TSC, True, False),  # MSR_TYPE_R: reads see the offset TSC
    (Msr.FS_BASE, True, True),
    (Msr.GS_BASE, True, True),
    (Msr.KERNEL_GS_BASE, True, True),
    (Msr.IA32_SYSENTER_CS, True, True),
    (Msr.IA32_SYSENTER_ESP, True, True),
    (Msr.IA32_SYSENTER_EIP, True, True),
)
"""(MSR, pass reads, pass writes): FS/GS base and SYSENTER_* live in the VMCS guest-state area,
KERNEL_GS_BASE in the register file KVM swaps on vcpu_load/put, the TSC read is offset by the
processor (SDM 26.3 "RDMSR")."""


class MsrBitmap:
    """A 4-KiB MSR bitmap page at host-physical ``address``, all ones (intercept everything)
    when created, as alloc_loaded_vmcs() leaves it."""

    def __init__(self, memory: PhysicalMemory, address: int) -> None:
        if address % PAGE_SIZE:
            raise ValueError(f"MSR bitmap address {address:#x} is not 4-KiB aligned")
        self.memory = memory
        self.address = address
        self.fill(intercept=True)

    def fill(self, *, intercept: bool) -> None:
        """Every bit to ``intercept`` (memset 0xFF / 0)."""
        self.memory.fill(self.address, PAGE_SIZE, 0xFF if intercept else 0)

    def _set(self, msr: int, write: bool, intercept: bool) -> None:
        position = msr_bitmap_position(msr, write)
        if position is None:
            if intercept:
                return  # outside the ranges: exits anyway
            raise MsrOutsideBitmapError(
                f"MSR {msr:#x} is outside 0-1FFFH and C0000000H-C0001FFFH: it always exits (SDM 26.1.3)"
            )
        offset, bit = position
        self.memory.set_bit(self.address + offset, bit, intercept)

    def set_intercept(self, msr: MsrLike, *, read: bool, write: bool, intercept: bool) -> None:
        """Set (``intercept``) or clear the read and/or write bits of one MSR
        (vmx_enable_intercept_for_msr / vmx_disable_intercept_for_msr)."""
        index = msr_index(msr)
        if read:
            self._set(index, False, intercept)
        if write:
            self._set(index, True, intercept)

    def intercepted(self, msr: MsrLike, write: bool) -> bool:
        """Whether the access exits (SDM 26.1.3)."""
        position = msr_bitmap_position(msr_index(msr), write)
        if position is None:
            return True
        offset, bit = position
        return self.memory.test_bit(self.address + offset, bit)

    def pass_through_kvm_defaults(self) -> None:
        """vmx_vcpu_create()'s list (:data:`KVM_PASSTHROUGH_MSRS`)."""
        for msr, read, write in KVM_PASSTHROUGH_MSRS:
            self.set_intercept(msr, read=read, write=write, intercept=False)

    def intercepted_msrs(self, write: bool, candidates: Iterable[int]) -> list[int]:
        return [m for m in candidates if self.intercepted(m, write)]
