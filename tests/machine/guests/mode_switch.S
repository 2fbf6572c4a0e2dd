# Real mode -> protected mode -> long mode, the way a boot loader does it (SDM Vol. 3 10.8.5,
# 10.9 "Mode Switching"; 10.8.5.4 "Initializing IA-32e Mode").
#
# Entered in real-address mode (unrestricted guest) with CS.base = 0x10000 and the image linked
# at offset 0, so labels are CS offsets and physical addresses are BASE + label.  Paging
# structures identity-map the first 2 MiB.  Labels the tests look at: protected (first 32-bit
# instruction), efer_write (WRMSR of IA32_EFER.LME), cr0_write (MOV to CR0 setting PG), long
# (first 64-bit instruction), done (the final HLT).
.set BASE, 0x10000

.code16
_start:
    cli
    mov %cs, %ax
    mov %ax, %ds                    # the image's data is addressed through CS's base
    lgdtl gdt_desc
    mov %cr0, %eax
    or $1, %eax                     # CR0.PE
    mov %eax, %cr0
    ljmpl $0x08, $(BASE + pm32)     # load a 32-bit CS

.code32
pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    mov $0x8000, %esp
protected:
    mov %cr4, %eax
    or $0x20, %eax                  # CR4.PAE
    mov %eax, %cr4
    mov $(BASE + pml4), %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx           # IA32_EFER
    rdmsr
    or $0x100, %eax                 # EFER.LME
efer_write:
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax            # CR0.PG: IA-32e mode becomes active (EFER.LMA = 1)
cr0_write:
    mov %eax, %cr0
    ljmp $0x18, $(BASE + lm64)      # compatibility mode -> 64-bit mode

.code64
lm64:
long:
    mov $0x1122334455667788, %rax   # a 64-bit immediate: only 64-bit code has them
    lea (%rip), %rbx
done:
    hlt

.align 8
gdt:
    .quad 0                         # null
    .quad 0x00CF9B000000FFFF        # 0x08: 32-bit code, base 0, 4 GiB
    .quad 0x00CF93000000FFFF        # 0x10: data, base 0, 4 GiB
    .quad 0x00AF9B000000FFFF        # 0x18: 64-bit code (L = 1)
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long BASE + gdt

.align 4096
pml4:
    .quad BASE + pdpt + 3
    .fill 511, 8, 0
pdpt:
    .quad BASE + pd + 3
    .fill 511, 8, 0
pd:
    .quad 0x83                      # 2 MiB page at 0, present, writable
    .fill 511, 8, 0
