# The guest of tests/tools/test_gdb_steps.py: one of each kind of VM exit a debugger steps across.
    .code64
_start:
    mov $1, %r8
first_touch:
    mov %r8, data(%rip)         # EPT violation: the data page is touched first here
    xor %eax, %eax
    cpuid                       # CPUID exit, emulated
    mov $0x1b, %ecx
    rdmsr                       # MSR exit (IA32_APIC_BASE)
    mov $0x80, %dx
    out %al, %dx                # no device: an I/O exit to user space
    call greet
after_call:
    # PIC + PIT: timer interrupts, interrupt windows, HLT
    mov $0x11, %al
    out %al, $0x20
    mov $0x20, %al
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov $0xfe, %al
    out %al, $0x21
    mov $0x34, %al
    out %al, $0x43
    mov $0xa9, %al
    out %al, $0x40
    mov $0x04, %al
    out %al, $0x40
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
wait:
    hlt
    cmpq $3, ticks(%rip)
    jb wait
    cli
    mov $'k', %al
    mov $0x3f8, %dx
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    mov data(%rip), %rax
    add $0x29, %al
    out %al, $0xf4              # exit status 0x2a
greet:
    mov $0x3f8, %dx
    mov $'o', %al
    out %al, %dx
    ret
timer:
    incq ticks(%rip)
    push %rax
    mov $0x20, %al
    out %al, $0x20
    pop %rax
    iretq
    .align 8
ticks: .quad 0
idtr: .word 0xfff
    .quad idt
    .align 16
idt: .fill 256*16, 1, 0
    .align 4096
data: .quad 0
