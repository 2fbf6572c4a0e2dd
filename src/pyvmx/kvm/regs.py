"""Register state as the VMM sees it: KVM_GET/SET_REGS (``struct kvm_regs``), KVM_GET/SET_SREGS
(``struct kvm_sregs``, ``struct kvm_segment``, ``struct kvm_dtable``), and the conversion between
a ``kvm_segment`` and the VMCS access-rights format (vmx.c vmx_segment_access_rights() and
vmx_get_segment(); SDM 25.4.1 Table 25-2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pyvmx.arch.x86 import VMX_AR_UNUSABLE_MASK

GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")
VMCS_SEGMENT_NAMES = ("ES", "CS", "SS", "DS", "FS", "GS", "LDTR", "TR")


@dataclass
class Regs:
    """``struct kvm_regs``: the general-purpose registers, RIP and RFLAGS."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    def gpr(self, index: int) -> int:
        return int(getattr(self, GPR_NAMES[index]))


@dataclass
class Segment:
    """``struct kvm_segment``."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3
    present: bool = True
    dpl: int = 0
    db: bool = False
    s: bool = True
    l: bool = False  # noqa: E741 (the kvm_segment field name)
    g: bool = False
    avl: bool = False
    unusable: bool = False

    def access_rights(self, *, force_accessed: bool = False) -> int:
        """``vmx_segment_access_rights()``; ``force_accessed`` is __vmx_set_segment()'s fix-up
        for unrestricted guests (SDM 27.3.1.2 wants the accessed bit in usable code/data
        segments)."""
        seg_type = self.type & 15
        if force_accessed and self.s:
            seg_type |= 1
        ar = seg_type
        ar |= int(self.s) << 4
        ar |= (self.dpl & 3) << 5
        ar |= int(self.present) << 7
        ar |= int(self.avl) << 12
        ar |= int(self.l) << 13
        ar |= int(self.db) << 14
        ar |= int(self.g) << 15
        ar |= int(self.unusable or not self.present) << 16
        return ar

    @classmethod
    def from_vmcs(cls, selector: int, base: int, limit: int, ar: int) -> Segment:
        """``vmx_get_segment()``: an unusable segment reads as not present."""
        unusable = bool(ar & VMX_AR_UNUSABLE_MASK)
        return cls(
            base=base,
            limit=limit,
            selector=selector,
            type=ar & 15,
            s=bool(ar >> 4 & 1),
            dpl=(ar >> 5) & 3,
            present=not unusable,
            avl=bool(ar >> 12 & 1),
            l=bool(ar >> 13 & 1),
            db=bool(ar >> 14 & 1),
            g=bool(ar >> 15 & 1),
            unusable=unusable,
        )

    def replace(self, **changes: object) -> Segment:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass
class DTable:
    """``struct kvm_dtable``: GDTR or IDTR."""

    base: int = 0
    limit: int = 0xFFFF


def _real_mode_segment(selector: int = 0, ar_type: int = 3) -> Segment:
    return Segment(base=selector << 4, limit=0xFFFF, selector=selector, type=ar_type)


@dataclass
class Sregs:
    """``struct kvm_sregs``: segments, descriptor tables, control registers, EFER, APIC base.
    (The interrupt bitmap of the original is not modelled: there is no pending-interrupt
    injection through SREGS here.)"""

    cs: Segment = field(default_factory=lambda: Segment(base=0xFFFF0000, selector=0xF000, type=11))
    ds: Segment = field(default_factory=_real_mode_segment)
    es: Segment = field(default_factory=_real_mode_segment)
    fs: Segment = field(default_factory=_real_mode_segment)
    gs: Segment = field(default_factory=_real_mode_segment)
    ss: Segment = field(default_factory=_real_mode_segment)
    tr: Segment = field(default_factory=lambda: Segment(type=11, s=False))
    ldt: Segment = field(default_factory=lambda: Segment(type=2, s=False))
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900

    def segment(self, name: str) -> Segment:
        return getattr(self, name)  # type: ignore[no-any-return]
