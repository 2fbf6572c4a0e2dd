"""Non-canonical addresses fault (SDM 3.3.7.1; each instruction's 64-bit-mode exceptions in
SDM Vol. 2; SDM 6.15 for #SS vs #GP), whether the instruction runs on the engine or exits to
the hypervisor -- and the faults go through the VMX exception path like any other: with #GP and
#SS in the exception bitmap each is a VM exit with its vector and error code (SDM 26.2) that
KVM reflects, and the guest sees the same thing.

* WRMSR of FS_BASE, GS_BASE, KERNEL_GS_BASE, SYSENTER_ESP/EIP (passed through to the guest, so
  executed by the machine) and of LSTAR, CSTAR (intercepted: kvm_set_msr_common()'s
  is_noncanonical_address() check): #GP(0);
* WRFSBASE: #GP(0); LGDT/LIDT: #GP(0); LLDT/LTR of a 16-byte descriptor whose base is
  non-canonical: #GP(selector); LTR of a null selector: #GP(0), of a 16-bit TSS in IA-32e mode:
  #GP(selector) (SDM 8.2.3);
* a load through a non-canonical pointer: #GP(0); through RBP, or a PUSH with a non-canonical
  RSP: #SS(0) (delivered on IST1, as kernels do).
"""

from __future__ import annotations

import pytest

from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import ExceptionVector
from pyvmx.kvm.exits import DebugExit, TraceRecord
from pyvmx.kvm.msrs import is_canonical

from tests.kvm.cpu.ring3 import TSS_BASE, ring3_guest
from tests.kvm.hv.guests import DEFAULT_LIMIT, u32, u64

pytestmark = pytest.mark.machine

NONCANONICAL = 0x0000800000000000
LDT_BASE_LOW = 0x31000

CHECKS: list[tuple[str, str, int, int]] = [
    # (label of the faulting instruction, set-up, vector, error code)
    ("wrmsr_fs_base", "mov $0xC0000100, %ecx; mov $0x8000, %edx; xor %eax, %eax", 13, 0),
    ("wrmsr_gs_base", "mov $0xC0000101, %ecx; mov $0x8000, %edx; xor %eax, %eax", 13, 0),
    ("wrmsr_kernel_gs_base", "mov $0xC0000102, %ecx; mov $0x8000, %edx; xor %eax, %eax", 13, 0),
    ("wrmsr_sysenter_esp", "mov $0x175, %ecx; mov $0x8000, %edx; xor %eax, %eax", 13, 0),
    ("wrmsr_sysenter_eip", "mov $0x176, %ecx; mov $0x8000, %edx; xor %eax, %eax", 13, 0),
    ("wrmsr_lstar", "mov $0xC0000082, %ecx; mov $0x8000, %edx; xor %eax, %eax", 13, 0),
    ("wrmsr_cstar", "mov $0xC0000083, %ecx; mov $0x8000, %edx; xor %eax, %eax", 13, 0),
    ("wrfsbase", f"mov ${NONCANONICAL:#x}, %rax", 13, 0),
    ("lgdt", "lea bad_dtr(%rip), %rbx", 13, 0),
    ("lidt", "lea bad_dtr(%rip), %rbx", 13, 0),
    ("lldt", "mov $0x50, %ax", 13, 0x50),
    ("ltr", "mov $0x60, %ax", 13, 0x60),
    ("ltr_null", "xor %eax, %eax", 13, 0),
    ("ltr_tss16", "mov $0x70, %ax", 13, 0x70),
    ("load", f"mov ${NONCANONICAL:#x}, %rax", 13, 0),
    ("load_rbp", f"mov ${NONCANONICAL:#x}, %rbp", 12, 0),
    ("push", f"mov ${NONCANONICAL + 0x100:#x}, %rsp", 12, 0),
]
INJECTED_BY_KVM = frozenset({"wrmsr_lstar", "wrmsr_cstar"})  # MSR-write exits: KVM's own check
INSTRUCTION = {
    "wrfsbase": "wrfsbase %rax", "lgdt": "lgdt (%rbx)", "lidt": "lidt (%rbx)", "lldt": "lldt %ax",
    "ltr": "ltr %ax", "ltr_null": "ltr %ax", "ltr_tss16": "ltr %ax", "load": "mov (%rax), %ecx", "load_rbp": "mov 8(%rbp), %ecx",
    "push": "push %rax",
}


