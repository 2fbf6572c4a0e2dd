"""Keeping cached code exact when memory is written behind the CPU engine's back.

Two caches hold code by address: Unicorn's translated blocks (TBs) and the executor's decoded
sensitive instructions.  Both must follow self-modifying and cross-modifying code (SDM Vol. 3A
10.6 "Self-Modifying Code", 10.7 "Cross-Modifying Code": a write to code takes effect for the
instructions fetched after it).

* A guest store through the engine that runs the code is Unicorn's own business: QEMU keeps
  pages holding TBs write-protected in its TLB and invalidates the TBs a store hits
  (``tb_invalidate_phys_page_fast``); the new blocks are scanned again for sensitive
  instructions.
* A write that does not go through that engine -- the hypervisor, device DMA, event delivery
  or emulated INS writing :class:`~pyvmx.vmx.memory.PhysicalMemory` from Python, or the guest
  running on *another* engine (another physical CPU) over the same memory -- is invisible to
  it.  :class:`TranslatedCode` records the host-physical byte ranges of every TB each engine
  translated and watches their pages; a Python write overlapping a range makes that engine drop
  its TBs before it runs again (:meth:`EngineCode.prepare_run`).  For other engines' guest
  stores, an engine's TLB never caches write permission for a page holding another engine's
  code: the first store comes back to the TLB-fill hook (:meth:`EngineCode.fill_permissions`),
  which invalidates the other engine's code there, as QEMU's ``notdirty_write`` does for its own.
* :class:`DecodedInsnCache` keys decoded instructions by linear and host-physical address and
  uses an entry only while the bytes at that address are still the bytes it was decoded from,
  so it is exact whoever wrote the memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmx.vmx.decode import DecodedInsn
from pyvmx.vmx.memory import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from pyvmx.vmx.paging import Access
from pyvmx.vmx.translate import PROT_WRITE

if TYPE_CHECKING:
    from pyvmx.engine.unicorn_cpu import UnicornCpu

MAX_CACHED_INSNS = 100_000
MAX_RANGES = 200_000  # TB ranges one engine may have recorded before it just drops all its TBs


class DecodedInsnCache:
    """Decoded sensitive instructions by (linear address, host-physical address), each used only
    if the same bytes are still at that host-physical address, in the same code size."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self._insns: dict[tuple[int, int], DecodedInsn] = {}

    def put(self, insn: DecodedInsn, hpa: int) -> None:
        if (hpa & (PAGE_SIZE - 1)) + insn.length > PAGE_SIZE:
            return  # its bytes span two pages: decoded each time, never trusted from here
        if len(self._insns) >= MAX_CACHED_INSNS:
            self._insns.clear()
        self._insns[(insn.address, hpa)] = insn

    def get(self, address: int, hpa: int, bitness: int) -> DecodedInsn | None:
        insn = self._insns.get((address, hpa))
        if insn is None or insn.bitness != bitness:
            return None
        if self.memory.read(hpa, insn.length) != insn.raw:
            del self._insns[(address, hpa)]  # the code was rewritten
            return None
        return insn


