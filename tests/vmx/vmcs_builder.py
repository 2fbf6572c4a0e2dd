"""A processor in VMX root operation with a current VMCS that passes every VM-entry check.

``EntryHarness`` builds the state the way a hypervisor would -- VMXON, VMCLEAR, VMPTRLD, then
VMWRITEs of controls computed with ``adjust_vmx_controls`` (as KVM's setup_vmcs_config does) and
of a complete guest and host state -- so a test can break exactly one field and VMLAUNCH.
Baselines: a 64-bit guest (the default), a real-mode guest under "unrestricted guest", a 32-bit
protected-mode guest with paging (optionally PAE) and a virtual-8086 guest.
"""

from __future__ import annotations

from pyvmx.arch.controls import (
    PinBasedControls as P,
    ProcBasedControls as C,
    SecondaryProcBasedControls as S,
    VmEntryControls as E,
    VmExitControls as X,
)
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4, Efer
from pyvmx.vmx.caps import CpuProfile, adjust_vmx_controls
from pyvmx.vmx.memory import PhysicalMemory
from pyvmx.vmx.outcomes import VmxResult
from pyvmx.vmx.processor import Processor

MEMORY_SIZE = 16 << 20

# Physical layout of the test machine.
VMXON_REGION = 0x1000
VMCS_REGION = 0x2000
OTHER_VMCS = 0x3000  # a second, valid VMCS (a VMCS link pointer may reference it)
IO_BITMAP_A = 0x4000
IO_BITMAP_B = 0x5000
MSR_BITMAP = 0x6000
EPT_PML4 = 0x7000
VIRTUAL_APIC_PAGE = 0x8000
ENTRY_MSR_LOAD_AREA = 0x9000
EXIT_MSR_STORE_AREA = 0xA000
EXIT_MSR_LOAD_AREA = 0xB000
GUEST_PAE_PDPT = 0xC000  # the PAE PDPT a non-EPT PAE guest's CR3 points to
GUEST_CR3 = 0x100000
HOST_CR3 = 0x200000

HOST_RIP = 0xFFFFFFFF81000000
HOST_RSP = 0xFFFFC90000010000
HOST_RIP_32 = 0xC1000000  # a 32-bit host (use_32bit_host)
HOST_RSP_32 = 0xC0010000

EPTP_WB_4LEVEL = EPT_PML4 | 6 | (3 << 3)

CR0_64 = int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG)
CR4_64 = int(Cr4.PAE | Cr4.VMXE)
EFER_64 = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NX)
CR0_32_HOST = int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG)
CR4_32_HOST = int(Cr4.VMXE)  # 2-level paging
PAT_DEFAULT = 0x0007040600070406

# Access rights (VMX format, SDM 25.4.1).
AR_CODE64 = 0xA09B  # type 11 (execute/read, accessed), S, P, L, G
AR_CODE32 = 0xC09B  # type 11, S, P, D/B, G
AR_CODE16 = 0x009B  # type 11, S, P
AR_DATA32 = 0xC093  # type 3 (read/write, accessed), S, P, D/B, G
AR_DATA16 = 0x0093
AR_V8086 = 0x00F3
AR_TSS_BUSY = 0x008B  # type 11 (busy 32/64-bit TSS), P
AR_LDT = 0x0082  # type 2, P
AR_UNUSABLE = 0x10000

DATA_SEGMENTS = ("ES", "SS", "DS", "FS", "GS")


def _true_msr(profile: CpuProfile, true_msr: int, plain_msr: int) -> int:
    value = profile.rdmsr(true_msr)
    if value is None:
        value = profile.rdmsr(plain_msr)
    assert value is not None
    return value


