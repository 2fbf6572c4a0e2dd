"""Hypothesis properties of the MMU (no CPU engine):

* the EPT tables it builds, walked by the machine (pyvmx.vmx.ept.ept_lookup), agree with a plain
  dict model gfn -> (hpa, writable, page size) over random sequences of faults, range zaps,
  host invalidations (MMU notifiers) and full zaps;
* a memslot state machine (creates, moves, deletes, flag changes, faults, dirty-log reads)
  keeps its invariants: no overlapping slots, a generation that only grows, and EPT
  reachability equal to the slots' contents (every leaf maps the page its slot names, with no
  more rights than the slot and the dirty log allow; every faulted gfn of a slot is reachable).

Linux: arch/x86/kvm/mmu/tdp_mmu.c (kvm_tdp_mmu_map(), tdp_mmu_zap_leafs(),
kvm_tdp_mmu_unmap_gfn_range()), mmu.c (kvm_mmu_hugepage_adjust()), virt/kvm/kvm_main.c
(kvm_set_memslot(), kvm_mmu_notifier_invalidate_range_start()).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pyvmx.kvm.host_mm import HPAGE_SIZE
from pyvmx.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, MemorySlot, MemslotError
from pyvmx.kvm.mmu import RetPf
from pyvmx.kvm.mmu.page_fault import PFERR_FETCH_MASK, PFERR_PRESENT_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK
from pyvmx.kvm.mmu.spte import get_mmio_spte_generation, is_writable_pte

from tests.kvm.mmu.harness import KIB4, MmuEnv
from tests.kvm.mmu.strategies import SLOT_GFN_SPACE, fault_kinds, gfns, slot_geometry

ERROR_CODES = {"read": PFERR_USER_MASK, "write": PFERR_WRITE_MASK, "fetch": PFERR_FETCH_MASK}


def error_code(env: MmuEnv, gfn: int, kind: str) -> int:
    """The error code the processor would report: PRESENT when the EPT has the page."""
    code = ERROR_CODES[kind]
    return code | PFERR_PRESENT_MASK if env.walk(gfn << 12) is not None else code


def host_pfn(env: MmuEnv, slot: MemorySlot, gfn: int) -> int:
    result = env.host_mm.get_user_page(slot.gfn_to_hva(gfn), False)
    assert isinstance(result, int)
    return result


# --- the dict model ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mapping:
    hpa: int
    writable: bool
    base_gfn: int  # first gfn of the leaf
    pages: int  # 1 or 512


def build_slots(env: MmuEnv, geometries: list[tuple[int, int, int, bool, bool]]) -> list[MemorySlot]:
    slots: list[MemorySlot] = []
    for n, (base, npages, offset, thp, readonly) in enumerate(geometries):
        end = base + npages
        if any(s.base_gfn < end and base < s.end_gfn for s in slots):
            continue
        env.add_slot(n, base << 12, npages << 12, huge=thp, offset=offset << 12, flags=KVM_MEM_READONLY if readonly else 0)
        slot = env.memslots.get(n)
        assert slot is not None
        slots.append(slot)
    return slots


class DictModel:
    """What the EPT should contain, updated by rules that restate KVM's: a fault maps the gfn
    (a whole 2M block when the slot and host allow it), a zap removes every leaf that meets
    the range, a host invalidation zaps the gfns backed by the invalidated host range."""

    def __init__(self, env: MmuEnv) -> None:
        self.env = env
        self.map: dict[int, Mapping] = {}

    def drop(self, start: int, end: int) -> None:
        leaves = {m.base_gfn: m.pages for g, m in self.map.items() if start <= g < end}
        for base, pages in leaves.items():
            for gfn in range(base, base + pages):
                self.map.pop(gfn, None)

    def fault(self, gfn: int, kind: str) -> None:
        env = self.env
        slot = env.memslots.gfn_to_memslot(gfn)
        outcome = env.mmu.page_fault(gfn << 12, error_code(env, gfn, kind))
        if slot is None:
            assert outcome.result is RetPf.EMULATE and outcome.mmio
            return
        if slot.readonly and kind == "write":
            assert outcome.result is RetPf.EMULATE and outcome.mmio
            return
        assert outcome.result in (RetPf.FIXED, RetPf.SPURIOUS), outcome
        if gfn in self.map and self.map[gfn].pages == 512 or outcome.result is RetPf.SPURIOUS:
            assert gfn in self.map
            return
        block = gfn & ~511
        hva = slot.gfn_to_hva(gfn)
        huge = (
            slot.base_gfn <= block
            and block + 512 <= slot.end_gfn
            and (slot.base_gfn - (slot.userspace_addr >> 12)) % 512 == 0
            and env.host_mm.mapping_level(hva) == HPAGE_SIZE
        )
        if huge:
            self.drop(block, block + 512)
            first = host_pfn(env, slot, block) << 12
            for n in range(512):
                self.map[block + n] = Mapping(first + n * KIB4, not slot.readonly, block, 512)
        else:
            self.map[gfn] = Mapping(host_pfn(env, slot, gfn) << 12, not slot.readonly, gfn, 1)

    def host_invalidate(self, gfn: int) -> None:
        """Swap the host page of ``gfn`` out (a THP it is part of is split first: the whole
        2M host block is invalidated)."""
        env = self.env
        slot = env.memslots.gfn_to_memslot(gfn)
        if slot is None:
            return
        hva = slot.gfn_to_hva(gfn)
        if not env.host_mm.is_resident(hva):
            return
        if env.host_mm.mapping_level(hva) == HPAGE_SIZE:
            start, end = hva & ~(HPAGE_SIZE - 1), (hva & ~(HPAGE_SIZE - 1)) + HPAGE_SIZE
        else:
            start, end = hva, hva + KIB4
        for other in env.memslots:
            lo = max(start, other.userspace_addr)
            hi = min(end, other.userspace_addr + (other.npages << 12))
            if lo < hi:
                self.drop(other.hva_to_gfn(lo), other.hva_to_gfn(hi - 1) + 1)
        env.host_mm.swap_out(hva, KIB4)

    def check(self, probes: list[int]) -> None:
        env = self.env
        for gfn in sorted(set(probes) | set(self.map)):
            t = env.walk(gfn << 12)
            m = self.map.get(gfn)
            if m is None:
                assert t is None, f"gfn {gfn:#x} is mapped but the model has nothing"
                continue
            assert t is not None, f"gfn {gfn:#x} should map {m}"
            assert t.hpa == m.hpa, f"gfn {gfn:#x}: {t.hpa:#x} != {m.hpa:#x}"
            assert t.writable == m.writable and t.readable and t.executable
            assert t.page_size == m.pages * KIB4
        stats = env.mmu.stats
        leaves = [leaf for leaf in env.mmu.leaves() if not leaf.mmio]
        assert stats["pages_4k"] == sum(1 for leaf in leaves if leaf.level == 1)
        assert stats["pages_2m"] == sum(1 for leaf in leaves if leaf.level == 2)
        assert sum(leaf.pages for leaf in leaves) == len(self.map)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("fault"), gfns(), fault_kinds()),
        st.tuples(st.just("fault_in_slot"), st.integers(0, 2**20), fault_kinds()),
        st.tuples(st.just("fault_in_slot"), st.integers(0, 2**20), fault_kinds()),
        st.tuples(st.just("zap"), gfns(), st.integers(1, 1500)),
        st.tuples(st.just("host"), gfns(), st.just(0)),
        st.tuples(st.just("zap_all"), st.just(0), st.just(0)),
    ),
    max_size=40,
)
slot_layouts = st.lists(
    st.tuples(slot_geometry(), st.booleans(), st.sampled_from((False, False, False, True))).map(
        lambda t: (*t[0], t[1], t[2])
    ),
    min_size=1,
    max_size=3,
)


@given(layout=slot_layouts, ops=operations, probes=st.lists(gfns(), max_size=20))
def test_ept_agrees_with_dict_model(
    layout: list[tuple[int, int, int, bool, bool]], ops: list[tuple[str, int, int | str]], probes: list[int]
) -> None:
    """tdp_mmu.c: after every fault, zap, MMU-notifier invalidation or full zap, the machine's
    walk of the MMU's EPT gives exactly the model's hpa, rights and page size for every gfn
    (and nothing where the model has nothing); the per-level page counts match the leaves."""
    env = MmuEnv.create()
    slots = build_slots(env, layout)
    model = DictModel(env)
    edges = [g for s in slots for g in (s.base_gfn, s.end_gfn - 1, s.end_gfn)]
    for op, a, b in ops:
        if op == "fault":
            assert isinstance(b, str)
            model.fault(a, b)
        elif op == "fault_in_slot":
            assert isinstance(b, str)
            slot = slots[a % len(slots)]
            model.fault(slot.base_gfn + (a >> 2) % slot.npages, b)
        elif op == "zap":
            assert isinstance(b, int)
            env.mmu.zap_gfn_range(a, a + b)
            model.drop(a, a + b)
        elif op == "host":
            model.host_invalidate(a)
        else:
            env.mmu.zap_all()
            model.map.clear()
        model.check(probes + edges)


# --- the memslot state machine -------------------------------------------------------------------------
class MemslotMachine(RuleBasedStateMachine):
    """KVM_SET_USER_MEMORY_REGION in every form against a live MMU."""

    SLOT_IDS = (0, 1, 2, 3)

    def __init__(self) -> None:
        super().__init__()
        self.env = MmuEnv.create()
        self.generation = self.env.memslots.generation
        self.hvas: dict[int, tuple[int, int]] = {}  # slot id -> (hva, npages) of its mapping
        self.faulted: set[int] = set()  # gfns faulted in since the last change that may zap them

    def _slot(self, slot_id: int) -> MemorySlot | None:
        return self.env.memslots.get(slot_id)

    def _update(self, slot_id: int, flags: int, base: int, npages: int, hva: int) -> bool:
        try:
            self.env.memslots.set_user_memory_region(slot_id, flags, base << 12, npages << 12, hva)
        except MemslotError:
            return False
        return True

    @rule(slot_id=st.sampled_from(SLOT_IDS), geometry=slot_geometry(), thp=st.sampled_from((True, True, False)),
          flags=st.sampled_from((0, 0, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY)))
    def create(self, slot_id: int, geometry: tuple[int, int, int], thp: bool, flags: int) -> None:
        if self._slot(slot_id) is not None:
            return
        base, npages, offset = geometry
        hva = self.env.host_mm.mmap((npages + offset) << 12, huge=thp) + (offset << 12)
        if self._update(slot_id, flags, base, npages, hva):
            self.hvas[slot_id] = (hva, npages)

    @rule(slot_id=st.sampled_from(SLOT_IDS), base=st.integers(0, SLOT_GFN_SPACE - 1))
    def move(self, slot_id: int, base: int) -> None:
        slot = self._slot(slot_id)
        if slot is not None and self._update(slot_id, slot.flags, base, slot.npages, slot.userspace_addr):
            self.faulted = {g for g in self.faulted if not slot.contains(g)}

    @rule(slot_id=st.sampled_from(SLOT_IDS))
    def delete(self, slot_id: int) -> None:
        slot = self._slot(slot_id)
        if slot is not None:
            self._update(slot_id, 0, slot.base_gfn, 0, slot.userspace_addr)
            self.faulted = {g for g in self.faulted if not slot.contains(g)}

    @rule(slot_id=st.sampled_from(SLOT_IDS))
    def toggle_logging(self, slot_id: int) -> None:
        slot = self._slot(slot_id)
        if slot is not None and not slot.readonly:
            self._update(slot_id, slot.flags ^ KVM_MEM_LOG_DIRTY_PAGES, slot.base_gfn, slot.npages, slot.userspace_addr)
            self.faulted = {g for g in self.faulted if not slot.contains(g)}  # may zap collapsible

    @rule(gfn=gfns(), kind=fault_kinds())
    def fault(self, gfn: int, kind: str) -> None:
        env = self.env
        outcome = env.mmu.page_fault(gfn << 12, error_code(env, gfn, kind))
        slot = env.memslots.gfn_to_memslot(gfn)
        if slot is None or (slot.readonly and kind == "write"):
            assert outcome.result is RetPf.EMULATE and outcome.mmio
            return
        assert outcome.result in (RetPf.FIXED, RetPf.SPURIOUS)
        t = env.walk(gfn << 12)
        assert t is not None and t.hpa >> 12 == host_pfn(env, slot, gfn)
        if kind == "write":
            assert t.writable
            if slot.dirty_logging:
                assert slot.test_dirty(gfn)
        self.faulted.add(gfn)

    @rule(slot_id=st.sampled_from(SLOT_IDS), offset=st.integers(0, 2**16), kind=fault_kinds())
    def fault_in_slot(self, slot_id: int, offset: int, kind: str) -> None:
        slot = self._slot(slot_id)
        if slot is not None:
            self.fault(slot.base_gfn + offset % slot.npages, kind)

    @rule(slot_id=st.sampled_from(SLOT_IDS))
    def read_dirty_log(self, slot_id: int) -> None:
        slot = self._slot(slot_id)
        if slot is not None and slot.dirty_logging:
            self.env.memslots.get_dirty_log(slot_id)

    @invariant()
    def no_overlaps_and_generation_grows(self) -> None:
        slots = list(self.env.memslots)
        for i, a in enumerate(slots):
            assert not a.invalid
            for b in slots[i + 1 :]:
                assert a.as_id != b.as_id or not (a.base_gfn < b.end_gfn and b.base_gfn < a.end_gfn)
        assert self.env.memslots.generation >= self.generation
        self.generation = self.env.memslots.generation

    @invariant()
    def ept_reachability_equals_slot_contents(self) -> None:
        env = self.env
        gen = env.memslots.memslots_generation(0) & ((1 << 19) - 1)
        for leaf in env.mmu.leaves():
            if leaf.mmio:
                slot = env.memslots.gfn_to_memslot(leaf.gfn)
                assert slot is None or get_mmio_spte_generation(leaf.spte) != gen, "live MMIO marker over RAM"
                continue
            for gfn in (leaf.gfn, leaf.gfn + leaf.pages - 1):
                slot = env.memslots.gfn_to_memslot(gfn)
                assert slot is not None, f"gfn {gfn:#x} is mapped but in no slot"
                assert slot.contains(leaf.gfn) and slot.contains(leaf.gfn + leaf.pages - 1)
                assert leaf.pfn + (gfn - leaf.gfn) == host_pfn(env, slot, gfn)
                if is_writable_pte(leaf.spte):
                    assert not slot.readonly
                    if slot.dirty_logging:
                        assert leaf.pages == 1 and slot.test_dirty(gfn), "writable but not dirty"
            if env.memslots.gfn_to_memslot(leaf.gfn).dirty_logging:  # type: ignore[union-attr]
                assert leaf.pages == 1, "huge page while logging"
        for gfn in self.faulted:
            if env.memslots.gfn_to_memslot(gfn) is not None:
                assert env.walk(gfn << 12) is not None, f"faulted gfn {gfn:#x} lost its mapping"
        stats = env.mmu.stats
        assert stats["tdp_mmu_pages"] == len(env.mmu._pages) - 1


TestMemslotMachine = MemslotMachine.TestCase
TestMemslotMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
