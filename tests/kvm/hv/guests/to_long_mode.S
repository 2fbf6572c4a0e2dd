# Starts in 32-bit protected mode with paging off (pyvmx.kvm.boot.setup_protected_mode) and
# switches to 64-bit mode as a kernel's startup code does (SDM 10.8.5): page tables, CR4.PAE,
# CR3, EFER.LME (WRMSR), CR0.PG, then a far jump to the 64-bit code segment (selector 0x18).
.code32
_start:
    # identity-map the first 1 GiB with 2-MiB pages
    lea pd, %edi
    xor %eax, %eax
    mov $0x87, %ebx               # present, writable, user, 2-MiB page
fill:
    mov %ebx, (%edi, %eax, 8)
    movl $0, 4(%edi, %eax, 8)
    add $0x200000, %ebx
    inc %eax
    cmp $512, %eax
    jb fill
    lea pd, %eax
    or $0x7, %eax
    mov %eax, pdpt
    lea pdpt, %eax
    or $0x7, %eax
    mov %eax, pml4
    mov %cr4, %eax
    or $0x20, %eax                # CR4.PAE
    mov %eax, %cr4
    lea pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx         # IA32_EFER
    rdmsr
    or $0x100, %eax               # LME
efer_write:
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax          # PG: with LME, activates IA-32e mode
cr0_write:
    mov %eax, %cr0
    ljmp $0x18, $long_mode
.code64
long_mode:
    mov $0xc0000080, %ecx
    rdmsr                         # EFER as the guest sees it
    mov %eax, efer_seen(%rip)
    mov $0x64, %al
    out %al, $0xf4
    hlt
    .align 8
efer_seen: .long 0
    .align 4096
pml4: .fill 4096, 1, 0
pdpt: .fill 4096, 1, 0
pd:   .fill 4096, 1, 0
