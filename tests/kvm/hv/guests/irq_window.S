# Interrupts off across a long busy stretch while the PIT keeps ticking, then STI: the pending
# IRQ 0 must wait for the interrupt window (SDM 26.7.5) and is delivered right after STI's shadow.
_start:
    SET_GATE 0x20, timer
    LOAD_IDT
    PIC_INIT 0xFE
    PIT_PERIODIC 1193
    cli
    mov $2000000, %rcx
busy:
    dec %rcx
    jnz busy
    sti
    nop
after_sti:
    nop
    cli
    mov ticks(%rip), %eax
    EXIT_WITH %al
    hlt
timer:
    push %rax
    incl ticks(%rip)
    mov 8(%rsp), %rax              # where the interrupt came in
    mov %rax, irq_rip(%rip)
    mov $0x20, %al
    out %al, $0x20
    pop %rax
    iretq
    .align 8
ticks:   .long 0
irq_rip: .quad 0
    IDT_TABLE
