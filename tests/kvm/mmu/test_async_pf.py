"""Asynchronous page faults, host side, as a state machine (no CPU engine): the MSRs, when a
fault may go asynchronous, the "page not present" and "page ready" notifications of both
protocols, the halt fallback, and the prefault when the page is in.

Linux: virt/kvm/async_pf.c (kvm_setup_async_pf(), kvm_check_async_pf_completion(),
kvm_async_pf_wakeup_all()), arch/x86/kvm/x86.c (kvm_pv_enable_async_pf(),
kvm_can_do_async_pf(), kvm_can_deliver_async_pf(), kvm_arch_async_page_not_present(),
kvm_arch_async_page_present(), alloc_apf_token()); Documentation/virt/kvm/x86/msr.rst
(MSR_KVM_ASYNC_PF_EN/_INT/_ACK); seed 001 (the guest's do_async_page_fault()).
"""

from __future__ import annotations

import pytest

from pyvmx.arch.msr import (
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_SEND_ALWAYS,
    KVM_PV_REASON_PAGE_NOT_PRESENT,
    KVM_PV_REASON_PAGE_READY,
    Msr,
)
from pyvmx.kvm.mmu import RetPf
from pyvmx.kvm.mmu.async_pf import (
    APF_BROADCAST_TOKEN,
    ASYNC_PF_PER_VCPU,
    ApfEvent,
    ApfEventKind,
    ApfHalt,
    ApfVcpuState,
    AsyncPf,
    AsyncPfWork,
)
from pyvmx.kvm.mmu.guest_memory import GuestMemory
from pyvmx.kvm.mmu.page_fault import PFERR_USER_MASK

from tests.kvm.mmu.harness import KIB4, MIB, MmuEnv

AREA = 0x1000  # the shared kvm_vcpu_pv_apf_data
VECTOR = 0xEC
LATENCY = 1000
USER = ApfVcpuState(interrupts_allowed=True, cpl=3)
KERNEL = ApfVcpuState(interrupts_allowed=True, cpl=0)
CLI = ApfVcpuState(interrupts_allowed=False, cpl=3)


class Setup:
    def __init__(self, *, protocol: str = "int", vcpu_id: int = 0) -> None:
        self.env = MmuEnv.create(huge_pages=False, page_in_latency=LATENCY)
        self.hva = self.env.add_slot(0, 0, 4 * MIB, huge=False)
        self.memory = GuestMemory(self.env.memslots, self.env.host_mm)
        self.apf = AsyncPf(self.env.host_mm, self.memory, vcpu_id=vcpu_id, mmu=self.env.mmu)
        if protocol == "int":
            assert self.apf.set_msr(Msr.KVM_ASYNC_PF_INT, VECTOR)
            assert self.apf.set_msr(Msr.KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT)
        elif protocol == "legacy":
            assert self.apf.set_msr(Msr.KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED)
        self.ack_broadcast()

    def ack_broadcast(self) -> None:
        """Enabling queues a broadcast wakeup (kvm_async_pf_wakeup_all()); consume it."""
        self.apf.check_completion(USER)
        self.apf.take_events()
        self.guest_ack()

    def guest_ack(self) -> None:
        """What the guest's handlers do: read and reset the reason, zero the token, write the
        ACK MSR."""
        self.memory.write32(AREA, 0)
        self.memory.write32(AREA + 4, 0)
        self.apf.set_msr(Msr.KVM_ASYNC_PF_ACK, 1)

    def swapped(self, gpa: int) -> None:
        self.env.mmu.page_fault(gpa, PFERR_USER_MASK)
        self.env.host_mm.swap_out(self.hva + gpa, KIB4)
        assert self.env.walk(gpa) is None

    def fault(self, gpa: int, state: ApfVcpuState = USER, now: int = 0):  # type: ignore[no-untyped-def]
        return self.env.mmu.page_fault(gpa, PFERR_USER_MASK, async_pf=self.apf.hook(state, now))

    def flags(self) -> int:
        return self.memory.read32(AREA)

    def token_field(self) -> int:
        return self.memory.read32(AREA + 4)


