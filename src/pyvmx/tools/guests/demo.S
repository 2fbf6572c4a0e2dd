/*
 * The pyvmx demo guest.  Linked and loaded at guest-physical 0x8000; vCPU 0 enters _start in
 * real mode (CS = 0), vCPU 1 enters ap_main in long mode once vCPU 0 has built the page tables.
 *
 * The story, in order (the intercept questions, then the async page fault):
 *   1. real mode -> protected mode (CR0.PE: guest-owned, no exit)
 *      -> long mode: CR4.PAE, CR3, WRMSR IA32_EFER.LME (exit: the only MSR write intercepted),
 *      CR0.PG (exit: the only CR0 bit intercepted); the hypervisor sets EFER.LMA and the
 *      "IA-32e mode guest" entry control, as KVM does.
 *   2. prints a banner with a polled 16550 driver: LSR (0x3FD) is not intercepted, THR (0x3F8) is.
 *   3. touches TOUCH_PAGES fresh pages: one EPT violation each on first touch.
 *   4. enables async page faults (MSR_KVM_ASYNC_PF_EN, page ready as interrupt APF_VECTOR) and runs
 *      two tasks: task A reads COLD_PAGE, which the host has swapped out; while it is paged in,
 *      the "page not present" #PF parks task A and task B counts; "page ready" resumes task A.
 *   5. reports through the debug-exit port (0xF4): the value written is task B's count at the
 *      moment task A got its page.
 */
    .set SERIAL,          0x3f8
    .set DEBUG_EXIT,      0xf4
    .set MSR_EFER,        0xc0000080
    .set MSR_APF_EN,      0x4b564d02
    .set MSR_APF_INT,     0x4b564d06
    .set MSR_APF_ACK,     0x4b564d07
    .set APF_VECTOR,      0x40
    .set TOUCH_BASE,      0x200000
    .set TOUCH_PAGES,     16
    .set COLD_PAGE,       0x400000
    .set AP_COUNTER,      0x500000

/* Save every GPR on the current stack, store RSP in \save, load RSP from \load, restore the
   other task's GPRs and return into it: a context switch inside an interrupt handler. */
    .macro SAVE_AND_SWITCH save, load
    push %rbx; push %rcx; push %rdx; push %rsi; push %rdi; push %rbp; push %rax
    push %r8; push %r9; push %r10; push %r11; push %r12; push %r13; push %r14; push %r15
    mov %rsp, \save(%rip)
    mov \load(%rip), %rsp
    pop %r15; pop %r14; pop %r13; pop %r12; pop %r11; pop %r10; pop %r9; pop %r8
    pop %rax; pop %rbp; pop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rbx
    iretq
    .endm

    .text
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7000, %sp
    lgdtl gdtr
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0                  /* CR0.PE: not intercepted */
    ljmpl $0x08, $protected

    .code32
protected:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7000, %esp
    mov %cr4, %eax
    or $0x20, %eax                  /* CR4.PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr                           /* not intercepted */
    or $0x100, %eax                 /* EFER.LME */
efer_write:
    wrmsr                           /* VM exit: MSR write of IA32_EFER */
    mov %cr0, %eax
    or $0x80000000, %eax
pg_write:
    mov %eax, %cr0                  /* VM exit: CR0.PG is host-owned */
    ljmp $0x18, $long_mode

    .code64
long_mode:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $stack_a_top, %rsp
    lea banner(%rip), %rsi
    call puts

    /* first touch: one EPT violation per page */
    mov $TOUCH_BASE, %rdi
    mov $TOUCH_PAGES, %ecx
1:  movq %rcx, (%rdi)
    add $4096, %rdi
    loop 1b
    lea touched(%rip), %rsi
    call puts

    /* The PIC's IRQ 0-7 (vectors 8-15 after a BIOS-style reset): ignore them -- no EOI, so the
       PIT interrupts only once.  These vectors are also #DF, #TS, #NP, #SS, #GP and #PF, which
       push an error code an IRETQ-only handler would take for RIP: #PF gets its own gate below. */
    mov $8, %ecx
    lea idt+8*16(%rip), %rdi
3:  lea ignore_irq(%rip), %rax
    call set_gate
    add $16, %rdi
    loop 3b
    /* async page faults (after the loop above, which covers vector 14 too) */
    lea pf_handler(%rip), %rax
    lea idt+14*16(%rip), %rdi
    call set_gate
    lea ready_handler(%rip), %rax
    lea idt+APF_VECTOR*16(%rip), %rdi
    call set_gate
    lidt idtr(%rip)
    mov $MSR_APF_INT, %ecx
    mov $APF_VECTOR, %eax
    xor %edx, %edx
    wrmsr
    mov $MSR_APF_EN, %ecx
    lea apf_area(%rip), %rax
    or $0xb, %eax                   /* ENABLED | SEND_ALWAYS (we run at CPL 0) | DELIVERY_AS_INT */
    xor %edx, %edx
    wrmsr
    sti
    nop                             /* the STI shadow: KVM does no async PF while interrupts are
                                       blocked (kvm_can_do_async_pf()), so keep it off the touch */
