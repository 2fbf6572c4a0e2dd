"""Reflected exceptions that fault again while being delivered, and run() loops that let no
guest time pass: neither may hang the host."""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import INTR_INFO_DELIVER_CODE_MASK, INTR_INFO_VALID_MASK
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.x86 import ExceptionVector
from pyvmx.kvm import events
from pyvmx.kvm import exit_handlers as h
from pyvmx.kvm.boot import setup_long_mode
from pyvmx.kvm.exits import KVM_INTERNAL_ERROR_DELIVERY_EV, InternalError, Resume, TimeLimitExit
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.vcpu import MAX_ENTRIES_WITHOUT_PROGRESS, Vcpu
from pyvmx.vmx.outcomes import VmExitInfo

PF_INFO = INTR_INFO_VALID_MASK | INTR_INFO_DELIVER_CODE_MASK | (3 << 8) | 14


@pytest.fixture
def vcpu() -> Vcpu:
    kvm = Kvm(engine=False)
    vm = kvm.create_vm(memory_size=4 << 20)
    v = vm.create_vcpu()
    setup_long_mode(v, 0x10000)
    return v


def pf_exit() -> VmExitInfo:
    return VmExitInfo(reason=int(ExitReason.EXCEPTION_NMI), qualification=0xFFFFFFFFFFFFFFF8, intr_info=PF_INFO, intr_error_code=2)


def test_reflected_pf_during_pf_delivery_becomes_double_fault(vcpu: Vcpu) -> None:
    """An intercepted #PF raised while delivering a #PF: vmx_complete_interrupts() requeues the
    first one as the injected exception, and kvm_queue_exception() of the reflected #PF then
    goes through kvm_multiple_exception() against it -- #PF then #PF is #DF (SDM Table 6-5,
    arch/x86/kvm/x86.c kvm_multiple_exception()).  Before, the pair was re-injected for ever."""
    vcpu.intercept_exception(ExceptionVector.PF)
    vcpu.reinject = events.exception(int(ExceptionVector.PF), 2, cr2=0x1000)
    assert isinstance(h.handle_exit(vcpu, pf_exit()), Resume)
    assert vcpu.reinject is None
    assert vcpu.exception is not None and vcpu.exception.vector == ExceptionVector.DF


def test_reflected_fault_during_double_fault_delivery_is_a_triple_fault(vcpu: Vcpu) -> None:
    """A fault while delivering #DF: kvm_multiple_exception() -> KVM_REQ_TRIPLE_FAULT."""
    vcpu.intercept_exception(ExceptionVector.PF)
    vcpu.reinject = events.exception(int(ExceptionVector.DF), 0)
    h.handle_exit(vcpu, pf_exit())
    assert vcpu.triple_fault_pending and vcpu.exception is None and vcpu.reinject is None


def test_reinjected_interrupt_is_not_merged_with_a_new_exception(vcpu: Vcpu) -> None:
    """Only an exception combines (kvm_multiple_exception() looks at vcpu->arch.exception): a
    requeued external interrupt stays queued for a later entry."""
    vcpu.intercept_exception(ExceptionVector.PF)
    vcpu.reinject = events.external_interrupt(0x30)
    h.handle_exit(vcpu, pf_exit())
    assert vcpu.exception is not None and vcpu.exception.vector == ExceptionVector.PF
    assert vcpu.reinject == events.external_interrupt(0x30)


def test_run_gives_up_when_guest_time_stands_still(vcpu: Vcpu) -> None:
    """Exits that let no guest time pass cannot reach ``time_limit``: run() reports the livelock
    (KVM_INTERNAL_ERROR_DELIVERY_EV) instead of looping."""
    calls = []

    def run_once(pcpu: object, *, deadlines: tuple[int | None, ...] = ()) -> Resume:
        calls.append(1)
        return Resume("nothing happened")

    vcpu.run_once = run_once  # type: ignore[method-assign]
    exit = vcpu.run(time_limit=1000)
    assert isinstance(exit, InternalError) and exit.suberror == KVM_INTERNAL_ERROR_DELIVERY_EV
    assert "no progress" in exit.reason
    assert len(calls) == MAX_ENTRIES_WITHOUT_PROGRESS


def test_run_with_zero_time_limit_returns_at_once(vcpu: Vcpu) -> None:
    assert isinstance(vcpu.run(time_limit=0), TimeLimitExit)