def test_page_not_present_then_page_ready_by_interrupt() -> None:
    """Current protocol: the fault ends in RET_PF_RETRY with a "page not present" #PF queued
    (CR2 = token, flags = KVM_PV_REASON_PAGE_NOT_PRESENT, pf_guest counted); when the page-in
    completes at its guest-TSC time the page is mapped (prefetch fault) and the vector of
    MSR_KVM_ASYNC_PF_INT is raised with the token in the shared area."""
    s = Setup()
    s.swapped(0x7000)
    outcome = s.fault(0x7000, now=100)
    assert outcome.result is RetPf.RETRY and isinstance(outcome.async_pf, AsyncPfWork)
    token = outcome.async_pf.token
    assert token == 1 << 12  # alloc_apf_token(): the first id is 1 (the broadcast uses none)
    assert s.apf.take_events() == [ApfEvent(ApfEventKind.PAGE_NOT_PRESENT, token, 14, token, 0)]
    assert s.flags() == KVM_PV_REASON_PAGE_NOT_PRESENT
    assert s.env.mmu.stats["pf_guest"] == 1 and not s.apf.halted
    assert s.apf.next_completion() == 100 + LATENCY

    assert s.apf.poll(100 + LATENCY - 1) == [] and s.apf.check_completion(USER) == []
    assert s.apf.poll(100 + LATENCY) == [outcome.async_pf]
    events = s.apf.check_completion(USER)
    assert events == [ApfEvent(ApfEventKind.PAGE_READY, token, VECTOR)]
    assert s.token_field() == token and s.apf.pageready_pending
    assert s.env.walk(0x7000) is not None  # kvm_arch_async_page_ready() prefaulted it
    assert s.env.mmu.stats["pf_taken"] == 2  # the swap-in fault and the async one; not the prefetch
    assert s.apf.queue == []


def test_token_is_never_zero_and_carries_the_vcpu_id() -> None:
    """alloc_apf_token(): (id++ << 12) | vcpu_id, skipping an id whose shifted value is 0."""
    s = Setup(vcpu_id=3)
    tokens = []
    for n in range(3):
        gpa = 0x10000 + n * KIB4
        s.swapped(gpa)
        tokens.append(s.fault(gpa).async_pf.token)
    assert tokens == [(1 << 12) | 3, (2 << 12) | 3, (3 << 12) | 3]


def test_next_page_ready_waits_for_the_guest_ack() -> None:
    """kvm_arch_can_dequeue_async_page_present(): with the token slot still holding the last
    token, no new "page ready" is sent; after the guest zeroes it and ACKs, the next goes."""
    s = Setup()
    works = []
    for gpa in (0x20000, 0x21000):
        s.swapped(gpa)
        works.append(s.fault(gpa).async_pf)
    s.apf.take_events()
    s.apf.poll(10 * LATENCY)
    first = s.apf.check_completion(USER)
    assert [e.token for e in first] == [works[0].token]
    s.apf.take_events()
    assert s.apf.check_completion(USER) == []  # slot busy
    s.guest_ack()
    assert [e.token for e in s.apf.check_completion(USER)] == [works[1].token]


def test_enabling_queues_a_broadcast_wakeup() -> None:
    """kvm_pv_enable_async_pf() -> kvm_async_pf_wakeup_all(): a "page ready" with token ~0."""
    s = Setup(protocol="none")
    assert s.apf.set_msr(Msr.KVM_ASYNC_PF_INT, VECTOR)
    assert s.apf.set_msr(Msr.KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT)
    assert s.apf.check_completion(USER) == [ApfEvent(ApfEventKind.PAGE_READY, APF_BROADCAST_TOKEN, VECTOR)]
    assert s.token_field() == APF_BROADCAST_TOKEN


def test_legacy_protocol_page_ready_is_a_page_fault() -> None:
    """Pre-5.8 protocol (ENABLED without DELIVERY_AS_INT): both notifications are #PFs with
    CR2 = token, told apart by the reason in the shared area."""
    s = Setup(protocol="legacy")
    s.swapped(0x7000)
    work = s.fault(0x7000).async_pf
    assert s.apf.take_events() == [ApfEvent(ApfEventKind.PAGE_NOT_PRESENT, work.token, 14, work.token, 0)]
    assert s.flags() == KVM_PV_REASON_PAGE_NOT_PRESENT
    s.memory.write32(AREA, 0)  # the guest's kvm_read_and_reset_pf_reason()
    s.apf.poll(LATENCY)
    assert s.apf.check_completion(CLI) == []  # interrupts off: not now
    assert s.apf.check_completion(USER) == [ApfEvent(ApfEventKind.PAGE_READY, work.token, 14, work.token, 0)]
    assert s.flags() == KVM_PV_REASON_PAGE_READY
    # The broadcast wakeup at enable time was a #PF too (token ~0), then these two.
    assert s.env.mmu.stats["pf_guest"] == 3


def test_legacy_page_ready_waits_for_the_pending_not_present_fault() -> None:
    """kvm_arch_can_inject_async_page_present() (pre-5.8) -> kvm_can_do_async_pf(): while the
    "not present" #PF is still pending (not yet injected) no "page ready" #PF is made; once the
    vCPU has taken it, the page-ready #PF follows -- one per VM entry."""
    s = Setup(protocol="legacy")
    for gpa in (0x7000, 0x8000):
        s.swapped(gpa)
        s.fault(gpa)
    s.apf.poll(LATENCY)
    assert [e.kind for e in s.apf.check_completion(USER)] == [ApfEventKind.PAGE_NOT_PRESENT] * 2
    assert len(s.apf.take_events()) == 2
    assert [e.kind for e in s.apf.check_completion(USER)] == [ApfEventKind.PAGE_READY]
    s.apf.take_events()
    assert [e.kind for e in s.apf.check_completion(USER)] == [ApfEventKind.PAGE_READY]
    assert not s.apf.done


