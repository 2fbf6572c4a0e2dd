"""EPT violations and misconfigurations end to end, with the exact exit information a
hypervisor relies on, plus EPT accessed/dirty flags, large EPT pages and INVEPT.

SDM references: 28.2.1 Table 28-7 (EPT-violation exit qualification: bits 2:0 the access,
bits 5:3 the permissions of the translation, bit 7 "guest linear address valid", bit 8 "access
to the translation of that linear address" as opposed to a guest paging-structure entry),
28.2.1 / 25.9.x (GUEST_PHYSICAL_ADDRESS, GUEST_LINEAR_ADDRESS), 29.3.2 (EPT entries, 2-MByte and
1-GByte pages), 29.3.3.1 (misconfigurations: write without read, reserved bits, reserved memory
types), 29.3.3.2 (violations), 29.3.5 (accessed and dirty flags; guest paging-structure accesses
count as writes), 29.4.3 (cached translations; INVEPT; VM entries with VPIDs disabled).
"""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.guest.sandbox import EPT_MEMTYPE_WB, GUEST_PD, GUEST_PDPT, GUEST_PML4, VmxSandbox

pytestmark = pytest.mark.machine

R, W, X = 1, 2, 4
GVA_VALID, GVA_TRANSLATED = 1 << 7, 1 << 8
EPT_A, EPT_D = 1 << 8, 1 << 9
DATA = 0x300000  # a guest page the tests re-map


def _set_pte(sb: VmxSandbox, gpa: int, value: int) -> None:
    entry = sb.ept_entry_address(gpa)
    assert entry is not None
    sb.memory.write64(entry, value)
    assert sb.cpu.invept(2, 0).succeeded


def _pte(sb: VmxSandbox, gpa: int) -> int:
    entry = sb.ept_entry_address(gpa, create=False)
    assert entry is not None
    return sb.memory.read64(entry)


def _qualification(access: int, permissions: int, translated: bool = True) -> int:
    return access | permissions << 3 | GVA_VALID | (GVA_TRANSLATED if translated else 0)


@pytest.mark.parametrize(
    "body, permissions, access",
    [
        ("mov 0x123(%rax), %rbx", X, R),  # read of an execute-only page
        ("movq $1, 0x123(%rax)", R, W),  # write to a read-only page
        ("movq $1, 0x123(%rax)", R | X, W),
    ],
)
def test_data_access_violation_exact_information(body: str, permissions: int, access: int) -> None:
    sb = VmxSandbox("long", f"mov ${DATA:#x}, %rax\nhere: {body}\nhlt\n")
    _set_pte(sb, DATA, sb.gpa_to_hpa(DATA) | permissions | EPT_MEMTYPE_WB)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EPT_VIOLATION
    assert sb.rip == sb.symbol("here")
    assert exit.qualification == _qualification(access, permissions)
    assert exit.guest_physical_address == DATA + 0x123
    assert exit.guest_linear_address == DATA + 0x123


def test_fetch_violation_exact_information() -> None:
    """Jumping into a readable, writable but not executable page: an instruction fetch."""
    sb = VmxSandbox("long", f"mov ${DATA + 0x10:#x}, %rax\njmp *%rax\n")
    sb.write_memory(DATA + 0x10, b"\xf4")
    _set_pte(sb, DATA, sb.gpa_to_hpa(DATA) | R | W | EPT_MEMTYPE_WB)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EPT_VIOLATION
    assert exit.qualification == _qualification(X, R | W)
    assert exit.guest_physical_address == exit.guest_linear_address == DATA + 0x10
    assert sb.rip == DATA + 0x10


def test_permissions_are_the_and_over_the_walk() -> None:
    """Bits 5:3 report the permissions of the whole translation: the AND of every EPT entry
    used -- here a read-only PDE above a read/write/execute PTE (SDM 28.2.1 Table 28-7)."""
    sb = VmxSandbox("long", f"mov ${DATA:#x}, %rax\nhere: movq $1, (%rax)\nhlt\n")
    pde = sb.ept_root  # walk to the EPT PDE of DATA: PML4E -> PDPTE -> PDE
    for shift in (39, 30):
        pde = sb.memory.read64(pde + ((DATA >> shift) & 0x1FF) * 8) & 0x000FFFFFFFFFF000
    pde += ((DATA >> 21) & 0x1FF) * 8
    # Give this 2 MiB region its own table so the code page keeps its rights.
    sb.memory.write64(pde, (sb.memory.read64(pde) & ~0x7) | R)
    assert sb.cpu.invept(2, 0).succeeded
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EPT_VIOLATION
    assert exit.qualification == _qualification(W, R)


