# pit_interrupts.S -- an interrupt handler driven by the PIT through the PIC.
#
#   pyvmx run examples/guests/pit_interrupts.S --stat          # exit status 5: five ticks counted
#
# The 8259 PIC is programmed to put IRQ 0-7 at vectors 0x20-0x27 with only IRQ 0 (the 8254
# PIT's channel 0) unmasked; the PIT runs in mode 2 at ~1 kHz of guest time.  The guest halts
# with interrupts on (HLT exits); each tick wakes the vCPU and the hypervisor injects vector 0x20
# at the next VM entry (event injection, SDM 27.6), the handler counts it and sends the PIC an
# EOI.  The PIT runs on guest time, so the run is deterministic.  After five
# ticks the guest ends the run with the count as its exit status.
    .code64
_start:
    mov $0x11, %al
    out %al, $0x20              # PIC ICW1: edge triggered, ICW4 follows
    mov $0x20, %al
    out %al, $0x21              # ICW2: IRQ 0 -> vector 0x20
    mov $0x04, %al
    out %al, $0x21              # ICW3: a slave on IRQ 2
    mov $0x01, %al
    out %al, $0x21              # ICW4: 8086 mode
    mov $0xfe, %al
    out %al, $0x21              # mask all but IRQ 0
    mov $0x34, %al
    out %al, $0x43              # PIT channel 0, lobyte/hibyte, mode 2 (rate generator)
    mov $0xa9, %al
    out %al, $0x40
    mov $0x04, %al
    out %al, $0x40              # divisor 0x04a9 = 1193: 1.193182 MHz / 1193 = ~1 kHz
    lea timer(%rip), %rax
    lea idt+0x20*16(%rip), %rdi # gate 0x20
    mov %ax, (%rdi)
    movw $0x18, 2(%rdi)         # the boot GDT's 64-bit code segment
    movw $0x8e00, 4(%rdi)       # present 64-bit interrupt gate
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    lidt idtr(%rip)
    sti
1:  hlt                         # wait for the next tick
    cmpq $5, ticks(%rip)
    jb 1b
    mov ticks(%rip), %rax
    mov $0xf4, %dx
    out %al, %dx                # exit status 5
timer:
    incq ticks(%rip)
    push %rax
    mov $0x20, %al
    out %al, $0x20              # EOI to the PIC
    pop %rax
    iretq
    .align 8
ticks: .quad 0
idtr:  .word 256*16-1
       .quad idt
    .align 16
idt:   .fill 256*16, 1, 0
