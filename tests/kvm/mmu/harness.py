"""Test scaffolding for the MMU: a bare MMU over simulated host memory (:class:`MmuEnv`), a
walk of its EPT with the machine's own walker, and a real guest on the VT-x machine whose EPT is
the MMU's (:class:`MmuGuest`) with the exit loop a KVM vCPU runs:

    EPT violation     -> kvm_mmu_page_fault(gpa, error code from the qualification)
    EPT misconfig     -> handle_ept_misconfig(gpa)
    RET_PF_EMULATE    -> emulate the instruction against the MMIO device
    anything else     -> back to the test
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.kvm.host_mm import HostMm
from pyvmx.kvm.memslots import Memslots
from pyvmx.kvm.mmu import RetPf, TdpMmu, ept_violation_error_code
from pyvmx.kvm.mmu.emulate import EmulationOutcome, EmulationResult, MmioEmulator, MmioExit, code_bitness
from pyvmx.kvm.mmu.guest_memory import GuestMemory, GuestMemoryError, GuestPhysicalView
from pyvmx.vmx.ept import EptTranslation, ept_lookup
from pyvmx.vmx.faults import X86Fault
from pyvmx.vmx.memory import PAGE_SIZE, PageAllocator, PhysicalMemory
from pyvmx.vmx.outcomes import VmExitInfo
from pyvmx.vmx.paging import Access, translate_linear

KIB4, MIB, MIB2 = 1 << 12, 1 << 20, 2 << 20

# Host-physical layout of an MmuEnv / MmuGuest (above the sandbox's own VMCS, EPT and RAM).
MMU_TABLES = (0x600000, 0xA00000)
HOST_POOL_START = 0xA00000


@dataclass
class MmuEnv:
    """Host memory, the VMM's address space, memslots and a TDP MMU over them."""

    memory: PhysicalMemory
    tables: PageAllocator
    host_mm: HostMm
    memslots: Memslots
    mmu: TdpMmu
    flushes: list[int] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        size: int = 64 * MIB,
        *,
        huge_pages: bool = True,
        memory: PhysicalMemory | None = None,
        memslots: Memslots | None = None,
        invept: Callable[[], None] | None = None,
        page_in_latency: int = 1000,
    ) -> MmuEnv:
        memory = memory if memory is not None else PhysicalMemory(size)
        tables = PageAllocator(memory, *MMU_TABLES)
        host_mm = HostMm(PageAllocator(memory, HOST_POOL_START), page_in_latency=page_in_latency)
        memslots = memslots if memslots is not None else Memslots()
        flushes: list[int] = []

        def flush() -> None:
            flushes.append(1)
            if invept is not None:
                invept()

        mmu = TdpMmu(memory, tables, memslots, host_mm, invept=flush, huge_pages=huge_pages)
        return cls(memory, tables, host_mm, memslots, mmu, flushes)

    def add_slot(self, slot: int, gpa: int, size: int, *, flags: int = 0, huge: bool = True, offset: int = 0) -> int:
        """mmap ``size + offset`` bytes and make slot ``slot`` of the part from ``offset`` (an
        ``offset`` that is not a multiple of 2 MiB misaligns gfn and hva)."""
        hva = self.host_mm.mmap(size + offset, huge=huge) + offset
        self.memslots.set_user_memory_region(slot, flags, gpa, size, hva)
        return hva

    def walk(self, gpa: int) -> EptTranslation | None:
        """The machine's own EPT walk of the MMU's tables (no side effects)."""
        return ept_lookup(self.memory, self.mmu.eptp, gpa)

    def hpa_of(self, gpa: int) -> int:
        """Where the memslots say ``gpa`` lives in host memory (faulting the host page in)."""
        slot = self.memslots.gfn_to_memslot(gpa >> 12)
        assert slot is not None
        hva = slot.gfn_to_hva(gpa >> 12) + (gpa & 0xFFF)
        pfn = self.host_mm.page_in_now(hva)
        return pfn << 12 | (hva & 0xFFF)


