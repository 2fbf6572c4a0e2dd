# No IDT (limit 0): the #UD from UD2 (intercepted by KVM's exception bitmap, reflected) cannot
# be delivered: #GP, then #DF, then a triple fault (SDM 6.15, Table 6-5).
_start:
    lidt empty_idtr(%rip)
    ud2
    hlt
empty_idtr:
    .word 0
    .quad 0
