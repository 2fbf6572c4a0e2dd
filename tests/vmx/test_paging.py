"""The guest's paging (SDM ch. 4): each #PF error-code rule of SDM 4.6/4.7 in its own test,
accessed and dirty flags (SDM 4.8), page sizes, PAE PDPTEs, paging off, and a Hypothesis
property of 4-level paging against a dict model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, strategies as st

from pyvmx.arch.x86 import Cr0, Cr4, Efer, PageFaultErrorCode as PF, PteFlags as F
from pyvmx.vmx.faults import EptViolation, X86Fault
from pyvmx.vmx.memory import PageAllocator, PhysicalMemory
from pyvmx.vmx.paging import Access, GuestTranslation, lookup_linear, translate_linear

R, W, X = Access.READ, Access.WRITE, Access.FETCH
P, RW, US, A, D, PS, G, NX = F.PRESENT, F.RW, F.USER, F.ACCESSED, F.DIRTY, F.PSE, F.GLOBAL, F.NX
KIB4, MIB2, MIB4, GIB1 = 1 << 12, 1 << 21, 1 << 22, 1 << 30

CR0 = Cr0.PE | Cr0.PG | Cr0.WP
CR4_PAE = Cr4.PAE
EFER_LONG = Efer.LME | Efer.LMA | Efer.NX
LINEAR = 0x00007F1234567000
GPA = 0x00345000


# --- test doubles ---------------------------------------------------------------------------------
@dataclass
class FakeGuestMemory:
    """Guest-physical = host-physical over a PhysicalMemory, logging every write and checking
    that the walker marks its accesses as paging-structure accesses."""

    memory: PhysicalMemory
    writes: list[tuple[int, int]] = field(default_factory=list)
    fail_at: int | None = None  # a GPA whose access raises an EPT violation

    def _check(self, gpa: int, paging_structure: bool) -> None:
        assert paging_structure
        if gpa == self.fail_at:
            raise EptViolation(gpa, 0x181, 0)

    def read64(self, gpa: int, *, paging_structure: bool = True) -> int:
        self._check(gpa, paging_structure)
        return self.memory.read64(gpa)

    def read32(self, gpa: int, *, paging_structure: bool = True) -> int:
        self._check(gpa, paging_structure)
        return self.memory.read32(gpa)

    def write64(self, gpa: int, value: int, *, paging_structure: bool = True) -> None:
        self._check(gpa, paging_structure)
        self.writes.append((gpa, value))
        self.memory.write64(gpa, value)

    def write32(self, gpa: int, value: int, *, paging_structure: bool = True) -> None:
        self._check(gpa, paging_structure)
        self.writes.append((gpa, value))
        self.memory.write32(gpa, value)


# (shift of each level's index, top first; index mask; entry size)
MODES = {
    "32bit": ((22, 12), 0x3FF, 4),
    "pae": ((30, 21, 12), 0x1FF, 8),
    "4level": ((39, 30, 21, 12), 0x1FF, 8),
    "5level": ((48, 39, 30, 21, 12), 0x1FF, 8),
}


class PageTables:
    """Guest page tables in one of the four paging modes, table pages from a bump allocator.
    Levels are counted like the SDM: 1 = PTE, 2 = PDE, 3 = PDPTE, 4 = PML4E, 5 = PML5E."""

    def __init__(self, mode: str = "4level") -> None:
        self.mode = mode
        self.shifts, self.index_mask, self.entry_size = MODES[mode]
        self.memory = PhysicalMemory(32 << 20)
        self.guest = FakeGuestMemory(self.memory)
        self.allocator = PageAllocator(self.memory, 0x100000, 0x200000)
        self.root = int(self.allocator.alloc_page())
        if mode == "pae":
            self.root += 0x20  # CR3[31:5] need not be page aligned

    @property
    def cr3(self) -> int:
        return self.root

    def _read(self, address: int) -> int:
        return self.memory.read32(address) if self.entry_size == 4 else self.memory.read64(address)

    def _write(self, address: int, value: int) -> None:
        if self.entry_size == 4:
            self.memory.write32(address, value)
        else:
            self.memory.write64(address, value)

    def map(self, linear: int, gpa: int, size: int = KIB4, flags: int = P | RW | US, table_flags: int = P | RW | US) -> int:
        """Map ``size`` bytes; missing tables get ``table_flags`` (PAE PDPTEs just P).
        Returns the address of the leaf entry."""
        table = self.root
        for shift in self.shifts:
            address = table + ((linear >> shift) & self.index_mask) * self.entry_size
            if 1 << shift == size:
                entry = gpa | flags
                if size == MIB4:
                    entry = (gpa & 0xFFC00000) | ((gpa >> 32) & 0xFF) << 13 | flags
                if size != KIB4:
                    entry |= PS
                self._write(address, entry)
                return address
            entry = self._read(address)
            if not entry & P:
                pdpte = self.mode == "pae" and shift == 30
                entry = int(self.allocator.alloc_page()) | (P if pdpte else table_flags)
                self._write(address, entry)
            table = entry & 0xFFFFFFFFFF000
        raise AssertionError(f"no level maps {size:#x} bytes")

    def entry_address(self, linear: int, level: int) -> int:
        table = self.root
        for shift in self.shifts[: len(self.shifts) - level + 1]:
            address = table + ((linear >> shift) & self.index_mask) * self.entry_size
            table = self._read(address) & 0xFFFFFFFFFF000
        return address

    def entry(self, linear: int, level: int) -> int:
        return self._read(self.entry_address(linear, level))

    def update(self, linear: int, level: int, *, set_bits: int = 0, clear_bits: int = 0) -> None:
        address = self.entry_address(linear, level)
        self._write(address, (self._read(address) & ~clear_bits) | set_bits)

    def translate(
        self, linear: int, access: Access = R, cpl: int = 0, *, cr0: int = CR0, cr4: int | None = None,
        efer: int | None = None, **kw: Any,
    ) -> GuestTranslation:
        if cr4 is None:
            cr4 = {"32bit": Cr4.PSE, "pae": Cr4.PAE, "4level": Cr4.PAE, "5level": Cr4.PAE | Cr4.LA57}[self.mode]
        if efer is None:
            efer = EFER_LONG if self.mode.endswith("level") else Efer.NX
        return translate_linear(
            linear, access, cpl, cr0=cr0, cr3=self.cr3, cr4=cr4, efer=efer, memory=self.guest, **kw
        )

    def fault(self, linear: int, access: Access = R, cpl: int = 0, **kw: Any) -> int:
        """The error code of the #PF that the translation must raise (and CR2 is ``linear``)."""
        writes = len(self.guest.writes)
        with pytest.raises(X86Fault) as info:
            self.translate(linear, access, cpl, **kw)
        assert info.value.vector == 14 and info.value.cr2 == linear
        assert len(self.guest.writes) == writes, "a faulting walk must not set A/D flags"
        assert info.value.error_code is not None
        return info.value.error_code