task_a:
    mov COLD_PAGE, %rax             /* the host swapped this page out */
    mov count_b(%rip), %rax
    mov %rax, b_when_a_done(%rip)
    lea done_msg(%rip), %rsi
    call puts
    mov b_when_a_done(%rip), %eax
    mov $DEBUG_EXIT, %dx
    out %eax, %dx
    hlt

task_b:
    incq count_b(%rip)
    pause
    jmp task_b

/* set_gate: a 64-bit interrupt gate at RDI for the handler at RAX (CS 0x18, DPL 0) */
set_gate:
    mov %ax, (%rdi)
    movw $0x18, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    ret

/* puts: print the NUL-terminated string at RSI through the 16550 (polled) */
puts:
    lodsb
    test %al, %al
    jz 2f
    mov %al, %bl
    mov $SERIAL+5, %dx
1:  in %dx, %al                     /* LSR: not intercepted */
    test $0x20, %al                 /* THRE */
    jz 1b
    mov $SERIAL, %dx
    mov %bl, %al
    out %al, %dx                    /* THR: VM exit, the only intercepted port */
    jmp puts
2:  ret

/* #PF: async "page not present" parks the current task and switches to the other one. */
pf_handler:
    push %rax
    mov apf_area(%rip), %eax        /* flags: KVM_PV_REASON_* */
    test %eax, %eax
    jz real_pf
    movl $0, apf_area(%rip)
    mov %cr2, %rax
    mov %rax, parked_token(%rip)
    pop %rax
    add $8, %rsp                    /* the error code */
    SAVE_AND_SWITCH parked_rsp, other_rsp
real_pf:
    mov $0xdead, %eax
    mov $DEBUG_EXIT, %dx
    out %eax, %dx
    hlt

/* APF_VECTOR: "page ready": take the token (and free the slot for the next one, as Linux's
   sysvec_kvm_asyncpf_interrupt() does: token = 0, then MSR_KVM_ASYNC_PF_ACK), then resume the
   parked task if the token is its own.  Any other token -- the broadcast ~0 that enabling async
   PF sends (kvm_pv_enable_async_pf() -> kvm_async_pf_wakeup_all()) -- parks nothing here. */
ready_handler:
    push %rax
    push %rcx
    push %rdx
    mov apf_area+4(%rip), %eax      /* the token */
    movl $0, apf_area+4(%rip)
    push %rax
    mov $MSR_APF_ACK, %ecx
    mov $1, %eax
    xor %edx, %edx
    wrmsr
    pop %rax
    cmpq $0, parked_rsp(%rip)
    je 1f                           /* no task parked */
    cmp parked_token(%rip), %eax
    jne 1f
    movq $0, parked_token(%rip)
    pop %rdx
    pop %rcx
    pop %rax
    SAVE_AND_SWITCH other_rsp, parked_rsp
1:  pop %rdx
    pop %rcx
    pop %rax
    iretq

ignore_irq:
    iretq

ap_main:
    mov $stack_ap_top, %rsp
1:  incq AP_COUNTER
    jmp 1b

    .data
    .align 16
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: data */
    .quad 0x00af9a000000ffff        /* 0x18: 64-bit code */
gdtr:
    .word gdtr - gdt - 1
    .long gdt
    .align 16
idtr:
    .word 256 * 16 - 1
    .quad idt
banner:
    .asciz "pyvmx demo guest: real mode -> long mode done, printing through a 16550 UART\n"
touched:
    .asciz "touched 16 fresh pages (EPT violations on first touch)\n"
done_msg:
    .asciz "task A got its page back; task B ran meanwhile\n"
    .align 8
count_b:        .quad 0
b_when_a_done:  .quad 0
parked_token:   .quad 0
parked_rsp:     .quad 0
other_rsp:      .quad task_b_frame     /* task B starts from a prepared frame */
    .align 64
apf_area:                           /* struct kvm_vcpu_pv_apf_data */
    .long 0                         /* flags */
    .long 0                         /* token */
    .fill 56, 1, 0
    .long 0                         /* enabled */

    .align 4096
pml4:
    .quad pdpt + 0x3
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x3
    .fill 511, 8, 0
pd:
    .set i, 0
    .rept 512
    .quad (i << 21) | 0x83
    .set i, i + 1
    .endr
idt:
    .fill 256 * 16, 1, 0
    .fill 4096, 1, 0
stack_a_top:
    .fill 4096 - 20 * 8, 1, 0
task_b_frame:                       /* 15 GPRs, then the IRETQ frame */
    .fill 15, 8, 0
    .quad task_b, 0x18, 0x202, stack_b_top, 0x10
stack_b_top:
    .fill 4096, 1, 0
stack_ap_top:
