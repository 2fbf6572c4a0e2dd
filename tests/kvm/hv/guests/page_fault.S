# A #PF handler that records CR2 and the error code, then skips the 3-byte faulting MOV.
# First a not-present fault (above the 4-GiB identity map), then a write to a read-only page
# (a present fault).
_start:
    SET_GATE 14, pf_handler
    LOAD_IDT
    # make the 2-MiB page at 0x400000 read-only: PD entry 2 of the first page directory
    mov %cr3, %rax
    mov (%rax), %rax              # PML4[0] -> PDPT
    and $~0xfff, %rax
    mov (%rax), %rax              # PDPT[0] -> PD
    and $~0xfff, %rax
    andq $~0x2, 16(%rax)          # clear R/W of PD[2]
    mov %cr3, %rax                # flush the TLB
    mov %rax, %cr3
    movabs $0x100000000, %rax
not_present:
    mov (%rax), %rcx              # 48 8b 08
    mov $0x400000, %rax
read_only:
    mov %rcx, (%rax)              # 48 89 08
    mov faults(%rip), %eax
    EXIT_WITH %al
    hlt
pf_handler:
    push %rax
    push %rbx
    mov faults(%rip), %eax
    lea records(%rip), %rbx
    shl $4, %rax
    add %rax, %rbx
    mov %cr2, %rax
    mov %rax, (%rbx)              # records[n].cr2
    mov 16(%rsp), %rax
    mov %rax, 8(%rbx)             # records[n].error_code
    incl faults(%rip)
    addq $3, 24(%rsp)             # return past the faulting instruction
    pop %rbx
    pop %rax
    add $8, %rsp                  # drop the error code
    iretq
    .align 8
faults:  .long 0, 0
records: .fill 64, 1, 0
    IDT_TABLE
