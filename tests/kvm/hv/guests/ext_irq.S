# Waits (a bounded spin) for one interrupt on vector 0x40; the handler counts it. Reports the
# count. Does not touch RFLAGS.IF itself: the hypervisor opens or closes the guest's interrupts.
_start:
    SET_GATE 0x40, handler
    LOAD_IDT
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
    incl count(%rip)
    iretq
    .align 8
count: .long 0
    IDT_TABLE
