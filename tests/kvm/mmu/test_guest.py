"""End to end on the VT-x machine: real guest code runs with EPT_POINTER = the MMU's root and
no memory mapped up front; the exit loop of tests/kvm/mmu/harness.py (arch/x86/kvm/vmx/vmx.c
handle_ept_violation() / handle_ept_misconfig() -> mmu.c kvm_mmu_page_fault() ->
x86.c x86_emulate_instruction()) fixes every EPT violation and emulates MMIO.

SDM references: 29.3.3 (EPT violations and misconfigurations), 28.2.1 Table 28-7 (their exit
qualification), 29.3.5 (EPT accessed and dirty flags).
"""

from __future__ import annotations

import pytest

from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from pyvmx.kvm.mmu import RetPf
from pyvmx.kvm.mmu.emulate import MmioExit

from tests.kvm.mmu.harness import KIB4, MIB, MIB2, MmuGuest

pytestmark = pytest.mark.machine

DEV = 0x3000_0000  # the MMIO register bank (inside the guest's 1-GiB identity map)
LOW_PAGES = {0x3000, 0x4000, 0x5000, 0x10000}  # guest PML4, PDPT, PD, code


def touch_loop(base: int, pages: int, stride: int = KIB4) -> str:
    return f"""
        mov ${base:#x}, %rdi
        mov ${pages}, %rcx
    1:  movq %rcx, (%rdi)
        add ${stride:#x}, %rdi
        dec %rcx
        jnz 1b
    done: hlt
    """


def test_first_touch_faults_are_fixed_and_counted_4k() -> None:
    """mmu.c kvm_mmu_page_fault() per EPT violation, RIP not advanced: the guest's page walker
    (paging-structure accesses, qualification bit 8 clear), its code fetch and each page it
    writes fault exactly once; pf_fixed and pages_4k equal the pages touched."""
    pages = 48
    guest = MmuGuest("long", touch_loop(0x20_0000, pages), huge_pages=False)
    exit = guest.run()
    assert exit.exit_reason is ExitReason.HLT and guest.sb.rip == guest.symbol("done")
    touched = LOW_PAGES | {0x20_0000 + n * KIB4 for n in range(pages)}
    assert {gpa & ~0xFFF for gpa, _, _ in guest.violations} == touched
    assert all(result is RetPf.FIXED for _, _, result in guest.violations)
    stats = guest.mmu.stats
    assert stats["pf_taken"] == stats["pf_fixed"] == stats["pages_4k"] == len(touched)
    assert stats["pf_spurious"] == stats["pf_emulate"] == 0
    # The values the guest wrote went to the pages the memslot names.
    assert guest.read_gpa(0x20_0000, 8) == pages.to_bytes(8, "little")
    assert guest.read_gpa(0x20_0000 + (pages - 1) * KIB4, 8) == (1).to_bytes(8, "little")


def test_first_touch_with_thp_maps_2m_pages() -> None:
    """kvm_mmu_hugepage_adjust() with THP-backed, 2M-aligned guest RAM: one fault per 2-MByte
    block touched (plus the block holding the page tables and code)."""
    guest = MmuGuest("long", touch_loop(0x20_0000, 6 * 512), ram=16 * MIB)
    assert guest.run().exit_reason is ExitReason.HLT
    stats = guest.mmu.stats
    assert stats["pf_fixed"] == stats["pages_2m"] == 1 + 6 and stats["pages_4k"] == 0
    assert guest.read_gpa(0x20_0000 + 6 * 512 * KIB4 - KIB4, 8) == (1).to_bytes(8, "little")


