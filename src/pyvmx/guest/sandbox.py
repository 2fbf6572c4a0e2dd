"""A bare VT-x sandbox: one processor, a VMCS set up for a guest in real, protected or long
mode, guest RAM behind EPT, and a guest program from assembly source -- the smallest hypervisor
that lets you configure VMCS controls and watch which guest actions become VM exits.

Everything here goes through the processor's public instructions (VMXON, VMCLEAR, VMPTRLD,
VMWRITE, VMLAUNCH, VMRESUME), exactly as a hypervisor would.

    sb = VmxSandbox("long", '''
        mov $0x3f8, %dx
        out %al, %dx
        hlt
    ''')
    sb.use_io_bitmaps(intercept=[0x3F8])
    exit = sb.run()            # VM exit: IO_INSTRUCTION, port 0x3f8

More guests can share the processor (``sb.add_guest(...)``): each has its own VMCS, its own EPT
and its own slice of host memory; a hypervisor switches between them with VMPTRLD
(``make_current``), and -- as on hardware -- saves the registers the VMCS does not hold.

Guest time here is retired instructions only: unless given a profile, the sandbox's processor
charges nothing for a VM exit (``CpuProfile.vmexit_tsc_cost`` = 0), so timers and traces are
exact to the instruction.  The hypervisor's processors charge the profile's round-trip cost.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Iterable, Literal

from pyvmx.arch.controls import (
    ProcBasedControls as C,
    SecondaryProcBasedControls as S,
    VmEntryControls as E,
    VmExitControls as X,
)
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4, Efer
from pyvmx.guest.assemble import GuestImage, SourceOrigin, assemble
from pyvmx.vmx.caps import CpuProfile, adjust_vmx_controls
from pyvmx.vmx.memory import PAGE_SIZE, PageAllocator, PhysicalMemory
from pyvmx.vmx.outcomes import VmExitInfo, VmxResult, VmxStatus
from pyvmx.vmx.processor import Processor

Mode = Literal["real", "protected", "long"]

# Host-physical layout.
VMXON_REGION = 0x1000
IO_BITMAP_A = 0x4000
IO_BITMAP_B = 0x5000
MSR_BITMAP = 0x6000
TABLES_START = 0x10000  # EPT tables and spare VMCS pages come from here
TABLES_END = 0x100000
GUEST_RAM_HPA = 0x100000  # guest-physical 0 lives here

# Guest-physical layout (the guest sees these addresses).
GUEST_GDT = 0x1000
GUEST_TSS = 0x1800
GUEST_IDT = 0x2000
GUEST_PML4 = 0x3000
GUEST_PDPT = 0x4000
GUEST_PD = 0x5000
GUEST_STACK_TOP = 0x8000
GUEST_CODE = 0x10000  # where the program is loaded (and linked)

SEL_CODE32, SEL_DATA, SEL_CODE64, SEL_TSS = 0x08, 0x10, 0x18, 0x28

# Where the host continues after a VM exit (HOST_RIP), for a 64-bit and a 32-bit host.
HOST_RIP_64 = 0xFFFFFFFF81000000
HOST_RIP_32 = 0xC1000000

EPT_RWX = 0x7
EPT_MEMTYPE_WB = 6 << 3


def _gdt_entry(base: int, limit: int, access: int, flags: int) -> bytes:
    return struct.pack(
        "<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access, ((limit >> 16) & 0xF) | (flags << 4), base >> 24
    )


class VmxSandbox:
    """One processor in VMX root operation with one VMCS running one guest program.

    ``read``/``write`` and ``enter``/``run`` act on the processor's *current* VMCS: after
    :meth:`add_guest`, call :meth:`make_current` on the guest to work on."""

    def __init__(
        self,
        mode: Mode,
        source: str | GuestImage,
        *,
        guest_ram: int = 4 << 20,
        memory: int = 32 << 20,
        profile: CpuProfile | None = None,
        map_all: bool = True,
        tsc_per_instruction: int = 1,
        instruction_budget: int | None = 50_000_000,
        share: VmxSandbox | None = None,
        origin: SourceOrigin | None = None,
        host32: bool = False,
    ) -> None:
        """``host32``: the host runs in 32-bit protected mode with paging, outside IA-32e mode
        (IA32_EFER.LMA = 0), from VMXON on; its VMCSs then say "host address-space size" = 0."""
        from pyvmx.engine.executor import VmxExecutor

        self.mode = mode
        self.guest_ram = guest_ram
        if share is None:
            self.memory = PhysicalMemory(memory)
            self.executor = VmxExecutor(self.memory, tsc_per_instruction=tsc_per_instruction, instruction_budget=instruction_budget)
            if profile is None:  # exact instruction time (see the module docstring)
                profile = dataclasses.replace(CpuProfile.default(), vmexit_tsc_cost=0)
            self.cpu = Processor(self.memory, profile, executor=self.executor)
            self.pages = PageAllocator(self.memory, TABLES_START, TABLES_END)
            self.ram_hpa = GUEST_RAM_HPA
            self._ram_top = [GUEST_RAM_HPA + guest_ram]  # shared with the guests added later
            self.io_bitmaps = (IO_BITMAP_A, IO_BITMAP_B)
            self.msr_bitmap = MSR_BITMAP
        else:
            # Another guest on the same processor: its own VMCS, EPT, RAM and bitmaps.
            self.memory, self.executor, self.cpu, self.pages = share.memory, share.executor, share.cpu, share.pages
            self._ram_top = share._ram_top
            self.ram_hpa = self._ram_top[0]
            self._ram_top[0] += guest_ram
            if self._ram_top[0] > self.memory.size - PAGE_SIZE:
                raise ValueError("host memory is too small for another guest's RAM")
            self.io_bitmaps = (self.pages.alloc_page(), self.pages.alloc_page())
            self.msr_bitmap = self.pages.alloc_page()
        self.profile = self.cpu.profile
        # Real-mode code is linked at offset 0 of a code segment whose base is GUEST_CODE, so its
        # labels are CS offsets (what RIP holds); other modes link at GUEST_CODE itself.
        link = 0 if mode == "real" else GUEST_CODE
        self.image = source if isinstance(source, GuestImage) else assemble(source, link, prologue=_prologue(mode), origin=origin)
        self.launched = False
        self.vmcs_address = self.pages.alloc_page()
        self.memory.write32(self.vmcs_address, self.profile.revision_id)
        if share is None:
            if host32:
                host = self.cpu.host
                host.cr0, host.cr4, host.efer, host.cs_l = int(Cr0.PE | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG), 0, 0, False
            self.cpu.host.cr4 |= Cr4.VMXE
            self.memory.write32(VMXON_REGION, self.profile.revision_id)
            self._check(self.cpu.vmxon(VMXON_REGION), "VMXON")
        self._check(self.cpu.vmclear(self.vmcs_address), "VMCLEAR")
        self._check(self.cpu.vmptrld(self.vmcs_address), "VMPTRLD")
        self.ept_root = self.pages.alloc_page()
        if map_all:
            self.ept_map(0, guest_ram)
        self.write_memory(GUEST_CODE, self.image.code)
        self._write_controls()
        self._write_host_state()
        self._write_guest_state()
        self._build_guest_tables()

    # --- helpers ------------------------------------------------------------------------------------
    def add_guest(self, mode: Mode, source: str | GuestImage, *, guest_ram: int = 4 << 20, map_all: bool = True) -> VmxSandbox:
        """A second (third ...) guest on this processor, with its own VMCS, which becomes the
        current VMCS; its guest RAM is the next free slice of host memory."""
        return VmxSandbox(mode, source, guest_ram=guest_ram, map_all=map_all, share=self)

    def make_current(self) -> VmxResult:
        """VMPTRLD this guest's VMCS (a switch between guests copies no field)."""
        return self.cpu.vmptrld(self.vmcs_address)

    @staticmethod
    def _check(result: VmxResult, what: str) -> None:
        if not result.succeeded:
            raise RuntimeError(f"{what}: {result}")

    def read(self, field: F) -> int:
        return self.cpu.vmcs.read(field)

    def write(self, field: F, value: int) -> None:
        self.cpu.vmcs.write(field, value)

    def set_bits(self, field: F, mask: int) -> None:
        self.write(field, self.read(field) | int(mask))

    def clear_bits(self, field: F, mask: int) -> None:
        self.write(field, self.read(field) & ~int(mask))

    def symbol(self, name: str) -> int:
        return self.image.symbol(name)

    def adjust(self, msr: Msr, minimum: int, optional: int = 0) -> int:
        return adjust_vmx_controls(int(minimum), int(optional), self.cpu.rdmsr(msr), msr)

    # --- guest memory ---------------------------------------------------------------------------------
    def gpa_to_hpa(self, gpa: int) -> int:
        if not 0 <= gpa < self.guest_ram:
            raise ValueError(f"guest-physical address {gpa:#x} is outside guest RAM")
        return self.ram_hpa + gpa

    def write_memory(self, gpa: int, data: bytes) -> None:
        if gpa + len(data) > self.guest_ram:
            raise ValueError("write past the end of guest RAM")
        self.memory.write(self.gpa_to_hpa(gpa), data)

    def read_memory(self, gpa: int, size: int) -> bytes:
        return self.memory.read(self.gpa_to_hpa(gpa), size)

    # --- EPT ---------------------------------------------------------------------------------------------
    def ept_entry_address(self, gpa: int, create: bool = True) -> int | None:
        """The host-physical address of the 4 KiB EPT PTE for ``gpa`` (tables made on demand)."""
        table: int = self.ept_root
        for shift in (39, 30, 21):
            slot = table + ((gpa >> shift) & 0x1FF) * 8
            entry = self.memory.read64(slot)
            if not entry & EPT_RWX:
                if not create:
                    return None
                page = self.pages.alloc_page()
                self.memory.write64(slot, page | EPT_RWX)
                entry = page | EPT_RWX
            table = entry & 0x000FFFFFFFFFF000
        return table + ((gpa >> 12) & 0x1FF) * 8

    def ept_map(self, gpa: int, size: int, perms: int = EPT_RWX, hpa: int | None = None) -> None:
        """Map [gpa, gpa+size) with 4 KiB EPT pages (to guest RAM unless ``hpa`` is given)."""
        for offset in range(0, size, PAGE_SIZE):
            target = (hpa + offset) if hpa is not None else self.gpa_to_hpa(gpa + offset)
            entry = self.ept_entry_address(gpa + offset)
            assert entry is not None
            self.memory.write64(entry, target | perms | (EPT_MEMTYPE_WB if perms else 0))
        self.cpu.invept(2, 0)

    def ept_unmap(self, gpa: int, size: int) -> None:
        for offset in range(0, size, PAGE_SIZE):
            entry = self.ept_entry_address(gpa + offset, create=False)
            if entry is not None:
                self.memory.write64(entry, 0)
        self.cpu.invept(2, 0)

    @property
    def eptp(self) -> int:
        return self.ept_root | 6 | (3 << 3)

    # --- intercept configuration (seed 002's questions) -------------------------------------------------
    def use_io_bitmaps(self, intercept: Iterable[int] = ()) -> None:
        """Use I/O bitmaps A/B (instead of unconditional I/O exiting) with only these ports set."""
        bitmap_a, bitmap_b = self.io_bitmaps
        self.memory.fill(bitmap_a, PAGE_SIZE, 0)
        self.memory.fill(bitmap_b, PAGE_SIZE, 0)
        for port in intercept:
            base = bitmap_a if port < 0x8000 else bitmap_b
            self.memory.set_bit(base, port & 0x7FFF)
        self.write(F.IO_BITMAP_A, bitmap_a)
        self.write(F.IO_BITMAP_B, bitmap_b)
        self.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.USE_IO_BITMAPS)
        self.clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.UNCOND_IO_EXITING)

    def use_msr_bitmap(self, read: Iterable[int] = (), write: Iterable[int] = (), all_ones: bool = False) -> None:
        """Use an MSR bitmap (SDM 25.6.9) in which only the listed MSRs exit."""
        self.memory.fill(self.msr_bitmap, PAGE_SIZE, 0xFF if all_ones else 0)
        for msr, offset in [(m, 0x000) for m in read] + [(m, 0x800) for m in write]:
            base = self.msr_bitmap + offset + (0x400 if msr >= 0xC0000000 else 0)
            self.memory.set_bit(base, msr & 0x1FFF)
        self.write(F.MSR_BITMAP, self.msr_bitmap)
        self.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.USE_MSR_BITMAPS)

    # --- VMCS set-up ---------------------------------------------------------------------------------------
    def _write_controls(self) -> None:
        # Real mode and paging-off protected mode both need "unrestricted guest" (SDM 27.3.1.1).
        secondary = S.ENABLE_EPT | (S.UNRESTRICTED_GUEST if self.mode != "long" else 0)
        self.write(F.PIN_BASED_VM_EXEC_CONTROL, self.adjust(Msr.IA32_VMX_TRUE_PINBASED_CTLS, 0))
        self.write(F.CPU_BASED_VM_EXEC_CONTROL, self.adjust(Msr.IA32_VMX_TRUE_PROCBASED_CTLS, C.ACTIVATE_SECONDARY_CONTROLS))
        self.write(F.SECONDARY_VM_EXEC_CONTROL, self.adjust(Msr.IA32_VMX_PROCBASED_CTLS2, secondary, S.ENABLE_RDTSCP))
        # "host address-space size" is the processor's IA-32e mode (SDM 27.2.4).
        host_size = X.HOST_ADDR_SPACE_SIZE if self.cpu.host_ia32e_mode else 0
        self.write(
            F.VM_EXIT_CONTROLS,
            self.adjust(Msr.IA32_VMX_TRUE_EXIT_CTLS, host_size | X.SAVE_IA32_EFER | X.LOAD_IA32_EFER),
        )
        entry = E.LOAD_IA32_EFER | (E.IA32E_MODE if self.mode == "long" else 0)
        self.write(F.VM_ENTRY_CONTROLS, self.adjust(Msr.IA32_VMX_TRUE_ENTRY_CTLS, entry))
        self.write(F.EPT_POINTER, self.eptp)
        self.write(F.VMCS_LINK_POINTER, 0xFFFFFFFFFFFFFFFF)
        # Guest-owned CR0/CR4 bits, except CR4.VMXE which VMX forces on (the guest reads 0).
        self.write(F.CR4_GUEST_HOST_MASK, Cr4.VMXE)
        self.write(F.CR4_READ_SHADOW, 0)

    def _write_host_state(self) -> None:
        h = self.cpu.host
        self.write(F.HOST_CR0, h.cr0)
        self.write(F.HOST_CR3, 0x200000)
        self.write(F.HOST_CR4, h.cr4)
        for seg, selector in (("CS", 0x10), ("SS", 0x18), ("DS", 0), ("ES", 0), ("FS", 0), ("GS", 0), ("TR", 0x40)):
            self.write(F[f"HOST_{seg}_SELECTOR"], selector)
        long_mode = self.cpu.host_ia32e_mode
        for base in (F.HOST_FS_BASE, F.HOST_GS_BASE, F.HOST_TR_BASE, F.HOST_GDTR_BASE, F.HOST_IDTR_BASE):
            self.write(base, 0xFFFFFE0000000000 if long_mode else 0xC0000000)
        self.write(F.HOST_IA32_EFER, h.efer)
        self.write(F.HOST_IA32_PAT, h.pat)
        self.write(F.HOST_RIP, HOST_RIP_64 if long_mode else HOST_RIP_32)
        self.write(F.HOST_RSP, 0xFFFFC90000010000 if long_mode else 0xC0010000)

    def set_segment(self, name: str, selector: int, base: int, limit: int, ar: int) -> None:
        self.write(F[f"GUEST_{name}_SELECTOR"], selector)
        self.write(F[f"GUEST_{name}_BASE"], base)
        self.write(F[f"GUEST_{name}_LIMIT"], limit)
        self.write(F[f"GUEST_{name}_AR_BYTES"], ar)

    def _write_guest_state(self) -> None:
        entry = self.image.symbols.get("_start", self.image.base)
        if self.mode == "real":
            cr0 = int(Cr0.ET | Cr0.NE)
            cr4 = int(Cr4.VMXE)
            efer = 0
            self.set_segment("CS", GUEST_CODE >> 4, GUEST_CODE, 0xFFFF, 0x9B)
            for seg in ("SS", "DS", "ES", "FS", "GS"):
                self.set_segment(seg, 0, 0, 0xFFFF, 0x93)
            self.set_segment("TR", 0, 0, 0xFFFF, 0x8B)
            self.write(F.GUEST_RIP, entry)
            self.write(F.GUEST_CR0, cr0)
            self.write(F.CR0_READ_SHADOW, cr0)
        else:
            long_mode = self.mode == "long"
            cr0 = int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP) | (int(Cr0.PG) if long_mode else 0)
            cr4 = int(Cr4.VMXE) | (int(Cr4.PAE) if long_mode else 0)
            efer = int(Efer.LME | Efer.LMA | Efer.SCE | Efer.NX) if long_mode else 0
            if long_mode:
                self.set_segment("CS", SEL_CODE64, 0, 0xFFFFFFFF, 0xA09B)
            else:
                self.set_segment("CS", SEL_CODE32, 0, 0xFFFFFFFF, 0xC09B)
            for seg in ("SS", "DS", "ES", "FS", "GS"):
                self.set_segment(seg, SEL_DATA, 0, 0xFFFFFFFF, 0xC093)
            self.set_segment("TR", SEL_TSS, GUEST_TSS, 0x67, 0x8B)
            self.write(F.GUEST_RIP, entry)
            self.write(F.GUEST_CR0, cr0)
            self.write(F.CR0_READ_SHADOW, cr0)
        self.set_segment("LDTR", 0, 0, 0, 0x10000)
        self.write(F.GUEST_CR3, GUEST_PML4 if self.mode == "long" else 0)
        self.write(F.GUEST_CR4, cr4)
        self.write(F.GUEST_IA32_EFER, efer)
        self.write(F.GUEST_GDTR_BASE, GUEST_GDT)
        self.write(F.GUEST_GDTR_LIMIT, 0x2F)
        self.write(F.GUEST_IDTR_BASE, GUEST_IDT)
        self.write(F.GUEST_IDTR_LIMIT, 0x3FF if self.mode == "real" else 0xFFF)
        self.write(F.GUEST_DR7, 0x400)
        self.write(F.GUEST_RSP, GUEST_STACK_TOP)
        self.write(F.GUEST_RFLAGS, 0x2)
        self.write(F.GUEST_ACTIVITY_STATE, 0)
        self.write(F.GUEST_INTERRUPTIBILITY_INFO, 0)
        self.write(F.GUEST_IA32_PAT, 0x0007040600070406)

    def _build_guest_tables(self) -> None:
        """A GDT (code32, data, code64, TSS) and, for long mode, 1 GiB identity-mapped with 2 MiB pages."""
        gdt = b"".join(
            [
                bytes(8),
                _gdt_entry(0, 0xFFFFF, 0x9B, 0xC),
                _gdt_entry(0, 0xFFFFF, 0x93, 0xC),
                _gdt_entry(0, 0xFFFFF, 0x9B, 0xA),
                bytes(8),
                _gdt_entry(GUEST_TSS, 0x67, 0x8B, 0x0),
            ]
        )
        self.write_memory(GUEST_GDT, gdt)
        if self.mode == "long":
            self.write_memory(GUEST_PML4, struct.pack("<Q", GUEST_PDPT | 0x7))
            self.write_memory(GUEST_PDPT, struct.pack("<Q", GUEST_PD | 0x7))
            self.write_memory(GUEST_PD, b"".join(struct.pack("<Q", (i << 21) | 0x87) for i in range(512)))

    # --- running -------------------------------------------------------------------------------------------
    def enter(self) -> VmxResult:
        """VMLAUNCH the first time, VMRESUME afterwards."""
        result = self.cpu.vmresume() if self.launched else self.cpu.vmlaunch()
        if result.status is VmxStatus.VM_EXIT and result.exit is not None and not result.exit.failed_vmentry:
            self.launched = True
        return result

    def run(self) -> VmExitInfo:
        """Enter the guest and return the VM exit (raise if the entry itself failed)."""
        result = self.enter()
        if result.exit is None:
            raise RuntimeError(f"VM entry did not produce a VM exit: {result}")
        return result.exit

    def skip_instruction(self) -> None:
        """What a hypervisor does after emulating an instruction: RIP += VM-exit instruction length."""
        self.write(F.GUEST_RIP, self.read(F.GUEST_RIP) + self.read(F.VM_EXIT_INSTRUCTION_LEN))

    @property
    def rip(self) -> int:
        return self.read(F.GUEST_RIP)

    @property
    def gpr(self):  # type: ignore[no-untyped-def]
        return self.cpu.gpr


def _prologue(mode: Mode) -> str:
    return {"real": ".code16\n", "protected": ".code32\n", "long": ".code64\n"}[mode]
