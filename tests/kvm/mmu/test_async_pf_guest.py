"""Asynchronous page faults end to end: a tiny two-task guest kernel on the VT-x machine and the
host side (pyvmx.kvm.mmu.async_pf) wired into a vCPU loop.

The guest (long mode, ring 0) enables the protocol with MSR_KVM_ASYNC_PF_EN (SEND_ALWAYS, so
ring 0 may take it) and starts task A, which reads pages the host has swapped out, while task
B only counts. Its #PF handler is seed 001's do_async_page_fault(): it reads and resets the
reason in the shared area; KVM_PV_REASON_PAGE_NOT_PRESENT parks the running task on the token
in CR2 (kvm_async_pf_task_wait()) and switches to the other; "page ready" -- the interrupt of
MSR_KVM_ASYNC_PF_INT with the token in the shared area (current protocol), or a #PF with
KVM_PV_REASON_PAGE_READY (legacy) -- wakes the task parked on that token
(kvm_async_pf_task_wake()) and switches back to it. Token ~0 wakes everyone.

The vCPU loop is KVM's vcpu_enter_guest() in miniature: before each entry, finish the page-ins
due by the guest TSC and deliver their notifications (kvm_check_async_pf_completion()), inject
the queued events, arm the VMX-preemption timer for the next page-in (the kick KVM's worker
would send); after each exit, hand EPT violations to the MMU with the async-PF hook
(kvm_mmu_page_fault() -> __kvm_mmu_faultin_pfn() -> kvm_arch_setup_async_pf()), re-inject
an event whose delivery was interrupted (vmx_complete_interrupts()), and emulate WRMSR.

SDM: 27.6 (VM-entry event injection), 28.2.4 (IDT-vectoring information), 26.5.1 (VMX-preemption
timer), 6.14 (64-bit interrupt gates).
"""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.engine.unicorn_cpu import REG_CR2
from pyvmx.kvm.mmu import RetPf, ept_violation_error_code
from pyvmx.kvm.mmu.async_pf import ApfEvent, ApfVcpuState, AsyncPf
from pyvmx.kvm.mmu.guest_memory import GuestMemory

from tests.kvm.mmu.harness import KIB4, MIB, MmuEnv

pytestmark = pytest.mark.machine

PAGES = 6
SLOW = 0x40_0000  # the swapped-out pages task A reads
LATENCY = 50_000  # guest TSC ticks per page-in
VECTOR = 0xEC
INTR_INFO_VALID = 1 << 31
INTR_TYPE_EXT_INTR = 0 << 8
INTR_TYPE_HARD_EXCEPTION = 3 << 8
INTR_INFO_DELIVER_CODE = 1 << 11

