"""Guest-physical memory slots: KVM_SET_USER_MEMORY_REGION and the dirty log.

A memslot maps ``npages`` guest frames from ``base_gfn`` onto host-virtual memory of the VMM
from ``userspace_addr`` (virt/kvm/kvm_main.c). This module keeps the slots of one VM, in
:data:`KVM_ADDRESS_SPACE_NUM` address spaces (0: normal, 1: SMM), and checks every update as
``kvm_vm_ioctl_set_memory_region()`` and ``kvm_set_memory_region()`` do, returning the same
errno for the same rule (as a :class:`MemslotError`).

An accepted update runs in two phases, as ``kvm_set_memslot()`` does:

1. **prepare** -- for DELETE and MOVE the old slot is first replaced by a copy flagged
   :data:`KVM_MEMSLOT_INVALID` (``kvm_invalidate_memslot()``), so that a fault racing with the
   update finds it and retries (DragonOS's ``__kvm_faultin_pfn`` returns ``PFRet::Retry``; Linux
   returns RET_PF_RETRY), and the listeners are told, which is when the MMU zaps the old
   mappings (``kvm_arch_flush_shadow_memslot()``). For CREATE and FLAGS_ONLY nothing is
   visible yet.
2. **commit** -- the new slot (or, for DELETE, nothing) is installed, the generation moves on,
   and the listeners are told again (``kvm_commit_memory_region()``).

Failed updates change nothing: every check, including x86's own (the highest gfn must be
mappable), is made before the first phase.

Generations. :attr:`Memslots.generation` counts completed updates VM-wide; it is what a caller
compares to see whether anything changed, and :attr:`Memslots.generation_in_progress` is True
from the start of the prepare phase until the commit. :meth:`Memslots.memslots_generation` is
Linux's per-address-space ``kvm_memslots(kvm, as_id)->generation`` as the MMU stores it in MMIO
SPTEs: address space *n* starts at *n* and every install adds :data:`KVM_ADDRESS_SPACE_NUM` (so
the two never collide), twice for DELETE and MOVE (invalidate, then activate), once for CREATE
and FLAGS_ONLY; bit 63 (:data:`KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS`) is set while an update of
that address space is in progress, so that an MMIO SPTE made then can never match again.

Dirty logging. A slot created or changed with :data:`KVM_MEM_LOG_DIRTY_PAGES` has a bitmap of
one bit per page, little-endian, rounded up to whole 64-bit words (``kvm_dirty_bitmap_bytes()``).
The MMU calls :meth:`Memslots.mark_page_dirty` for each guest write it lets through;
:meth:`Memslots.get_dirty_log` (KVM_GET_DIRTY_LOG) returns the bitmap and clears it, asking the
reprotect listeners to write-protect the cleared pages again
(``kvm_arch_mmu_enable_log_dirty_pt_masked()``); with manual protection
(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) it only returns it and :meth:`Memslots.clear_dirty_log`
(KVM_CLEAR_DIRTY_LOG) clears chosen bits.

Not modelled: guest_memfd (KVM_MEM_GUEST_MEMFD) and private memory, the dirty ring, internal
slots (the APIC-access and TSS pages; ids at or above :data:`KVM_USER_MEM_SLOTS`).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# include/uapi/linux/kvm.h
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_SET_USER_MEMORY_REGION_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
"""The flags x86 accepts from userspace (no guest_memfd here)."""

# include/linux/kvm_host.h
KVM_MEMSLOT_INVALID = 1 << 16
"""Internal: the slot is being deleted or moved; faults on it must retry."""
KVM_MEM_SLOTS_NUM = 0x7FFF  # SHRT_MAX
KVM_INTERNAL_MEM_SLOTS = 3  # arch/x86/include/asm/kvm_host.h
KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS  # 32764
KVM_ADDRESS_SPACE_NUM = 2  # x86: normal and SMM
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63

TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE
"""The top of x86-64 user space with 4-level paging: access_ok() refuses ranges beyond it."""

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_BITS_PER_LONG = 64


class MemslotChange(enum.StrEnum):
    """``enum kvm_mr_change``."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"


