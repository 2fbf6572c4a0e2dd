# A real-address-mode guest whose IVT (at IDTR.base, 4-byte entries, SDM 20.1.4) sends vectors
# 0-0x3F to recording stubs.
#
# Entered with CS.base = 0x10000 (labels are CS offsets).  _start fills the IVT at the IDTR base
# the VMCS gives (0x2000 in the sandbox), sets DS = ES = 0 and jumps to `main`.  Stub v records
# at linear 0x9000: the vector (word), SP at entry (word), then the three words the delivery
# pushed (IP, CS, FLAGS), and halts.
.set FRAME, 0x9000

_start:
    sidtw %cs:ivt_desc              # IDTR: where the IVT is
    mov %cs:ivt_desc + 2, %di
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov $stubs, %bx
    xor %cx, %cx
1:  mov %bx, (%di)                  # offset
    mov %cs, 2(%di)                 # segment
    add $16, %bx
    add $4, %di
    inc %cx
    cmp $0x40, %cx
    jne 1b
    jmp main

ivt_desc:
    .word 0
    .long 0

.align 16
stubs:
.rept 0x40
    .align 16
    movw $(. - stubs) / 16, %ss:FRAME
    jmp record
.endr

record:
    mov %sp, %ss:FRAME + 2
    mov %sp, %bp
    mov 0(%bp), %ax
    mov %ax, %ss:FRAME + 4          # IP
    mov 2(%bp), %ax
    mov %ax, %ss:FRAME + 6          # CS
    mov 4(%bp), %ax
    mov %ax, %ss:FRAME + 8          # FLAGS
handler_halt:
    hlt
    jmp handler_halt