# --- paging off (SDM 4.1.1) ------------------------------------------------------------------------
def test_paging_off_linear_is_physical() -> None:
    pt = PageTables()
    t = pt.translate(0x1_2345_6789, W, 3, cr0=Cr0.PE, cr4=0, efer=0)
    assert (t.gpa, t.readable, t.writable, t.user, t.executable, t.dirty) == (0x2345_6789, True, True, True, True, True)
    assert pt.guest.writes == []


# --- translation and page sizes (SDM 4.3-4.5) -----------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "size", "linear", "gpa"),
    [
        ("32bit", KIB4, 0xC0345000, GPA),
        ("32bit", MIB4, 0xC0400000, 0x01C00000),
        ("32bit", MIB4, 0xC0400000, 0x12_01C00000),  # PSE-36: bits 39:32 from PDE bits 20:13
        ("pae", KIB4, 0xC0345000, GPA),
        ("pae", MIB2, 0xC0200000, 0x01E00000),
        ("4level", KIB4, LINEAR, GPA),
        ("4level", MIB2, 0x7F1234400000, 0x01E00000),
        ("4level", GIB1, 0x7F1240000000, 0x40000000),
        ("5level", KIB4, 0x01FF_1234_5678_9000, GPA),
    ],
)
def test_translation_of_each_page_size(mode: str, size: int, linear: int, gpa: int) -> None:
    pt = PageTables(mode)
    pt.map(linear, gpa, size)
    offset = size - 3
    t = pt.translate(linear + offset, W, 3)
    assert (t.gpa, t.page_size, t.readable, t.writable, t.user, t.executable) == (gpa + offset, size, True, True, True, True)


def test_32bit_pde_ps_is_ignored_without_cr4_pse() -> None:
    pt = PageTables("32bit")
    pt.map(0xC0345000, GPA)
    pt.update(0xC0345000, 2, set_bits=PS)
    assert pt.translate(0xC0345000, cr4=0).gpa == GPA
    assert pt.translate(0xC0345000, cr4=Cr4.PSE).page_size == MIB4


