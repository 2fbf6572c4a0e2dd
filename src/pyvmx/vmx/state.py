"""Guest architectural state as the VT-x machine sees it: what VM entry loads from the
guest-state area and VM exit saves to it (SDM 25.4), independent of the CPU engine."""

from __future__ import annotations

from dataclasses import dataclass, field

# Segment register indices, in the order of the VMCS encodings (ES, CS, SS, DS, FS, GS, LDTR, TR).
ES, CS, SS, DS, FS, GS, LDTR, TR = range(8)
SEGMENT_NAMES = ("ES", "CS", "SS", "DS", "FS", "GS", "LDTR", "TR")

AR_UNUSABLE = 1 << 16


@dataclass(slots=True)
class Segment:
    """A segment register with its hidden part; access rights in the VMX format (SDM 25.4.1)."""

    selector: int
    base: int
    limit: int
    ar: int

    @property
    def unusable(self) -> bool:
        return bool(self.ar & AR_UNUSABLE)

    @property
    def dpl(self) -> int:
        return (self.ar >> 5) & 3

    @property
    def type(self) -> int:
        return self.ar & 0xF


def _real_mode_segments() -> list[Segment]:
    segs = [Segment(0, 0, 0xFFFF, 0x93) for _ in range(6)]
    segs[CS] = Segment(0, 0, 0xFFFF, 0x9B)
    return segs + [Segment(0, 0, 0xFFFF, 0x82), Segment(0, 0, 0xFFFF, 0x8B)]


@dataclass(slots=True)
class ArchState:
    """Registers of the guest-state area that the engine keeps (GPRs other than RSP are not in
    the VMCS: they carry over VM entries and exits, as on hardware)."""

    rip: int = 0
    rsp: int = 0
    rflags: int = 2
    cr0: int = 0x10
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    dr7: int = 0x400
    segments: list[Segment] = field(default_factory=_real_mode_segments)
    gdtr_base: int = 0
    gdtr_limit: int = 0xFFFF
    idtr_base: int = 0
    idtr_limit: int = 0xFFFF
    interrupt_shadow: bool = False  # blocking by STI or MOV SS

    @property
    def cpl(self) -> int:
        """CPL: 0 in real mode, 3 in virtual-8086 mode, else SS.DPL (SDM 27.3.1.2)."""
        if not self.cr0 & 1:
            return 0
        if self.rflags & (1 << 17):
            return 3
        return self.segments[SS].dpl

    @property
    def long_mode(self) -> bool:
        return bool(self.efer & (1 << 10))

    @property
    def code64(self) -> bool:
        """IA-32e mode with CS.L = 1: 64-bit code."""
        return self.long_mode and bool(self.segments[CS].ar & (1 << 13))

    @property
    def bitness(self) -> int:
        """The default operand/address size of the code segment: 16, 32 or 64."""
        if self.code64:
            return 64
        if not self.cr0 & 1 or self.rflags & (1 << 17):
            return 16
        return 32 if self.segments[CS].ar & (1 << 14) else 16
