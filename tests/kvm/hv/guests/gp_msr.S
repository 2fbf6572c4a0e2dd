# WRMSR of an MSR nobody has: the hypervisor injects #GP(0); the guest's handler records it and
# skips the 2-byte WRMSR; then reports the vector count through the debug-exit port.
_start:
    SET_GATE 13, gp_handler
    LOAD_IDT
    mov $0x12345678, %ecx
    xor %eax, %eax
    xor %edx, %edx
bad_wrmsr:
    wrmsr
    mov $0x4b564d01, %ecx         # MSR_KVM_SYSTEM_TIME_NEW: known, accepted
    mov $0x1001, %eax
    wrmsr
    mov gp_count(%rip), %eax
    EXIT_WITH %al
    hlt
gp_handler:
    push %rax
    incl gp_count(%rip)
    mov 8(%rsp), %rax             # the error code
    mov %eax, gp_error(%rip)
    mov 16(%rsp), %rax
    mov %rax, gp_rip(%rip)
    addq $2, 16(%rsp)             # skip WRMSR
    pop %rax
    add $8, %rsp
    iretq
    .align 8
gp_count: .long 0
gp_error: .long 0xffffffff
gp_rip:   .quad 0
    IDT_TABLE