class EntryHarness:
    """A processor, 16 MiB of memory and a current VMCS holding a valid 64-bit guest."""

    def __init__(self, profile: CpuProfile | None = None) -> None:
        self.memory = PhysicalMemory(MEMORY_SIZE)
        self.processor = Processor(self.memory, profile)
        self.profile = self.processor.profile
        self.processor.host.cr4 |= Cr4.VMXE
        revision = self.profile.revision_id
        for region in (VMXON_REGION, VMCS_REGION, OTHER_VMCS):
            self.memory.write32(region, revision)
        assert self.processor.vmxon(VMXON_REGION).succeeded
        assert self.processor.vmclear(OTHER_VMCS).succeeded
        assert self.processor.vmclear(VMCS_REGION).succeeded
        assert self.processor.vmptrld(VMCS_REGION).succeeded
        self.write_controls()
        self.write_host_state()
        self.write_guest_state_64()

    # --- VMREAD/VMWRITE through the processor ----------------------------------------------------
    def read(self, field: F) -> int:
        return self.processor.vmcs.read(field)

    def write(self, field: F, value: int) -> None:
        self.processor.vmcs.write(field, value)

    def set_bits(self, field: F, mask: int) -> None:
        self.write(field, self.read(field) | int(mask))

    def clear_bits(self, field: F, mask: int) -> None:
        self.write(field, self.read(field) & ~int(mask))

    def launch(self) -> VmxResult:
        return self.processor.vmlaunch()

    def resume(self) -> VmxResult:
        return self.processor.vmresume()

    # --- controls --------------------------------------------------------------------------------
    def adjust(self, kind: str, minimum: int, optional: int = 0) -> int:
        p = self.profile
        msr = {
            "pin": _true_msr(p, Msr.IA32_VMX_TRUE_PINBASED_CTLS, Msr.IA32_VMX_PINBASED_CTLS),
            "proc": _true_msr(p, Msr.IA32_VMX_TRUE_PROCBASED_CTLS, Msr.IA32_VMX_PROCBASED_CTLS),
            "secondary": _true_msr(p, Msr.IA32_VMX_PROCBASED_CTLS2, Msr.IA32_VMX_PROCBASED_CTLS2),
            "exit": _true_msr(p, Msr.IA32_VMX_TRUE_EXIT_CTLS, Msr.IA32_VMX_EXIT_CTLS),
            "entry": _true_msr(p, Msr.IA32_VMX_TRUE_ENTRY_CTLS, Msr.IA32_VMX_ENTRY_CTLS),
        }[kind]
        return adjust_vmx_controls(int(minimum), int(optional), msr)

    def write_controls(self) -> None:
        self.write(F.PIN_BASED_VM_EXEC_CONTROL, self.adjust("pin", P.EXT_INTR_MASK | P.NMI_EXITING | P.VIRTUAL_NMIS))
        self.write(
            F.CPU_BASED_VM_EXEC_CONTROL,
            self.adjust(
                "proc",
                C.HLT_EXITING | C.USE_IO_BITMAPS | C.USE_MSR_BITMAPS | C.ACTIVATE_SECONDARY_CONTROLS,
            ),
        )
        self.write(F.SECONDARY_VM_EXEC_CONTROL, self.adjust("secondary", S.ENABLE_EPT | S.ENABLE_VPID))
        self.write(
            F.VM_EXIT_CONTROLS,
            self.adjust(
                "exit",
                X.HOST_ADDR_SPACE_SIZE | X.ACK_INTR_ON_EXIT | X.SAVE_IA32_PAT | X.LOAD_IA32_PAT
                | X.SAVE_IA32_EFER | X.LOAD_IA32_EFER,
            ),
        )
        self.write(
            F.VM_ENTRY_CONTROLS,
            self.adjust("entry", E.IA32E_MODE | E.LOAD_IA32_PAT | E.LOAD_IA32_EFER | E.LOAD_DEBUG_CONTROLS),
        )
        self.write(F.EXCEPTION_BITMAP, 0)
        self.write(F.CR3_TARGET_COUNT, 0)
        self.write(F.IO_BITMAP_A, IO_BITMAP_A)
        self.write(F.IO_BITMAP_B, IO_BITMAP_B)
        self.write(F.MSR_BITMAP, MSR_BITMAP)
        self.write(F.EPT_POINTER, EPTP_WB_4LEVEL)
        self.write(F.VIRTUAL_PROCESSOR_ID, 1)
        self.write(F.VM_EXIT_MSR_STORE_COUNT, 0)
        self.write(F.VM_EXIT_MSR_LOAD_COUNT, 0)
        self.write(F.VM_ENTRY_MSR_LOAD_COUNT, 0)
        self.write(F.VM_EXIT_MSR_STORE_ADDR, EXIT_MSR_STORE_AREA)
        self.write(F.VM_EXIT_MSR_LOAD_ADDR, EXIT_MSR_LOAD_AREA)
        self.write(F.VM_ENTRY_MSR_LOAD_ADDR, ENTRY_MSR_LOAD_AREA)
        self.write(F.VM_ENTRY_INTR_INFO_FIELD, 0)
        self.write(F.VM_ENTRY_EXCEPTION_ERROR_CODE, 0)
        self.write(F.VM_ENTRY_INSTRUCTION_LEN, 0)

    # --- host state (SDM 25.5) -------------------------------------------------------------------
    def write_host_state(self) -> None:
        self.write(F.HOST_CR0, CR0_64)
        self.write(F.HOST_CR3, HOST_CR3)
        self.write(F.HOST_CR4, CR4_64)
        for seg, selector in (("CS", 0x10), ("SS", 0x18), ("DS", 0), ("ES", 0), ("FS", 0), ("GS", 0), ("TR", 0x40)):
            self.write(F[f"HOST_{seg}_SELECTOR"], selector)
        self.write(F.HOST_FS_BASE, 0x7F0000001000)
        self.write(F.HOST_GS_BASE, 0xFFFF888000000000)
        self.write(F.HOST_TR_BASE, 0xFFFFFE0000001000)
        self.write(F.HOST_GDTR_BASE, 0xFFFFFE0000000000)
        self.write(F.HOST_IDTR_BASE, 0xFFFFFE0000002000)
        self.write(F.HOST_IA32_SYSENTER_CS, 0)
        self.write(F.HOST_IA32_SYSENTER_ESP, 0)
        self.write(F.HOST_IA32_SYSENTER_EIP, 0)
        self.write(F.HOST_IA32_EFER, EFER_64)
        self.write(F.HOST_IA32_PAT, PAT_DEFAULT)
        self.write(F.HOST_RIP, HOST_RIP)
        self.write(F.HOST_RSP, HOST_RSP)

    # --- guest state (SDM 25.4) ------------------------------------------------------------------
    def write_segment(self, name: str, selector: int, base: int, limit: int, ar: int) -> None:
        self.write(F[f"GUEST_{name}_SELECTOR"], selector)
        self.write(F[f"GUEST_{name}_BASE"], base)
        self.write(F[f"GUEST_{name}_LIMIT"], limit)
        self.write(F[f"GUEST_{name}_AR_BYTES"], ar)

    def write_guest_state_64(self) -> None:
        """A 64-bit guest at CPL 0: what KVM's vCPU looks like after booting a 64-bit kernel."""
        self.write(F.GUEST_CR0, CR0_64)
        self.write(F.GUEST_CR3, GUEST_CR3)
        self.write(F.GUEST_CR4, CR4_64)
        self.write(F.GUEST_DR7, 0x400)
        self.write(F.GUEST_IA32_DEBUGCTL, 0)
        self.write(F.GUEST_IA32_EFER, EFER_64)
        self.write(F.GUEST_IA32_PAT, PAT_DEFAULT)
        self.write(F.GUEST_SYSENTER_CS, 0)
        self.write(F.GUEST_SYSENTER_ESP, 0)
        self.write(F.GUEST_SYSENTER_EIP, 0)
        self.write_segment("CS", 0x10, 0, 0xFFFFFFFF, AR_CODE64)
        for name in DATA_SEGMENTS:
            self.write_segment(name, 0x18, 0, 0xFFFFFFFF, AR_DATA32)
        self.write(F.GUEST_FS_BASE, 0x7F0000001000)
        self.write(F.GUEST_GS_BASE, 0xFFFF888000000000)
        self.write_segment("LDTR", 0, 0, 0, AR_UNUSABLE)
        self.write_segment("TR", 0x40, 0xFFFFFE0000003000, 0x67, AR_TSS_BUSY)
        self.write(F.GUEST_GDTR_BASE, 0xFFFFFE0000000000)
        self.write(F.GUEST_GDTR_LIMIT, 0x7F)
        self.write(F.GUEST_IDTR_BASE, 0xFFFFFE0000002000)
        self.write(F.GUEST_IDTR_LIMIT, 0xFFF)
        self.write(F.GUEST_RIP, 0xFFFFFFFF80001000)
        self.write(F.GUEST_RSP, 0xFFFFC90000020000)
        self.write(F.GUEST_RFLAGS, 0x2)
        self.write(F.GUEST_ACTIVITY_STATE, 0)
        self.write(F.GUEST_INTERRUPTIBILITY_INFO, 0)
        self.write(F.GUEST_PENDING_DBG_EXCEPTIONS, 0)
        self.write(F.VMCS_LINK_POINTER, 0xFFFFFFFFFFFFFFFF)
        for i in range(4):
            self.write(F[f"GUEST_PDPTR{i}"], 0)

    def _leave_ia32e_mode(self, cr0: int, cr4: int) -> None:
        self.clear_bits(F.VM_ENTRY_CONTROLS, E.IA32E_MODE)
        self.write(F.GUEST_CR0, cr0)
        self.write(F.GUEST_CR4, cr4)
        self.write(F.GUEST_IA32_EFER, 0)
        self.write(F.GUEST_FS_BASE, 0)
        self.write(F.GUEST_GS_BASE, 0)
        self.write(F.GUEST_TR_BASE, 0x3000)
        self.write(F.GUEST_GDTR_BASE, 0x2000)
        self.write(F.GUEST_IDTR_BASE, 0x1000)

    def use_real_mode_guest(self) -> EntryHarness:
        """A real-mode guest at the reset vector, under "unrestricted guest"."""
        self.set_bits(F.SECONDARY_VM_EXEC_CONTROL, S.UNRESTRICTED_GUEST)
        self._leave_ia32e_mode(int(Cr0.ET | Cr0.NE), int(Cr4.VMXE))
        self.write_segment("CS", 0xF000, 0xF0000, 0xFFFF, AR_CODE16)
        for name in DATA_SEGMENTS:
            self.write_segment(name, 0, 0, 0xFFFF, AR_DATA16)
        self.write_segment("LDTR", 0, 0, 0xFFFF, AR_LDT)
        self.write_segment("TR", 0, 0, 0xFFFF, AR_TSS_BUSY)
        self.write(F.GUEST_GDTR_LIMIT, 0xFFFF)
        self.write(F.GUEST_IDTR_LIMIT, 0x3FF)
        self.write(F.GUEST_RIP, 0xFFF0)
        self.write(F.GUEST_RSP, 0)
        return self

    def use_protected_mode_32_guest(self, pae: bool = False) -> EntryHarness:
        """A 32-bit protected-mode guest at CPL 0 with paging (2-level, or PAE)."""
        cr4 = int(Cr4.VMXE | (Cr4.PAE if pae else 0))
        self._leave_ia32e_mode(int(Cr0.PE | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG), cr4)
        self.write_segment("CS", 0x08, 0, 0xFFFFFFFF, AR_CODE32)
        for name in DATA_SEGMENTS:
            self.write_segment(name, 0x10, 0, 0xFFFFFFFF, AR_DATA32)
        self.write(F.GUEST_RIP, 0x100000)
        self.write(F.GUEST_RSP, 0x90000)
        if pae:
            self.write(F.GUEST_CR3, GUEST_PAE_PDPT)
            # Used when "enable EPT" is 1 (the PDPTE fields) ...
            self.write(F.GUEST_PDPTR0, 0x101000 | 1)
            # ... and when it is 0 (the PDPT in memory at guest CR3).
            self.memory.write64(GUEST_PAE_PDPT, 0x101000 | 1)
        return self

    def use_v8086_guest(self) -> EntryHarness:
        """A virtual-8086 task under a 32-bit protected-mode kernel (RFLAGS.VM = 1)."""
        self.use_protected_mode_32_guest()
        for name, selector in (("CS", 0x1000), ("SS", 0x2000), ("DS", 0x3000), ("ES", 0), ("FS", 0), ("GS", 0)):
            self.write_segment(name, selector, selector << 4, 0xFFFF, AR_V8086)
        self.write(F.GUEST_RIP, 0x100)
        self.write(F.GUEST_RSP, 0xFFFE)
        self.write(F.GUEST_RFLAGS, 0x2 | (1 << 17))
        return self

    def use_32bit_host(self) -> EntryHarness:
        """A host in 32-bit protected mode with paging, outside IA-32e mode (IA32_EFER.LMA = 0):
        the processor's own state and the host-state area that returns to it ("host address-space
        size" = 0, "load IA32_EFER" loading 0)."""
        host = self.processor.host
        host.cr0, host.cr4, host.efer, host.cs_l = CR0_32_HOST, CR4_32_HOST, 0, False
        self.clear_bits(F.VM_EXIT_CONTROLS, X.HOST_ADDR_SPACE_SIZE)
        self.write(F.HOST_CR0, CR0_32_HOST)
        self.write(F.HOST_CR4, CR4_32_HOST)
        self.write(F.HOST_IA32_EFER, 0)
        self.write(F.HOST_RIP, HOST_RIP_32)
        self.write(F.HOST_RSP, HOST_RSP_32)
        for name, base in (("FS", 0), ("GS", 0), ("TR", 0xC0001000), ("GDTR", 0xC0000000), ("IDTR", 0xC0002000)):
            self.write(F[f"HOST_{name}_BASE"], base)
        return self

    def without_ept(self) -> EntryHarness:
        self.clear_bits(F.SECONDARY_VM_EXEC_CONTROL, S.ENABLE_EPT | S.UNRESTRICTED_GUEST)
        return self

    def inject(self, kind: int, vector: int, error_code: int | None = None, length: int = 0) -> None:
        """VM-entry event injection (SDM 25.8.3)."""
        info = (1 << 31) | (kind << 8) | vector
        if error_code is not None:
            info |= 1 << 11
            self.write(F.VM_ENTRY_EXCEPTION_ERROR_CODE, error_code)
        self.write(F.VM_ENTRY_INTR_INFO_FIELD, info)
        self.write(F.VM_ENTRY_INSTRUCTION_LEN, length)

    def write_msr_load_list(self, entries: list[tuple[int, int, int]]) -> None:
        """The VM-entry MSR-load area: (index, reserved dword, value) per 16-byte entry."""
        for i, (index, reserved, value) in enumerate(entries):
            entry = ENTRY_MSR_LOAD_AREA + 16 * i
            self.memory.write32(entry, index)
            self.memory.write32(entry + 4, reserved)
            self.memory.write64(entry + 8, value)
        self.write(F.VM_ENTRY_MSR_LOAD_COUNT, len(entries))