# --- an MMIO device -----------------------------------------------------------------------------------
@dataclass
class RegisterDevice:
    """A 4-KiB bank of byte-addressed registers at ``base`` that logs every access. With
    ``in_kernel`` False it answers nothing itself: every access exits to the VMM, which the
    harness completes from the same registers (KVM_EXIT_MMIO + complete_userspace_io)."""

    base: int
    size: int = 0x1000
    in_kernel: bool = True
    regs: bytearray = field(default_factory=lambda: bytearray(0x1000))
    log: list[tuple[str, int, int, int]] = field(default_factory=list)

    def contains(self, gpa: int) -> bool:
        return self.base <= gpa < self.base + self.size

    def load(self, gpa: int, size: int) -> int:
        off = gpa - self.base
        return int.from_bytes(self.regs[off : off + size], "little")

    def store(self, gpa: int, size: int, value: int) -> None:
        off = gpa - self.base
        self.regs[off : off + size] = value.to_bytes(size, "little")

    def read(self, gpa: int, size: int) -> int | None:
        if not self.in_kernel or not self.contains(gpa):
            return None
        value = self.load(gpa, size)
        self.log.append(("r", gpa, size, value))
        return value

    def write(self, gpa: int, size: int, value: int) -> bool:
        if not self.in_kernel or not self.contains(gpa):
            return False
        self.store(gpa, size, value)
        self.log.append(("w", gpa, size, value))
        return True

    def user_exit(self, exit: MmioExit) -> int | None:
        """What the VMM does with a KVM_EXIT_MMIO for this device."""
        assert self.contains(exit.gpa), exit
        if exit.is_write:
            assert exit.data is not None
            self.store(exit.gpa, exit.size, exit.data)
            self.log.append(("W", exit.gpa, exit.size, exit.data))
            return None
        value = self.load(exit.gpa, exit.size)
        self.log.append(("R", exit.gpa, exit.size, value))
        return value


# --- the vCPU as the emulator sees it ---------------------------------------------------------------------
_SEGMENT_NAMES = ("ES", "CS", "SS", "DS", "FS", "GS")


class SandboxEmulatorContext:
    """:class:`pyvmx.kvm.mmu.emulate.EmulatorContext` for a VmxSandbox vCPU after a VM exit:
    registers from the processor (RSP, RIP, RFLAGS from the VMCS guest-state area), guest
    linear addresses translated by a software walk of the guest's page tables, RAM through the
    memslots, MMIO to ``device``."""

    def __init__(self, sb, guest_memory: GuestMemory, device: RegisterDevice) -> None:  # type: ignore[no-untyped-def]
        self.sb = sb
        self.memory = guest_memory
        self.view = GuestPhysicalView(guest_memory)
        self.device = device

    def read_gpr(self, index: int) -> int:
        return self.sb.read(F.GUEST_RSP) if index == 4 else self.sb.gpr[index]

    def write_gpr(self, index: int, value: int) -> None:
        if index == 4:
            self.sb.write(F.GUEST_RSP, value)
        else:
            self.sb.gpr[index] = value

    def read_rip(self) -> int:
        return self.sb.read(F.GUEST_RIP)

    def write_rip(self, value: int) -> None:
        self.sb.write(F.GUEST_RIP, value)

    def read_rflags(self) -> int:
        return self.sb.read(F.GUEST_RFLAGS)

    def write_rflags(self, value: int) -> None:
        self.sb.write(F.GUEST_RFLAGS, value)

    def bitness(self) -> int:
        ar = self.sb.read(F.GUEST_CS_AR_BYTES)
        return code_bitness(
            cr0_pe=bool(self.sb.read(F.GUEST_CR0) & 1),
            efer_lma=bool(self.sb.read(F.GUEST_IA32_EFER) & (1 << 10)),
            cs_l=bool(ar & (1 << 13)),
            cs_d=bool(ar & (1 << 14)),
            rflags_vm=bool(self.sb.read(F.GUEST_RFLAGS) & (1 << 17)),
        )

    def segment_base(self, segment: int) -> int:
        return self.sb.read(F[f"GUEST_{_SEGMENT_NAMES[segment]}_BASE"])

    def translate(self, linear: int, write: bool) -> int | None:
        cr0 = self.sb.read(F.GUEST_CR0)
        if not cr0 & (1 << 31):
            return linear & 0xFFFFFFFF
        try:
            return translate_linear(
                linear, Access.WRITE if write else Access.READ, 0,
                cr0=cr0, cr3=self.sb.read(F.GUEST_CR3), cr4=self.sb.read(F.GUEST_CR4),
                efer=self.sb.read(F.GUEST_IA32_EFER), memory=self.view,
            ).gpa
        except (X86Fault, GuestMemoryError):
            return None

    def read_linear(self, linear: int, size: int) -> bytes | None:
        out = b""
        while size:
            chunk = min(size, PAGE_SIZE - (linear & 0xFFF))
            gpa = self.translate(linear, False)
            if gpa is None:
                return None
            try:
                out += self.memory.read(gpa, chunk)
            except GuestMemoryError:
                return None
            linear, size = linear + chunk, size - chunk
        return out

    def write_linear(self, linear: int, data: bytes) -> bool:
        offset = 0
        while offset < len(data):
            chunk = min(len(data) - offset, PAGE_SIZE - (linear & 0xFFF))
            gpa = self.translate(linear, True)
            if gpa is None:
                return False
            try:
                self.memory.write(gpa, data[offset : offset + chunk])
            except GuestMemoryError:
                return False
            linear, offset = linear + chunk, offset + chunk
        return True

    def is_mmio(self, gpa: int, write: bool) -> bool:
        return self.memory.is_mmio(gpa, write)

    def mmio_read(self, gpa: int, size: int) -> int | None:
        return self.device.read(gpa, size)

    def mmio_write(self, gpa: int, size: int, value: int) -> bool:
        return self.device.write(gpa, size, value)