def test_32bit_paging_uses_the_low_32_bits_of_the_linear_address() -> None:
    pt = PageTables("32bit")
    pt.map(0xC0345000, GPA)
    assert pt.translate(0x1_C0345010).gpa == GPA + 0x10


def test_pae_pdptes_from_registers_replace_memory() -> None:
    pt = PageTables("pae")
    pt.map(0xC0345000, GPA)
    pdpte3 = pt.entry(0xC0345000, 3)
    pt.update(0xC0345000, 3, clear_bits=P)
    assert pt.translate(0xC0345000, pdptes=(0, 0, 0, pdpte3)).gpa == GPA
    assert pt.fault(0xC0345000) == 0


def test_global_flag_needs_cr4_pge() -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA, flags=P | RW | G)
    assert pt.translate(LINEAR, cr4=Cr4.PAE | Cr4.PGE).global_
    assert not pt.translate(LINEAR, cr4=Cr4.PAE).global_


def test_ept_violation_during_the_walk_propagates_unchanged() -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA)
    pt.guest.fail_at = pt.entry_address(LINEAR, 2)
    with pytest.raises(EptViolation) as info:
        pt.translate(LINEAR)
    assert info.value == EptViolation(pt.guest.fail_at, 0x181, 0)


# --- #PF error codes (SDM 4.6, 4.7) ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("access", "cpl", "cr4", "efer", "mode", "error_code"),
    [
        (R, 0, None, None, "4level", 0),
        (W, 0, None, None, "4level", PF.WRITE),
        (R, 3, None, None, "4level", PF.USER),
        (W, 3, None, None, "4level", PF.WRITE | PF.USER),
        (X, 3, None, None, "4level", PF.FETCH | PF.USER),
        # I/D is reported only with CR4.SMEP = 1 or with PAE/4-level paging and EFER.NXE = 1.
        (X, 0, Cr4.PAE, Efer.LME | Efer.LMA, "4level", 0),
        (X, 0, Cr4.PAE | Cr4.SMEP, Efer.LME | Efer.LMA, "4level", PF.FETCH),
        (X, 0, Cr4.PAE, Efer.NX, "pae", PF.FETCH),
        (X, 0, Cr4.PAE, 0, "pae", 0),
        (X, 0, Cr4.PSE, Efer.NX, "32bit", 0),
        (X, 0, Cr4.PSE | Cr4.SMEP, 0, "32bit", PF.FETCH),
    ],
)
def test_not_present_page(access: Access, cpl: int, cr4: int | None, efer: int | None, mode: str, error_code: int) -> None:
    pt = PageTables(mode)
    linear = LINEAR if mode == "4level" else 0xC0345000
    assert pt.fault(linear, access, cpl, cr4=cr4, efer=efer) == error_code  # no tables at all
    pt.map(linear, GPA, flags=RW | US)  # a leaf with P = 0 below present tables
    assert pt.fault(linear, access, cpl, cr4=cr4, efer=efer) == error_code


@pytest.mark.parametrize(
    ("user_page", "cpl", "wp", "error_code"),
    [
        (True, 3, True, PF.PRESENT | PF.WRITE | PF.USER),
        (True, 3, False, PF.PRESENT | PF.WRITE | PF.USER),  # WP only concerns supervisor writes
        (True, 0, True, PF.PRESENT | PF.WRITE),
        (True, 0, False, None),
        (False, 0, True, PF.PRESENT | PF.WRITE),
        (False, 0, False, None),
    ],
)
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_write_to_read_only_page(user_page: bool, cpl: int, wp: bool, error_code: int | None, level: int) -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA, flags=P | RW | (US if user_page else 0), table_flags=P | RW | (US if user_page else 0))
    pt.update(LINEAR, level, clear_bits=RW)  # R/W = 0 at any level makes the page read-only
    cr0 = CR0 if wp else CR0 & ~Cr0.WP
    if error_code is None:
        assert pt.translate(LINEAR, W, cpl, cr0=cr0).writable
    else:
        assert pt.fault(LINEAR, W, cpl, cr0=cr0) == error_code
        assert not pt.translate(LINEAR, R, cpl, cr0=cr0).writable


@pytest.mark.parametrize(("access", "error_code"), [(R, 0x5), (W, 0x7), (X, 0x15)])
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_user_access_to_supervisor_page(access: Access, error_code: int, level: int) -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA)
    pt.update(LINEAR, level, clear_bits=US)
    assert pt.fault(LINEAR, access, 3) == error_code
    assert not pt.translate(LINEAR, access, 0).user


