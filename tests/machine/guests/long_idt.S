# A 64-bit guest whose IDT sends all 256 vectors to recording stubs (SDM 6.14, 16-byte gates).
#
# _start builds the IDT at `idt` (interrupt gates, selector 0x18, DPL 3 so INT n works from
# CPL 3 too), loads it, puts RSP0 = 0x7000 in the TSS at 0x1800 (used when an event comes from
# CPL 3, SDM 6.14.4/8.7) and jumps to `main`, which the test supplies.
#
# Stub v (at stubs + 32*v) records, then halts:
#   0x9000 vector, 0x9008 RSP at handler entry, 0x9010.. eight qwords from that RSP (the
#   frame: [error code,] RIP, CS, RFLAGS, RSP, SS), 0x9050 CR2.
.set FRAME, 0x9000

_start:
    lea stubs(%rip), %rax           # offset of stub 0
    lea idt(%rip), %rdi
    xor %ecx, %ecx
1:  mov %rax, %rdx
    mov %dx, (%rdi)                 # offset 15:0
    movw $0x18, 2(%rdi)             # 64-bit code segment
    movw $0xEE00, 4(%rdi)           # present, DPL 3, 64-bit interrupt gate, IST 0
    shr $16, %rdx
    mov %dx, 6(%rdi)                # offset 31:16
    shr $16, %rdx
    mov %edx, 8(%rdi)               # offset 63:32
    movl $0, 12(%rdi)
    add $32, %rax
    add $16, %rdi
    inc %ecx
    cmp $256, %ecx
    jne 1b
    lidt idtr(%rip)
    movq $0x7000, 0x1804            # TSS.RSP0
    jmp main

.align 32
stubs:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .align 32
    movq $\v, FRAME
    jmp record
.endr
.rept 256 - 32
    .align 32
    movq $(. - stubs) / 32, FRAME
    jmp record
.endr

record:
    mov %rsp, FRAME + 8
    mov $8, %ecx
    mov %rsp, %rsi
    mov $(FRAME + 16), %edi
    rep movsq
    mov %cr2, %rax
    mov %rax, FRAME + 0x50
handler_halt:
    hlt
    jmp handler_halt

.align 8
idtr:
    .word 256 * 16 - 1
    .quad idt
.align 16
idt:
    .fill 256 * 16, 1, 0