# --- MMIO: each instruction form on a device register, run by the guest ------------------------------------
# (id, guest code, registers to check afterwards, device bytes expected at offsets)
MMIO_FORMS = [
    ("mov r8/16/32/64 -> m", """
        movb $0x11, %al;  mov %al, 0x0(%rbx)
        movw $0x2222, %ax; mov %ax, 0x2(%rbx)
        movl $0x33333333, %eax; mov %eax, 0x4(%rbx)
        movabs $0x4444444444444444, %rax; mov %rax, 0x8(%rbx)
    """, {}, {0x0: b"\x11", 0x2: b"\x22\x22", 0x4: b"\x33" * 4, 0x8: b"\x44" * 8}),
    ("mov m -> r8/16/32/64", """
        mov 0x20(%rbx), %al
        mov 0x20(%rbx), %cx
        mov 0x20(%rbx), %edx
        mov 0x20(%rbx), %rsi
    """, {"rax": 0x20, "rcx": 0x2120, "rdx": 0x23222120, "rsi": 0x2726252423222120}, {}),
    ("mov imm -> m, moffs, rip-relative, sib", """
        movl $0xfeedface, 0x40(%rbx)
        movq $-1, 0x48(%rbx)
        movabs 0x30000040, %eax
        mov %eax, %edi
        movabs %al, 0x30000050
        .byte 0x8b, 0x2d
        .long 0x30000048 - 1f
    1:  mov $3, %rcx
        movw $0x6666, 0x50(%rbx,%rcx,2)
    """, {"rdi": 0xFEEDFACE, "rbp": 0xFFFFFFFF}, {0x40: b"\xce\xfa\xed\xfe", 0x48: b"\xff" * 8, 0x50: b"\xce", 0x56: b"\x66\x66"}),
    ("movzx movsx movsxd", """
        movzbl 0x80(%rbx), %eax
        movswq 0x80(%rbx), %rcx
        movslq 0x80(%rbx), %rdx
    """, {"rax": 0x80, "rcx": 0xFFFFFFFFFFFF8180, "rdx": 0xFFFFFFFF83828180}, {}),
    ("read-modify-write", """
        mov $5, %eax
        addl %eax, 0x0(%rbx)
        subw $1, 0x4(%rbx)
        andb $0x0f, 0x8(%rbx)
        orq $0x100, 0x10(%rbx)
        xorl $-1, 0x18(%rbx)
        incb 0x20(%rbx)
        decl 0x24(%rbx)
        mov $0xabcd, %ecx
        xchg %cx, 0x28(%rbx)
        cmpl $0x07060503, 0x4(%rbx)
        sete %dl
        testb $0x80, 0x8(%rbx)
        setz %dh
        add 0x2c(%rbx), %rax
    """, {"rcx": 0x2928, "rdx": 0x0101, "rax": 5 + 0x333231302F2E2D2C},
     {0x0: (0x03020100 + 5).to_bytes(4, "little"), 0x4: b"\x03\x05", 0x8: b"\x08", 0x10: (0x1716151413121110 | 0x100).to_bytes(8, "little"),
      0x18: bytes(b ^ 0xFF for b in range(0x18, 0x1C)), 0x20: b"\x21", 0x24: (0x27262524 - 1).to_bytes(4, "little"), 0x28: b"\xcd\xab"}),
    ("rep stos forwards and backwards", """
        mov $0x5a5a5a5a, %eax
        lea 0x100(%rbx), %rdi
        mov $4, %rcx
        rep stosl
        std
        lea 0x20e(%rbx), %rdi
        mov $3, %rcx
        mov $0xbeef, %eax
        rep stosw
        cld
    """, {"rcx": 0, "rdi": DEV + 0x208}, {0x100: b"\x5a" * 16, 0x20A: b"\xef\xbe" * 3}),
    ("rep movs ram -> mmio -> ram", """
        lea src(%rip), %rsi
        lea 0x300(%rbx), %rdi
        mov $3, %rcx
        rep movsq
        lea 0x300(%rbx), %rsi
        lea dst(%rip), %rdi
        mov $6, %rcx
        rep movsl
        mov dst+8(%rip), %rax
        jmp over
    src: .quad 0x1111111111111111, 0x2222222222222222, 0x3333333333333333
    dst: .quad 0, 0, 0
    over:
    """, {"rax": 0x2222222222222222, "rcx": 0}, {0x300: b"\x11" * 8 + b"\x22" * 8 + b"\x33" * 8}),
]