@pytest.mark.parametrize(("cpl", "error_code"), [(0, 0x11), (3, 0x15)])
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_fetch_from_execute_disable_page(cpl: int, error_code: int, level: int) -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA)
    pt.update(LINEAR, level, set_bits=NX)
    assert pt.fault(LINEAR, X, cpl) == error_code
    assert not pt.translate(LINEAR, R, cpl).executable


def test_execute_disable_is_reserved_without_nxe() -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA, flags=P | RW | US | NX)
    assert pt.fault(LINEAR, R, 3, efer=Efer.LME | Efer.LMA) == PF.PRESENT | PF.RSVD | PF.USER
    pae = PageTables("pae")
    pae.map(0xC0345000, GPA, flags=P | RW | US | NX)
    assert pae.fault(0xC0345000, R, 0, efer=0) == PF.PRESENT | PF.RSVD


def test_32bit_paging_has_no_execute_disable() -> None:
    pt = PageTables("32bit")
    pt.map(0xC0345000, GPA)
    assert pt.translate(0xC0345000, X, 3, efer=Efer.NX).executable


@pytest.mark.parametrize(("smep", "error_code"), [(True, 0x11), (False, None)])
def test_smep_blocks_supervisor_fetch_from_user_page(smep: bool, error_code: int | None) -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA)
    cr4 = Cr4.PAE | (Cr4.SMEP if smep else 0)
    if error_code is None:
        assert pt.translate(LINEAR, X, 0, cr4=cr4).executable
    else:
        assert pt.fault(LINEAR, X, 0, cr4=cr4) == error_code
        assert pt.translate(LINEAR, X, 3, cr4=cr4).executable  # user fetches are not affected


@pytest.mark.parametrize(
    ("access", "ac", "wp", "error_code"),
    [(R, False, True, 0x1), (W, False, True, 0x3), (W, False, False, 0x3), (R, True, True, None), (W, True, False, None)],
)
def test_smap_blocks_supervisor_data_access_to_user_page(access: Access, ac: bool, wp: bool, error_code: int | None) -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA, flags=P | US)  # read-only: writes pass only with WP = 0
    cr4, cr0 = Cr4.PAE | Cr4.SMAP, CR0 if wp else CR0 & ~Cr0.WP
    if error_code is None:
        assert pt.translate(LINEAR, access, 0, cr0=cr0, cr4=cr4, ac=ac).gpa == GPA
    else:
        assert pt.fault(LINEAR, access, 0, cr0=cr0, cr4=cr4, ac=ac) == error_code
        assert pt.translate(LINEAR, X, 0, cr0=cr0, cr4=cr4).executable  # fetches are SMEP's business
        assert pt.translate(LINEAR, R, 3, cr0=cr0, cr4=cr4).readable  # user accesses are not affected


RSVD = PF.PRESENT | PF.RSVD


@pytest.mark.parametrize(
    ("mode", "size", "level", "bit"),
    [
        ("4level", KIB4, 1, 46),  # bits 51:MAXPHYADDR
        ("4level", KIB4, 1, 51),
        ("4level", KIB4, 2, 47),
        ("4level", KIB4, 3, 50),
        ("4level", KIB4, 4, 46),
        ("4level", KIB4, 4, 7),  # PS in a PML4E
        ("5level", KIB4, 5, 7),  # PS in a PML5E
        ("4level", GIB1, 3, 13),  # bits 29:13 of a 1-GByte PDPTE
        ("4level", GIB1, 3, 29),
        ("4level", MIB2, 2, 13),  # bits 20:13 of a 2-MByte PDE
        ("4level", MIB2, 2, 20),
        ("pae", KIB4, 1, 52),  # PAE: bits 62:MAXPHYADDR
        ("pae", KIB4, 2, 62),
        ("pae", MIB2, 2, 13),
        ("32bit", MIB4, 2, 21),  # 4-MByte PDE bit 21 (PSE-36, MAXPHYADDR >= 40)
    ],
)
@pytest.mark.parametrize(("access", "cpl"), [(R, 0), (W, 3)])
def test_reserved_bit_set(mode: str, size: int, level: int, bit: int, access: Access, cpl: int) -> None:
    pt = PageTables(mode)
    linear = {"4level": 0x7F1240000000, "5level": 0x01FF_1234_5678_9000}.get(mode, 0xC0400000)
    pt.map(linear, 0x40000000 if size == GIB1 else 0x01C00000 if size != KIB4 else GPA, size)
    pt.update(linear, level, set_bits=1 << bit)
    assert pt.fault(linear, access, cpl) == RSVD | (PF.WRITE | PF.USER if cpl == 3 else 0)