def _body() -> str:
    steps = []
    for i, (label, setup, _, _) in enumerate(CHECKS):
        insn = INSTRUCTION.get(label, "wrmsr")
        steps.append(
            f"    lea next_{i}(%rip), %rax\n    mov %rax, resume(%rip)\n"
            f"    {setup.replace('; ', chr(10) + '    ')}\n{label}:\n    {insn}\nnext_{i}:\n"
        )
    return rf"""
    KGATE 13, gp_handler
    KGATE 12, ss_handler
    movb $1, idt + 12 * 16 + 4(%rip)   # #SS on IST1
    KERNEL_SETUP
    movq $0xC000, {TSS_BASE + 0x24}    # TSS.IST1
    mov %cr4, %rax
    or $(1 << 16), %rax                # CR4.FSGSBASE
    mov %rax, %cr4
    mov %rsp, good_rsp(%rip)
{''.join(steps)}
    rdfsbase %rax                      # the refused WRMSR/WRFSBASE loaded nothing
    mov %rax, fs_base_after(%rip)
    EXIT_WITH $0x77
    hlt
gp_handler:
    pushq $13
    jmp record
ss_handler:
    pushq $12
record:                                # vector, error code, RIP, CS, RFLAGS, RSP, SS
    mov count(%rip), %ecx
    shl $4, %ecx
    lea log(%rip), %rdx
    add %rcx, %rdx
    mov (%rsp), %rax
    mov %eax, (%rdx)
    mov 8(%rsp), %rax
    mov %eax, 4(%rdx)
    mov 16(%rsp), %rax
    mov %rax, 8(%rdx)
    incl count(%rip)
    mov resume(%rip), %rax
    mov %rax, 16(%rsp)
    mov good_rsp(%rip), %rax
    mov %rax, 40(%rsp)
    add $16, %rsp
    iretq
    .align 8
bad_dtr: .word 0xFF
    .quad {NONCANONICAL:#x}
good_rsp: .quad 0
resume: .quad 0
fs_base_after: .quad -1
count: .long 0
    .align 16
log: .fill {2 * len(CHECKS)}, 8, 0
"""


EXTRA_GDT = f"""
    .word 0x0F, {LDT_BASE_LOW & 0xFFFF}   # 0x50 LDT, base 0000_8000_0003_1000
    .byte {LDT_BASE_LOW >> 16}, 0x82, 0x00, 0x00
    .long 0x8000, 0
    .word 0x67, 0x0000                    # 0x60 TSS, base 0000_8000_0003_0000
    .byte 0x03, 0x89, 0x00, 0x00
    .long 0x8000, 0
    .word 0x67, 0x0000                    # 0x70 16-bit TSS (type 1): not in IA-32e mode
    .byte 0x03, 0x81, 0x00, 0x00
    .long 0, 0
"""


@pytest.mark.parametrize("intercept", [False, True], ids=["direct", "exception-bitmap"])
def test_non_canonical_addresses_fault(intercept: bool) -> None:
    vm, vcpu, img = ring3_guest(_body(), extra_gdt=EXTRA_GDT)
    exits: list[tuple[int, int, int, int]] = []

    def trace(record: TraceRecord) -> None:
        if record.reason == ExitReason.EXCEPTION_NMI:
            info = vcpu.vmcs_read(F.VM_EXIT_INTR_INFO)
            exits.append((info & 0xFF, vcpu.vmcs_read(F.VM_EXIT_INTR_ERROR_CODE), record.rip, (info >> 8) & 7))

    vcpu.tracer = trace
    if intercept:
        vcpu.intercept_exception(ExceptionVector.GP)
        vcpu.intercept_exception(ExceptionVector.SS)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x77)
    expected = [(vector, error, img.symbol(label)) for label, _, vector, error in CHECKS]
    log = img.symbol("log")
    seen = [(u32(vm, log + 16 * i), u32(vm, log + 16 * i + 4), u64(vm, log + 16 * i + 8)) for i in range(len(CHECKS))]
    assert u32(vm, img.symbol("count")) == len(CHECKS)
    assert seen == expected
    assert u64(vm, img.symbol("fs_base_after")) == 0
    if intercept:
        # Hardware exceptions (type 3) with their error codes, at the same RIPs -- but for the
        # intercepted WRMSRs, whose #GP KVM injects itself (kvm_complete_insn_gp()): an injected
        # event is no exception-bitmap exit.
        raised = [e for e, (label, *_) in zip(expected, CHECKS) if label not in INJECTED_BY_KVM]
        assert exits == [(vector, error, rip, 3) for vector, error, rip in raised]
    else:
        assert exits == []