GUEST = r"""
    .equ LEGACY, {legacy}
    .equ IDT, 0x2000
    .macro SETGATE vec, handler
        lea \handler(%rip), %rax
        mov $IDT + \vec * 16, %rdi
        mov %ax, (%rdi)
        movw $0x18, 2(%rdi)
        movw $0x8e00, 4(%rdi)
        shr $16, %rax
        mov %ax, 6(%rdi)
        shr $16, %rax
        mov %eax, 8(%rdi)
        movl $0, 12(%rdi)
    .endm
    .macro SAVE
        push %rax; push %rbx; push %rcx; push %rdx; push %rsi; push %rdi; push %rbp
        push %r8; push %r9; push %r10; push %r11; push %r12; push %r13; push %r14; push %r15
    .endm
    .macro RESTORE
        pop %r15; pop %r14; pop %r13; pop %r12; pop %r11; pop %r10; pop %r9
        pop %r8; pop %rbp; pop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rbx; pop %rax
    .endm

_start:
    SETGATE 14, pf_handler
    SETGATE {vector}, ready_handler
    # Task B starts from a fake interrupt frame + saved registers on its own stack.
    lea stack_b_top(%rip), %rdi
    mov %rdi, %rbx
    sub $8, %rdi; movq $0x10, (%rdi)
    sub $8, %rdi; mov %rbx, (%rdi)
    sub $8, %rdi; movq $0x202, (%rdi)
    sub $8, %rdi; movq $0x18, (%rdi)
    sub $8, %rdi; lea task_b(%rip), %rax; mov %rax, (%rdi)
    sub $120, %rdi
    mov %rdi, task_sp+8(%rip)
    # Enable async PF (Documentation/virt/kvm/x86/msr.rst).
.if LEGACY == 0
    mov $0x4b564d06, %ecx; mov ${vector}, %eax; xor %edx, %edx; wrmsr
.endif
    lea apf_area(%rip), %rax
    or ${en_flags}, %rax
    mov %rax, %rdx; shr $32, %rdx
    mov $0x4b564d02, %ecx
    wrmsr
    sti

task_a:
    mov ${slow:#x}, %rsi
    xor %ebx, %ebx
    lea results(%rip), %rdi
1:  mov (%rsi), %rax                  # a swapped-out page: async page fault
    mov counter(%rip), %rdx
    mov %rax, (%rdi, %rbx, 8)
    mov %rdx, 8(%rdi, %rbx, 8)
    add $0x1000, %rsi
    add $2, %rbx
    cmp ${pages} * 2, %rbx
    jne 1b
done:
    hlt

task_b:
    incq counter(%rip)
    jmp task_b

pf_handler:                            # do_async_page_fault()
    add $8, %rsp                       # the error code
    SAVE
    mov apf_area(%rip), %eax           # kvm_read_and_reset_apf_flags()
    movl $0, apf_area(%rip)
    mov %cr2, %rbx
    cmp $1, %eax
    je page_not_present
    cmp $2, %eax
    je wake
    mov $0xbad, %r15                    # a genuine #PF: not expected here
    hlt
page_not_present:                      # kvm_async_pf_task_wait()
    mov npf(%rip), %rcx
    lea tokens(%rip), %rdx
    mov %rbx, (%rdx, %rcx, 8)
    incq npf(%rip)
    mov cur(%rip), %rcx
    lea waiting(%rip), %rdx
    mov %rbx, (%rdx, %rcx, 8)
    jmp switch_to_other

ready_handler:                         # the page-ready interrupt
    SAVE
    mov apf_area+4(%rip), %ebx
    movl $0, apf_area+4(%rip)
    mov $0x4b564d07, %ecx; mov $1, %eax; xor %edx, %edx; wrmsr
wake:                                  # kvm_async_pf_task_wake(token in %rbx)
    incq nready(%rip)
    lea waiting(%rip), %rdx
    mov cur(%rip), %rcx
    xor $1, %rcx                       # the other task (the running one waits on nothing)
    mov $0xffffffff, %eax
    cmp %rax, %rbx
    je 2f                              # token ~0: wake everyone
    cmp %rbx, (%rdx, %rcx, 8)
    jne out                            # nobody waits on this token
2:  cmpq $0, (%rdx, %rcx, 8)
    je out
    movq $0, (%rdx, %rcx, 8)
    jmp switch_to_other
out:
    RESTORE
    iretq

switch_to_other:
    mov cur(%rip), %rcx
    lea task_sp(%rip), %rdx
    mov %rsp, (%rdx, %rcx, 8)
    xor $1, %rcx
    mov %rcx, cur(%rip)
    mov (%rdx, %rcx, 8), %rsp
    RESTORE
    iretq

    .align 4096
apf_area: .space 64
cur: .quad 0
task_sp: .quad 0, 0
waiting: .quad 0, 0
counter: .quad 0
npf: .quad 0
nready: .quad 0
tokens: .space 8 * 16
results: .space 16 * 16
    .align 4096
    .space 4096
stack_b_top:
"""