def test_4level_bits_62_52_are_ignored() -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA)
    for level in (1, 2, 3, 4):
        pt.update(LINEAR, level, set_bits=1 << 52 | 1 << 62)
    assert pt.translate(LINEAR).gpa == GPA


def test_32bit_4m_page_without_pse36_reserves_bits_21_13() -> None:
    pt = PageTables("32bit")
    pt.map(0xC0400000, 0x1_01C00000, MIB4)
    assert pt.fault(0xC0400000, pse36=False) == RSVD
    assert pt.translate(0xC0400000, maxphyaddr=36).gpa == 0x1_01C00000
    pt.update(0xC0400000, 2, set_bits=1 << 17)  # PA bit 36: beyond a 36-bit MAXPHYADDR
    assert pt.fault(0xC0400000, maxphyaddr=36) == RSVD


def test_reserved_bit_fault_beats_not_present_below_it() -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA, flags=0)
    pt.update(LINEAR, 3, set_bits=1 << 48)
    assert pt.fault(LINEAR) == RSVD


def test_reserved_bit_fault_beats_protection_fault() -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA, flags=P | (1 << 50))  # supervisor, read-only
    assert pt.fault(LINEAR, W, 3) == RSVD | PF.WRITE | PF.USER


@pytest.mark.parametrize("bit", [1, 2, 5, 6, 7, 8, 46, 63])
def test_pae_pdpte_reserved_bit(bit: int) -> None:
    pt = PageTables("pae")
    pt.map(0xC0345000, GPA)
    pt.update(0xC0345000, 3, set_bits=1 << bit)
    assert pt.fault(0xC0345000) == RSVD
    pdpte = pt.entry(0xC0345000, 3)
    pt.update(0xC0345000, 3, clear_bits=1 << bit)
    assert pt.fault(0xC0345000, pdptes=(0, 0, 0, pdpte)) == RSVD


def test_pae_pdpte_not_present() -> None:
    pt = PageTables("pae")
    assert pt.fault(0xC0345000, W) == PF.WRITE


# --- accessed and dirty flags (SDM 4.8) ---------------------------------------------------------------------
def ad(pt: PageTables, linear: int, levels: tuple[int, ...]) -> list[int]:
    return [pt.entry(linear, level) & (A | D) for level in levels]


@pytest.mark.parametrize(("mode", "linear", "levels"), [("4level", LINEAR, (4, 3, 2, 1)), ("32bit", 0xC0345000, (2, 1)), ("pae", 0xC0345000, (2, 1))])
def test_read_sets_accessed_flags_in_every_entry(mode: str, linear: int, levels: tuple[int, ...]) -> None:
    pt = PageTables(mode)
    pt.map(linear, GPA)
    t = pt.translate(linear, R)
    assert ad(pt, linear, levels) == [A] * len(levels)
    assert not t.dirty


def test_write_sets_dirty_in_the_leaf_only() -> None:
    pt = PageTables()
    pt.map(0x7F1234400000, 0x01E00000, MIB2)
    t = pt.translate(0x7F1234400000, W)
    assert t.dirty
    assert ad(pt, 0x7F1234400000, (4, 3, 2)) == [A, A, A | D]


def test_32bit_writes_32bit_entries() -> None:
    pt = PageTables("32bit")
    leaf = pt.map(0xC0345000, GPA)
    pt.translate(0xC0345000, W)
    assert (leaf, GPA | P | RW | US | A | D) in pt.guest.writes
    assert pt.memory.read32(leaf + 4) == 0


def test_pae_pdptes_have_no_accessed_flag() -> None:
    pt = PageTables("pae")
    pt.map(0xC0345000, GPA)
    pt.translate(0xC0345000, W)
    assert pt.entry(0xC0345000, 3) & A == 0


def test_flags_are_written_only_when_they_change() -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA)
    pt.translate(LINEAR, R)
    assert len(pt.guest.writes) == 4
    pt.translate(LINEAR, R)
    assert len(pt.guest.writes) == 4
    pt.translate(LINEAR, W)
    assert pt.guest.writes[4:] == [(pt.entry_address(LINEAR, 1), GPA | P | RW | US | A | D)]
    pt.translate(LINEAR, W)
    assert len(pt.guest.writes) == 5


