# A spin-wait loop: ten PAUSEs, then the count through the debug-exit port.
_start:
    mov $10, %ecx
spin:
    pause
    dec %ecx
    jnz spin
    mov $10, %al
    out %al, $0xf4
    hlt