def test_violation_during_the_guests_page_walk() -> None:
    """An EPT-unmapped page directory: the violation happens on the guest's read of its PDE --
    bit 7 set (the linear address is known), bit 8 clear (not an access to the translation),
    GUEST_PHYSICAL_ADDRESS the PDE's exact address, GUEST_LINEAR_ADDRESS the address being
    translated (SDM 28.2.1 Table 28-7)."""
    sb = VmxSandbox("long", "here: cpuid\nnext: hlt\n")
    assert sb.run().exit_reason is ExitReason.CPUID
    sb.skip_instruction()
    sb.ept_unmap(GUEST_PD, 0x1000)  # also INVEPT: the code page must be translated again
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EPT_VIOLATION
    assert exit.qualification == R | GVA_VALID  # a data read, no permissions, bit 8 clear
    assert exit.guest_physical_address == GUEST_PD + 8 * (sb.symbol("next") >> 21)
    assert exit.guest_linear_address == sb.symbol("next")


def test_violation_during_page_walk_with_ad_flags_is_a_write() -> None:
    """With EPT A/D flags on (EPTP bit 6), guest paging-structure accesses are writes for EPT:
    the violation sets bits 0 and 1 (SDM 29.3.3.2, Table 28-7 footnote)."""
    sb = VmxSandbox("long", "here: cpuid\nnext: hlt\n")
    sb.write(F.EPT_POINTER, sb.eptp | (1 << 6))
    assert sb.run().exit_reason is ExitReason.CPUID
    sb.skip_instruction()
    sb.ept_unmap(GUEST_PD, 0x1000)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EPT_VIOLATION
    assert exit.qualification == R | W | GVA_VALID


@pytest.mark.parametrize(
    "entry_bits",
    [
        W | EPT_MEMTYPE_WB,  # write without read (SDM 29.3.3.1)
        R | W | X | EPT_MEMTYPE_WB | (1 << 50),  # bit 50: above MAXPHYADDR (46)
        R | W | X | (2 << 3),  # memory type 2 is reserved
    ],
)
def test_ept_misconfiguration(entry_bits: int) -> None:
    """Exit reason 49 with the guest-physical address of the access; no qualification."""
    sb = VmxSandbox("long", f"mov ${DATA:#x}, %rax\nhere: mov 0x40(%rax), %rbx\nhlt\n")
    _set_pte(sb, DATA, sb.gpa_to_hpa(DATA) | entry_bits)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EPT_MISCONFIG
    assert exit.guest_physical_address == DATA + 0x40
    assert exit.qualification == 0
    assert sb.rip == sb.symbol("here")


def test_accessed_and_dirty_flags() -> None:
    """EPTP bit 6: the accessed flag is set in every EPT entry a translation uses and the dirty
    flag in the leaf on a write (SDM 29.3.5).  The guest's paging-structure accesses count as
    writes: the EPT PTEs of its PML4, PDPT and PD pages get dirty although the guest never
    writes them (their own accessed/dirty flags are already set here)."""
    sb = VmxSandbox(
        "long",
        f"mov ${DATA:#x}, %rax\nmov (%rax), %rbx\nmovq $7, 0x1000(%rax)\nhlt\n",
    )
    sb.write_memory(GUEST_PML4, (GUEST_PDPT | 0x27).to_bytes(8, "little"))
    sb.write_memory(GUEST_PDPT, (GUEST_PD | 0x27).to_bytes(8, "little"))
    sb.write_memory(GUEST_PD, b"".join(((i << 21) | 0xE7).to_bytes(8, "little") for i in range(512)))
    sb.write(F.EPT_POINTER, sb.eptp | (1 << 6))
    for gpa in (DATA, DATA + 0x1000, GUEST_PML4, GUEST_PDPT, GUEST_PD, 0x20000):
        assert not _pte(sb, gpa) & (EPT_A | EPT_D)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, 1 << 7)  # HLT exiting
    assert sb.run().exit_reason is ExitReason.HLT
    assert _pte(sb, DATA) & (EPT_A | EPT_D) == EPT_A  # read only
    assert _pte(sb, DATA + 0x1000) & (EPT_A | EPT_D) == EPT_A | EPT_D  # written
    for table in (GUEST_PML4, GUEST_PDPT, GUEST_PD):
        assert _pte(sb, table) & (EPT_A | EPT_D) == EPT_A | EPT_D
    assert not _pte(sb, 0x20000) & EPT_A  # never touched
    pml4e = sb.memory.read64(sb.ept_root)
    assert pml4e & EPT_A  # a non-leaf entry used by the walks


