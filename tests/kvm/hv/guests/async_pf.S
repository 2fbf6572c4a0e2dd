# A guest that takes asynchronous page faults the way Linux's kvm_async_pf_task_wait does
# (arch/x86/kernel/kvm.c): enable the protocol (MSR_KVM_ASYNC_PF_INT = vector 0x50,
# MSR_KVM_ASYNC_PF_EN = area | SEND_ALWAYS | DELIVERY_AS_INT | ENABLED), then touch a page the
# host has swapped out. The "page not present" #PF (CR2 = token, flags = 1 in the shared area)
# makes the handler wait with HLT until the "page ready" interrupt brings the same token; the
# handler acknowledges it (MSR_KVM_ASYNC_PF_ACK) and the access is retried.
_start:
    SET_GATE 14, pf_handler
    SET_GATE 0x50, ready_handler
    LOAD_IDT
    mov $0x4b564d06, %ecx              # MSR_KVM_ASYNC_PF_INT
    mov $0x50, %eax
    xor %edx, %edx
    wrmsr
    lea apf_area(%rip), %rax
    or $0xb, %eax                      # ENABLED | SEND_ALWAYS | DELIVERY_AS_INT
    xor %edx, %edx
    mov $0x4b564d02, %ecx              # MSR_KVM_ASYNC_PF_EN
    wrmsr
    sti
    out %al, $0x80                     # ready: the host swaps the page out now
    mov $0x300000, %rbx
touch:
    mov (%rbx), %rax
    mov %rax, value(%rip)
    cli
    mov pf_count(%rip), %eax
    out %al, $0xf4
    hlt

pf_handler:                            # error code on the stack
    push %rax
    mov %cr2, %rax
    mov %eax, token(%rip)
    mov apf_area(%rip), %eax           # flags: KVM_PV_REASON_PAGE_NOT_PRESENT
    mov %eax, reason(%rip)
    movl $0, apf_area(%rip)
    incl pf_count(%rip)
    sti
1:  mov ready_token(%rip), %eax
    cmp token(%rip), %eax
    je 2f
    hlt
    jmp 1b
2:  pop %rax
    add $8, %rsp
    iretq

ready_handler:
    push %rax
    push %rcx
    push %rdx
    mov apf_area+4(%rip), %eax         # token
    mov %eax, ready_token(%rip)
    movl $0, apf_area+4(%rip)
    incl ready_count(%rip)
    mov $0x4b564d07, %ecx              # MSR_KVM_ASYNC_PF_ACK
    mov $1, %eax
    xor %edx, %edx
    wrmsr
    pop %rdx
    pop %rcx
    pop %rax
    iretq

    .align 64
apf_area:    .fill 64, 1, 0
token:       .long 0
reason:      .long 0
ready_token: .long 0
ready_count: .long 0
pf_count:    .long 0
    .align 8
value:       .quad 0
    IDT_TABLE
