"""Asynchronous page faults, host side: virt/kvm/async_pf.c and the x86 parts in
arch/x86/kvm/x86.c (kvm_arch_setup_async_pf(), kvm_can_do_async_pf(),
kvm_arch_async_page_not_present(), kvm_arch_async_page_present(), kvm_pv_enable_async_pf()).

When the fault path finds the guest page swapped out on the host (HostMm reports
:class:`NotResident`) it does not make the vCPU wait for the page-in. :meth:`AsyncPf.try_async_pf`
(the MMU's async-PF hook) starts the page-in, queues a work item with a token, and -- if the
guest enabled the protocol (MSR_KVM_ASYNC_PF_EN) and can take it now -- queues a "page not
present" #PF for the vCPU to inject (CR2 = token, reason KVM_PV_REASON_PAGE_NOT_PRESENT in the
shared area), so the guest can schedule another task; otherwise the vCPU halts until the page
is in (KVM_REQ_APF_HALT, ``halted``). The fault itself ends in RET_PF_RETRY.

When the page-in completes -- at a guest TSC time, :meth:`AsyncPf.poll` -- the work moves to the
done list; :meth:`AsyncPf.check_completion` (before each VM entry:
kvm_check_async_pf_completion()) maps the page (a prefetch fault, kvm_arch_async_page_ready())
and queues "page ready":

* current protocol (KVM_ASYNC_PF_DELIVERY_AS_INT, Linux >= 5.8): the token goes in the shared
  area's ``token`` field and the vector from MSR_KVM_ASYNC_PF_INT is raised as an interrupt;
  the next one waits until the guest has zeroed ``token`` and written MSR_KVM_ASYNC_PF_ACK;
* legacy protocol (ENABLED alone, Linux < 5.8): reason KVM_PV_REASON_PAGE_READY in the shared
  area and a #PF with CR2 = token, one per VM entry, when the vCPU could take an async PF and
  no #PF is pending (kvm_arch_can_inject_async_page_present()). (Current Linux treats ENABLED
  without DELIVERY_AS_INT as disabled; this model keeps the old protocol for old guests.)

The shared area (``struct kvm_vcpu_pv_apf_data``, 64 bytes at the MSR's bits 63:6): u32
``flags`` (legacy: ``reason``) at offset 0, u32 ``token`` at offset 4.

The class is a state machine per vCPU; the vCPU supplies its interrupt/CPL/paging state
(:class:`ApfVcpuState`) at each decision and injects the :class:`ApfEvent` values it gets.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from pyvmx.arch.msr import (
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_ASYNC_PF_VEC_MASK,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    KVM_PV_REASON_PAGE_READY,
    Msr,
)
from pyvmx.arch.x86 import ExceptionVector
from pyvmx.kvm.host_mm import HostMm, NotResident
from pyvmx.kvm.mmu.guest_memory import GuestMemory, GuestMemoryError
from pyvmx.kvm.mmu.page_fault import AsyncPfHook, KvmPageFault


class _Mmu(Protocol):
    """What async PF needs of the MMU (:class:`pyvmx.kvm.mmu.TdpMmu`)."""

    def page_fault(self, gpa: int, error_code: int, *, prefetch: bool = False) -> object: ...

    def account_guest_page_fault(self) -> None: ...

ASYNC_PF_PER_VCPU = 64  # include/linux/kvm_host.h
APF_FLAGS_OFFSET = 0  # struct kvm_vcpu_pv_apf_data.flags (legacy: reason)
APF_TOKEN_OFFSET = 4  # struct kvm_vcpu_pv_apf_data.token
APF_BROADCAST_TOKEN = 0xFFFFFFFF  # "wake up all" (kvm_async_pf_wakeup_all())
_MSR_EN_RESERVED = 0x30  # bits 5:4 of MSR_KVM_ASYNC_PF_EN


@dataclass(frozen=True, slots=True)
class ApfVcpuState:
    """What kvm_can_do_async_pf()/kvm_can_deliver_async_pf() read from the vCPU:
    ``interrupts_allowed`` (kvm_arch_interrupt_allowed(): RFLAGS.IF, no STI/MOV-SS shadow),
    ``cpl``, ``paging`` (CR0.PG), ``event_pending`` (an exception pending or an event to
    re-inject), ``guest_mode`` (an L2 guest runs), ``lapic_enabled``."""

    interrupts_allowed: bool
    cpl: int = 3
    paging: bool = True
    event_pending: bool = False
    guest_mode: bool = False
    lapic_enabled: bool = True


class ApfEventKind(enum.Enum):
    PAGE_NOT_PRESENT = "page not present"
    PAGE_READY = "page ready"


@dataclass(frozen=True, slots=True)
class ApfEvent:
    """An event for the vCPU to inject: a #PF (``vector`` 14, ``error_code`` 0, ``cr2`` the
    token) or, for page ready with the current protocol, the interrupt ``vector``."""

    kind: ApfEventKind
    token: int
    vector: int
    cr2: int | None = None
    error_code: int | None = None

    @property
    def is_page_fault(self) -> bool:
        return self.vector == ExceptionVector.PF and self.cr2 is not None


@dataclass(slots=True, eq=False)
class AsyncPfWork:
    """``struct kvm_async_pf`` (+ ``kvm_arch_async_pf``): one page-in under way for a fault."""

    token: int
    gfn: int
    gpa: int
    hva: int
    error_code: int
    ready_at: int
    wakeup_all: bool = False
    notpresent_injected: bool = False
    done: bool = False


class ApfHalt:
    """What the MMU hook returns when the vCPU faults again on a gfn already being paged in
    (KVM_REQ_APF_HALT): the vCPU halts until that page is in."""

    def __init__(self, work: AsyncPfWork) -> None:
        self.work = work

    def __repr__(self) -> str:
        return f"ApfHalt(token={self.work.token:#x})"


class AsyncPf:
    """The async-PF state of one vCPU (``vcpu->async_pf`` + ``vcpu->arch.apf``).

    ``host_mm`` pages memory in; ``guest_memory`` reaches the shared area; ``mmu``, if given,
    maps completed pages (prefetch faults) and counts injected #PFs (pf_guest)."""

    def __init__(
        self,
        host_mm: HostMm,
        guest_memory: GuestMemory,
        *,
        vcpu_id: int = 0,
        mmu: _Mmu | None = None,
        lapic_in_kernel: bool = True,
    ) -> None:
        self.host_mm = host_mm
        self.guest_memory = guest_memory
        self.vcpu_id = vcpu_id
        self.mmu = mmu
        self.lapic_in_kernel = lapic_in_kernel
        self.msr_en_val = 0
        self.msr_int_val = 0
        self.vec = 0
        self.send_always = False
        self.delivery_as_pf_vmexit = False
        self.pageready_pending = False
        self.halted = False
        self._id = 0
        self.queue: list[AsyncPfWork] = []  # every work not yet finished (vcpu->async_pf.queue)
        self.done: deque[AsyncPfWork] = deque()  # page-ins complete, ready to report
        self._gfns: set[int] = set()  # kvm_add_async_pf_gfn() hash
        self._events: list[ApfEvent] = []
        self.stats = {"apf_not_present": 0, "apf_ready": 0, "apf_halt": 0, "apf_sync": 0}

    # --- MSRs ------------------------------------------------------------------------------------
    @property
    def area_gpa(self) -> int:
        return self.msr_en_val & ~0x3F

    @property
    def legacy(self) -> bool:
        """ENABLED without DELIVERY_AS_INT: the pre-5.8 protocol (page ready as a #PF)."""
        return bool(self.msr_en_val & KVM_ASYNC_PF_ENABLED) and not self.msr_en_val & KVM_ASYNC_PF_DELIVERY_AS_INT

    def pv_async_pf_enabled(self) -> bool:
        """``kvm_pv_async_pf_enabled()`` -- or, for the legacy protocol, ENABLED alone."""
        if self.legacy:
            return True
        mask = KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT
        return self.msr_en_val & mask == mask

    def set_msr(self, index: int, value: int) -> bool:
        """WRMSR of MSR_KVM_ASYNC_PF_EN/_INT/_ACK (kvm_set_msr_common()); False means #GP."""
        if index == Msr.KVM_ASYNC_PF_EN:
            return self._enable(value)
        if index == Msr.KVM_ASYNC_PF_INT:
            if value >> 8 or not self.lapic_in_kernel:
                return False
            self.msr_int_val = value
            self.vec = value & KVM_ASYNC_PF_VEC_MASK
            return True
        if index == Msr.KVM_ASYNC_PF_ACK:
            if value & 1:
                self.pageready_pending = False  # the vCPU then calls check_completion()
            return True
        raise ValueError(f"MSR {index:#x} is not an async-PF MSR")

    def get_msr(self, index: int) -> int:
        if index == Msr.KVM_ASYNC_PF_EN:
            return self.msr_en_val
        if index == Msr.KVM_ASYNC_PF_INT:
            return self.msr_int_val
        if index == Msr.KVM_ASYNC_PF_ACK:
            return 0
        raise ValueError(f"MSR {index:#x} is not an async-PF MSR")

    def _enable(self, data: int) -> bool:
        """``kvm_pv_enable_async_pf()``."""
        if data & _MSR_EN_RESERVED:
            return False
        if not self.lapic_in_kernel:
            return data == 0
        if data & KVM_ASYNC_PF_ENABLED and not self.guest_memory.is_ram(data & ~0x3F, True):
            return False  # kvm_gfn_to_hva_cache_init() fails
        self.msr_en_val = data
        if not self.pv_async_pf_enabled():
            self.clear_completion_queue()
            return True
        self.send_always = bool(data & KVM_ASYNC_PF_SEND_ALWAYS)
        self.delivery_as_pf_vmexit = bool(data & KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT)
        self.wakeup_all()
        return True

    # --- decisions ------------------------------------------------------------------------------------
    def can_deliver(self, state: ApfVcpuState) -> bool:
        """``kvm_can_deliver_async_pf()``: may a "page not present" #PF go to the guest now?"""
        if not self.pv_async_pf_enabled():
            return False
        if not self.send_always and state.cpl == 0:
            return False
        if state.guest_mode:
            return self.delivery_as_pf_vmexit
        return state.paging

    def can_do_async_pf(self, state: ApfVcpuState) -> bool:
        """``kvm_can_do_async_pf()``: may the fault go asynchronous at all (possibly as a halt)?"""
        if not self.lapic_in_kernel or state.event_pending:
            return False
        return state.interrupts_allowed

    def _alloc_token(self) -> int:
        """``alloc_apf_token()``: never 0, the vCPU id in the low 12 bits."""
        if (self._id << 12) & 0xFFFFFFFF == 0:
            self._id = 1
        token = ((self._id << 12) | self.vcpu_id) & 0xFFFFFFFF
        self._id += 1
        return token

    def find_gfn(self, gfn: int) -> bool:
        return gfn in self._gfns

    def hook(self, state: ApfVcpuState, now: int) -> AsyncPfHook:
        """The MMU's async-PF hook for one fault, given the vCPU state and the guest TSC."""

        def try_async(fault: KvmPageFault, not_resident: NotResident) -> object | None:
            return self.try_async_pf(fault, not_resident, state, now)

        return try_async

    def try_async_pf(self, fault: KvmPageFault, not_resident: NotResident, state: ApfVcpuState, now: int) -> object | None:
        """The async branch of ``__kvm_mmu_faultin_pfn()``: None to page in synchronously;
        an :class:`ApfHalt` for a repeated fault on a page already coming in; the new
        :class:`AsyncPfWork` when one was set up."""
        if fault.prefetch or not self.can_do_async_pf(state):
            self.stats["apf_sync"] += 1
            return None
        for work in self.queue:
            if work.gfn == fault.gfn and not work.wakeup_all:
                self.halted = True
                self.stats["apf_halt"] += 1
                return ApfHalt(work)
        return self.setup(fault, not_resident, state, now)

    def setup(self, fault: KvmPageFault, not_resident: NotResident, state: ApfVcpuState, now: int) -> AsyncPfWork | None:
        """``kvm_arch_setup_async_pf()`` + ``kvm_setup_async_pf()``: start the page-in, queue
        the work, then ``kvm_arch_async_page_not_present()``."""
        if len(self.queue) >= ASYNC_PF_PER_VCPU:
            return None
        ready_at = self.host_mm.start_page_in(not_resident.hva, now)
        work = AsyncPfWork(self._alloc_token(), fault.gfn, fault.addr, not_resident.hva, fault.error_code, ready_at)
        self.queue.append(work)
        work.notpresent_injected = self._page_not_present(work, state)
        return work

    def _page_not_present(self, work: AsyncPfWork, state: ApfVcpuState) -> bool:
        """``kvm_arch_async_page_not_present()``."""
        self._gfns.add(work.gfn)
        if self.can_deliver(state) and self._put_flags(KVM_PV_REASON_PAGE_NOT_PRESENT):
            self._inject_pf(ApfEventKind.PAGE_NOT_PRESENT, work.token)
            self.stats["apf_not_present"] += 1
            return True
        self.halted = True  # KVM_REQ_APF_HALT: a synthetic halt instead
        self.stats["apf_halt"] += 1
        return False

    # --- completion ------------------------------------------------------------------------------------
    def poll(self, now: int) -> list[AsyncPfWork]:
        """``async_pf_execute()`` for every page-in finished by guest TSC ``now``: the works
        whose page is in move to the done list. Returns them."""
        self.host_mm.complete_page_ins(now)
        finished = []
        for work in self.queue:
            if not work.done and not work.wakeup_all and self.host_mm.is_resident(work.hva):
                work.done = True
                self.done.append(work)
                finished.append(work)
        return finished

    def next_completion(self) -> int | None:
        """The guest TSC at which the earliest outstanding page-in completes."""
        times = [work.ready_at for work in self.queue if not work.done and not work.wakeup_all]
        return min(times) if times else None

    def wakeup_all(self) -> None:
        """``kvm_async_pf_wakeup_all()``: queue a broadcast "page ready" (token ~0)."""
        if self.done:
            return
        work = AsyncPfWork(APF_BROADCAST_TOKEN, 0, 0, 0, 0, 0, wakeup_all=True, done=True)
        self.queue.append(work)
        self.done.append(work)

    def _can_dequeue(self, state: ApfVcpuState) -> bool:
        """``kvm_arch_can_dequeue_async_page_present()`` (legacy: ..._can_inject_...)."""
        if not self.pv_async_pf_enabled():
            return True
        if self.legacy:
            # A #PF this object queued and the vCPU has not injected yet is a pending exception
            # (vcpu->arch.exception.pending), which kvm_can_do_async_pf() waits out.
            return self.can_do_async_pf(state) and not any(e.is_page_fault for e in self._events)
        return state.lapic_enabled and self._slot_free()

    def check_completion(self, state: ApfVcpuState) -> list[ApfEvent]:
        """``kvm_check_async_pf_completion()``: for each finished page-in, in order, while the
        guest can take a notification: map the page, report "page ready". Returns the events
        now queued for injection (see :meth:`take_events`)."""
        while self.done and self._can_dequeue(state):
            work = self.done.popleft()
            self._page_ready(work)
            self._page_present(work)
            self.queue.remove(work)
            if self.legacy and self._events:
                break  # one #PF per entry: the vCPU now has an exception pending
        return list(self._events)

    def _page_ready(self, work: AsyncPfWork) -> None:
        """``kvm_arch_async_page_ready()``: map the page now that it is in (a prefetch fault)."""
        if work.wakeup_all or self.mmu is None:
            return
        self.mmu.page_fault(work.gpa, work.error_code, prefetch=True)

    def _page_present(self, work: AsyncPfWork) -> None:
        """``kvm_arch_async_page_present()``."""
        if not work.wakeup_all:
            self._gfns.discard(work.gfn)
        if self.legacy:
            self._legacy_page_present(work)
        elif (work.wakeup_all or work.notpresent_injected) and self.pv_async_pf_enabled():
            if self._put_token(work.token):
                self.pageready_pending = True
                self._events.append(ApfEvent(ApfEventKind.PAGE_READY, work.token, self.vec))
                self.stats["apf_ready"] += 1
        self.halted = False

    def _legacy_page_present(self, work: AsyncPfWork) -> None:
        if self._put_flags(KVM_PV_REASON_PAGE_READY):
            self._inject_pf(ApfEventKind.PAGE_READY, work.token)
            self.stats["apf_ready"] += 1

    def clear_completion_queue(self) -> None:
        """``kvm_clear_async_pf_completion_queue()``: drop every work (the page-ins go on)."""
        self.queue.clear()
        self.done.clear()
        self._gfns.clear()
        self.halted = False

    # --- events and the shared area -----------------------------------------------------------------------
    def take_events(self) -> list[ApfEvent]:
        """The events to inject, oldest first, handed over once."""
        events, self._events = self._events, []
        return events

    def _inject_pf(self, kind: ApfEventKind, token: int) -> None:
        self._events.append(ApfEvent(kind, token, int(ExceptionVector.PF), token, 0))
        if self.mmu is not None:
            self.mmu.account_guest_page_fault()

    def _put_flags(self, value: int) -> bool:
        try:
            self.guest_memory.write32(self.area_gpa + APF_FLAGS_OFFSET, value)
        except GuestMemoryError:
            return False
        return True

    def _put_token(self, token: int) -> bool:
        try:
            self.guest_memory.write32(self.area_gpa + APF_TOKEN_OFFSET, token)
        except GuestMemoryError:
            return False
        return True

    def _slot_free(self) -> bool:
        """``apf_pageready_slot_free()``: the guest has consumed the last token."""
        try:
            return self.guest_memory.read32(self.area_gpa + APF_TOKEN_OFFSET) == 0
        except GuestMemoryError:
            return False