def test_no_flags_on_a_faulting_walk() -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA, flags=P | US)
    pt.fault(LINEAR, W, 3)  # checks that nothing was written
    assert ad(pt, LINEAR, (4, 3, 2, 1)) == [0, 0, 0, 0]


# --- lookup_linear ----------------------------------------------------------------------------------------
def test_lookup_has_no_side_effects() -> None:
    pt = PageTables()
    pt.map(LINEAR, GPA)

    def lookup(linear: int, access: Access, cpl: int) -> GuestTranslation | None:
        return lookup_linear(linear, access, cpl, cr0=CR0, cr3=pt.cr3, cr4=Cr4.PAE, efer=EFER_LONG, memory=pt.guest)

    t = lookup(LINEAR + 5, W, 3)
    assert t is not None and t.gpa == GPA + 5 and not t.dirty
    assert pt.guest.writes == []
    assert lookup(LINEAR + KIB4, R, 0) is None
    pt.update(LINEAR, 1, clear_bits=US)
    assert lookup(LINEAR, R, 3) is None
    pt.guest.fail_at = pt.entry_address(LINEAR, 4)
    assert lookup(LINEAR, R, 0) is None


# --- property: 4-level paging agrees with a dict model ------------------------------------------------
PAGES = st.builds(
    lambda pml4, pdpt, pd, pt: pml4 << 27 | pdpt << 18 | pd << 9 | pt,
    st.sampled_from([0, 255]), st.integers(0, 1), st.integers(0, 2), st.integers(0, 511),
)
LEAF_FLAGS = st.builds(
    lambda p, rw, us, nx: (P if p else 0) | (RW if rw else 0) | (US if us else 0) | (NX if nx else 0),
    st.booleans(), st.booleans(), st.booleans(), st.booleans(),
)


def model(flags: int, access: Access, cpl: int, wp: bool, smep: bool, smap: bool, ac: bool) -> int | None:
    """The error code SDM 4.6.1/4.7 predict for one leaf (tables above are P|RW|US, NXE = 1),
    or None if the access is allowed -- written case by case, as the SDM's lists read."""
    code = (PF.WRITE if access == W else 0) | (PF.USER if cpl == 3 else 0) | (PF.FETCH if access == X else 0)
    if not flags & P:
        return code
    user_page, writable, xd = bool(flags & US), bool(flags & RW), bool(flags & NX)
    if cpl == 3:
        allowed = user_page and {R: True, W: writable, X: not xd}[access]
    elif access == X:
        allowed = not xd and not (user_page and smep)
    elif user_page and smap and not ac:
        allowed = False
    elif access == W:
        allowed = writable or not wp
    else:
        allowed = True
    return None if allowed else code | PF.PRESENT


@given(
    mappings=st.dictionaries(PAGES, st.tuples(st.integers(0, (1 << 34) - 1), LEAF_FLAGS), max_size=24),
    probes=st.lists(st.tuples(PAGES, st.sampled_from([R, W, X]), st.sampled_from([0, 3])), min_size=1, max_size=16),
    wp=st.booleans(), smep=st.booleans(), smap=st.booleans(), ac=st.booleans(),
)
def test_4level_walk_agrees_with_a_dict_model(
    mappings: dict[int, tuple[int, int]], probes: list[tuple[int, Access, int]],
    wp: bool, smep: bool, smap: bool, ac: bool,
) -> None:
    pt = PageTables()
    for page, (frame, flags) in mappings.items():
        pt.map(page << 12, frame << 12, flags=flags)
    cr0 = CR0 if wp else CR0 & ~Cr0.WP
    cr4 = Cr4.PAE | (Cr4.SMEP if smep else 0) | (Cr4.SMAP if smap else 0)
    probes += [(page, R, 0) for page in mappings]
    for page, access, cpl in probes:
        linear = page << 12 | 0xABC
        if page >> 27:
            linear |= 0xFFFF << 48  # canonical upper half
        frame, flags = mappings.get(page, (0, 0))
        expected = model(flags, access, cpl, wp, smep, smap, ac)
        if expected is None:
            t = pt.translate(linear, access, cpl, cr0=cr0, cr4=cr4, ac=ac)
            assert t.gpa == frame << 12 | 0xABC
            assert pt.entry(linear, 1) & A
            assert t.dirty == bool(pt.entry(linear, 1) & D)
            if access == W:
                assert t.dirty
        else:
            assert pt.fault(linear, access, cpl, cr0=cr0, cr4=cr4, ac=ac) == expected