def test_kernel_mode_without_send_always_halts_instead() -> None:
    """kvm_can_deliver_async_pf(): CPL 0 without KVM_ASYNC_PF_SEND_ALWAYS cannot take the #PF:
    the vCPU halts (KVM_REQ_APF_HALT) and wakes when the page is in, with no notification."""
    s = Setup()
    s.swapped(0x7000)
    outcome = s.fault(0x7000, KERNEL)
    assert outcome.result is RetPf.RETRY and not outcome.async_pf.notpresent_injected
    assert s.apf.halted and s.apf.take_events() == []
    s.apf.poll(LATENCY)
    assert s.apf.check_completion(KERNEL) == [] and not s.apf.halted
    assert s.env.walk(0x7000) is not None

    s2 = Setup()
    assert s2.apf.set_msr(Msr.KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT | KVM_ASYNC_PF_SEND_ALWAYS)
    s2.ack_broadcast()
    s2.swapped(0x7000)
    assert s2.fault(0x7000, KERNEL).async_pf.notpresent_injected


def test_not_enabled_guest_gets_a_synthetic_halt() -> None:
    """kvm_can_do_async_pf() does not need the guest's consent: without the MSR the fault still
    goes asynchronous, as a halt (interrupts can still wake the vCPU)."""
    s = Setup(protocol="none")
    s.swapped(0x7000)
    assert s.fault(0x7000).result is RetPf.RETRY and s.apf.halted


def test_interrupts_off_pages_in_synchronously() -> None:
    """kvm_can_do_async_pf(): with interrupts off not even a halt is possible; the fault waits
    for the page (the second __kvm_faultin_pfn() without FOLL_NOWAIT) and is FIXED."""
    s = Setup()
    s.swapped(0x7000)
    assert s.fault(0x7000, CLI).result is RetPf.FIXED
    assert s.apf.queue == [] and s.apf.stats["apf_sync"] == 1
    pending = ApfVcpuState(interrupts_allowed=True, event_pending=True)
    s.swapped(0x8000)
    assert s.fault(0x8000, pending).result is RetPf.FIXED


def test_repeated_fault_on_a_page_coming_in_halts() -> None:
    """kvm_find_async_pf_gfn(): a second fault on a gfn already queued -> KVM_REQ_APF_HALT."""
    s = Setup()
    s.swapped(0x7000)
    work = s.fault(0x7000).async_pf
    again = s.fault(0x7000)
    assert again.result is RetPf.RETRY and isinstance(again.async_pf, ApfHalt) and again.async_pf.work is work
    assert s.apf.halted and len(s.apf.queue) == 1


def test_queue_limit_falls_back_to_synchronous() -> None:
    """kvm_setup_async_pf(): at ASYNC_PF_PER_VCPU queued works, no more async."""
    s = Setup()
    for n in range(ASYNC_PF_PER_VCPU + 1):
        s.swapped(0x100000 + n * KIB4)
    results = [s.fault(0x100000 + n * KIB4).result for n in range(ASYNC_PF_PER_VCPU + 1)]
    assert results == [RetPf.RETRY] * ASYNC_PF_PER_VCPU + [RetPf.FIXED]


@pytest.mark.parametrize(
    ("msr", "value"),
    [
        (Msr.KVM_ASYNC_PF_EN, AREA | KVM_ASYNC_PF_ENABLED | 0x10),  # bits 5:4 reserved
        (Msr.KVM_ASYNC_PF_EN, 0x4000_0000 | KVM_ASYNC_PF_ENABLED),  # area not in guest RAM
        (Msr.KVM_ASYNC_PF_INT, 0x100),  # the vector is 8 bits
    ],
)
def test_bad_msr_writes_are_refused(msr: Msr, value: int) -> None:
    """kvm_set_msr_common(): a refused write (#GP for the guest) changes nothing."""
    s = Setup(protocol="none")
    assert not s.apf.set_msr(msr, value)
    assert s.apf.get_msr(Msr.KVM_ASYNC_PF_EN) == 0


def test_disabling_clears_the_queue() -> None:
    """kvm_pv_enable_async_pf(0) -> kvm_clear_async_pf_completion_queue()."""
    s = Setup()
    s.swapped(0x7000)
    s.fault(0x7000)
    assert s.apf.set_msr(Msr.KVM_ASYNC_PF_EN, 0)
    assert s.apf.queue == [] and not s.apf.find_gfn(7)