@pytest.mark.parametrize(("code", "regs", "device"), [f[1:] for f in MMIO_FORMS], ids=[f[0] for f in MMIO_FORMS])
def test_mmio_forms_in_a_guest(code: str, regs: dict[str, int], device: dict[int, bytes]) -> None:
    """Each access to the device first faults (EPT violation -> no memslot -> MMIO SPTE ->
    RET_PF_EMULATE), later ones take EPT misconfigurations (handle_ept_misconfig() ->
    handle_mmio_page_fault() -> EMULATE); the emulator carries each instruction out and the
    guest goes on at the next one."""
    guest = MmuGuest("long", f"mov ${DEV:#x}, %rbx\n{code}\ndone: hlt\n")
    guest.device.regs[:] = bytes(range(256)) * 16
    exit = guest.run()
    assert exit.exit_reason is ExitReason.HLT and guest.sb.rip == guest.symbol("done")
    for name, value in regs.items():
        assert guest.sb.gpr[name] == value, name
    for offset, data in device.items():
        assert bytes(guest.device.regs[offset : offset + len(data)]) == data, hex(offset)
    stats = guest.mmu.stats
    assert stats["pf_mmio_spte_created"] == 1  # one device page, one marker
    assert all(result is RetPf.EMULATE for _, result in guest.misconfigs)
    assert all(o.result.value == "done" for o in guest.emulated)


def test_mmio_exits_to_vmm_when_no_device_answers() -> None:
    """KVM_EXIT_MMIO: with no in-kernel device, reads wait for the VMM's data
    (complete_userspace_io) and writes carry theirs."""
    guest = MmuGuest("long", f"""
        mov ${DEV:#x}, %rbx
        movl $0x1234, 0x10(%rbx)
        mov 0x10(%rbx), %edx
        add $1, %edx
        lea 0x20(%rbx), %rdi
        mov $0x77, %al
        mov $2, %ecx
        rep stosb
        done: hlt
    """, mmio_in_kernel=False)
    assert guest.run().exit_reason is ExitReason.HLT
    assert guest.sb.gpr["rdx"] == 0x1235 and guest.sb.gpr["rcx"] == 0
    assert guest.user_exits == [
        MmioExit(DEV + 0x10, 4, True, 0x1234),
        MmioExit(DEV + 0x10, 4, False),
        MmioExit(DEV + 0x20, 1, True, 0x77),
        MmioExit(DEV + 0x21, 1, True, 0x77),
    ]


def test_alu_flags_on_mmio_match_the_processor() -> None:
    """Differential check of the emulated RFLAGS (SDM Vol. 1 3.4.3): every ALU form is run by
    the processor on RAM and by the emulator on the device with the same operands and carry;
    results and CF/PF/ZF/SF/OF must agree (AF too, except after logic ops, where the SDM leaves
    it undefined)."""
    ops = [("add", False), ("adc", False), ("sub", False), ("sbb", False), ("cmp", False), ("and", True),
           ("or", True), ("xor", True), ("test", True)]
    sizes = [("b", "%cl", 0xFF), ("w", "%cx", 0xFFFF), ("l", "%ecx", 0xFFFFFFFF), ("q", "%rcx", 2**64 - 1)]
    pairs = [(0, 0, False), (1, 0xFFFFFFFFFFFFFFFF, True), (0x7F, 1, False), (0x8000, 0x8000, True),
             (0x7FFFFFFF, 0x80000001, False), (0x8000000000000000, 1, True), (0x1234, 0x4321, False)]
    cases, lines = [], []
    for op, logic in ops:
        for suffix, reg, mask in sizes:
            for a, b, carry in pairs:
                index = len(cases)
                cases.append((op, suffix, a & mask, b & mask, carry, logic))
                cf = "stc" if carry else "clc"
                lines.append(f"""
                    movabs ${a & mask:#x}, %rax
                    mov %rax, cell(%rip)
                    mov %rax, (%rbx)
                    movabs ${b & mask:#x}, %rcx
                    {cf}
                    {op}{suffix} {reg}, cell(%rip)
                    pushfq
                    pop %r8
                    {cf}
                    {op}{suffix} {reg}, (%rbx)
                    pushfq
                    pop %r9
                    mov cell(%rip), %r10
                    mov (%rbx), %r11
                    mov %r8, results+{index * 32}(%rip)
                    mov %r9, results+{index * 32 + 8}(%rip)
                    mov %r10, results+{index * 32 + 16}(%rip)
                    mov %r11, results+{index * 32 + 24}(%rip)
                """)
    source = f"mov ${DEV:#x}, %rbx\n" + "".join(lines) + "done: hlt\n.align 8\ncell: .quad 0\nresults:\n"
    guest = MmuGuest("long", source)
    assert guest.run().exit_reason is ExitReason.HLT
    results = guest.sb.symbol("results")
    arith = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x800
    for index, (op, suffix, a, b, carry, logic) in enumerate(cases):
        raw = guest.read_gpa(results + index * 32, 32)
        native_flags, emulated_flags, native, emulated = (int.from_bytes(raw[i : i + 8], "little") for i in range(0, 32, 8))
        mask = arith & ~(0x10 if logic else 0)
        where = f"{op}{suffix} a={a:#x} b={b:#x} cf={carry}"
        assert emulated_flags & mask == native_flags & mask, where
        assert emulated == native, where
    assert len(guest.emulated) == 3 * len(cases)


