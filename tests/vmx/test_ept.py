"""EPT translation (SDM 29.3): page sizes, EPT violations and their exit qualification (SDM
28.2.1, Table 28-7), EPT misconfigurations (SDM 29.3.3.1), accessed and dirty flags (SDM
29.3.5). One test per rule; a Hypothesis property against a dict model."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from pyvmx.arch.controls import VMX_EPT_ACCESS_BIT, VMX_EPT_DIRTY_BIT, VMX_EPT_LARGE_PAGE_BIT
from pyvmx.vmx.ept import EptAccess, EptTranslation, ept_lookup, ept_walk
from pyvmx.vmx.faults import EptMisconfig, EptViolation
from pyvmx.vmx.memory import PhysicalMemory

from .ept_builder import GIB1, KIB4, MIB2, EptBuilder

R, W, X = EptAccess.READ, EptAccess.WRITE, EptAccess.FETCH
MEMORY_SIZE = 32 << 20
GPA = 0x12345000  # 4-KByte test page; PML4 index 0, PDPT 0, PD 0x91, PT 0x145
HPA = 0x00400000


def new_ept() -> EptBuilder:
    return EptBuilder(PhysicalMemory(MEMORY_SIZE))


def violation(
    ept: EptBuilder,
    gpa: int,
    access: EptAccess,
    *,
    eptp: int | None = None,
    guest_linear: int | None = None,
    paging_structure_access: bool = False,
) -> int:
    """The exit qualification of the EPT violation that the walk must raise."""
    with pytest.raises(EptViolation) as info:
        ept_walk(
            ept.memory, ept.eptp() if eptp is None else eptp, gpa, access,
            guest_linear=guest_linear, paging_structure_access=paging_structure_access,
        )
    assert info.value.guest_physical == gpa
    assert info.value.guest_linear == guest_linear
    return info.value.qualification


def misconfig(
    ept: EptBuilder, gpa: int, access: EptAccess = R, *, execute_only_supported: bool = True, huge_1g_supported: bool = True
) -> None:
    with pytest.raises(EptMisconfig) as info:
        ept_walk(
            ept.memory, ept.eptp(), gpa, access,
            execute_only_supported=execute_only_supported, huge_1g_supported=huge_1g_supported,
        )
    assert info.value.guest_physical == gpa


def table_bytes(ept: EptBuilder) -> bytes:
    return ept.memory.read(0x100000, 0x100000)


# --- translation (SDM 29.3.2) -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "gpa", "hpa", "level"),
    [(KIB4, GPA, HPA, 1), (MIB2, 0x40200000, 0x01000000, 2), (GIB1, 0x80000000, 0, 3)],
    ids=["4k", "2m", "1g"],
)
def test_translation_of_each_page_size(size: int, gpa: int, hpa: int, level: int) -> None:
    ept = new_ept()
    leaf = ept.map(gpa, hpa, size, perms=0b101, memtype=4)
    offset = size - 8
    t = ept_walk(ept.memory, ept.eptp(), gpa + offset, R)
    assert t == EptTranslation(
        hpa=hpa + offset, readable=True, writable=False, executable=True,
        page_size=size, leaf_address=leaf, dirty=True, memory_type=4,
    )
    assert leaf == ept.entry_address(gpa, level)


def test_walk_uses_only_bits_47_0_of_the_gpa() -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    assert ept_walk(ept.memory, ept.eptp(), (1 << 48) | GPA | 0x10, R).hpa == HPA | 0x10


def test_pte_bit_7_is_ignored() -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    ept.update_entry(GPA, 1, set_bits=VMX_EPT_LARGE_PAGE_BIT)
    assert ept_walk(ept.memory, ept.eptp(), GPA, R).page_size == KIB4


# --- EPT violations (SDM 29.3.3.2) and their exit qualification (Table 28-7) -----------------------
@pytest.mark.parametrize(("access", "qualification"), [(R, 0x1), (W, 0x2), (X, 0x4), (R | W, 0x3)])
def test_not_present_pml4e_reports_access_and_no_rights(access: EptAccess, qualification: int) -> None:
    assert violation(new_ept(), GPA, access) == qualification


@pytest.mark.parametrize("level", [1, 2, 3])
def test_not_present_entry_below_present_ones_gives_rwx_and_zero(level: int) -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    ept.set_entry(GPA, level, 0)
    assert violation(ept, GPA, W) == 0x2


def test_not_present_entry_is_never_a_misconfiguration() -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    ept.set_entry(GPA, 1, HPA | 7 << 3 | 1 << 45)  # bits 2:0 = 0: reserved bits don't matter
    assert violation(ept, GPA, R) == 0x1


@pytest.mark.parametrize(
    ("perms", "access", "qualification"),
    [
        (0b001, W, 0x02 | 0b001 << 3),
        (0b001, X, 0x04 | 0b001 << 3),
        (0b011, X, 0x04 | 0b011 << 3),
        (0b100, R, 0x01 | 0b100 << 3),
        (0b100, W, 0x02 | 0b100 << 3),
        (0b101, W, 0x02 | 0b101 << 3),
        (0b101, R | W, 0x03 | 0b101 << 3),
    ],
)
def test_present_but_not_permitted(perms: int, access: EptAccess, qualification: int) -> None:
    ept = new_ept()
    ept.map(GPA, HPA, perms=perms)
    assert violation(ept, GPA, access) == qualification


@pytest.mark.parametrize(("perms", "access"), [(0b001, R), (0b011, W), (0b011, R | W), (0b100, X), (0b111, X)])
def test_permitted_access_translates(perms: int, access: EptAccess) -> None:
    ept = new_ept()
    ept.map(GPA, HPA, perms=perms)
    assert ept_walk(ept.memory, ept.eptp(), GPA, access).hpa == HPA


@pytest.mark.parametrize("level", [2, 3, 4])
def test_rights_are_the_and_over_all_levels(level: int) -> None:
    ept = new_ept()
    ept.map(GPA, HPA, perms=0b111)
    ept.update_entry(GPA, level, clear_bits=0b010)  # R-X above a RWX leaf
    t = ept_walk(ept.memory, ept.eptp(), GPA, R)
    assert (t.readable, t.writable, t.executable) == (True, False, True)
    assert violation(ept, GPA, W) == 0x02 | 0b101 << 3
    ept.update_entry(GPA, 1, clear_bits=0b100)  # leaf RW-: the AND is R--
    assert violation(ept, GPA, X) == 0x04 | 0b001 << 3


def test_guest_linear_address_valid_sets_bits_7_and_8() -> None:
    ept = new_ept()
    ept.map(GPA, HPA, perms=0b001)
    assert violation(ept, GPA, W, guest_linear=0x7000) == 0x02 | 0b001 << 3 | 1 << 7 | 1 << 8
    assert violation(ept, GPA + 0x1000, R, guest_linear=0x7000) == 0x01 | 1 << 7 | 1 << 8


def test_violation_carries_the_guest_linear_address() -> None:
    ept = new_ept()
    with pytest.raises(EptViolation) as info:
        ept_walk(ept.memory, ept.eptp(), GPA, R, guest_linear=0xFFFF800000001000)
    assert info.value.guest_linear == 0xFFFF800000001000


def test_paging_structure_access_without_ad_is_a_read_with_bit_8_clear() -> None:
    ept = new_ept()
    ept.map(GPA, HPA, perms=0b001)
    t = ept_walk(ept.memory, ept.eptp(), GPA, R, guest_linear=0x7000, paging_structure_access=True)
    assert t.hpa == HPA
    q = violation(ept, GPA + 0x1000, R, guest_linear=0x7000, paging_structure_access=True)
    assert q == 0x01 | 1 << 7


@pytest.mark.parametrize("access", [R, W], ids=["walk", "guest-ad-update"])
def test_paging_structure_access_with_ad_is_a_write_setting_bits_0_and_1(access: EptAccess) -> None:
    # SDM 29.3.3.2 and Table 28-7 note: "If such an access causes an EPT violation, the
    # processor sets both bit 0 and bit 1 of the exit qualification."
    ept = new_ept()
    ept.map(GPA, HPA, perms=0b001)
    q = violation(ept, GPA, access, eptp=ept.eptp(ad=True), guest_linear=0x7000, paging_structure_access=True)
    assert q == 0x03 | 0b001 << 3 | 1 << 7
    assert ept.entry(GPA, 1) & (VMX_EPT_ACCESS_BIT | VMX_EPT_DIRTY_BIT) == 0


def test_paging_structure_access_with_ad_sets_the_dirty_flag() -> None:
    # SDM 29.3.5: accesses to guest paging structures are treated as writes.
    ept = new_ept()
    ept.map(GPA, HPA, perms=0b011)
    t = ept_walk(ept.memory, ept.eptp(ad=True), GPA, R, guest_linear=0x7000, paging_structure_access=True)
    assert t.dirty
    assert ept.entry(GPA, 1) & VMX_EPT_DIRTY_BIT


# --- EPT misconfigurations (SDM 29.3.3.1) -----------------------------------------------------------
@pytest.mark.parametrize("rwx", [0b010, 0b110], ids=["write-only", "write-execute"])
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_write_without_read_is_a_misconfiguration(rwx: int, level: int) -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    ept.update_entry(GPA, level, clear_bits=0b111, set_bits=rwx)
    misconfig(ept, GPA, W)


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_execute_only_is_a_misconfiguration_unless_supported(level: int) -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    ept.update_entry(GPA, level, clear_bits=0b011)
    misconfig(ept, GPA, X, execute_only_supported=False)
    assert ept_walk(ept.memory, ept.eptp(), GPA, X).executable
    assert violation(ept, GPA, R) == 0x01 | 0b100 << 3


@pytest.mark.parametrize("level", [1, 2, 3, 4])
@pytest.mark.parametrize("bit", [46, 51])
def test_bits_above_maxphyaddr_are_reserved(level: int, bit: int) -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    ept.update_entry(GPA, level, set_bits=1 << bit)
    misconfig(ept, GPA)
    if level == 1:  # the same bit is an address bit with a wider physical-address width
        assert ept_walk(ept.memory, ept.eptp(), GPA, R, maxphyaddr=52).hpa == HPA | 1 << bit


@pytest.mark.parametrize("bit", [3, 4, 5, 6, 7])
def test_pml4e_bits_7_3_are_reserved(bit: int) -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    ept.update_entry(GPA, 4, set_bits=1 << bit)
    misconfig(ept, GPA)


@pytest.mark.parametrize("level", [2, 3], ids=["pde", "pdpte"])
@pytest.mark.parametrize("bit", [3, 4, 5, 6])
def test_non_leaf_bits_6_3_are_reserved(level: int, bit: int) -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    ept.update_entry(GPA, level, set_bits=1 << bit)
    misconfig(ept, GPA)


def test_pdpte_bit_7_is_reserved_without_1g_pages() -> None:
    ept = new_ept()
    ept.map(0x80000000, 0, GIB1)
    misconfig(ept, 0x80000000, huge_1g_supported=False)
    assert ept_walk(ept.memory, ept.eptp(), 0x80000000, R).page_size == GIB1


@pytest.mark.parametrize("bit", [12, 20, 29])
def test_1g_leaf_bits_29_12_are_reserved(bit: int) -> None:
    ept = new_ept()
    ept.map(0x80000000, 0, GIB1)
    ept.update_entry(0x80000000, 3, set_bits=1 << bit)
    misconfig(ept, 0x80000000)


@pytest.mark.parametrize("bit", [12, 16, 20])
def test_2m_leaf_bits_20_12_are_reserved(bit: int) -> None:
    ept = new_ept()
    ept.map(0x40200000, 0x01000000, MIB2)
    ept.update_entry(0x40200000, 2, set_bits=1 << bit)
    misconfig(ept, 0x40200000)


@pytest.mark.parametrize("size", [KIB4, MIB2, GIB1])
@pytest.mark.parametrize("memtype", [2, 3, 7])
def test_reserved_leaf_memory_type_is_a_misconfiguration(size: int, memtype: int) -> None:
    ept = new_ept()
    gpa = {KIB4: GPA, MIB2: 0x40200000, GIB1: 0x80000000}[size]
    ept.map(gpa, {KIB4: HPA, MIB2: 0x01000000, GIB1: 0}[size], size, memtype=memtype)
    misconfig(ept, gpa)


@pytest.mark.parametrize("memtype", [0, 1, 4, 5, 6])
def test_valid_leaf_memory_types(memtype: int) -> None:
    ept = new_ept()
    ept.map(GPA, HPA, memtype=memtype)
    assert ept_walk(ept.memory, ept.eptp(), GPA, R).memory_type == memtype


def test_misconfiguration_is_found_before_the_permission_check() -> None:
    ept = new_ept()
    ept.map(GPA, HPA, memtype=7)
    ept.update_entry(GPA, 4, clear_bits=0b110)  # a write would also be a violation
    misconfig(ept, GPA, W)


def test_misconfiguration_above_a_not_present_entry_wins() -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    ept.update_entry(GPA, 3, set_bits=1 << 3)
    ept.set_entry(GPA, 1, 0)
    misconfig(ept, GPA)


# --- accessed and dirty flags (SDM 29.3.5) ------------------------------------------------------------
AD = VMX_EPT_ACCESS_BIT | VMX_EPT_DIRTY_BIT


def ad_bits(ept: EptBuilder, gpa: int) -> list[int]:
    return [ept.entry(gpa, level) & AD for level in (4, 3, 2, 1)]


def test_read_sets_accessed_flags_in_every_entry_when_enabled() -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    t = ept_walk(ept.memory, ept.eptp(ad=True), GPA, R)
    assert ad_bits(ept, GPA) == [VMX_EPT_ACCESS_BIT] * 4
    assert not t.dirty


def test_write_sets_the_dirty_flag_of_the_leaf_only() -> None:
    ept = new_ept()
    ept.map(0x40200000, 0x01000000, MIB2)
    t = ept_walk(ept.memory, ept.eptp(ad=True), 0x40200000, W)
    assert t.dirty
    assert [ept.entry(0x40200000, level) & AD for level in (4, 3, 2)] == [VMX_EPT_ACCESS_BIT] * 2 + [AD]


def test_no_flags_without_eptp_bit_6() -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    before = table_bytes(ept)
    t = ept_walk(ept.memory, ept.eptp(), GPA, W)
    assert t.dirty
    assert table_bytes(ept) == before


@pytest.mark.parametrize("access", [W, X])
def test_no_flags_on_a_faulting_walk(access: EptAccess) -> None:
    ept = new_ept()
    ept.map(GPA, HPA, perms=0b001)
    violation(ept, GPA, access, eptp=ept.eptp(ad=True))
    assert ad_bits(ept, GPA) == [0] * 4


def test_flags_already_set_are_not_rewritten(monkeypatch: pytest.MonkeyPatch) -> None:
    ept = new_ept()
    ept.map(GPA, HPA)
    eptp = ept.eptp(ad=True)
    ept_walk(ept.memory, eptp, GPA, W)
    writes: list[int] = []
    monkeypatch.setattr(ept.memory, "write64", lambda address, value: writes.append(address))
    assert ept_walk(ept.memory, eptp, GPA, W).dirty
    assert writes == []


# --- ept_lookup ---------------------------------------------------------------------------------------
def test_lookup_has_no_side_effects_and_ignores_permissions() -> None:
    ept = new_ept()
    ept.map(GPA, HPA, perms=0b100)
    before = table_bytes(ept)
    t = ept_lookup(ept.memory, ept.eptp(ad=True), GPA + 0x123)
    assert t is not None and t.hpa == HPA + 0x123 and not t.dirty and t.executable and not t.readable
    assert table_bytes(ept) == before


def test_lookup_gives_none_when_unmapped_or_misconfigured() -> None:
    ept = new_ept()
    ept.map(GPA, HPA, memtype=2)
    assert ept_lookup(ept.memory, ept.eptp(), GPA) is None
    assert ept_lookup(ept.memory, ept.eptp(), GPA + 0x1000) is None
    assert ept_lookup(ept.memory, ept.eptp(), 1 << 40) is None


# --- property: the walk agrees with a dict model ----------------------------------------------------
PAGES = st.builds(
    lambda pml4, pdpt, pd, pt: pml4 << 27 | pdpt << 18 | pd << 9 | pt,
    st.integers(0, 1), st.integers(0, 1), st.integers(0, 2), st.integers(0, 511),
)
PERMS = st.sampled_from([0b000, 0b001, 0b011, 0b100, 0b101, 0b111])
ACCESSES = st.sampled_from([R, W, X])


@given(
    mappings=st.dictionaries(PAGES, st.tuples(st.integers(0, MEMORY_SIZE // KIB4 - 1), PERMS), max_size=24),
    probes=st.lists(st.tuples(PAGES, st.integers(0, KIB4 - 1), ACCESSES), min_size=1, max_size=20),
    ad=st.booleans(),
)
def test_walk_agrees_with_a_dict_model(
    mappings: dict[int, tuple[int, int]], probes: list[tuple[int, int, EptAccess]], ad: bool
) -> None:
    ept = new_ept()
    for page, (frame, perms) in mappings.items():
        ept.map(page * KIB4, frame * KIB4, perms=perms)
    eptp = ept.eptp(ad=ad)
    probes += [(page, 8, R) for page in mappings]
    for page, offset, access in probes:
        gpa = page * KIB4 + offset
        frame, perms = mappings.get(page, (0, 0b000))
        if perms & access:
            t = ept_walk(ept.memory, eptp, gpa, access)
            assert t.hpa == frame * KIB4 + offset
            assert (t.readable, t.writable, t.executable) == (bool(perms & 1), bool(perms & 2), bool(perms & 4))
            assert t.dirty == (not ad or bool(ept.entry(gpa, 1) & VMX_EPT_DIRTY_BIT))
        else:
            with pytest.raises(EptViolation) as info:
                ept_walk(ept.memory, eptp, gpa, access)
            assert info.value.qualification == int(access) | perms << 3
