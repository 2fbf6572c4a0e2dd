# The guest of tests/tools/test_gdb_watch.py: reads and writes of a watched word, and a write beside it.
_start:
    mov $1, %r8
    mov counter(%rip), %rax     # a read
    mov %r8, other(%rip)        # a write on the same page, not watched
write1:
    movq $5, counter(%rip)      # a write of the watched word
after1:
    add $1, %r8
    mov counter(%rip), %rbx
after_read:
    movq $7, counter(%rip)
after2:
    mov $0x2a, %al
    out %al, $0xf4
.align 4096
other: .quad 0
counter: .quad 0