class ApfGuest:
    """The guest above on a VmxSandbox whose EPT is the MMU's, plus the vCPU loop."""

    def __init__(self, legacy: bool) -> None:
        from pyvmx.guest.sandbox import VmxSandbox

        en_flags = 1 | 2 | (0 if legacy else 8)  # ENABLED | SEND_ALWAYS | DELIVERY_AS_INT
        source = GUEST.format(legacy=int(legacy), vector=VECTOR, en_flags=en_flags, slow=SLOW, pages=PAGES)
        self.sb = sb = VmxSandbox("long", source, map_all=False, memory=64 * MIB)
        sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
        self.env = env = MmuEnv.create(memory=sb.memory, huge_pages=False, invept=lambda: sb.cpu.invept(2, 0),
                                       page_in_latency=LATENCY)
        self.hva = env.host_mm.mmap(8 * MIB, huge=False)
        for gpa in range(0, sb.guest_ram, KIB4):
            data = sb.read_memory(gpa, KIB4)
            if any(data):
                env.host_mm.write(self.hva + gpa, data)
        for n in range(PAGES):
            env.host_mm.write(self.hva + SLOW + n * KIB4, (0x1111 * (n + 1)).to_bytes(8, "little"))
        env.host_mm.swap_out(self.hva + SLOW, PAGES * KIB4)
        env.memslots.set_user_memory_region(0, 0, 0, 8 * MIB, self.hva)
        sb.write(F.EPT_POINTER, env.mmu.eptp)
        self.memory = GuestMemory(env.memslots, env.host_mm)
        self.apf = AsyncPf(env.host_mm, self.memory, mmu=env.mmu)
        self.injected: list[ApfEvent] = []
        self.pending: list[ApfEvent] = []
        self.rate = sb.profile.preemption_timer_rate

    def state(self) -> ApfVcpuState:
        sb = self.sb
        return ApfVcpuState(
            interrupts_allowed=bool(sb.read(F.GUEST_RFLAGS) & (1 << 9)) and not sb.read(F.GUEST_INTERRUPTIBILITY_INFO) & 3,
            cpl=sb.read(F.GUEST_CS_SELECTOR) & 3,
            paging=bool(sb.read(F.GUEST_CR0) & (1 << 31)),
            event_pending=bool(sb.read(F.VM_ENTRY_INTR_INFO_FIELD) & INTR_INFO_VALID)
            or any(e.is_page_fault for e in self.pending),
        )

    def before_entry(self) -> None:
        sb, apf = self.sb, self.apf
        now = sb.cpu.read_tsc()
        apf.poll(now)
        apf.check_completion(self.state())
        self.pending += apf.take_events()
        # inject_pending_event(): one event per entry; an interrupt only into an open window,
        # else ask for an interrupt-window exit (enable_irq_window()).
        sb.clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.INTR_WINDOW_EXITING)
        if self.pending and not sb.read(F.VM_ENTRY_INTR_INFO_FIELD) & INTR_INFO_VALID:
            event = self.pending[0]
            if event.is_page_fault:  # kvm_inject_page_fault(): CR2 = token
                assert event.cr2 is not None
                sb.executor.cpu.write(REG_CR2, event.cr2)
                sb.write(F.VM_ENTRY_EXCEPTION_ERROR_CODE, 0)
                sb.write(F.VM_ENTRY_INTR_INFO_FIELD, INTR_INFO_VALID | INTR_TYPE_HARD_EXCEPTION | INTR_INFO_DELIVER_CODE | 14)
                self.injected.append(self.pending.pop(0))
            elif self.state().interrupts_allowed:  # kvm_apic_set_irq() -> vmx_inject_irq()
                sb.write(F.VM_ENTRY_INTR_INFO_FIELD, INTR_INFO_VALID | INTR_TYPE_EXT_INTR | event.vector)
                self.injected.append(self.pending.pop(0))
        if self.pending:
            sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.INTR_WINDOW_EXITING)
        deadline = apf.next_completion()
        if apf.done and apf.legacy:
            # Page-ins finished but not reported (one #PF per entry, or interrupts off): come
            # back as soon as the guest can take the next (KVM_REQ_APF_READY).
            if self.state().interrupts_allowed:
                deadline = now
            else:
                sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.INTR_WINDOW_EXITING)
        if deadline is None:
            sb.clear_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
        else:
            sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
            sb.write(F.VMX_PREEMPTION_TIMER_VALUE, max(0, -(-(deadline - now) >> self.rate)))

    def run(self, max_exits: int = 10_000) -> None:
        sb = self.sb
        for _ in range(max_exits):
            self.before_entry()
            exit = sb.run()
            if exit.idt_vectoring_info & INTR_INFO_VALID:  # vmx_complete_interrupts(): re-inject
                sb.write(F.VM_ENTRY_INTR_INFO_FIELD, exit.idt_vectoring_info)
                sb.write(F.VM_ENTRY_EXCEPTION_ERROR_CODE, exit.idt_vectoring_error_code)
                sb.write(F.VM_ENTRY_INSTRUCTION_LEN, exit.instruction_length)
            reason = exit.exit_reason
            if reason is ExitReason.EPT_VIOLATION:
                hook = self.apf.hook(self.state(), sb.cpu.read_tsc())
                outcome = self.env.mmu.page_fault(
                    exit.guest_physical_address, ept_violation_error_code(exit.qualification), async_pf=hook
                )
                assert outcome.result in (RetPf.FIXED, RetPf.SPURIOUS, RetPf.RETRY), outcome
            elif reason is ExitReason.MSR_WRITE:
                index = sb.gpr["rcx"] & 0xFFFFFFFF
                value = (sb.gpr["rdx"] & 0xFFFFFFFF) << 32 | (sb.gpr["rax"] & 0xFFFFFFFF)
                assert self.apf.set_msr(index, value), hex(index)
                sb.skip_instruction()
            elif reason in (ExitReason.PREEMPTION_TIMER, ExitReason.INTERRUPT_WINDOW):
                pass
            elif reason is ExitReason.HLT:
                return
            else:
                raise AssertionError(f"unexpected exit {exit}")
        raise AssertionError("the guest did not finish")

    def quad(self, name: str, index: int = 0) -> int:
        return self.memory.read64(self.sb.symbol(name) + 8 * index)