class MemslotPhase(enum.StrEnum):
    PREPARE = "prepare"
    COMMIT = "commit"


class MemslotError(ValueError):
    """A refused KVM_SET_USER_MEMORY_REGION or dirty-log request: ``errno`` is the name of the
    error Linux returns ("EINVAL", "EEXIST", "ENOENT", "EFAULT"), the message names the rule."""

    def __init__(self, errno: str, message: str) -> None:
        super().__init__(f"{errno}: {message}")
        self.errno = errno


def dirty_bitmap_bytes(npages: int) -> int:
    """``kvm_dirty_bitmap_bytes()``: one bit per page, in whole 64-bit words."""
    return -(-npages // _BITS_PER_LONG) * (_BITS_PER_LONG // 8)


@dataclass(frozen=True, slots=True)
class MemorySlot:
    """``struct kvm_memory_slot``. Each update makes a new object; the dirty bitmap, a mutable
    bytearray, is carried over while dirty logging stays on (as kvm_prepare_memory_region does)."""

    id: int
    as_id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int
    dirty_bitmap: bytearray | None = None

    @property
    def slot(self) -> int:
        """The slot number as userspace names it: address space in bits 31:16, id in 15:0."""
        return self.as_id << 16 | self.id

    @property
    def end_gfn(self) -> int:
        """One past the last gfn."""
        return self.base_gfn + self.npages

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def invalid(self) -> bool:
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    @property
    def dirty_logging(self) -> bool:
        return self.dirty_bitmap is not None

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.end_gfn

    def gfn_to_hva(self, gfn: int) -> int:
        """``__gfn_to_hva_memslot()``. Linux refuses INVALID slots in __gfn_to_hva_many(); here
        the caller checks :attr:`invalid` first, as seed 004's fault path does."""
        if not self.contains(gfn):
            raise ValueError(f"gfn {gfn:#x} is outside {self}")
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)

    def hva_to_gfn(self, hva: int) -> int:
        """``hva_to_gfn_memslot()``: the gfn whose page holds ``hva`` (no range check)."""
        return self.base_gfn + ((hva - self.userspace_addr) >> PAGE_SHIFT)

    def test_dirty(self, gfn: int) -> bool:
        if self.dirty_bitmap is None or not self.contains(gfn):
            return False
        rel = gfn - self.base_gfn
        return bool(self.dirty_bitmap[rel >> 3] >> (rel & 7) & 1)

    def __str__(self) -> str:
        flags = "".join(
            name
            for bit, name in ((KVM_MEM_LOG_DIRTY_PAGES, " log"), (KVM_MEM_READONLY, " ro"), (KVM_MEMSLOT_INVALID, " INVALID"))
            if self.flags & bit
        )
        return (
            f"slot {self.as_id}:{self.id} gfn [{self.base_gfn:#x}, {self.end_gfn:#x}) "
            f"-> hva {self.userspace_addr:#x}{flags}"
        )


MemslotListener = Callable[[MemslotPhase, MemslotChange, MemorySlot | None, MemorySlot | None], None]
"""``callback(phase, change, old, new)``; ``old`` is None for CREATE, ``new`` None for DELETE."""

ReprotectListener = Callable[[MemorySlot, int, int], None]
"""``callback(slot, gfn_offset, mask)``: write-protect again each page ``gfn_offset + i`` of the
slot for every bit ``i`` set in the 64-bit ``mask``, because its dirty bit was just cleared."""


