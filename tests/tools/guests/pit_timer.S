    .code64
_start:
    mov $0x11, %al
    out %al, $0x20
    mov $0x20, %al
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov $0xfe, %al
    out %al, $0x21          # only IRQ 0 unmasked
    mov $0x34, %al
    out %al, $0x43          # PIT channel 0, mode 2
    mov $0xa9, %al
    out %al, $0x40
    mov $0x04, %al
    out %al, $0x40          # divisor 1193: about 1 kHz
    lea timer(%rip), %rax
    lea idt+0x20*16(%rip), %rdi
    mov %ax, (%rdi)
    mov %cs, %bx
    mov %bx, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    lidt idtr(%rip)
    sti
1:  hlt
    cmpq $5, ticks(%rip)
    jb 1b
    mov ticks(%rip), %rax
    mov $0xf4, %dx
    out %al, %dx
timer:
    incq ticks(%rip)
    push %rax
    mov $0x20, %al
    out %al, $0x20          # EOI
    pop %rax
    iretq
    .align 8
ticks: .quad 0
idtr: .word 0xfff
    .quad idt
    .align 16
idt: .fill 256*16, 1, 0
