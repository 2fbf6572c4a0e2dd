# Counts PIT interrupts (IRQ 0 -> vector 0x20 through the 8259) while halting between them.
# The PIT runs channel 0 in mode 2 with divisor 1193 (~1 kHz). Stops after `target` ticks and
# reports the count through the debug-exit port.
_start:
    SET_GATE 0x20, timer
    LOAD_IDT
    PIC_INIT 0xFE                  # only IRQ 0 unmasked
    PIT_PERIODIC 1193
    sti
wait:
    hlt
    mov ticks(%rip), %eax
    cmp target(%rip), %eax
    jb wait
    cli
    EXIT_WITH %al
    hlt
timer:
    push %rax
    incl ticks(%rip)
    mov $0x20, %al                 # non-specific EOI
    out %al, $0x20
    pop %rax
    iretq
    .align 8
ticks:  .long 0
target: .long 5
    IDT_TABLE