class EngineCode:
    """One engine's share of :class:`TranslatedCode`: what it translated, whether its TBs are
    stale, and which pages its TLB may hold writable."""

    def __init__(self, shared: TranslatedCode, cpu: UnicornCpu) -> None:
        self.shared = shared
        self.cpu = cpu
        self.stale = False  # some TB may hold bytes that memory no longer has
        self.ranges: dict[int, set[tuple[int, int]]] = {}  # pfn -> host-physical [lo, hi) of TBs
        self.count = 0
        self.writable: set[int] = set()  # pfns the TLB may map writable (kept only if shared)

    def translated(self, linear: int, size: int) -> None:
        """A block of ``size`` bytes at ``linear`` was translated: record where its bytes are."""
        end = linear + max(size, 1)
        while linear < end:
            piece = min(end, (linear | (PAGE_SIZE - 1)) + 1) - linear
            hpa = self.cpu.translate_fetch(linear)
            if hpa is not None:
                self.shared.add(self, hpa, hpa + piece)
            linear += piece

    def prepare_run(self) -> None:
        """Before the core runs: drop every TB if memory under any of them was written."""
        if self.stale:
            self.stale = False
            self.cpu.flush_translations()

    def fill_permissions(self, page: int, perms: int, access: Access) -> int:
        """The permissions a TLB fill of host-physical ``page`` may cache: a store to another
        engine's code invalidates that code first; otherwise write permission to it is withheld,
        so that a store comes back here."""
        shared = self.shared
        if len(shared.engines) < 2:
            return perms
        pfn = page >> PAGE_SHIFT
        if shared.foreign_code(self, pfn):
            if access is not Access.WRITE:
                return perms & ~PROT_WRITE
            shared.code_written(page, PAGE_SIZE, by=self)
        if perms & PROT_WRITE:
            self.writable.add(pfn)
        return perms

    def flush_tlb(self) -> None:
        self.cpu.flush_tlb()
        self.writable.clear()

    def invalidate(self) -> None:
        """Memory under one of this engine's TBs changed: drop them all before the next run (or
        now, when the engine is running: :meth:`UnicornCpu.stop` ends the run first)."""
        self.stale = True
        self.shared.forget(self)
        self.cpu.stop()


class TranslatedCode:
    """The translated code of every engine over one :class:`PhysicalMemory`."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self.engines: list[EngineCode] = []
        self._pages: dict[int, dict[EngineCode, set[tuple[int, int]]]] = {}
        memory.add_write_observer(self.code_written)

    def attach(self, cpu: UnicornCpu) -> EngineCode:
        engine = EngineCode(self, cpu)
        self.engines.append(engine)
        return engine

    def add(self, engine: EngineCode, lo: int, hi: int) -> None:
        pfn = lo >> PAGE_SHIFT
        ranges = engine.ranges.setdefault(pfn, set())
        if (lo, hi) in ranges:
            return
        if engine.count >= MAX_RANGES:
            engine.invalidate()
            return
        ranges.add((lo, hi))
        engine.count += 1
        owners = self._pages.get(pfn)
        if owners is None:
            owners = self._pages[pfn] = {}
            self.memory.watch_page(pfn)
        if engine not in owners:
            owners[engine] = ranges
            # Another engine's TLB may map this page writable from before: make it ask again.
            for other in self.engines:
                if other is not engine and pfn in other.writable:
                    other.flush_tlb()

    def foreign_code(self, engine: EngineCode, pfn: int) -> bool:
        owners = self._pages.get(pfn)
        return owners is not None and any(e is not engine for e in owners)

    def code_written(self, address: int, size: int, *, by: EngineCode | None = None) -> None:
        """Memory [address, address + size) was written (by Python, or by ``by``'s guest):
        every other engine with a TB over those bytes drops its TBs."""
        end = address + size
        hit: list[EngineCode] = []
        for pfn in range(address >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1):
            for engine, ranges in self._pages.get(pfn, {}).items():
                if engine is not by and engine not in hit and any(lo < end and address < hi for lo, hi in ranges):
                    hit.append(engine)
        for engine in hit:
            engine.invalidate()

    def forget(self, engine: EngineCode) -> None:
        for pfn in engine.ranges:
            owners = self._pages.get(pfn)
            if owners is not None:
                owners.pop(engine, None)
                if not owners:
                    del self._pages[pfn]
                    self.memory.unwatch_page(pfn)
        engine.ranges = {}
        engine.count = 0


def engine_code(memory: PhysicalMemory, cpu: UnicornCpu) -> EngineCode:
    """The code tracking of a new engine over ``memory`` (shared with the engines already there,
    kept in the memory's ``engine_state``)."""
    shared = memory.engine_state.get("translated_code")
    if not isinstance(shared, TranslatedCode):
        shared = TranslatedCode(memory)
        memory.engine_state["translated_code"] = shared
    return shared.attach(cpu)
