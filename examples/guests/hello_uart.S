# hello_uart.S -- the smallest useful guest: print a line on COM1 and end the run.
#
#   pyvmx run examples/guests/hello_uart.S                     # prints the line, exit status 0
#   pyvmx run examples/guests/hello_uart.S --intercept io:0x3f8 --stat
#
# The guest starts in 64-bit long mode at _start (see "The guest's starting state" in the
# README).  Each OUT to port 0x3F8 (the 16550 UART's transmit register) is a VM exit the
# hypervisor hands to its UART model; the bytes appear on pyvmx's stdout.  Writing a byte to
# port 0xF4 (the debug-exit device, like QEMU's isa-debug-exit) ends the run: the exit status is
# that byte & 0x7F.
    .code64
_start:
    lea msg(%rip), %rsi
    mov $0x3f8, %dx             # COM1 transmit holding register
1:  lodsb                       # AL = next byte of the message
    test %al, %al
    jz 2f
    out %al, %dx                # one I/O exit per byte
    jmp 1b
2:  mov $0xf4, %dx              # debug-exit port
    xor %eax, %eax
    out %al, %dx                # exit status 0: the run ends here
msg: .asciz "hello from a pyvmx guest\n"