@pytest.mark.parametrize("legacy", [False, True], ids=["page-ready-interrupt", "legacy-page-ready-pf"])
def test_two_task_guest_runs_the_other_task_while_pages_come_in(legacy: bool) -> None:
    """Every swapped-out page task A reads costs it one "page not present" #PF (CR2 = token)
    and one "page ready"; while A is parked, task B runs (its counter grows between any two of
    A's reads); A gets the page's real contents; the tokens the guest saw are the host's; the
    host never made the vCPU wait (no synchronous page-in, no halt)."""
    guest = ApfGuest(legacy)
    guest.run()
    sb = guest.sb
    assert sb.rip == sb.symbol("done") and sb.gpr["r15"] != 0xBAD
    values = [guest.quad("results", 2 * n) for n in range(PAGES)]
    counters = [guest.quad("results", 2 * n + 1) for n in range(PAGES)]
    assert values == [0x1111 * (n + 1) for n in range(PAGES)]
    assert all(b > a for a, b in zip([0, *counters], counters)), counters
    assert guest.quad("npf") == PAGES
    assert guest.quad("nready") == PAGES + 1  # + the broadcast wakeup sent when enabling

    not_present = [e for e in guest.injected if e.kind.value == "page not present"]
    ready = [e for e in guest.injected if e.kind.value == "page ready"]
    assert [guest.quad("tokens", n) for n in range(PAGES)] == [e.token for e in not_present]
    assert [e.token for e in ready] == [0xFFFFFFFF] + [e.token for e in not_present]
    assert all(e.is_page_fault for e in ready) == legacy
    stats = guest.apf.stats
    assert (stats["apf_not_present"], stats["apf_ready"], stats["apf_halt"], stats["apf_sync"]) == (PAGES, PAGES + 1, 0, 0)
    assert guest.env.mmu.stats["pf_guest"] == PAGES + (PAGES + 1 if legacy else 0)
