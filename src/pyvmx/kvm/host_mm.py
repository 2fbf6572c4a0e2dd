"""The VMM process's memory as the host kernel sees it: what KVM's page-fault path reaches
through kvm_faultin_pfn() -> hva_to_pfn() -> get_user_pages().

A :class:`HostMm` is one process address space (an ``mm_struct``): anonymous mappings made with
:meth:`HostMm.mmap`, backed by host-physical pages from a :class:`PageAllocator` only when first
touched -- by the VMM itself (:meth:`HostMm.read`, :meth:`HostMm.write`) or by KVM faulting a
guest page in (:meth:`HostMm.get_user_page`).

What is modelled, and where it comes from in Linux:

* Demand paging of anonymous memory: the first touch of a page allocates a zeroed page. Unlike
  Linux there is no shared zero page for read faults; every touch allocates.
* Transparent huge pages (mm/huge_memory.c, do_huge_pmd_anonymous_page): when a mapping allows
  them, a first touch in a 2-MByte-aligned block that lies wholly inside the mapping and has no
  page yet is served with one physically contiguous, 2-MByte-aligned run of 512 pages, falling
  back to a 4-KByte page when no such run is free. :meth:`HostMm.mapping_level` then reports
  2 MBytes -- what KVM's host_pfn_mapping_level() reads from the host page tables to decide
  whether it may map the guest page with a 2-MByte EPT entry.
* Swap, for asynchronous page faults (virt/kvm/async_pf.c): :meth:`HostMm.swap_out` writes pages
  to a backing store and frees them; a fault on such a page does not block but reports
  :class:`NotResident` with the page-in cost, so that KVM can start the page-in
  (:meth:`HostMm.start_page_in`), let the vCPU run something else, and retry after
  :meth:`HostMm.complete_page_ins` -- or wait for it (:meth:`HostMm.page_in_now`).
* MMU notifiers (include/linux/mmu_notifier.h): every listener added with
  :meth:`HostMm.add_invalidate_listener` is called with ``(hva_start, hva_end)`` before pages in
  that range are freed, swapped out, or remapped by a huge-page split, so that the MMU can zap
  the SPTEs that point at them (kvm_mmu_notifier_invalidate_range_start).

Host-virtual addresses start at :data:`HVA_BASE`; every mapping starts on a 2-MByte boundary (so
that THP can apply to it) and is followed by an unmapped 2-MByte guard gap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyvmx.vmx.memory import PAGE_SHIFT, PAGE_SIZE, PageAllocator

HVA_BASE = 0x7F00_0000_0000
"""The first host-virtual address handed out by :meth:`HostMm.mmap`."""

HPAGE_SIZE = 2 << 20
"""A PMD-mapped transparent huge page: 2 MBytes."""

HPAGE_PAGES = HPAGE_SIZE // PAGE_SIZE  # 512

DEFAULT_PAGE_IN_LATENCY = 2_000_000
"""Clock ticks that a page-in from swap takes, unless :class:`HostMm` is told otherwise."""

InvalidateListener = Callable[[int, int], None]
"""Called with ``(hva_start, hva_end)``, end exclusive, before the pages there go away."""


class HostMemoryError(ValueError):
    """A host-virtual access outside every mapping (in Linux: a SIGSEGV, or -EFAULT from
    get_user_pages); carries the first bad address."""

    def __init__(self, address: int, what: str = "access") -> None:
        super().__init__(f"host-virtual {what} at {address:#x} is outside every mapping")
        self.address = address


@dataclass(frozen=True, slots=True)
class NotResident:
    """The page at ``hva`` (page-aligned) is swapped out. Nothing has been started: the caller
    either starts an asynchronous page-in (:meth:`HostMm.start_page_in`) or waits for one
    (:meth:`HostMm.page_in_now`). ``cost`` is the page-in latency in clock ticks."""

    hva: int
    cost: int


@dataclass(frozen=True, slots=True)
class HostVma:
    """One mapping (a ``vm_area_struct``): ``[start, end)``, page-aligned."""

    start: int
    end: int
    huge: bool
    name: str = ""

    def contains(self, hva: int) -> bool:
        return self.start <= hva < self.end

    def __str__(self) -> str:
        label = f" {self.name}" if self.name else ""
        return f"[{self.start:#x}, {self.end:#x}){label}{' thp' if self.huge else ''}"


def _page(hva: int) -> int:
    return hva & ~(PAGE_SIZE - 1)


def _block(hva: int) -> int:
    return hva & ~(HPAGE_SIZE - 1)


def _page_align_up(size: int) -> int:
    return -(-size // PAGE_SIZE) * PAGE_SIZE


class HostMm:
    """The address space of the VMM process; see the module docstring."""

    def __init__(self, allocator: PageAllocator, *, page_in_latency: int = DEFAULT_PAGE_IN_LATENCY) -> None:
        if page_in_latency < 0:
            raise ValueError(f"page-in latency must not be negative, not {page_in_latency}")
        self.allocator = allocator
        self.memory = allocator.memory
        self.page_in_latency = page_in_latency
        self._vmas: list[HostVma] = []  # sorted by start, never overlapping
        self._next_hva = HVA_BASE
        self._pages: dict[int, int] = {}  # resident page's hva -> its host-physical address
        self._huge: set[int] = set()  # 2-MByte blocks mapped by one contiguous run
        self._swapped: dict[int, bytes] = {}  # swapped-out page's hva -> its contents
        self._page_ins: dict[int, int] = {}  # page-in under way: page's hva -> completion time
        self._listeners: list[InvalidateListener] = []

    # --- mappings -------------------------------------------------------------------------------
    def mmap(self, size: int, *, huge: bool = True, name: str = "") -> int:
        """Reserve ``size`` bytes (rounded up to whole pages) of anonymous, private, read-write
        memory and return its first address, which is 2-MByte aligned. No page is allocated
        until one is touched. ``huge`` allows transparent huge pages (MADV_HUGEPAGE)."""
        if size <= 0:
            raise ValueError(f"mmap size must be positive, not {size:#x}")
        start = self._next_hva
        end = start + _page_align_up(size)
        self._next_hva = -(-end // HPAGE_SIZE) * HPAGE_SIZE + HPAGE_SIZE  # then a guard gap
        self._vmas.append(HostVma(start, end, huge, name))
        return start

    def munmap(self, hva: int, size: int) -> None:
        """Unmap ``[hva, hva + size)`` (page-aligned start, size rounded up to whole pages) and
        free its pages, as munmap(2) does: the range may cover parts of mappings, which are then
        split, and parts that are not mapped at all, which are ignored."""
        if hva & (PAGE_SIZE - 1) or size <= 0:
            raise ValueError(f"munmap needs a page-aligned address and a positive size, not {hva:#x}+{size:#x}")
        end = hva + _page_align_up(size)
        self._split_partial_blocks(hva, end)
        resident = self._resident_in(hva, end)
        if resident:
            self._invalidate(hva, end)
        for block in sorted({_block(page) for page in resident if _block(page) in self._huge}):
            self._huge.remove(block)
            self.allocator.free_contiguous(self._pages[block], HPAGE_PAGES)
            for page in range(block, block + HPAGE_SIZE, PAGE_SIZE):
                del self._pages[page]
        for page in resident:
            if page in self._pages:
                self.allocator.free_page(self._pages.pop(page))
        for page in [page for page in self._swapped if hva <= page < end]:
            del self._swapped[page]
            self._page_ins.pop(page, None)
        kept: list[HostVma] = []
        for vma in self._vmas:
            if vma.end <= hva or vma.start >= end:
                kept.append(vma)
                continue
            if vma.start < hva:
                kept.append(HostVma(vma.start, hva, vma.huge, vma.name))
            if vma.end > end:
                kept.append(HostVma(end, vma.end, vma.huge, vma.name))
        self._vmas = kept

    @property
    def vmas(self) -> tuple[HostVma, ...]:
        """The mappings, lowest first (like /proc/self/maps)."""
        return tuple(self._vmas)

    def find_vma(self, hva: int) -> HostVma | None:
        for vma in self._vmas:
            if vma.contains(hva):
                return vma
        return None

    # --- faulting pages in (get_user_pages) -----------------------------------------------------
    def get_user_page(self, hva: int, write: bool) -> int | NotResident:
        """The page frame number of the host page backing ``hva``, allocating it on first touch
        (a page fault in the VMM), or :class:`NotResident` if the page is swapped out -- which
        starts nothing. Every mapping is writable and there is no shared zero page, so ``write``
        (KVM's write_fault) does not change the outcome; it is taken for the interface's sake.

        Raises :class:`HostMemoryError` for an address outside every mapping, and MemoryError
        when the host is out of pages."""
        del write
        page = _page(hva)
        vma = self.find_vma(page)
        if vma is None:
            raise HostMemoryError(hva, "fault")
        if page in self._swapped:
            return NotResident(page, self.page_in_latency)
        hpa = self._pages.get(page)
        if hpa is None:
            hpa = self._fault_in(page, vma)
        return hpa >> PAGE_SHIFT

    def mapping_level(self, hva: int) -> int:
        """The size of the host mapping of ``hva``: :data:`HPAGE_SIZE` inside a transparent huge
        page, else ``PAGE_SIZE`` (also for a page not populated yet: the host page tables have
        no larger entry there) -- as KVM's host_pfn_mapping_level() finds by walking them."""
        if self.find_vma(hva) is None:
            raise HostMemoryError(hva, "mapping-level lookup")
        return HPAGE_SIZE if _block(hva) in self._huge else PAGE_SIZE

    def is_resident(self, hva: int) -> bool:
        """Whether the page of ``hva`` is in host memory now (False if never touched or swapped)."""
        return _page(hva) in self._pages

    @property
    def resident_pages(self) -> int:
        return len(self._pages)

    def _fault_in(self, page: int, vma: HostVma) -> int:
        block = _block(page)
        if (
            vma.huge
            and vma.start <= block
            and block + HPAGE_SIZE <= vma.end
            and not self._block_in_use(block)
        ):
            run = self.allocator.alloc_contiguous(HPAGE_PAGES, HPAGE_PAGES)
            if run is not None:
                self._huge.add(block)
                for i in range(HPAGE_PAGES):
                    self._pages[block + i * PAGE_SIZE] = run + i * PAGE_SIZE
                return self._pages[page]
        hpa = int(self.allocator.alloc_page())
        self._pages[page] = hpa
        return hpa

    def _block_in_use(self, block: int) -> bool:
        for page in range(block, block + HPAGE_SIZE, PAGE_SIZE):
            if page in self._pages or page in self._swapped:
                return True
        return False

    # --- swap, for asynchronous page faults -----------------------------------------------------
    def swap_out(self, hva: int, size: int) -> None:
        """Write the resident pages of ``[hva, hva + size)`` to the backing store and free them
        (madvise(MADV_PAGEOUT)). A huge page only partly in the range is split first; a huge
        page wholly inside is swapped out as its 512 small pages. Pages already out, or never
        touched, are left alone."""
        end = hva + size
        self._check_range(hva, size, "swap-out")
        start = _page(hva)
        self._split_partial_blocks(start, end)
        resident = self._resident_in(start, end)
        if not resident:
            return
        self._invalidate(start, _page_align_up(end))
        for page in resident:
            self._huge.discard(_block(page))
        for page in resident:
            hpa = self._pages.pop(page)
            self._swapped[page] = self.memory.read(hpa, PAGE_SIZE)
            self.allocator.free_page(hpa)

    def start_page_in(self, hva: int, now: int) -> int:
        """Start reading the page of ``hva`` back from swap and return the time it completes:
        ``now`` plus the page-in latency. Starting one already under way returns its existing
        completion time; a page that is not swapped out needs no page-in and returns ``now``."""
        page = _page(hva)
        if self.find_vma(page) is None:
            raise HostMemoryError(hva, "page-in")
        if page not in self._swapped:
            return now
        return self._page_ins.setdefault(page, now + self.page_in_latency)

    def complete_page_ins(self, now: int) -> list[int]:
        """Finish every page-in whose completion time is ``now`` or earlier: allocate a page,
        copy the contents back. Returns the pages' addresses, earliest completion first."""
        due = sorted((done, page) for page, done in self._page_ins.items() if done <= now)
        for _, page in due:
            self._swap_in(page)
        return [page for _, page in due]

    def page_in_now(self, hva: int) -> int:
        """Bring the page of ``hva`` in synchronously -- the path where the vCPU waits for the
        fault instead of going asynchronous -- and return its page frame number."""
        page = _page(hva)
        if self.find_vma(page) is None:
            raise HostMemoryError(hva, "page-in")
        if page in self._swapped:
            self._swap_in(page)
        result = self.get_user_page(page, write=False)
        assert not isinstance(result, NotResident)
        return result

    def pending_page_ins(self) -> dict[int, int]:
        """Page-ins under way: page address -> completion time."""
        return dict(self._page_ins)

    def _swap_in(self, page: int) -> None:
        contents = self._swapped.pop(page)
        self._page_ins.pop(page, None)
        hpa = int(self.allocator.alloc_page())
        self.memory.write(hpa, contents)
        self._pages[page] = hpa

    # --- the VMM's own accesses -----------------------------------------------------------------
    def read(self, hva: int, size: int) -> bytes:
        """Read ``size`` bytes at ``hva`` as the VMM process does: untouched pages are populated,
        swapped-out pages are brought back in synchronously."""
        self._check_range(hva, size, "read")
        out = bytearray()
        for address, chunk in self._chunks(hva, size):
            out += self.memory.read(self._touch(address), chunk)
        return bytes(out)

    def write(self, hva: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``hva`` as the VMM process does (to load a guest image, say)."""
        self._check_range(hva, len(data), "write")
        offset = 0
        for address, chunk in self._chunks(hva, len(data)):
            self.memory.write(self._touch(address), data[offset : offset + chunk])
            offset += chunk

    def _touch(self, hva: int) -> int:
        """The host-physical address of ``hva``, faulting or swapping its page in."""
        page = _page(hva)
        pfn = self.page_in_now(page)
        return (pfn << PAGE_SHIFT) + (hva - page)

    @staticmethod
    def _chunks(hva: int, size: int) -> Iterator[tuple[int, int]]:
        end = hva + size
        while hva < end:
            chunk = min(end, _page(hva) + PAGE_SIZE) - hva
            yield hva, chunk
            hva += chunk

    def _check_range(self, hva: int, size: int, what: str) -> None:
        """Raise :class:`HostMemoryError` at the first address of the range in no mapping."""
        if size < 0:
            raise ValueError(f"negative size {size}")
        address, end = hva, hva + size
        while True:
            vma = self.find_vma(address)
            if vma is None:
                raise HostMemoryError(address, what)
            if vma.end >= end:
                return
            address = vma.end

    # --- MMU notifiers --------------------------------------------------------------------------
    def add_invalidate_listener(self, callback: InvalidateListener) -> None:
        """Call ``callback(hva_start, hva_end)`` before pages in that range are freed, swapped
        out, or remapped by a huge-page split (mmu_notifier_register)."""
        self._listeners.append(callback)

    def remove_invalidate_listener(self, callback: InvalidateListener) -> None:
        self._listeners.remove(callback)

    def _invalidate(self, start: int, end: int) -> None:
        for listener in list(self._listeners):
            listener(start, end)

    def _resident_in(self, start: int, end: int) -> list[int]:
        if end - start <= len(self._pages) * PAGE_SIZE:
            return [page for page in range(_page(start), end, PAGE_SIZE) if page in self._pages]
        return sorted(page for page in self._pages if start <= page < end)

    def _split_partial_blocks(self, start: int, end: int) -> None:
        """Split each huge page that ``[start, end)`` covers only in part into 512 small pages
        (split_huge_pmd), telling the listeners: the 2-MByte mapping of the block is gone."""
        for edge in (start, end):
            block = _block(edge)
            if block in self._huge and block != edge:
                self._invalidate(block, block + HPAGE_SIZE)
                self._huge.remove(block)

    def __repr__(self) -> str:
        return (
            f"HostMm({len(self._vmas)} mappings, {len(self._pages)} resident pages, "
            f"{len(self._huge)} huge, {len(self._swapped)} swapped out)"
        )