# --- dirty logging with a real guest ------------------------------------------------------------------------------
def test_dirty_log_is_exact_after_guest_writes() -> None:
    """KVM_MEM_LOG_DIRTY_PAGES on a data slot: the guest's writes (and only those -- its reads
    map pages read-only) set exactly their bits; KVM_GET_DIRTY_LOG clears them and
    write-protects the pages again; the second round's writes take the fast path."""
    first = [0, 3, 5, 100, 101, 511]
    second = [3, 200, 511]
    reads = [7, 300]
    base = 4 * MIB

    def writes(pages: list[int]) -> str:
        return "".join(f"movq $1, {base + p * KIB4 + 8:#x}\n" for p in pages)

    source = (
        "".join(f"mov {base + p * KIB4:#x}, %rax\n" for p in reads)
        + writes(first) + "round1: hlt\n" + writes(second) + "round2: hlt\n"
    )
    guest = MmuGuest("long", source, ram=8 * MIB, ram_slot_size=4 * MIB)
    data_hva = guest.ram_hva + base
    guest.memslots.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, base, MIB2, data_hva)

    def dirty() -> set[int]:
        bitmap = guest.memslots.get_dirty_log(1)
        return {i for i in range(512) if bitmap[i >> 3] >> (i & 7) & 1}

    guest.run()
    assert guest.sb.rip == guest.symbol("round1")
    assert dirty() == set(first)
    fast_before = guest.mmu.stats["pf_fast"]
    guest.sb.skip_instruction()
    guest.run()
    assert guest.sb.rip == guest.symbol("round2")
    assert dirty() == set(second)
    # Pages 3 and 511 were write-protected again by the first GET: fast path; 200 is new.
    assert guest.mmu.stats["pf_fast"] - fast_before == 2
    assert guest.mmu.stats["pages_2m"] == 1  # the first slot's block; none in the logged slot


def test_write_to_read_only_slot_goes_to_the_vmm() -> None:
    """KVM_MEM_READONLY (a ROM): reads run from the mapped page, a write is emulated as MMIO and
    exits to the VMM (KVM_EXIT_MMIO with is_write), leaving the ROM unchanged."""
    rom = 4 * MIB
    guest = MmuGuest("long", f"""
        mov {rom + 0x10:#x}, %rax
        movl $0xdead, {rom + 0x10:#x}
        mov {rom + 0x10:#x}, %rcx
        done: hlt
    """, ram=8 * MIB, ram_slot_size=4 * MIB)
    guest.host_mm.write(guest.ram_hva + rom + 0x10, b"ROMDATA!")
    guest.memslots.set_user_memory_region(1, KVM_MEM_READONLY, rom, MIB2, guest.ram_hva + rom)
    vmm: list[MmioExit] = []
    guest.on_user_exit = lambda exit: vmm.append(exit)  # type: ignore[func-returns-value]
    assert guest.run().exit_reason is ExitReason.HLT
    assert guest.sb.gpr["rax"] == guest.sb.gpr["rcx"] == int.from_bytes(b"ROMDATA!", "little")
    assert vmm == [MmioExit(rom + 0x10, 4, True, 0xDEAD)]
    assert guest.mmu.stats["pf_emulate"] == 1
