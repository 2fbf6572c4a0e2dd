# efer_cr0.S -- guest writes of IA32_EFER and CR0 and which of them become VM exits.
#
#   pyvmx run examples/guests/efer_cr0.S --intercept msr-write:IA32_EFER --intercept cr0:TS --stat
#
# With msr-write:IA32_EFER only WRMSR of EFER exits (the RDMSR does not, and nor does a WRMSR of
# another MSR in the bitmap's range: SDM 25.6.9); with cr0:TS only a MOV to CR0 that changes TS
# against the read shadow exits (SDM 25.6.6) -- the first MOV below writes CR0 unchanged and does
# not exit, the second flips TS and does.  The hypervisor emulates each exiting instruction and
# resumes the guest.  The run ends with exit status 0.
    .code64
_start:
    mov $0xc0000080, %ecx       # IA32_EFER
    rdmsr                       # EDX:EAX = EFER (LME, LMA set: we are in long mode)
    wrmsr                       # written back unchanged: a MSR_WRITE exit
    mov $0xc0000081, %ecx       # IA32_STAR: not intercepted
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    mov %cr0, %rax
    mov %rax, %cr0              # CR0 unchanged: no exit
    xor $8, %rax                # flip CR0.TS (bit 3)
    mov %rax, %cr0              # a CR_ACCESS exit (MOV to CR0, qualification names RAX)
    mov $0xf4, %dx
    xor %eax, %eax
    out %al, %dx