def test_2mib_and_1gib_ept_pages() -> None:
    """A 2-MByte EPT page (PDE bit 7) and a 1-GByte one (PDPTE bit 7) translate with the low 21
    or 30 bits of the guest-physical address as the offset (SDM 29.3.2)."""
    sb = VmxSandbox(
        "long",
        "mov $0x600123, %rax\nmov (%rax), %rbx\nmov $0x41300456, %rax\nmov (%rax), %rcx\nhlt\n",
    )
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, 1 << 7)
    # The guest maps linear 1 GiB .. 2 GiB to guest-physical 1 GiB with a 1 GiB page.
    sb.write_memory(GUEST_PDPT + 8, (0x40000000 | 0x87).to_bytes(8, "little"))
    # EPT: guest-physical 0x600000 (2 MiB) -> host 0x1200000; 1 GiB -> host 0 (1 GiB).
    pdpt = sb.memory.read64(sb.ept_root) & 0x000FFFFFFFFFF000
    pd = sb.memory.read64(pdpt) & 0x000FFFFFFFFFF000
    sb.memory.write64(pd + 3 * 8, 0x1200000 | (1 << 7) | R | W | X | EPT_MEMTYPE_WB)
    sb.memory.write64(pdpt + 1 * 8, 0 | (1 << 7) | R | W | X | EPT_MEMTYPE_WB)
    assert sb.cpu.invept(2, 0).succeeded
    sb.memory.write64(0x1200123, 0x2222)
    sb.memory.write64(0x1300456, 0x1111)
    assert sb.run().exit_reason is ExitReason.HLT
    assert sb.gpr["rbx"] == 0x2222
    assert sb.gpr["rcx"] == 0x1111


INVEPT_GUEST = f"""
again: mov ${DATA:#x}, %rax
    mov (%rax), %rbx
    cpuid
    jmp again
"""


def _remap_data(sb: VmxSandbox, value: int) -> None:
    """Point DATA at another host page holding ``value`` -- without invalidating anything."""
    page = sb.pages.alloc_page()
    sb.memory.write64(page, value)
    entry = sb.ept_entry_address(DATA)
    assert entry is not None
    sb.memory.write64(entry, page | R | W | X | EPT_MEMTYPE_WB)


def test_invept_makes_a_changed_ept_entry_take_effect() -> None:
    """With VPIDs enabled, VM exits and entries keep cached translations (SDM 29.4.3.1): after
    the hypervisor changes the EPT entry of a page the guest used, the guest still sees the old
    page until INVEPT (single-context, this EPTP) invalidates the mappings derived from it."""
    sb = VmxSandbox("long", INVEPT_GUEST)
    sb.set_bits(F.SECONDARY_VM_EXEC_CONTROL, S.ENABLE_VPID)
    sb.write(F.VIRTUAL_PROCESSOR_ID, 1)
    sb.write_memory(DATA, (0x1111).to_bytes(8, "little"))
    assert sb.run().exit_reason is ExitReason.CPUID and sb.gpr["rbx"] == 0x1111
    _remap_data(sb, 0x2222)
    sb.skip_instruction()
    assert sb.run().exit_reason is ExitReason.CPUID
    assert sb.gpr["rbx"] == 0x1111  # the cached translation
    assert sb.cpu.invept(1, sb.read(F.EPT_POINTER)).succeeded
    sb.skip_instruction()
    assert sb.run().exit_reason is ExitReason.CPUID
    assert sb.gpr["rbx"] == 0x2222  # the new mapping
