# An endless loop with interrupts off: counts in counters[RBX] (the test puts the vCPU number
# in RBX). Only the VMX-preemption timer can take the CPU back.
_start:
    cli
    lea counters(%rip), %rdi
spin:
    incq (%rdi, %rbx, 8)
    jmp spin
    .align 8
counters:
    .quad 0, 0, 0, 0
