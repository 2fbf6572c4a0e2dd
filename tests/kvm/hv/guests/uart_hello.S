# A 16550 driver loop: program the UART (8N1, 115200 baud, FIFOs on), then for each byte poll
# LSR.THRE (port base+5, bit 5) and write THR (base+0). Ends with the debug-exit port, code 0x55,
# then HLT with interrupts off.
_start:
    cli
    mov $0x3fb, %dx
    mov $0x80, %al                 # LCR: DLAB
    out %al, %dx
    mov $0x3f8, %dx
    mov $0x01, %al                 # DLL: divisor 1 (115200 baud)
    out %al, %dx
    mov $0x3f9, %dx
    xor %al, %al                   # DLM
    out %al, %dx
    mov $0x3fb, %dx
    mov $0x03, %al                 # LCR: 8 data bits, no parity, 1 stop bit
    out %al, %dx
    mov $0x3fa, %dx
    mov $0xc7, %al                 # FCR: FIFOs on, cleared, 14-byte trigger
    out %al, %dx
    mov $0x3fc, %dx
    mov $0x0b, %al                 # MCR: DTR, RTS, OUT2
    out %al, %dx
    lea message(%rip), %rsi
next:
    mov (%rsi), %bl
    test %bl, %bl
    jz done
poll:
    mov $0x3fd, %dx                # LSR
    in %dx, %al
    test $0x20, %al                # THRE
    jz poll
    mov $0x3f8, %dx                # THR
    mov %bl, %al
    out %al, %dx
    inc %rsi
    jmp next
done:
    mov $0x55, %al
    out %al, $0xf4
    hlt
message:
    .asciz "Hello from a 16550 driver!\n"
