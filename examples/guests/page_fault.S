# page_fault.S -- a guest #PF handler: a read above the identity map faults, the handler records
# CR2 and the error code, and returns past the faulting instruction.
#
#   pyvmx run examples/guests/page_fault.S                        # exit status 1: one fault handled
#   pyvmx run examples/guests/page_fault.S --intercept exception:PF --stat
#
# The boot page tables map the first 4 GiB 1:1, so 0x100000000 is not present: the read takes a
# #PF (vector 14, error code 0: not present, read, supervisor) delivered through the guest's own
# IDT -- no VM exit unless the exception bitmap asks for one (exception:PF, SDM 25.6.3; the
# hypervisor then reinjects it, as KVM does).  The IDT below has one 16-byte gate (SDM 6.14.1).
    .code64
_start:
    lea pf_handler(%rip), %rax
    lea idt+14*16(%rip), %rdi   # gate 14
    mov %ax, (%rdi)             # offset 15:0
    movw $0x18, 2(%rdi)         # selector: the boot GDT's 64-bit code segment
    movw $0x8e00, 4(%rdi)       # present, DPL 0, 64-bit interrupt gate
    shr $16, %rax
    mov %ax, 6(%rdi)            # offset 31:16
    shr $16, %rax
    mov %eax, 8(%rdi)           # offset 63:32
    lidt idtr(%rip)
    movabs $0x100000000, %rax
    mov (%rax), %rcx            # 48 8b 08: faults, the handler skips these 3 bytes
    mov faults(%rip), %eax
    mov $0xf4, %dx
    out %al, %dx                # exit status = faults handled (1)
pf_handler:
    push %rax
    mov %cr2, %rax
    mov %rax, cr2(%rip)         # the faulting linear address
    mov 8(%rsp), %rax
    mov %rax, error_code(%rip)
    incl faults(%rip)
    addq $3, 16(%rsp)           # the saved RIP: past the faulting MOV
    pop %rax
    add $8, %rsp                # drop the error code
    iretq
    .align 8
faults:     .quad 0
cr2:        .quad 0
error_code: .quad 0
idtr:       .word 256*16-1
            .quad idt
    .align 16
idt:        .fill 256*16, 1, 0