def test_kvm_msr_check_uses_the_cpuid_width() -> None:
    """kvm_set_msr_common(): is_noncanonical_address() against the guest's linear-address width
    (CPUID 80000008H:EAX[15:8], 48 here)."""
    assert is_canonical(0x00007FFFFFFFFFFF) and is_canonical(0xFFFF800000000000)
    assert not is_canonical(NONCANONICAL) and not is_canonical(0x0100000000000000, 57)
    assert is_canonical(0x00FFFFFFFFFFFFFF, 57)


BRANCHES = rf"""
    KGATE 13, gp_handler
    KERNEL_SETUP
    mov %rsp, good_rsp(%rip)
    mov ${NONCANONICAL:#x}, %rax
    lea 1f(%rip), %rbx
    mov %rbx, resume(%rip)
jmp_at:
    jmp *%rax
1:  lea 2f(%rip), %rbx
    mov %rbx, resume(%rip)
    mov ${NONCANONICAL:#x}, %rax       # the handler clobbers RAX
call_at:
    call *%rax
2:  lea 3f(%rip), %rbx
    mov %rbx, resume(%rip)
    mov ${NONCANONICAL:#x}, %rax
    push %rax
ret_at:
    ret
3:  lea 4f(%rip), %rbx
    mov %rbx, resume(%rip)
    mov $0x7FFFFFFFFFFD, %rax
    jmp *%rax                          # three NOPs, then on into 0x800000000000
4:  EXIT_WITH $0x78
    hlt
gp_handler:                            # error code, RIP, CS, RFLAGS, RSP, SS
    mov count(%rip), %ecx
    shl $4, %ecx
    lea log(%rip), %rdx
    add %rcx, %rdx
    mov 8(%rsp), %rax
    mov %rax, (%rdx)
    mov 32(%rsp), %rax
    mov %rax, 8(%rdx)
    incl count(%rip)
    mov resume(%rip), %rax
    mov %rax, 8(%rsp)
    mov good_rsp(%rip), %rax
    mov %rax, 32(%rsp)
    add $8, %rsp
    iretq
    .align 8
good_rsp: .quad 0
resume: .quad 0
count: .long 0
    .align 16
log: .fill 8, 8, 0
"""
TOP = 0x7FFFFFFFF000  # the last page below the canonical hole


def _map_top_page(vm: object, tables: int = 0x300000) -> None:
    """Map linear 7FFF_FFFF_F000 (PML4E 255, PDPTE 511, PDE 511, PTE 511) to a page holding
    three NOPs at its last bytes."""
    from pyvmx.kvm.boot import DEFAULT_TABLES_GPA, PML4_OFFSET

    write = vm.write_guest  # type: ignore[attr-defined]
    pdpt, pd, pt, page = tables, tables + 0x1000, tables + 0x2000, tables + 0x3000
    write(DEFAULT_TABLES_GPA + PML4_OFFSET + 255 * 8, (pdpt | 3).to_bytes(8, "little"))
    write(pdpt + 511 * 8, (pd | 3).to_bytes(8, "little"))
    write(pd + 511 * 8, (pt | 3).to_bytes(8, "little"))
    write(pt + 511 * 8, (page | 3).to_bytes(8, "little"))
    write(page + 0xFFD, b"\x90\x90\x90")


def test_branch_to_non_canonical_faults_on_the_branch() -> None:
    """JMP, CALL and RET to a non-canonical target raise #GP(0) at the branch, which has changed
    nothing: CALL pushed nothing, RET popped nothing (SDM Vol. 2A, 64-bit-mode exceptions; the
    engine ran the branch and faulted on the fetch -- the machine undoes it). Code that runs
    sequentially off the end of the lower half faults at 800000000000H itself (kvm-unit-tests'
    hypercall test expects that RIP)."""
    vm, vcpu, img = ring3_guest(BRANCHES)
    _map_top_page(vm)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x78)
    good = u64(vm, img.symbol("good_rsp"))
    log = img.symbol("log")
    seen = [(u64(vm, log + 16 * i), u64(vm, log + 16 * i + 8)) for i in range(4)]
    assert u32(vm, img.symbol("count")) == 4
    assert seen == [
        (img.symbol("jmp_at"), good),
        (img.symbol("call_at"), good),
        (img.symbol("ret_at"), good - 8),
        (NONCANONICAL, good),
    ]
