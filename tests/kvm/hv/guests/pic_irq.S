# Programs the 8259 (IRQ 1 only, vectors from 0x20) and waits -- a bounded spin -- for the
# device interrupt the host raises on IRQ 1 (KVM_IRQ_LINE). Never touches RFLAGS.IF: the
# hypervisor opens or closes the guest's interrupts. Reports the count.
_start:
    SET_GATE 0x21, handler
    LOAD_IDT
    PIC_INIT 0xFD
    mov $300000, %rcx
wait:
    cmpl $0, count(%rip)
    jne done
    dec %rcx
    jnz wait
done:
    mov count(%rip), %eax
    EXIT_WITH %al
    hlt
handler:
    push %rax
    incl count(%rip)
    mov $0x20, %al
    out %al, $0x20
    pop %rax
    iretq
    .align 8
count: .long 0
    IDT_TABLE
