"""KVM_SET_USER_MEMORY_REGION semantics (pyvmx.kvm.memslots, after virt/kvm/kvm_main.c): one test
per rule and errno, the two-phase update with the INVALID slot visible in between, generations,
the dirty log; and a Hypothesis state machine against a plain model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pyvmx.kvm.memslots import (
    KVM_ADDRESS_SPACE_NUM,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
    KVM_MEMSLOT_INVALID,
    KVM_USER_MEM_SLOTS,
    PAGE_SHIFT,
    PAGE_SIZE,
    MemorySlot,
    MemslotChange,
    MemslotError,
    MemslotPhase,
    Memslots,
)

HVA = 0x7F00_0000_0000
MIB = 1 << 20
LOG, RO = KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
Event = tuple[str, str, MemorySlot | None, MemorySlot | None]


def recorded(slots: Memslots) -> list[Event]:
    events: list[Event] = []
    slots.add_listener(lambda phase, change, old, new: events.append((phase, change, old, new)))
    return events


def refused(slots: Memslots, errno: str, *args: int) -> MemslotError:
    before = list(slots)
    generation = slots.generation
    with pytest.raises(MemslotError) as info:
        slots.set_user_memory_region(*args)
    assert info.value.errno == errno, str(info.value)
    assert list(slots) == before and slots.generation == generation  # a refusal changes nothing
    return info.value


# --- the checks, one per rule -----------------------------------------------------------------------
@pytest.mark.parametrize("flags", [1 << 2, KVM_MEMSLOT_INVALID, 1 << 31])
def test_unknown_flags_are_einval(flags: int) -> None:
    refused(Memslots(), "EINVAL", 0, flags, 0, MIB, HVA)


def test_slot_ids_stop_below_kvm_user_mem_slots() -> None:
    slots = Memslots()
    refused(slots, "EINVAL", KVM_USER_MEM_SLOTS, 0, 0, MIB, HVA)
    refused(slots, "EINVAL", 0xFFFF, 0, 0, MIB, HVA)
    slots.set_user_memory_region(KVM_USER_MEM_SLOTS - 1, 0, 0, MIB, HVA)
    assert KVM_USER_MEM_SLOTS == 32764


def test_address_spaces_stop_below_kvm_address_space_num() -> None:
    slots = Memslots()
    refused(slots, "EINVAL", KVM_ADDRESS_SPACE_NUM << 16, 0, 0, MIB, HVA)
    slots.set_user_memory_region(1 << 16 | 5, 0, 0, MIB, HVA)  # SMM address space
    smm = slots.get(1 << 16 | 5)
    assert smm is not None and (smm.as_id, smm.id) == (1, 5)
    assert slots.gfn_to_memslot(0, as_id=1) is smm and slots.gfn_to_memslot(0) is None


@pytest.mark.parametrize(
    ("gpa", "size", "hva", "rule"),
    [
        (0, MIB + 1, HVA, "memory_size"),
        (0x800, MIB, HVA, "guest_phys_addr"),
        (0, MIB, HVA + 8, "userspace_addr"),
    ],
    ids=["size", "gpa", "hva"],
)
def test_misalignment_is_einval(gpa: int, size: int, hva: int, rule: str) -> None:
    error = refused(Memslots(), "EINVAL", 0, 0, gpa, size, hva)
    assert rule in str(error)


def test_userspace_range_beyond_user_space_is_einval() -> None:
    refused(Memslots(), "EINVAL", 0, 0, 0, 2 * MIB, (1 << 47) - MIB)


def test_gpa_plus_size_wrapping_is_einval() -> None:
    refused(Memslots(), "EINVAL", 0, 0, (1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE, HVA)


def test_more_than_kvm_mem_max_nr_pages_is_einval() -> None:
    refused(Memslots(), "EINVAL", 0, 0, 0, (KVM_MEM_MAX_NR_PAGES + 1) << PAGE_SHIFT, 0x1000)


def test_gfn_beyond_the_mmu_is_einval() -> None:
    slots = Memslots(max_gpa_bits=36)
    refused(slots, "EINVAL", 0, 0, (1 << 36) - PAGE_SIZE, 2 * PAGE_SIZE, HVA)
    slots.set_user_memory_region(0, 0, (1 << 36) - PAGE_SIZE, PAGE_SIZE, HVA)


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_values_outside_their_fields_are_einval(value: int) -> None:
    refused(Memslots(), "EINVAL", 0, 0, value & ~0xFFF, MIB, HVA)
    refused(Memslots(), "EINVAL", value, 0, 0, MIB, HVA)


def test_deleting_a_slot_that_does_not_exist_is_einval() -> None:
    error = refused(Memslots(), "EINVAL", 3, 0, 0, 0, 0)
    assert "does not exist" in str(error)


@pytest.mark.parametrize(
    ("flags", "size", "hva", "what"),
    [(0, MIB, HVA + MIB, "userspace_addr"), (0, 2 * MIB, HVA, "memory_size"), (RO, MIB, HVA, "READONLY")],
    ids=["hva", "size", "readonly"],
)
def test_changing_an_existing_slot_other_than_move_or_flags_is_einval(flags: int, size: int, hva: int, what: str) -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, 0, 0, MIB, HVA)
    error = refused(slots, "EINVAL", 0, flags, 0, size, hva)
    assert what in str(error)


def test_readonly_cannot_be_dropped_either() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, RO, 0, MIB, HVA)
    refused(slots, "EINVAL", 0, 0, 0, MIB, HVA)


@pytest.mark.parametrize(
    "gpa", [MIB, MIB // 2, MIB + MIB // 2, 2 * MIB - PAGE_SIZE], ids=["same", "head", "tail", "last-page"]
)
def test_create_overlapping_another_slot_is_eexist(gpa: int) -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, 0, MIB, MIB, HVA)
    error = refused(slots, "EEXIST", 1, 0, gpa, MIB, HVA + 4 * MIB)
    assert "overlaps slot 0:0" in str(error)


def test_a_slot_covering_another_is_eexist() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, 0, MIB, PAGE_SIZE, HVA)
    refused(slots, "EEXIST", 1, 0, 0, 4 * MIB, HVA + 4 * MIB)


def test_adjacent_slots_and_other_address_spaces_do_not_overlap() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, 0, MIB, MIB, HVA)
    slots.set_user_memory_region(1, 0, 0, MIB, HVA + MIB)
    slots.set_user_memory_region(2, 0, 2 * MIB, MIB, HVA + 2 * MIB)
    slots.set_user_memory_region(1 << 16, 0, MIB, MIB, HVA)  # same gfns, SMM address space
    assert len(slots) == 4


def test_move_onto_another_slot_is_eexist_but_onto_itself_is_fine() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, 0, 0, 2 * MIB, HVA)
    slots.set_user_memory_region(1, 0, 4 * MIB, MIB, HVA + 4 * MIB)
    refused(slots, "EEXIST", 1, 0, MIB, MIB, HVA + 4 * MIB)
    slots.set_user_memory_region(0, 0, MIB, 2 * MIB, HVA)  # overlaps only its old self
    moved = slots.get(0)
    assert moved is not None and moved.base_gfn == MIB >> PAGE_SHIFT


def test_repeating_a_slot_exactly_changes_nothing() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, LOG, 0, MIB, HVA)
    events = recorded(slots)
    generation, as_generation = slots.generation, slots.memslots_generation(0)
    slots.set_user_memory_region(0, LOG, 0, MIB, HVA)
    assert events == [] and slots.generation == generation and slots.memslots_generation(0) == as_generation


# --- create, move, flags-only, delete --------------------------------------------------------------
def test_create_then_lookups() -> None:
    slots = Memslots()
    events = recorded(slots)
    slots.set_user_memory_region(2, RO, 0x100000, 0x20000, HVA)
    slot = slots.get(2)
    assert slot == MemorySlot(2, 0, 0x100, 0x20, HVA, RO, None)
    assert slot.readonly and not slot.invalid and not slot.dirty_logging
    assert slot.end_gfn == 0x120 and slot.contains(0x11F) and not slot.contains(0x120)
    assert slot.gfn_to_hva(0x105) == HVA + 0x5000
    assert slots.gfn_to_memslot(0x100) is slot and slots.gfn_to_memslot(0x11F) is slot
    assert slots.gfn_to_memslot(0xFF) is None and slots.gfn_to_memslot(0x120) is None
    assert list(slots) == [slot]
    assert events == [("prepare", "create", None, slot), ("commit", "create", None, slot)]


def test_move_changes_only_the_gfns() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, 0, 0, MIB, HVA)
    old = slots.get(0)
    events = recorded(slots)
    slots.set_user_memory_region(0, 0, 8 * MIB, MIB, HVA)
    new = slots.get(0)
    assert new is not None and new.base_gfn == 0x800 and new.userspace_addr == HVA
    assert slots.gfn_to_memslot(0) is None and slots.gfn_to_memslot(0x800) is new
    assert events == [("prepare", "move", old, new), ("commit", "move", old, new)]


def test_delete_removes_the_slot() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, 0, 0, MIB, HVA)
    old = slots.get(0)
    events = recorded(slots)
    slots.set_user_memory_region(0, 0, 0x1234000, 0, 0)  # gpa and hva are ignored
    assert slots.get(0) is None and slots.gfn_to_memslot(0) is None and len(slots) == 0
    assert events == [("prepare", "delete", old, None), ("commit", "delete", old, None)]
    slots.set_user_memory_region(0, 0, 0, MIB, HVA + MIB)  # the id can be reused, anyhow


def fault_probe(slots: Memslots, *gfns: int) -> dict[str, list[MemorySlot | None]]:
    """What a vCPU faulting on ``gfns`` finds in each phase of the next updates."""
    seen: dict[str, list[MemorySlot | None]] = {}
    slots.add_listener(lambda phase, change, old, new: seen.update({phase: [slots.gfn_to_memslot(g) for g in gfns]}))
    return seen


def test_move_shows_the_invalid_old_slot_during_prepare() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, 0, 0, MIB, HVA)
    old = slots.get(0)
    seen = fault_probe(slots, 0x10, 0x810)
    slots.set_user_memory_region(0, 0, 8 * MIB, MIB, HVA)  # MOVE to gfn 0x800
    at_old, at_new = seen["prepare"]
    assert at_old is not None and at_old.invalid and at_old.flags == KVM_MEMSLOT_INVALID
    assert at_old.base_gfn == 0 and at_old.userspace_addr == HVA
    assert old is not None and not old.invalid  # the old object itself is untouched
    assert at_new is None  # the new place is not visible before the commit
    at_old, at_new = seen["commit"]
    assert at_old is None and at_new is slots.get(0) and at_new is not None and not at_new.invalid


def test_delete_shows_the_invalid_slot_during_prepare() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, LOG, 0, MIB, HVA)
    slots.set_user_memory_region(1, 0, 4 * MIB, MIB, HVA + MIB)
    seen = fault_probe(slots, 0x10, 0x410)
    slots.set_user_memory_region(0, 0, 0, 0, 0)
    during, other = seen["prepare"]
    assert during is not None and during.invalid and during.flags == LOG | KVM_MEMSLOT_INVALID
    assert other is slots.get(1)  # other slots are unaffected
    assert seen["commit"] == [None, slots.get(1)]


def test_create_and_flags_only_show_no_invalid_slot() -> None:
    slots = Memslots()
    found: list[MemorySlot | None] = []
    slots.add_listener(lambda phase, change, old, new: found.append(slots.gfn_to_memslot(0)))
    slots.set_user_memory_region(0, 0, 0, MIB, HVA)
    slots.set_user_memory_region(0, LOG, 0, MIB, HVA)
    assert found[0] is None  # create, prepare: not there yet
    assert found[1] is not None and found[1].flags == 0  # create, commit
    assert found[2] is not None and found[2].flags == 0  # flags-only, prepare: old flags, valid
    assert found[3] is not None and found[3].flags == LOG


def test_a_listener_failing_in_prepare_restores_the_old_slot() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, 0, 0, MIB, HVA)
    old = slots.get(0)

    def refuse(phase: str, change: str, old: MemorySlot | None, new: MemorySlot | None) -> None:
        if phase == "prepare":
            raise OSError("arch prepare failed")

    slots.add_listener(refuse)
    with pytest.raises(OSError):
        slots.set_user_memory_region(0, 0, 0, 0, 0)
    assert slots.get(0) is old and slots.gfn_to_memslot(0) is old
    assert slots.generation == 1 and not slots.generation_in_progress


def test_updates_from_inside_a_listener_are_refused() -> None:
    slots = Memslots()
    slots.add_listener(lambda phase, change, old, new: slots.set_user_memory_region(9, 0, 64 * MIB, MIB, HVA))
    with pytest.raises(RuntimeError):
        slots.set_user_memory_region(0, 0, 0, MIB, HVA)
    assert len(slots) == 0


def test_phases_and_changes_are_strings() -> None:
    assert [str(p) for p in MemslotPhase] == ["prepare", "commit"]
    assert [str(c) for c in MemslotChange] == ["create", "delete", "move", "flags_only"]
    assert isinstance(MemslotChange.MOVE, str)


# --- generations -----------------------------------------------------------------------------------
def test_generation_counts_completed_updates_and_is_in_progress_between_phases() -> None:
    slots = Memslots()
    states: list[tuple[str, int, bool]] = []
    slots.add_listener(lambda phase, change, old, new: states.append((phase, slots.generation, slots.generation_in_progress)))
    assert slots.generation == 0 and not slots.generation_in_progress
    slots.set_user_memory_region(0, 0, 0, MIB, HVA)
    slots.set_user_memory_region(0, 0, MIB, MIB, HVA)
    refused(slots, "EINVAL", 5, 0, 0, 0, 0)
    slots.set_user_memory_region(0, 0, 0, 0, 0)
    assert states == [
        ("prepare", 0, True), ("commit", 1, False),
        ("prepare", 1, True), ("commit", 2, False),
        ("prepare", 2, True), ("commit", 3, False),
    ]


def test_per_address_space_generation_follows_linux() -> None:
    slots = Memslots()
    assert (slots.memslots_generation(0), slots.memslots_generation(1)) == (0, 1)
    during: list[int] = []
    slots.add_listener(lambda phase, change, old, new: during.append(slots.memslots_generation(0)))
    slots.set_user_memory_region(0, 0, 0, MIB, HVA)  # CREATE: one swap
    assert slots.memslots_generation(0) == 2
    slots.set_user_memory_region(0, LOG, 0, MIB, HVA)  # FLAGS_ONLY: one swap
    assert slots.memslots_generation(0) == 4
    slots.set_user_memory_region(0, LOG, MIB, MIB, HVA)  # MOVE: invalidate, then activate
    assert slots.memslots_generation(0) == 8
    slots.set_user_memory_region(0, 0, 0, 0, 0)  # DELETE: likewise
    assert slots.memslots_generation(0) == 12
    assert slots.memslots_generation(1) == 1  # untouched
    bit = KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
    assert during == [bit | 0, 2, bit | 2, 4, bit | 6, 8, bit | 10, 12]
    slots.set_user_memory_region(1 << 16, 0, 0, MIB, HVA)
    assert slots.memslots_generation(1) == 3 and slots.memslots_generation(0) == 12


# --- dirty logging ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("npages", "nbytes"), [(1, 8), (64, 8), (65, 16), (128, 16), (129, 24)])
def test_dirty_bitmap_is_long_aligned(npages: int, nbytes: int) -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, LOG, 0, npages * PAGE_SIZE, HVA)
    slot = slots.get(0)
    assert slot is not None and slot.dirty_bitmap == bytearray(nbytes)
    assert slots.get_dirty_log(0) == bytes(nbytes)


def test_get_dirty_log_layout_and_clearing() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, LOG, 0x100 << PAGE_SHIFT, 100 * PAGE_SIZE, HVA)
    slot = slots.get(0)
    reprotected: list[tuple[int, int]] = []
    slots.add_reprotect_listener(lambda s, offset, mask: reprotected.append((offset, mask)))
    for gfn in (0x100, 0x107, 0x108, 0x100 + 64, 0x100 + 99):
        slots.mark_page_dirty(slot, gfn)
    slots.mark_gfn_dirty(0x101)
    assert slot is not None and slot.test_dirty(0x107) and not slot.test_dirty(0x109)
    log = slots.get_dirty_log(0)
    assert len(log) == 16
    assert log[0] == 0b1000_0011 and log[1] == 0b1  # pages 0, 1, 7 | 8
    assert log[8] == 0b1 and log[12] == 1 << 3  # page 64 | page 99 = bit 35 of word 1
    assert sum(bin(b).count("1") for b in log) == 6
    assert reprotected == [(0, 0b1_1000_0011), (64, 1 | 1 << 35)]
    assert slots.get_dirty_log(0) == bytes(16)  # read and cleared


def test_mark_page_dirty_without_logging_or_slot_is_a_no_op() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, 0, 0, MIB, HVA)
    slots.mark_page_dirty(slots.get(0), 3)
    slots.mark_page_dirty(None, 3)
    slots.mark_gfn_dirty(1 << 30)
    with pytest.raises(MemslotError) as info:
        slots.get_dirty_log(0)
    assert info.value.errno == "ENOENT"


def test_mark_page_dirty_outside_the_slot_is_a_bug() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, LOG, 0, MIB, HVA)
    with pytest.raises(ValueError):
        slots.mark_page_dirty(slots.get(0), 256)


@pytest.mark.parametrize(("slot_id", "errno"), [(4, "ENOENT"), (KVM_USER_MEM_SLOTS, "EINVAL"), (2 << 16, "EINVAL")])
def test_get_dirty_log_errors(slot_id: int, errno: str) -> None:
    with pytest.raises(MemslotError) as info:
        Memslots().get_dirty_log(slot_id)
    assert info.value.errno == errno


def test_toggling_dirty_logging_allocates_and_frees_the_bitmap() -> None:
    slots = Memslots()
    events = recorded(slots)
    slots.set_user_memory_region(0, 0, 0, MIB, HVA)
    slots.set_user_memory_region(0, LOG, 0, MIB, HVA)
    on = slots.get(0)
    assert on is not None and on.dirty_bitmap == bytearray(32)
    slots.mark_page_dirty(on, 5)
    slots.set_user_memory_region(0, 0, 0, MIB, HVA)
    off = slots.get(0)
    assert off is not None and off.dirty_bitmap is None
    assert [(phase, change) for phase, change, _, _ in events][2:] == [
        ("prepare", "flags_only"), ("commit", "flags_only"), ("prepare", "flags_only"), ("commit", "flags_only"),
    ]
    slots.set_user_memory_region(0, LOG, 0, MIB, HVA)
    assert slots.get_dirty_log(0) == bytes(32)  # a fresh bitmap


def test_move_keeps_the_dirty_bitmap() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, LOG, 0, MIB, HVA)
    slots.mark_gfn_dirty(3)
    slots.set_user_memory_region(0, LOG, 4 * MIB, MIB, HVA)
    assert slots.get_dirty_log(0)[0] == 1 << 3


def test_manual_protect_get_does_not_clear_and_clear_dirty_log_does() -> None:
    slots = Memslots(manual_dirty_log_protect=True)
    slots.set_user_memory_region(0, LOG, 0, 200 * PAGE_SIZE, HVA)
    reprotected: list[tuple[int, int]] = []
    slots.add_reprotect_listener(lambda s, offset, mask: reprotected.append((offset, mask)))
    for gfn in (1, 2, 70, 199):
        slots.mark_gfn_dirty(gfn)
    assert slots.get_dirty_log(0) == slots.get_dirty_log(0)
    assert reprotected == []
    slots.clear_dirty_log(0, 0, 64, (0b110 | 1 << 40).to_bytes(8, "little"))  # clear 1, 2 (40 is clean)
    assert reprotected == [(0, 0b110)]
    slots.clear_dirty_log(0, 64, 136, (1 << 6).to_bytes(8, "little") + bytes(8) + (1 << 7).to_bytes(8, "little"))
    assert reprotected == [(0, 0b110), (64, 1 << 6), (192, 1 << 7)]
    assert slots.get_dirty_log(0) == bytes(32)


def test_dirty_log_initially_set() -> None:
    slots = Memslots(manual_dirty_log_protect=True, dirty_log_initially_set=True)
    slots.set_user_memory_region(0, LOG, 0, 70 * PAGE_SIZE, HVA)
    log = slots.get_dirty_log(0)
    assert int.from_bytes(log, "little") == (1 << 70) - 1


@pytest.mark.parametrize(
    ("first", "num", "bitmap_len", "errno"),
    [
        (1, 63, 8, "EINVAL"),  # first_page not a multiple of 64
        (0, 201, 32, "EINVAL"),  # past the end of the slot
        (256, 0, 0, "EINVAL"),  # first_page past the end
        (0, 100, 16, "EINVAL"),  # not a multiple of 64 and short of the end
        (0, 200, 24, "EFAULT"),  # bitmap shorter than the range
    ],
)
def test_clear_dirty_log_errors(first: int, num: int, bitmap_len: int, errno: str) -> None:
    slots = Memslots(manual_dirty_log_protect=True)
    slots.set_user_memory_region(0, LOG, 0, 200 * PAGE_SIZE, HVA)
    with pytest.raises(MemslotError) as info:
        slots.clear_dirty_log(0, first, num, bytes(bitmap_len))
    assert info.value.errno == errno


def test_slots_in_hva_range_gives_the_gfns_an_mmu_notifier_hits() -> None:
    slots = Memslots()
    slots.set_user_memory_region(0, 0, 0x100 << PAGE_SHIFT, 16 * PAGE_SIZE, HVA)
    slots.set_user_memory_region(1 << 16, 0, 0, 16 * PAGE_SIZE, HVA + 8 * PAGE_SIZE)
    hits = slots.slots_in_hva_range(HVA + 10 * PAGE_SIZE, HVA + 10 * PAGE_SIZE + 1)
    assert [(s.slot, start, end) for s, start, end in hits] == [(0, 0x10A, 0x10B), (1 << 16, 2, 3)]
    assert slots.slots_in_hva_range(HVA - PAGE_SIZE, HVA) == []


# --- the state machine -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSlot:
    base_gfn: int
    npages: int
    hva: int
    flags: int


SLOT_NUMBERS = st.sampled_from([0, 1, 2, 3, 1 << 16, 1 << 16 | 1])
BASES = st.integers(0, 48)
SIZES = st.integers(1, 16)
HVAS = st.sampled_from([HVA, HVA + MIB, HVA + 2 * MIB])
FLAGS = st.sampled_from([0, LOG, RO, LOG | RO])


class MemslotMachine(RuleBasedStateMachine):
    """Random creates, moves, deletes, flag toggles and lookups; after each, the slots must equal
    a dict model and the generation must count exactly the successful changes."""

    def __init__(self) -> None:
        super().__init__()
        self.slots = Memslots()
        self.model: dict[int, ModelSlot] = {}
        self.changes = 0
        self.listener_calls: list[tuple[str, str]] = []
        self.slots.add_listener(lambda phase, change, old, new: self.listener_calls.append((phase, change)))

    # The model's own reading of the rules.
    def expected(self, slot: int, base: int, npages: int, hva: int, flags: int) -> tuple[str | None, str | None]:
        """(errno, change) -- one of them None."""
        old = self.model.get(slot)
        if npages == 0:
            return (None, "delete") if old else ("EINVAL", None)
        if old is not None:
            if hva != old.hva or npages != old.npages or (flags ^ old.flags) & RO:
                return "EINVAL", None
            if base == old.base_gfn:
                return (None, "flags_only") if flags != old.flags else (None, None)
        for number, other in self.model.items():
            if number != slot and number >> 16 == slot >> 16:
                if other.base_gfn < base + npages and base < other.base_gfn + other.npages:
                    return "EEXIST", None
        return None, "create" if old is None else "move"

    def apply(self, slot: int, base: int, npages: int, hva: int, flags: int) -> None:
        errno, change = self.expected(slot, base, npages, hva, flags)
        self.listener_calls.clear()
        try:
            self.slots.set_user_memory_region(slot, flags, base << PAGE_SHIFT, npages << PAGE_SHIFT, hva)
        except MemslotError as error:
            assert error.errno == errno, (error, errno)
            assert self.listener_calls == []
            return
        assert errno is None, f"expected {errno}"
        if change is None:
            assert self.listener_calls == []
            return
        assert self.listener_calls == [("prepare", change), ("commit", change)]
        self.changes += 1
        if change == "delete":
            del self.model[slot]
        else:
            self.model[slot] = ModelSlot(base, npages, hva, flags)

    @rule(slot=SLOT_NUMBERS, base=BASES, npages=SIZES, hva=HVAS, flags=FLAGS)
    def create(self, slot: int, base: int, npages: int, hva: int, flags: int) -> None:
        self.apply(slot, base, npages, hva, flags)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), base=BASES)
    def move(self, data: st.DataObject, base: int) -> None:
        slot = data.draw(st.sampled_from(sorted(self.model)))
        old = self.model[slot]
        self.apply(slot, base, old.npages, old.hva, old.flags)

    @rule(slot=SLOT_NUMBERS)
    def delete(self, slot: int) -> None:
        self.apply(slot, 0, 0, 0, 0)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def toggle_dirty_logging(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.model)))
        old = self.model[slot]
        self.apply(slot, old.base_gfn, old.npages, old.hva, old.flags ^ LOG)

    @rule(as_id=st.sampled_from([0, 1]), gfn=st.integers(0, 70))
    def lookup(self, as_id: int, gfn: int) -> None:
        found = self.slots.gfn_to_memslot(gfn, as_id)
        expected = [
            number for number, s in self.model.items()
            if number >> 16 == as_id and s.base_gfn <= gfn < s.base_gfn + s.npages
        ]
        assert len(expected) <= 1
        if expected:
            assert found is not None and found.slot == expected[0] and not found.invalid
        else:
            assert found is None

    @invariant()
    def slots_match_the_model(self) -> None:
        actual = {
            s.slot: ModelSlot(s.base_gfn, s.npages, s.userspace_addr, s.flags) for s in self.slots
        }
        assert actual == self.model
        for s in self.slots:
            assert s.dirty_logging == bool(s.flags & LOG)
            if s.dirty_bitmap is not None:
                assert len(s.dirty_bitmap) == -(-s.npages // 64) * 8

    @invariant()
    def no_two_slots_of_an_address_space_overlap(self) -> None:
        for as_id in range(KVM_ADDRESS_SPACE_NUM):
            ranges = sorted((s.base_gfn, s.end_gfn) for s in self.slots if s.as_id == as_id)
            for (_, end), (start, _) in zip(ranges, ranges[1:]):
                assert end <= start

    @invariant()
    def generation_counts_the_changes(self) -> None:
        assert self.slots.generation == self.changes
        assert not self.slots.generation_in_progress
        for as_id in range(KVM_ADDRESS_SPACE_NUM):
            generation = self.slots.memslots_generation(as_id)
            assert not generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
            assert generation % KVM_ADDRESS_SPACE_NUM == as_id


MemslotMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestMemslotMachine = MemslotMachine.TestCase