class Memslots:
    """The memslots of one VM; see the module docstring.

    ``max_gpa_bits`` is the guest-physical width the MMU can map (kvm_mmu_max_gfn(): host
    MAXPHYADDR with TDP). ``manual_dirty_log_protect`` and ``dirty_log_initially_set`` are the
    two bits of KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2."""

    def __init__(
        self,
        *,
        max_gpa_bits: int = 52,
        manual_dirty_log_protect: bool = False,
        dirty_log_initially_set: bool = False,
    ) -> None:
        if dirty_log_initially_set and not manual_dirty_log_protect:
            raise ValueError("KVM_DIRTY_LOG_INITIALLY_SET needs KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE")
        self.max_gfn = (1 << (max_gpa_bits - PAGE_SHIFT)) - 1
        self.manual_dirty_log_protect = manual_dirty_log_protect
        self.dirty_log_initially_set = dirty_log_initially_set
        self._slots: dict[int, MemorySlot] = {}  # by slot number (as_id << 16 | id)
        self._bases: list[list[int]] = [[] for _ in range(KVM_ADDRESS_SPACE_NUM)]
        self._by_base: list[list[MemorySlot]] = [[] for _ in range(KVM_ADDRESS_SPACE_NUM)]
        self._as_generation = list(range(KVM_ADDRESS_SPACE_NUM))  # "must be different for each address space"
        self._updating_as: int | None = None
        self.generation = 0
        self.generation_in_progress = False
        self._listeners: list[MemslotListener] = []
        self._reprotect_listeners: list[ReprotectListener] = []

    # --- KVM_SET_USER_MEMORY_REGION ---------------------------------------------------------------
    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """Create, move, change the flags of, or delete (``memory_size`` 0) a slot, with the checks
        and errors of Linux. Raises :class:`MemslotError`; a refused call changes nothing."""
        if self.generation_in_progress:
            raise RuntimeError("memslot update from inside a memslot listener (slots_lock is held)")
        old, new, change = self._check_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        if change is None:
            return  # nothing to change: Linux returns 0
        self._set_memslot(old, new, change)

    def _check_region(
        self, slot: int, flags: int, gpa: int, size: int, hva: int
    ) -> tuple[MemorySlot | None, MemorySlot | None, MemslotChange | None]:
        for name, value, limit in (
            ("slot", slot, _U32), ("flags", flags, _U32), ("guest_phys_addr", gpa, _U64),
            ("memory_size", size, _U64), ("userspace_addr", hva, _U64),
        ):
            if not 0 <= value <= limit:
                raise MemslotError("EINVAL", f"{name} {value:#x} does not fit its {limit.bit_length()}-bit field")
        # kvm_vm_ioctl_set_memory_region()
        if flags & ~KVM_SET_USER_MEMORY_REGION_FLAGS:
            raise MemslotError("EINVAL", f"unknown flags {flags & ~KVM_SET_USER_MEMORY_REGION_FLAGS:#x}")
        as_id, id_ = slot >> 16, slot & 0xFFFF
        if id_ >= KVM_USER_MEM_SLOTS:
            raise MemslotError("EINVAL", f"slot id {id_} is not below KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
        # kvm_set_memory_region(): general sanity checks
        if size & (PAGE_SIZE - 1):
            raise MemslotError("EINVAL", f"memory_size {size:#x} is not a multiple of the page size")
        if gpa & (PAGE_SIZE - 1):
            raise MemslotError("EINVAL", f"guest_phys_addr {gpa:#x} is not page aligned")
        if hva & (PAGE_SIZE - 1):
            raise MemslotError("EINVAL", f"userspace_addr {hva:#x} is not page aligned")
        if size > TASK_SIZE_MAX or hva > TASK_SIZE_MAX - size:
            raise MemslotError("EINVAL", f"userspace range {hva:#x}+{size:#x} is not user memory (access_ok)")
        if as_id >= KVM_ADDRESS_SPACE_NUM:
            raise MemslotError("EINVAL", f"address space {as_id} is not below KVM_ADDRESS_SPACE_NUM ({KVM_ADDRESS_SPACE_NUM})")
        if gpa + size > _U64 + 1:
            raise MemslotError("EINVAL", f"guest_phys_addr {gpa:#x} + memory_size {size:#x} wraps around")
        npages = size >> PAGE_SHIFT
        if npages > KVM_MEM_MAX_NR_PAGES:
            raise MemslotError("EINVAL", f"{npages} pages is more than KVM_MEM_MAX_NR_PAGES ({KVM_MEM_MAX_NR_PAGES})")

        old = self._slots.get(slot)
        if size == 0:
            if old is None:
                raise MemslotError("EINVAL", f"cannot delete slot {as_id}:{id_}: it does not exist")
            return old, None, MemslotChange.DELETE

        base_gfn = gpa >> PAGE_SHIFT
        if old is None:
            change = MemslotChange.CREATE
        else:
            if hva != old.userspace_addr:
                raise MemslotError("EINVAL", f"slot {as_id}:{id_} exists: its userspace_addr cannot change (delete it first)")
            if npages != old.npages:
                raise MemslotError("EINVAL", f"slot {as_id}:{id_} exists: its memory_size cannot change (delete it first)")
            if (flags ^ old.flags) & KVM_MEM_READONLY:
                raise MemslotError("EINVAL", f"slot {as_id}:{id_} exists: KVM_MEM_READONLY cannot change (delete it first)")
            if base_gfn != old.base_gfn:
                change = MemslotChange.MOVE
            elif flags != old.flags:
                change = MemslotChange.FLAGS_ONLY
            else:
                return old, None, None

        if change in (MemslotChange.CREATE, MemslotChange.MOVE):
            clash = self._overlapping(as_id, id_, base_gfn, base_gfn + npages)
            if clash is not None:
                raise MemslotError("EEXIST", f"gfn [{base_gfn:#x}, {base_gfn + npages:#x}) overlaps {clash}")
            # kvm_arch_prepare_memory_region() on x86
            if base_gfn + npages - 1 > self.max_gfn:
                raise MemslotError("EINVAL", f"gfn {base_gfn + npages - 1:#x} is beyond the MMU's highest gfn {self.max_gfn:#x}")

        new = MemorySlot(id_, as_id, base_gfn, npages, hva, flags, self._new_dirty_bitmap(old, flags, npages))
        return old, new, change

    def _overlapping(self, as_id: int, id_: int, start: int, end: int) -> MemorySlot | None:
        """``kvm_check_memslot_overlap()``: another slot of the address space meeting [start, end)."""
        for other in self._by_base[as_id]:
            if other.id != id_ and other.base_gfn < end and start < other.end_gfn:
                return other
        return None

    def _new_dirty_bitmap(self, old: MemorySlot | None, flags: int, npages: int) -> bytearray | None:
        """As kvm_prepare_memory_region(): none without dirty logging; the old slot's while
        logging stays on; else a new one, all set with KVM_DIRTY_LOG_INITIALLY_SET."""
        if not flags & KVM_MEM_LOG_DIRTY_PAGES:
            return None
        if old is not None and old.dirty_bitmap is not None:
            return old.dirty_bitmap
        bitmap = bytearray(dirty_bitmap_bytes(npages))
        if self.dirty_log_initially_set:
            for rel in range(npages):
                bitmap[rel >> 3] |= 1 << (rel & 7)
        return bitmap

    def _set_memslot(self, old: MemorySlot | None, new: MemorySlot | None, change: MemslotChange) -> None:
        """``kvm_set_memslot()``: the two phases."""
        target = old if old is not None else new
        assert target is not None
        key, as_id = target.slot, target.as_id
        self.generation_in_progress = True
        self._updating_as = as_id
        try:
            if old is not None and change in (MemslotChange.DELETE, MemslotChange.MOVE):
                self._install(key, dataclasses.replace(old, flags=old.flags | KVM_MEMSLOT_INVALID))
            self._notify(MemslotPhase.PREPARE, change, old, new)
        except BaseException:
            # kvm_set_memslot(): "For DELETE/MOVE, revert the above INVALID change."
            if old is not None and change in (MemslotChange.DELETE, MemslotChange.MOVE):
                self._install(key, old)
            self.generation_in_progress = False
            self._updating_as = None
            raise
        self._install(key, new)
        self.generation += 1
        self.generation_in_progress = False
        self._updating_as = None
        self._notify(MemslotPhase.COMMIT, change, old, new)

    def _install(self, key: int, slot: MemorySlot | None) -> None:
        """Replace the slot numbered ``key`` (None removes it) -- ``kvm_swap_active_memslots()``."""
        as_id = key >> 16
        if slot is None:
            self._slots.pop(key, None)
        else:
            self._slots[key] = slot
        in_space = sorted((s for s in self._slots.values() if s.as_id == as_id), key=lambda s: s.base_gfn)
        self._by_base[as_id] = in_space
        self._bases[as_id] = [s.base_gfn for s in in_space]
        self._as_generation[as_id] += KVM_ADDRESS_SPACE_NUM

    def _notify(
        self, phase: MemslotPhase, change: MemslotChange, old: MemorySlot | None, new: MemorySlot | None
    ) -> None:
        for listener in list(self._listeners):
            listener(phase, change, old, new)

    # --- listeners ------------------------------------------------------------------------------
    def add_listener(self, callback: MemslotListener) -> None:
        """Call ``callback(phase, change, old, new)`` in both phases of every accepted update.
        ``phase`` and ``change`` are str enums ("prepare"/"commit"; "create", "delete", "move",
        "flags_only"). A listener that raises in the prepare phase aborts the update: the old
        slot comes back and the exception propagates."""
        self._listeners.append(callback)

    def remove_listener(self, callback: MemslotListener) -> None:
        self._listeners.remove(callback)

    def add_reprotect_listener(self, callback: ReprotectListener) -> None:
        """Call ``callback(slot, gfn_offset, mask)`` whenever dirty bits are cleared, so that the
        MMU write-protects those pages again and sees their next write."""
        self._reprotect_listeners.append(callback)

    # --- lookups --------------------------------------------------------------------------------
    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        """The slot holding ``gfn`` (``search_memslots()``), INVALID ones included: the caller
        decides to retry, as kvm_faultin_pfn() does."""
        bases = self._bases[as_id]
        index = bisect.bisect_right(bases, gfn) - 1
        if index < 0:
            return None
        slot = self._by_base[as_id][index]
        return slot if slot.contains(gfn) else None

    def get(self, slot_id: int) -> MemorySlot | None:
        """The slot numbered ``slot_id`` (address space in bits 31:16), or None."""
        return self._slots.get(slot_id)

    def __iter__(self) -> Iterator[MemorySlot]:
        """Every slot, by address space, then gfn."""
        for as_id in range(KVM_ADDRESS_SPACE_NUM):
            yield from self._by_base[as_id]

    def __len__(self) -> int:
        return len(self._slots)

    def slots_in_hva_range(self, start: int, end: int) -> list[tuple[MemorySlot, int, int]]:
        """Each slot whose host-virtual range meets ``[start, end)``, with the gfn range
        ``[gfn_start, gfn_end)`` it maps there -- what kvm_handle_hva_range() hands the MMU
        when an MMU notifier fires."""
        found: list[tuple[MemorySlot, int, int]] = []
        for slot in self:
            slot_end = slot.userspace_addr + (slot.npages << PAGE_SHIFT)
            hva_start, hva_end = max(start, slot.userspace_addr), min(end, slot_end)
            if hva_start < hva_end:
                found.append((slot, slot.hva_to_gfn(hva_start), slot.hva_to_gfn(hva_end + PAGE_SIZE - 1)))
        return found

    def memslots_generation(self, as_id: int = 0) -> int:
        """``kvm_memslots(kvm, as_id)->generation``, with bit 63 set while an update of that
        address space is in progress."""
        gen = self._as_generation[as_id]
        if self.generation_in_progress and self._updating_as == as_id:
            gen |= KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        return gen

    # --- dirty logging --------------------------------------------------------------------------
    def mark_page_dirty(self, slot: MemorySlot | None, gfn: int) -> None:
        """``mark_page_dirty_in_slot()``: set the dirty bit of ``gfn``; nothing if there is no
        slot or it does not log dirty pages."""
        if slot is None or slot.dirty_bitmap is None:
            return
        if not slot.contains(gfn):
            raise ValueError(f"gfn {gfn:#x} is outside {slot}")
        rel = gfn - slot.base_gfn
        slot.dirty_bitmap[rel >> 3] |= 1 << (rel & 7)

    def mark_gfn_dirty(self, gfn: int, as_id: int = 0) -> None:
        """``mark_page_dirty()``: the same, finding the slot first."""
        self.mark_page_dirty(self.gfn_to_memslot(gfn, as_id), gfn)

    def get_dirty_log(self, slot_id: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's dirty bitmap (bit ``i`` of byte ``i // 8`` for page
        ``i``; ``ceil(npages / 64) * 8`` bytes), cleared as it is read -- unless manual dirty-log
        protection is on, when it is only copied (``kvm_get_dirty_log_protect()``)."""
        slot = self._dirty_log_slot(slot_id)
        assert slot.dirty_bitmap is not None
        bitmap = slot.dirty_bitmap
        snapshot = bytes(bitmap)
        if self.manual_dirty_log_protect:
            return snapshot
        for word in range(len(bitmap) // 8):
            mask = int.from_bytes(bitmap[word * 8 : word * 8 + 8], "little")
            if mask:
                bitmap[word * 8 : word * 8 + 8] = bytes(8)
                self._reprotect(slot, word * _BITS_PER_LONG, mask)
        return snapshot

    def clear_dirty_log(self, slot_id: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear the dirty bits of pages ``first_page + i`` for each bit
        ``i`` set in ``bitmap`` (same layout as :meth:`get_dirty_log`, from ``first_page``), and
        write-protect again those that were dirty (``kvm_clear_dirty_log_protect()``)."""
        self._check_log_slot_number(slot_id)
        if first_page & 63:
            raise MemslotError("EINVAL", f"first_page {first_page} is not a multiple of 64")
        slot = self._dirty_log_slot(slot_id)
        assert slot.dirty_bitmap is not None
        npages = slot.npages
        if (
            first_page > npages
            or num_pages > npages - first_page
            or (num_pages < npages - first_page and num_pages & 63)
        ):
            raise MemslotError(
                "EINVAL",
                f"pages [{first_page}, {first_page}+{num_pages}) do not fit slot of {npages} pages "
                "(or num_pages is not a multiple of 64 short of the end)",
            )
        words = -(-num_pages // _BITS_PER_LONG)
        if len(bitmap) < words * 8:
            raise MemslotError("EFAULT", f"bitmap of {len(bitmap)} bytes is shorter than {words * 8}")
        dirty = slot.dirty_bitmap
        for n in range(words):
            mask = int.from_bytes(bitmap[n * 8 : n * 8 + 8], "little")
            if not mask:
                continue
            at = (first_page // _BITS_PER_LONG + n) * 8
            current = int.from_bytes(dirty[at : at + 8], "little")
            dirty[at : at + 8] = (current & ~mask).to_bytes(8, "little")
            if mask & current:
                self._reprotect(slot, first_page + n * _BITS_PER_LONG, mask & current)

    def _check_log_slot_number(self, slot_id: int) -> None:
        if not 0 <= slot_id <= _U32 or slot_id >> 16 >= KVM_ADDRESS_SPACE_NUM or slot_id & 0xFFFF >= KVM_USER_MEM_SLOTS:
            raise MemslotError("EINVAL", f"slot {slot_id:#x} is not a user slot number")

    def _dirty_log_slot(self, slot_id: int) -> MemorySlot:
        self._check_log_slot_number(slot_id)
        slot = self._slots.get(slot_id)
        if slot is None:
            raise MemslotError("ENOENT", f"slot {slot_id >> 16}:{slot_id & 0xFFFF} does not exist")
        if slot.dirty_bitmap is None:
            raise MemslotError("ENOENT", f"{slot} does not log dirty pages")
        return slot

    def _reprotect(self, slot: MemorySlot, gfn_offset: int, mask: int) -> None:
        for listener in list(self._reprotect_listeners):
            listener(slot, gfn_offset, mask)

    def __repr__(self) -> str:
        return f"Memslots({len(self._slots)} slots, generation {self.generation})"