# --- a guest on the VT-x machine with the MMU's EPT ----------------------------------------------------------
class MmuGuest:
    """A VmxSandbox guest (``map_all=False``) whose EPT_POINTER is the MMU's: guest RAM is
    memslot 0 over ``ram`` bytes of the VMM's memory at guest-physical 0, with the sandbox's
    image (GDT, page tables, code) copied in (``ram_slot_size`` makes slot 0 cover only the
    start of it, for tests that add slots of their own); an MMIO register bank at
    ``mmio_base``."""

    def __init__(
        self,
        mode: str,
        source: str,
        *,
        ram: int = 8 * MIB,
        memory: int = 64 * MIB,
        huge_pages: bool = True,
        thp: bool = True,
        mmio_base: int = 0x3000_0000,
        mmio_in_kernel: bool = True,
        ram_flags: int = 0,
        ram_slot_size: int | None = None,
    ) -> None:
        from pyvmx.guest.sandbox import VmxSandbox

        self.sb = sb = VmxSandbox(mode, source, map_all=False, memory=memory)  # type: ignore[arg-type]
        sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
        self.env = MmuEnv.create(memory=sb.memory, huge_pages=huge_pages, invept=lambda: sb.cpu.invept(2, 0))
        self.mmu = self.env.mmu
        self.memslots = self.env.memslots
        self.host_mm = self.env.host_mm
        self.ram_hva = self.host_mm.mmap(ram, huge=thp, name="guest ram")
        for gpa in range(0, sb.guest_ram, PAGE_SIZE):
            data = sb.read_memory(gpa, PAGE_SIZE)
            if any(data):
                self.host_mm.write(self.ram_hva + gpa, data)
        self.memslots.set_user_memory_region(0, ram_flags, 0, ram if ram_slot_size is None else ram_slot_size, self.ram_hva)
        sb.write(F.EPT_POINTER, self.mmu.eptp)
        self.guest_memory = GuestMemory(self.memslots, self.host_mm)
        self.device = RegisterDevice(mmio_base, in_kernel=mmio_in_kernel)
        self.ctx = SandboxEmulatorContext(sb, self.guest_memory, self.device)
        self.emulator = MmioEmulator()
        self.violations: list[tuple[int, int, RetPf]] = []
        self.misconfigs: list[tuple[int, RetPf]] = []
        self.emulated: list[EmulationOutcome] = []
        self.user_exits: list[MmioExit] = []
        self.on_user_exit: Callable[[MmioExit], int | None] = self.device.user_exit
        """The VMM's answer to a KVM_EXIT_MMIO (read data, or None for a write)."""

    def symbol(self, name: str) -> int:
        return self.sb.symbol(name)

    def run(self, max_exits: int = 1_000_000) -> VmExitInfo:
        """Run until an exit the MMU does not own (HLT, ...) and return it."""
        for _ in range(max_exits):
            exit = self.sb.run()
            reason = exit.exit_reason
            if reason is ExitReason.EPT_VIOLATION:
                gpa = exit.guest_physical_address
                outcome = self.mmu.page_fault(gpa, ept_violation_error_code(exit.qualification))
                self.violations.append((gpa, exit.qualification, outcome.result))
            elif reason is ExitReason.EPT_MISCONFIG:
                gpa = exit.guest_physical_address
                outcome = self.mmu.handle_ept_misconfig(gpa)
                self.misconfigs.append((gpa, outcome.result))
            else:
                return exit
            if outcome.result is RetPf.EMULATE:
                self.emulate(gpa)
            elif outcome.result not in (RetPf.FIXED, RetPf.SPURIOUS, RetPf.RETRY):
                raise AssertionError(f"unexpected page-fault outcome {outcome}")
        raise AssertionError("guest did not stop")

    def emulate(self, gpa: int) -> None:
        outcome = self.emulator.emulate(self.ctx, gpa)
        while True:
            self.emulated.append(outcome)
            if outcome.result is EmulationResult.DONE:
                return
            if outcome.result is not EmulationResult.USER_EXIT or outcome.mmio is None:
                raise AssertionError(f"emulation failed: {outcome}")
            self.user_exits.append(outcome.mmio)
            outcome = self.emulator.complete_userspace_io(self.ctx, self.on_user_exit(outcome.mmio))
            if outcome.result is EmulationResult.DONE and not outcome.text:
                return  # a write whose instruction had already retired

    def read_gpa(self, gpa: int, size: int) -> bytes:
        return self.guest_memory.read(gpa, size)
