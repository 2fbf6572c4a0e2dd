"""A virtual CPU: its VMCS and bitmaps, its registers between runs, and ``run()`` -- KVM's
``struct vcpu_vmx`` with vmx_vcpu_create(), init_vmcs(), vmx_vcpu_reset(), vmx_vcpu_load_vmcs(),
vcpu_enter_guest() and vcpu_run() (arch/x86/kvm/vmx/vmx.c, arch/x86/kvm/x86.c).

``run()`` enters the guest with VMLAUNCH (a VMCS whose launch state is clear on this CPU) or
VMRESUME, hands each VM exit to the table in :mod:`pyvmx.kvm.exit_handlers`, and returns one
:mod:`~pyvmx.kvm.exits` value when the user must act. Before every entry it delivers device
timers, picks the event to inject (:mod:`pyvmx.kvm.events`), and arms the VMX-preemption timer
for the earliest deadline: the next PIT tick, a scheduler's time slice, ``run()``'s time limit.

A vCPU's VMCS is active on at most one physical CPU. Moving it is KVM's loaded_vmcs dance:
VMCLEAR on the old CPU (launch state back to clear, data flushed to memory), VMPTRLD on the new
one, and VMLAUNCH -- never VMRESUME -- for the first entry there (SDM 25.11.3, 31.3). The guest's
general-purpose, FPU and SIMD registers (not in the VMCS) travel in a saved register file.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmx.arch.controls import (
    INTR_INFO_VALID_MASK,
    GuestActivityState,
    GuestInterruptibility,
    InterruptionType,
)
from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import DR6_BS, Cr0, Cr4, Efer, ExceptionVector, Rflags
from pyvmx.kvm import apic_bus, cr_emulate, engine_access, events, host_time
from pyvmx.kvm.cpuid import CpuidEntry, CpuidError, CpuidTable, default_cpuid, table_from
from pyvmx.kvm.exits import (
    ExitStats,
    FailEntry,
    GuestDebugExit,
    Halt,
    HandlerOutcome,
    HltExit,
    InternalError,
    KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION,
    Reschedule,
    Resume,
    ShutdownExit,
    TimeLimitExit,
    TraceRecord,
    VcpuExit,
    WallClockExit,
)
from pyvmx.kvm.devices.lapic import APIC_TASKPRI, Lapic
from pyvmx.kvm.guest_memory import PagingState
from pyvmx.kvm.io_bitmap import IoBitmaps, PortSpec
from pyvmx.kvm.kvm import LOCAL_TIMER_VECTOR, PhysicalCpu, host_deadline_on
from pyvmx.kvm.mmu import AsyncPfHook
from pyvmx.kvm.mmu.async_pf import ApfVcpuState, AsyncPf
from pyvmx.kvm.mmu.emulate import MmioEmulator
from pyvmx.kvm.msr_bitmap import MsrBitmap, MsrLike, msr_index
from pyvmx.kvm.msrs import MsrStore
from pyvmx.kvm.regs import GPR_NAMES, VMCS_SEGMENT_NAMES, DTable, Regs, Segment, Sregs
from pyvmx.kvm.vmcs_dump import dump_vmcs
from pyvmx.vmx.vmcs_dump import dump_vmcs as decoded_dump
from pyvmx.kvm.vmcs_setup import (
    ExceptionBitmapPolicy,
    constant_host_state,
    cr0_guest_owned_bits,
    cr4_guest_owned_bits,
    exception_bitmap,
    guest_host_mask,
    hw_cr4,
    per_cpu_host_state,
    vmx_exec_control,
    vmx_pin_based_exec_ctrl,
    vmx_secondary_exec_control,
    vmx_vmentry_ctrl,
    vmx_vmexit_ctrl,
)
from pyvmx.vmx.outcomes import StallKind, VmExitInfo, VmxResult, VmxStatus

if TYPE_CHECKING:
    from pyvmx.engine.deadline import HostDeadline
    from pyvmx.kvm.vm import Vm

_U64 = (1 << 64) - 1
MSR_ENTRY_SIZE = 16
MAX_MSR_LOADS = 4096 // MSR_ENTRY_SIZE
# run(): this many VM entries in a row with the clock standing still is a livelock.
MAX_ENTRIES_WITHOUT_PROGRESS = 1000
INIT_PAT = 0x0007040600070406
VMCS_LINK_POINTER_INVALID = _U64


class MpState(enum.Enum):
    """``KVM_MP_STATE_*``."""

    RUNNABLE = 0
    HALTED = 3


_GUESTDBG_SINGLESTEP = 0x1 | 0x2  # KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
# Plain ints: every skipped instruction tests them, and IntFlag's & is slow.
_STI_MOV_SS_BLOCKING = int(GuestInterruptibility.STI | GuestInterruptibility.MOV_SS)
_RFLAGS_TF = int(Rflags.TF)


@dataclass(eq=False)
class LoadedVmcs:
    """``struct loaded_vmcs``: the VMCS, the CPU it is active on, and whether it was launched
    there."""

    address: int
    cpu: PhysicalCpu | None = None
    launched: bool = False


class VcpuStateError(RuntimeError):
    """A vCPU API used in a state it does not allow (KVM's -EBUSY/-EINVAL on vCPU ioctls)."""


Tracer = Callable[[TraceRecord], None]


class Vcpu:
    """One vCPU of a :class:`~pyvmx.kvm.vm.Vm` (made by :meth:`Vm.create_vcpu`)."""

    def __init__(self, vm: Vm, vcpu_id: int, home: PhysicalCpu) -> None:
        kvm = vm.kvm
        self.vm = vm
        self.kvm = kvm
        self.id = vcpu_id
        self.home = home
        cfg = kvm.config
        self.config = cfg
        # alloc_loaded_vmcs(): the VMCS region and the MSR bitmap (all ones).
        vmcs = kvm.alloc_page()
        kvm.memory.write32(vmcs, cfg.revision_id)
        self.loaded_vmcs = LoadedVmcs(vmcs)
        self._check(home.processor.vmclear(vmcs), "VMCLEAR")  # loaded_vmcs_init()
        self.msr_bitmap = MsrBitmap(kvm.memory, kvm.alloc_page())
        self.msr_bitmap.pass_through_kvm_defaults()
        self.io_bitmaps = IoBitmaps(kvm.memory, kvm.alloc_page(), kvm.alloc_page())
        self.msr_load_area = kvm.alloc_page()
        self.vpid = kvm.vpids.allocate() if cfg.has_vpid else 0
        # Architectural state the VMCS does not hold.
        self.cpuid: CpuidTable = default_cpuid(
            vcpu_id=vcpu_id, host_maxphyaddr=cfg.maxphyaddr, maxphyaddr=cfg.maxphyaddr, tsc_hz=kvm.tsc_hz
        )
        self.msrs = MsrStore(self, bsp=vcpu_id == 0)
        self.lapic = Lapic(vcpu_id, vm.clock, deliver_nmi=self.inject_nmi, send_ipi=lambda ipi: apic_bus.deliver_ipi(self, ipi))
        self._xcr0 = 1  # XCR0 at reset: x87 only (kvm_vcpu_reset())
        self._gprs = [0] * 16
        self._regfile: bytes | None = None
        self._regs_on: PhysicalCpu | None = None
        self._pending_msr_loads: dict[int, int] = {}
        self.tsc_adjust = 0
        self.last_guest_tsc = 0
        # Events (vcpu->arch.exception / nmi / interrupt).
        self.exception: events.Event | None = None
        self.reinject: events.Event | None = None
        self.nmi_pending = 0
        self.pv_unhalted = False
        self.triple_fault_pending = False
        self.mp_state = MpState.RUNNABLE
        # Intercept policy beyond KVM's defaults.
        self.guest_debug = 0
        self.singlestep_exit_pending = False
        self.extra_exceptions = 0
        self._cr0_mask = guest_host_mask(cr0_guest_owned_bits())
        self._cr4_mask = guest_host_mask(cr4_guest_owned_bits(cr4_guest_rsvd_bits=0))
        self._unconditional_io = True
        self.preemption_slice: int | None = None
        self.slice_exits_to_user = False
        # Bookkeeping.
        self.stats = ExitStats()
        self._entries_without_progress = (0, -1)  # (entries in a row, at this clock): see run()
        self.wall_deadline: HostDeadline | None = None  # run()'s host-time limit, while it runs
        # kvm_run.request_interrupt_window: exit (INTERRUPT_WINDOW) once the guest can take an
        # interrupt; handle_interrupt_window() clears it (Documentation/virt/kvm/api.rst).
        self.request_interrupt_window = False
        self.request_nmi_window = False  # the same for NMIs (NMI_WINDOW, with virtual NMIs)
        # handle_desc(): a descriptor-table instruction runs under the MTF; True when the MTF
        # was set for it (and is cleared again), False when it was already on, None otherwise.
        self.desc_step: bool | None = None
        self.tracer: Tracer | None = None
        self.last_exit: VmExitInfo | None = None
        self.ran = False
        self.complete_userspace_io: Callable[[], VcpuExit | None] | None = None
        self._tlb_flush_pending = False
        self.host_irqs: dict[int, int] = {}
        self.mmio_emulator = MmioEmulator()
        self.async_pf = AsyncPf(kvm.host_mm, vm.memory, vcpu_id=vcpu_id, mmu=vm.mmu)
        self.apf_irqs: deque[int] = deque()  # "page ready" notifications to inject
        self.msrs.async_pf = self.async_pf
        self._load_vmcs(home)
        self._init_vmcs()
        self.reset()

    @staticmethod
    def _check(result: VmxResult, what: str) -> None:
        if not result.succeeded:
            raise VcpuStateError(f"{what} failed: {result}")

    def __repr__(self) -> str:
        cpu = self.loaded_vmcs.cpu
        return f"Vcpu({self.vm.name}:{self.id}, vmcs={self.loaded_vmcs.address:#x}, on CPU {cpu.cpu_id if cpu else '-'})"

    # =============================================================================================
    # The VMCS on a physical CPU (vmx_vcpu_load_vmcs(), loaded_vmcs_clear())
    # =============================================================================================
    @property
    def pcpu(self) -> PhysicalCpu:
        """The CPU the VMCS is active on (else the home CPU)."""
        return self.loaded_vmcs.cpu or self.home

    def _vmclear(self) -> None:
        """``__loaded_vmcs_clear()`` on the CPU the VMCS is active on."""
        lv = self.loaded_vmcs
        cpu = lv.cpu
        if cpu is None:
            return
        self._check(cpu.processor.vmclear(lv.address), "VMCLEAR")
        self.kvm.log_vmx("VMCLEAR", cpu.cpu_id, lv.address)
        cpu.vmclears += 1
        if cpu.current_vmcs == lv.address:
            cpu.current_vmcs = None
        cpu.loaded_vmcss.discard(lv.address)
        lv.cpu = None
        lv.launched = False

    def _load_vmcs(self, pcpu: PhysicalCpu) -> None:
        """``vmx_vcpu_load_vmcs()``."""
        lv = self.loaded_vmcs
        already_loaded = lv.cpu is pcpu
        if not already_loaded and lv.cpu is not None:
            self._vmclear()
            self.stats.migrations += 1
        if pcpu.current_vmcs != lv.address:
            self._check(pcpu.processor.vmptrld(lv.address), "VMPTRLD")
            self.kvm.log_vmx("VMPTRLD", pcpu.cpu_id, lv.address)
            pcpu.current_vmcs = lv.address
        if not already_loaded:
            pcpu.loaded_vmcss.add(lv.address)
            lv.cpu = pcpu
            for field_, value in per_cpu_host_state(pcpu.cpu_id).items():
                pcpu.processor.vmcs.write(field_, value)
            self._tlb_flush_pending = True  # KVM_REQ_TLB_FLUSH: the new CPU may hold stale entries
            # kvm_arch_vcpu_load(): the guest TSC never goes backwards across CPUs.
            now = pcpu.clock() + self.vm.tsc_offset + self.tsc_adjust
            if now < self.last_guest_tsc:
                self.tsc_adjust += self.last_guest_tsc - now

    def _ensure_current(self) -> None:
        lv = self.loaded_vmcs
        cpu = lv.cpu
        if cpu is None or cpu.current_vmcs != lv.address:
            self._load_vmcs(cpu or self.home)

    def close(self) -> None:
        """``vmx_vcpu_free()``: VMCLEAR, give the pages and the VPID back."""
        if self._regs_on is not None:
            self._save_regs()
        lv = self.loaded_vmcs
        cpu = lv.cpu
        if cpu is not None:
            self._vmclear()
        kvm = self.kvm
        for page in (lv.address, self.msr_bitmap.address, self.io_bitmaps.address_a, self.io_bitmaps.address_b,
                     self.msr_load_area):
            kvm.allocator.free_page(page)
        kvm.vpids.free(self.vpid)
        self.vpid = 0

    def put(self) -> None:
        """Give up the physical CPU entirely: save the register file and VMCLEAR the VMCS (what
        happens to a vCPU before it runs elsewhere)."""
        if self._regs_on is not None:
            self._save_regs()
        self._vmclear()

    # --- the register file (GPRs, FPU, SIMD; not in the VMCS) ------------------------------------
    def _save_regs(self) -> None:
        cpu = self._regs_on
        assert cpu is not None
        processor = cpu.processor
        self._gprs = processor.gpr.snapshot()
        self._regfile = processor.save_register_file()
        cpu.regfile_owner = None
        self._regs_on = None

    def _load_regs(self, pcpu: PhysicalCpu) -> None:
        if self._regs_on is pcpu:
            return
        if self._regs_on is not None:
            self._save_regs()
        owner = pcpu.regfile_owner
        if owner is not None and owner is not self:
            owner._save_regs()
        processor = pcpu.processor
        if self._regfile is not None:
            processor.restore_register_file(self._regfile)
        processor.gpr.restore(self._gprs)
        engine_access.write_xcr0(processor, self._xcr0)
        self._regs_on = pcpu
        pcpu.regfile_owner = self

    @property
    def xcr0(self) -> int:
        return self._xcr0

    @xcr0.setter
    def xcr0(self, value: int) -> None:
        """XCR0 as the guest set it (XSETBV, KVM_SET_XCRS); loaded into the CPU that holds this
        vCPU's registers (kvm_load_guest_xsave_state())."""
        self._xcr0 = value
        if self._regs_on is not None:
            engine_access.write_xcr0(self._regs_on.processor, value)

    def load(self, pcpu: PhysicalCpu) -> None:
        """``vcpu_load()``: the VMCS current on ``pcpu`` and the register file in its core."""
        self._load_vmcs(pcpu)
        self._load_regs(pcpu)

    # =============================================================================================
    # VMCS access (width-checked accessors of the processor, on this vCPU's VMCS)
    # =============================================================================================
    def vmcs_read(self, field_: F) -> int:
        self._ensure_current()
        return self.pcpu.processor.vmcs.root_read(field_)

    def vmcs_write(self, field_: F, value: int) -> None:
        self._ensure_current()
        self.pcpu.processor.vmcs.root_write(field_, value)

    def vmcs_set_bits(self, field_: F, bits: int) -> None:
        self.vmcs_write(field_, self.vmcs_read(field_) | int(bits))

    def vmcs_clear_bits(self, field_: F, bits: int) -> None:
        self.vmcs_write(field_, self.vmcs_read(field_) & ~int(bits))

    def dump_vmcs(self) -> str:
        """A dump of this vCPU's VMCS by area (Linux dump_vmcs()): the decoded dump of
        :mod:`pyvmx.vmx.vmcs_dump` (what ``pyvmx vmcs dump`` prints), then every field of
        :mod:`pyvmx.kvm.vmcs_dump`."""
        title = f"VMCS {self.loaded_vmcs.address:#x} of vCPU {self.vm.name}:{self.id}"

        def read(field_: F) -> int | None:
            try:
                return self.vmcs_read(field_)
            except Exception:
                return None

        class _Reader:
            def read(_self, field_: F) -> int:
                value = read(field_)
                return 0 if value is None else value

        return f"{decoded_dump(_Reader(), title)}\n\n{dump_vmcs(read, title=title)}"

    # =============================================================================================
    # init_vmcs() / vmx_vcpu_reset()
    # =============================================================================================
    def _init_vmcs(self) -> None:
        cfg = self.config
        w = self.vmcs_write
        processor = self.pcpu.processor
        w(F.VMCS_LINK_POINTER, VMCS_LINK_POINTER_INVALID)
        w(F.PIN_BASED_VM_EXEC_CONTROL, vmx_pin_based_exec_ctrl(cfg))
        w(F.CPU_BASED_VM_EXEC_CONTROL, vmx_exec_control(cfg))
        if cfg.cpu_based & C.ACTIVATE_SECONDARY_CONTROLS:
            w(F.SECONDARY_VM_EXEC_CONTROL, vmx_secondary_exec_control(cfg, vpid=self.vpid))
        if self.vpid:
            w(F.VIRTUAL_PROCESSOR_ID, self.vpid)
        w(F.EPT_POINTER, self.vm.mmu.eptp)
        if cfg.has_msr_bitmap:
            w(F.MSR_BITMAP, self.msr_bitmap.address)
        w(F.IO_BITMAP_A, self.io_bitmaps.address_a)
        w(F.IO_BITMAP_B, self.io_bitmaps.address_b)
        w(F.CR3_TARGET_COUNT, 0)
        # vmx_set_constant_host_state()
        host = processor.host
        w(F.HOST_CR0, host.cr0 & ~int(Cr0.TS))
        w(F.HOST_CR3, self.kvm.host_cr3)
        w(F.HOST_CR4, host.cr4)
        for field_, value in constant_host_state().items():
            w(field_, value)
        w(F.HOST_IA32_PAT, host.pat)
        w(F.HOST_IA32_EFER, host.efer)
        w(F.VM_EXIT_MSR_STORE_COUNT, 0)
        w(F.VM_EXIT_MSR_LOAD_COUNT, 0)
        w(F.VM_ENTRY_MSR_LOAD_COUNT, 0)
        w(F.VM_ENTRY_MSR_LOAD_ADDR, self.msr_load_area)
        w(F.GUEST_IA32_PAT, INIT_PAT)
        w(F.VM_EXIT_CONTROLS, vmx_vmexit_ctrl(cfg))
        w(F.VM_ENTRY_CONTROLS, vmx_vmentry_ctrl(cfg))
        w(F.CR0_GUEST_HOST_MASK, self._cr0_mask)
        w(F.CR4_GUEST_HOST_MASK, self._cr4_mask)
        w(F.TSC_OFFSET, 0)
        self.update_exception_bitmap()

    def reset(self) -> None:
        """``kvm_vcpu_reset()`` / ``vmx_vcpu_reset()`` (power-on, not INIT): real mode at
        F000:FFF0, CR0 = 60000010H, EDX = the CPUID signature (SDM 10.1.1, Table 10-1)."""
        w = self.vmcs_write
        for name in ("ES", "SS", "DS", "FS", "GS"):
            self._write_segment(name, Segment(base=0, limit=0xFFFF, selector=0, type=3))
        self._write_segment("CS", Segment(base=0xFFFF0000, limit=0xFFFF, selector=0xF000, type=11))
        self._write_segment("LDTR", Segment(type=2, s=False))
        self._write_segment("TR", Segment(type=11, s=False))
        w(F.GUEST_GDTR_BASE, 0)
        w(F.GUEST_GDTR_LIMIT, 0xFFFF)
        w(F.GUEST_IDTR_BASE, 0)
        w(F.GUEST_IDTR_LIMIT, 0xFFFF)
        w(F.GUEST_IA32_EFER, 0)
        self.set_efer(0)
        w(F.GUEST_CR3, 0)
        w(F.CR4_READ_SHADOW, 0)
        w(F.GUEST_CR4, 0)
        cr_emulate.vmx_set_cr0(self, int(Cr0.NW | Cr0.CD | Cr0.ET))
        w(F.GUEST_CR4, hw_cr4(0, paging=False))
        w(F.GUEST_RIP, 0xFFF0)
        w(F.GUEST_RSP, 0)
        w(F.GUEST_RFLAGS, 0x2)
        w(F.GUEST_DR7, 0x400)
        w(F.GUEST_IA32_DEBUGCTL, 0)
        w(F.GUEST_PENDING_DBG_EXCEPTIONS, 0)
        w(F.GUEST_ACTIVITY_STATE, GuestActivityState.ACTIVE)
        w(F.GUEST_INTERRUPTIBILITY_INFO, 0)
        w(F.GUEST_SYSENTER_CS, 0)
        w(F.GUEST_SYSENTER_ESP, 0)
        w(F.GUEST_SYSENTER_EIP, 0)
        w(F.VM_ENTRY_INTR_INFO_FIELD, 0)
        for i in range(16):
            if i != 4:
                self.set_gpr(i, 0)
        leaf1, _ = self.cpuid.lookup(1, 0)
        self.set_gpr(2, leaf1[0])
        self.cr8 = 0
        self.exception = self.reinject = None
        self.nmi_pending = 0
        self.mp_state = MpState.RUNNABLE

    # =============================================================================================
    # Registers (KVM_GET/SET_REGS, KVM_GET/SET_SREGS, KVM_GET/SET_MSRS)
    # =============================================================================================
    def get_gpr(self, index: int | str) -> int:
        i = GPR_NAMES.index(index) if isinstance(index, str) else index
        if i == 4:
            return self.vmcs_read(F.GUEST_RSP)
        if self._regs_on is not None:
            return self._regs_on.processor.gpr[i]
        return self._gprs[i]

    def set_gpr(self, index: int | str, value: int) -> None:
        i = GPR_NAMES.index(index) if isinstance(index, str) else index
        value &= _U64
        if i == 4:
            self.vmcs_write(F.GUEST_RSP, value)
        elif self._regs_on is not None:
            self._regs_on.processor.gpr[i] = value
        else:
            self._gprs[i] = value

    @property
    def rip(self) -> int:
        return self.vmcs_read(F.GUEST_RIP)

    @rip.setter
    def rip(self, value: int) -> None:
        self.vmcs_write(F.GUEST_RIP, value)

    def get_regs(self) -> Regs:
        values = {name: self.get_gpr(i) for i, name in enumerate(GPR_NAMES)}
        return Regs(**values, rip=self.vmcs_read(F.GUEST_RIP), rflags=self.vmcs_read(F.GUEST_RFLAGS))

    def set_regs(self, regs: Regs) -> None:
        for i, name in enumerate(GPR_NAMES):
            self.set_gpr(i, getattr(regs, name))
        self.vmcs_write(F.GUEST_RIP, regs.rip)
        self.vmcs_write(F.GUEST_RFLAGS, (regs.rflags | Rflags.FIXED) & ~(0x8028 | (_U64 & ~((1 << 22) - 1))))

    def _read_segment(self, name: str) -> Segment:
        return Segment.from_vmcs(
            self.vmcs_read(F[f"GUEST_{name}_SELECTOR"]),
            self.vmcs_read(F[f"GUEST_{name}_BASE"]),
            self.vmcs_read(F[f"GUEST_{name}_LIMIT"]),
            self.vmcs_read(F[f"GUEST_{name}_AR_BYTES"]),
        )

    def _write_segment(self, name: str, seg: Segment) -> None:
        """``__vmx_set_segment()`` with unrestricted guest (accessed bit forced, except LDTR)."""
        self.vmcs_write(F[f"GUEST_{name}_SELECTOR"], seg.selector)
        self.vmcs_write(F[f"GUEST_{name}_BASE"], seg.base)
        self.vmcs_write(F[f"GUEST_{name}_LIMIT"], seg.limit)
        self.vmcs_write(F[f"GUEST_{name}_AR_BYTES"], seg.access_rights(force_accessed=name not in ("LDTR", "TR")))

    def get_sregs(self) -> Sregs:
        names = dict(zip(("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr"), VMCS_SEGMENT_NAMES))
        segs = {k: self._read_segment(v) for k, v in names.items()}
        return Sregs(
            **segs,
            gdt=DTable(self.vmcs_read(F.GUEST_GDTR_BASE), self.vmcs_read(F.GUEST_GDTR_LIMIT)),
            idt=DTable(self.vmcs_read(F.GUEST_IDTR_BASE), self.vmcs_read(F.GUEST_IDTR_LIMIT)),
            cr0=cr_emulate.read_cr0(self),
            cr2=engine_access.read_cr2(self.pcpu.processor) if self._regs_on is not None else 0,
            cr3=self.vmcs_read(F.GUEST_CR3),
            cr4=cr_emulate.read_cr4(self),
            cr8=self.cr8,
            efer=self.vmcs_read(F.GUEST_IA32_EFER),
            apic_base=self.msrs.values.get(0x1B, 0),
        )

    def set_sregs(self, sregs: Sregs) -> None:
        """``__set_sregs()``: segments and tables as given; CR0/CR4/EFER through vmx_set_cr0/4 and
        vmx_set_efer so the read shadows, the forced bits and "IA-32e mode guest" follow; the
        PDPTEs loaded when the guest uses PAE paging."""
        names = dict(zip(("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr"), VMCS_SEGMENT_NAMES))
        for k, v in names.items():
            self._write_segment(v, sregs.segment(k))
        self.vmcs_write(F.GUEST_GDTR_BASE, sregs.gdt.base)
        self.vmcs_write(F.GUEST_GDTR_LIMIT, sregs.gdt.limit)
        self.vmcs_write(F.GUEST_IDTR_BASE, sregs.idt.base)
        self.vmcs_write(F.GUEST_IDTR_LIMIT, sregs.idt.limit)
        self.cr8 = sregs.cr8
        self.msrs.values[0x1B] = sregs.apic_base
        self.vmcs_write(F.GUEST_CR3, sregs.cr3)
        self.set_efer(sregs.efer)
        self.vmcs_write(F.CR4_READ_SHADOW, sregs.cr4)
        cr_emulate.vmx_set_cr0(self, sregs.cr0)
        self.set_efer(sregs.efer)  # vmx_set_cr0() may have changed LMA; the caller's EFER wins
        self.vmcs_write(F.GUEST_CR4, hw_cr4(sregs.cr4, paging=bool(sregs.cr0 & Cr0.PG)))
        if sregs.cr0 & Cr0.PG and sregs.cr4 & Cr4.PAE and not sregs.efer & Efer.LMA:
            cr_emulate.load_pdptrs(self, sregs.cr3)
        if self._regs_on is not None and sregs.cr2:
            engine_access.write_cr2(self.pcpu.processor, sregs.cr2)

    def get_msr(self, msr: MsrLike) -> int | None:
        """KVM_GET_MSRS for one MSR (None: not an MSR this hypervisor has)."""
        return self.msrs.get(msr_index(msr), host_initiated=True)

    def set_msr(self, msr: MsrLike, value: int) -> bool:
        """KVM_SET_MSRS for one MSR; False if refused."""
        return self.msrs.set(msr_index(msr), value, host_initiated=True)

    # --- what the MSR store and CR emulation need (MsrHost / CrHost) ---------------------------------
    def set_efer(self, efer: int) -> None:
        """``vmx_set_efer()``: the EFER field and "IA-32e mode guest" = EFER.LMA."""
        self.vmcs_write(F.GUEST_IA32_EFER, efer)
        self.vmcs_write(F.VM_ENTRY_CONTROLS, cr_emulate.ia32e_entry_control(self.vmcs_read(F.VM_ENTRY_CONTROLS), efer))

    def is_paging(self) -> bool:
        return cr_emulate.is_paging(self)

    def load_core_msr(self, index: int, value: int) -> None:
        """Queue an MSR for the VM-entry MSR-load area of the next entry (SDM 27.4)."""
        self._pending_msr_loads[index] = value
        engine_access.note_msr(self.pcpu.processor, index, value)

    def read_core_msr(self, index: int) -> int | None:
        if index in self._pending_msr_loads:
            return self._pending_msr_loads[index]
        if self._regs_on is None:
            return None
        return engine_access.read_msr(self._regs_on.processor, index)

    def read_guest_phys(self, gpa: int, size: int) -> bytes | None:
        return self.vm.try_read_guest(gpa, size)

    @property
    def cr4_host_supported(self) -> int:
        return self.kvm.profile.cr4_supported

    # --- time ---------------------------------------------------------------------------------------
    def guest_tsc(self) -> int:
        """The guest's TSC now (host clock + VM offset + this vCPU's adjustment)."""
        return self.pcpu.clock() + self.vm.tsc_offset + self.tsc_adjust

    def write_guest_tsc(self, value: int) -> None:
        """A write of IA32_TSC (``kvm_synchronize_tsc()`` for this vCPU)."""
        self.tsc_adjust = value - (self.pcpu.clock() + self.vm.tsc_offset)
        self.last_guest_tsc = value

    # --- mode helpers ---------------------------------------------------------------------------------
    def cpl(self) -> int:
        """CPL: 0 in real mode, 3 in virtual-8086 mode, else SS.DPL (SDM 5.5, 27.3.1.2)."""
        if not self.vmcs_read(F.GUEST_CR0) & Cr0.PE:
            return 0
        if self.vmcs_read(F.GUEST_RFLAGS) & Rflags.VM:
            return 3
        return (self.vmcs_read(F.GUEST_SS_AR_BYTES) >> 5) & 3

    def is_64_bit_mode(self) -> bool:
        return cr_emulate.is_64_bit_mode(self)

    def paging_state(self) -> PagingState:
        return PagingState(
            cr0=self.vmcs_read(F.GUEST_CR0),
            cr3=self.vmcs_read(F.GUEST_CR3),
            cr4=self.vmcs_read(F.GUEST_CR4),
            efer=self.vmcs_read(F.GUEST_IA32_EFER),
            cpl=self.cpl(),
            rflags_ac=bool(self.vmcs_read(F.GUEST_RFLAGS) & Rflags.AC),
            maxphyaddr=self.cpuid.guest_maxphyaddr,
        )

    # =============================================================================================
    # Configuration: CPUID, intercepts (seed 002), guest debugging
    # =============================================================================================
    def set_cpuid(self, entries: CpuidTable | list[CpuidEntry] | list[dict[str, int]]) -> None:
        """KVM_SET_CPUID2. A malformed or inconsistent table raises :class:`CpuidError` and
        changes nothing; after the first ``run()`` only an identical table is accepted (EBUSY),
        as kvm_set_cpuid() does."""
        table = entries if isinstance(entries, CpuidTable) else table_from(entries, host_maxphyaddr=self.config.maxphyaddr)
        if self.ran and table != self.cpuid:
            raise CpuidError("EBUSY", "the CPUID table cannot change after the vCPU has run (KVM_RUN)")
        self.cpuid = table
        self.update_exception_bitmap()  # the guest MAXPHYADDR decides the #PF intercept

    def update_exception_bitmap(self) -> None:
        """``vmx_update_exception_bitmap()``."""
        policy = ExceptionBitmapPolicy(
            enable_ept=True,
            guest_maxphyaddr=self.cpuid.guest_maxphyaddr,
            host_maxphyaddr=self.config.maxphyaddr,
            guest_debug=self.guest_debug,
            extra=self.extra_exceptions,
        )
        eb, mask, match = exception_bitmap(policy)
        self.vmcs_write(F.EXCEPTION_BITMAP, eb)
        self.vmcs_write(F.PAGE_FAULT_ERROR_CODE_MASK, mask)
        self.vmcs_write(F.PAGE_FAULT_ERROR_CODE_MATCH, match)

    def intercept_exception(self, vector: int | ExceptionVector, on: bool = True) -> None:
        """Seed 002 "intercept guest #PF": set the exception's bit in the exception bitmap
        (bit 14 for #PF; then every #PF exits: mask = match = 0). The hypervisor counts the exit
        and reflects the exception back into the guest, whose handler runs."""
        if not 0 <= int(vector) < 32:
            raise ValueError(f"exception vector {vector} is outside 0..31")
        if on:
            self.extra_exceptions |= 1 << int(vector)
        else:
            self.extra_exceptions &= ~(1 << int(vector))
        self.update_exception_bitmap()

    def set_guest_debug(self, control: int) -> None:
        """KVM_SET_GUEST_DEBUG: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP makes INT3 exit to the
        user (GuestDebugExit) instead of reaching the guest.  KVM_GUESTDBG_ENABLE |
        KVM_GUESTDBG_SINGLESTEP ends every run after one guest instruction with a GuestDebugExit
        (#DB, DR6.BS).  Linux sets RFLAGS.TF for that and hides it from the guest; here the
        monitor trap flag does it (SDM 26.5.2: an MTF VM exit after each instruction, or after
        the delivery of an event), so the guest's RFLAGS and #DB are never touched, and an
        instruction the hypervisor emulates ends the step itself (kvm_vcpu_do_singlestep())."""
        self.guest_debug = control
        self.singlestep_exit_pending = False
        self._set_control(F.CPU_BASED_VM_EXEC_CONTROL, C.MONITOR_TRAP_FLAG, self.guest_singlestep)
        self.update_exception_bitmap()

    @property
    def guest_singlestep(self) -> bool:
        """Whether the user's debugger single-steps this vCPU (KVM_GUESTDBG_SINGLESTEP)."""
        return self.guest_debug & _GUESTDBG_SINGLESTEP == _GUESTDBG_SINGLESTEP

    def _set_control(self, field_: F, bit: int, on: bool) -> None:
        if on:
            self.vmcs_set_bits(field_, bit)
        else:
            self.vmcs_clear_bits(field_, bit)

    def intercept_hlt(self, on: bool = True) -> None:
        """Seed 002: "HLT exiting" (primary processor-based control bit 7). KVM keeps it on; off,
        the guest halts inside the processor until an interrupt or the preemption timer."""
        self._set_control(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING, on)

    def intercept_pause(self, on: bool = True) -> None:
        """Seed 002: "PAUSE exiting" (primary control bit 30). A PAUSE exit yields the CPU."""
        if on and not self.config.cpu_based & C.PAUSE_EXITING:
            raise VcpuStateError("this processor has no PAUSE exiting")
        self._set_control(F.CPU_BASED_VM_EXEC_CONTROL, C.PAUSE_EXITING, on)

    def intercept_external_interrupts(self, on: bool = True) -> None:
        """Seed 002: "external-interrupt exiting" (pin-based bit 0): host interrupts exit instead
        of being delivered through the guest's IDT. KVM keeps it on."""
        self._set_control(F.PIN_BASED_VM_EXEC_CONTROL, P.EXT_INTR_MASK, on)

    def set_interrupt_flag(self, enabled: bool) -> None:
        """Seed 002 "open or close the guest's interrupts": RFLAGS.IF in the guest-state area."""
        self._set_control(F.GUEST_RFLAGS, Rflags.IF, enabled)

    @property
    def unconditional_io(self) -> bool:
        """True: every I/O instruction exits ("unconditional I/O exiting", KVM's choice); False:
        the I/O bitmaps decide (SDM 26.1.3)."""
        return self._unconditional_io

    @unconditional_io.setter
    def unconditional_io(self, on: bool) -> None:
        if not on and not self.config.has_io_bitmap:
            raise VcpuStateError("this processor has no I/O bitmaps")
        self._unconditional_io = on
        self._set_control(F.CPU_BASED_VM_EXEC_CONTROL, C.USE_IO_BITMAPS, not on)
        self._set_control(F.CPU_BASED_VM_EXEC_CONTROL, C.UNCOND_IO_EXITING, on)

    def intercept_io(self, ports: PortSpec, *, only: bool = False) -> None:
        """Make accesses to ``ports`` exit, through the I/O bitmaps. ``only=True`` clears every
        other bit first -- seed 002's "intercept only the serial port 0x3F8" in one call."""
        if only:
            self.io_bitmaps.fill(intercept=False)
        self.io_bitmaps.set_intercept(ports, True)
        self.unconditional_io = False

    def pass_io(self, ports: PortSpec) -> None:
        """Let accesses to ``ports`` reach the platform without a VM exit."""
        self.io_bitmaps.set_intercept(ports, False)
        self.unconditional_io = False

    def intercept_msr(self, msr: MsrLike, *, read: bool = True, write: bool = True, only: bool = False) -> None:
        """Make RDMSR/WRMSR of ``msr`` exit (``vmx_enable_intercept_for_msr()``); ``only=True``
        clears the bitmap first -- seed 002's "intercept only writes of IA32_EFER" is
        ``intercept_msr("EFER", read=False, only=True)``."""
        if only:
            self.msr_bitmap.fill(intercept=False)
        self.msr_bitmap.set_intercept(msr, read=read, write=write, intercept=True)

    def pass_msr(self, msr: MsrLike, *, read: bool = True, write: bool = True) -> None:
        """``vmx_disable_intercept_for_msr()``: the guest accesses ``msr`` directly."""
        self.msr_bitmap.set_intercept(msr, read=read, write=write, intercept=False)

    def intercept_all_msrs(self) -> None:
        """Seed 002 "intercept every RDMSR/WRMSR": the bitmap all ones."""
        self.msr_bitmap.fill(intercept=True)

    def intercept_cr0_bits(self, bits: int, *, only: bool = False) -> None:
        """Make ``bits`` of CR0 host-owned (CR0 guest/host mask, SDM 25.6.6): the guest reads
        them from the read shadow and a MOV to CR0 that changes them exits. ``only=True`` makes
        them the only host-owned bits -- seed 002's "intercept only writes of CR0.PG" is
        ``intercept_cr0_bits(Cr0.PG, only=True)``."""
        view = cr_emulate.read_cr0(self)
        self._cr0_mask = int(bits) if only else self._cr0_mask | int(bits)
        self.vmcs_write(F.CR0_GUEST_HOST_MASK, self._cr0_mask)
        self.vmcs_write(F.CR0_READ_SHADOW, view)

    def pass_cr0_bits(self, bits: int) -> None:
        view = cr_emulate.read_cr0(self)
        self._cr0_mask &= ~int(bits)
        self.vmcs_write(F.CR0_GUEST_HOST_MASK, self._cr0_mask)
        self.vmcs_write(F.CR0_READ_SHADOW, view)

    def intercept_cr4_bits(self, bits: int, *, only: bool = False) -> None:
        view = cr_emulate.read_cr4(self)
        self._cr4_mask = int(bits) if only else self._cr4_mask | int(bits)
        self.vmcs_write(F.CR4_GUEST_HOST_MASK, self._cr4_mask)
        self.vmcs_write(F.CR4_READ_SHADOW, view)

    def set_preemption_timer(self, ticks: int | None, *, exit_to_user: bool = False) -> None:
        """Seed 002: arm the VMX-preemption timer (pin-based bit 6) for a slice of ``ticks`` TSC
        ticks at every entry; when it fires the vCPU gives up the CPU (``Reschedule``), or with
        ``exit_to_user`` ``run()`` returns TimeLimitExit. None disarms it."""
        if ticks is not None and not self.config.has_preemption_timer:
            raise VcpuStateError("this processor has no VMX-preemption timer")
        self.preemption_slice = ticks
        self.slice_exits_to_user = exit_to_user

    # =============================================================================================
    # Events
    # =============================================================================================
    def queue_exception(self, vector: int, error_code: int | None = None, *, cr2: int | None = None) -> None:
        """``kvm_queue_exception[_e]()``, with kvm_multiple_exception()'s escalation: a second
        exception before the first was delivered becomes #DF when both are contributory or a
        #PF is followed by a contributory one or a #PF (SDM Table 6-5); one after #DF is a
        triple fault."""
        new = events.exception(vector, error_code, cr2=cr2)
        prev = self.exception
        if prev is None and self.reinject is not None and self.reinject.kind is InterruptionType.HARD_EXCEPTION:
            # The exception whose delivery the exit interrupted (vmx_complete_interrupts() puts
            # it back in vcpu->arch.exception as "injected"): the new one -- an intercepted
            # fault raised while delivering it, now reflected -- combines with it just the same.
            prev, self.reinject = self.reinject, None
        if prev is not None and prev.kind is InterruptionType.HARD_EXCEPTION:
            if prev.vector == ExceptionVector.DF:
                self.triple_fault_pending = True
                self.exception = None
                return
            contributory = {0, 10, 11, 12, 13}
            if (prev.vector in contributory and vector in contributory) or (
                prev.vector == ExceptionVector.PF and (vector in contributory or vector == ExceptionVector.PF)
            ):
                new = events.exception(int(ExceptionVector.DF), 0)
        self.exception = new
        self.stats.exception_injections += 1

    def queue_event(self, event: events.Event) -> None:
        """Queue an event built by the caller (a software exception with its length, ...)."""
        self.exception = event

    def inject_nmi(self) -> None:
        """KVM_NMI."""
        self.nmi_pending = min(self.nmi_pending + 1, 2)

    def kick(self) -> None:
        """Wake a halted vCPU even with interrupts off (KVM_HC_KICK_CPU's pv_unhalted)."""
        self.pv_unhalted = True

    def _pic(self) -> object | None:
        platform = self.vm.platform
        if platform is None or self.vm.bsp is not self:
            return None
        return platform.pic

    def _pic_intr(self) -> bool:
        platform = self.vm.platform
        return platform is not None and self.vm.bsp is self and platform.pic.output()

    def has_events(self) -> bool:
        """``kvm_vcpu_has_events()``: something a halted vCPU should wake for."""
        if self.lapic.wait_sipi:  # only a SIPI ends wait-for-SIPI
            return self.lapic.sipi_vector is not None
        if self.pv_unhalted or self.exception is not None or self.triple_fault_pending:
            return True
        intr = self.vmcs_read(F.GUEST_INTERRUPTIBILITY_INFO)
        if self.nmi_pending and events.nmi_allowed(intr):
            return True
        return (self._pic_intr() or bool(self.apf_irqs) or self.lapic.has_interrupt() is not None) and events.interrupt_allowed(self.vmcs_read(F.GUEST_RFLAGS), intr)

    def interrupts_enabled(self) -> bool:
        return bool(self.vmcs_read(F.GUEST_RFLAGS) & Rflags.IF)

    def _inject_pending_event(self) -> None:
        """``kvm_check_and_inject_events()`` + ``vmx_inject_*()`` + the window requests."""
        intr = self.vmcs_read(F.GUEST_INTERRUPTIBILITY_INFO)
        rflags = self.vmcs_read(F.GUEST_RFLAGS)
        event: events.Event | None = None
        if self.exception is not None:
            event, self.exception = self.exception, None
            if events.injection_sets_rf(event):
                rflags |= Rflags.RF
                self.vmcs_write(F.GUEST_RFLAGS, rflags)
        elif self.reinject is not None:
            event, self.reinject = self.reinject, None
        elif self.nmi_pending and events.nmi_allowed(intr):
            event = events.NMI_EVENT
            self.nmi_pending -= 1
            self.stats.nmi_injections += 1
        elif self.apf_irqs and events.interrupt_allowed(rflags, intr):
            event = events.external_interrupt(self.apf_irqs.popleft())
            self.stats.irq_injections += 1
        elif self.lapic.has_interrupt() is not None and events.interrupt_allowed(rflags, intr):
            event = events.external_interrupt(self.lapic.acknowledge() or 0)  # kvm_get_apic_interrupt()
            self.stats.irq_injections += 1
        elif self._pic_intr() and events.interrupt_allowed(rflags, intr):
            assert self.vm.platform is not None
            event = events.external_interrupt(self.vm.platform.pic.acknowledge())
            self.stats.irq_injections += 1
        if event is not None:
            self._write_injection(event)
        proc = self.vmcs_read(F.CPU_BASED_VM_EXEC_CONTROL)
        want_irq = self._pic_intr() or bool(self.apf_irqs) or self.lapic.has_interrupt() is not None or self.request_interrupt_window
        want_nmi = (bool(self.nmi_pending) or self.request_nmi_window) and bool(self.config.cpu_based & C.NMI_WINDOW_EXITING) and self.config.has_virtual_nmis
        new = proc
        new = new | C.INTR_WINDOW_EXITING if want_irq else new & ~int(C.INTR_WINDOW_EXITING)
        new = new | C.NMI_WINDOW_EXITING if want_nmi else new & ~int(C.NMI_WINDOW_EXITING)
        if new != proc:
            self.vmcs_write(F.CPU_BASED_VM_EXEC_CONTROL, new)

    # --- asynchronous page faults (virt/kvm/async_pf.c, x86.c) -----------------------------------
    def apf_state(self) -> ApfVcpuState:
        """What kvm_can_do_async_pf()/kvm_can_deliver_async_pf() read."""
        return ApfVcpuState(
            interrupts_allowed=events.interrupt_allowed(self.vmcs_read(F.GUEST_RFLAGS), self.vmcs_read(F.GUEST_INTERRUPTIBILITY_INFO)),
            cpl=self.cpl(),
            paging=cr_emulate.is_paging(self),
            event_pending=self.exception is not None or self.reinject is not None,
        )

    def async_pf_hook(self) -> AsyncPfHook | None:
        """The MMU's hook for a fault on a swapped-out page (kvm_arch_setup_async_pf())."""
        if not self.async_pf.pv_async_pf_enabled():
            return None
        return self.async_pf.hook(self.apf_state(), self.guest_tsc())

    def _async_pf_work(self, guest_time: int) -> None:
        """``kvm_check_async_pf_completion()`` before an entry: page-ins done by ``guest_time``
        are mapped and reported; "page not present"/"page ready" become a #PF (CR2 = token) or
        the guest's notification vector."""
        apf = self.async_pf
        if apf.queue:
            apf.poll(guest_time)
            apf.check_completion(self.apf_state())
        for ev in apf.take_events():
            if ev.is_page_fault:
                self.queue_exception(int(ExceptionVector.PF), ev.error_code or 0, cr2=ev.cr2)
            else:
                self.apf_irqs.append(ev.vector)

    def _fix_hlt_shadow(self) -> None:
        """A guest that ran ``sti; hlt`` natively (HLT not intercepted) can come back in the HLT
        activity state with blocking by STI still recorded; the shadow ended when HLT retired, and
        SDM 27.3.1.5 refuses that combination at VM entry, so drop the stale blocking bits."""
        if self.vmcs_read(F.GUEST_ACTIVITY_STATE) != GuestActivityState.HLT:
            return
        intr = self.vmcs_read(F.GUEST_INTERRUPTIBILITY_INFO)
        blocking = GuestInterruptibility.STI | GuestInterruptibility.MOV_SS
        if intr & blocking:
            self.vmcs_write(F.GUEST_INTERRUPTIBILITY_INFO, intr & ~int(blocking))

    def _write_injection(self, event: events.Event) -> None:
        protected = bool(self.vmcs_read(F.GUEST_CR0) & Cr0.PE)
        info, error = event.intr_info(protected_mode=protected)
        if error is not None:
            self.vmcs_write(F.VM_ENTRY_EXCEPTION_ERROR_CODE, error)
        if event.software:
            self.vmcs_write(F.VM_ENTRY_INSTRUCTION_LEN, event.instruction_len)
        if event.cr2 is not None:
            engine_access.write_cr2(self.pcpu.processor, event.cr2)
        self.vmcs_write(F.VM_ENTRY_INTR_INFO_FIELD, info)
        # vmx_clear_hlt(): an injected event ends the HLT activity state.
        if self.vmcs_read(F.GUEST_ACTIVITY_STATE) == GuestActivityState.HLT:
            self.vmcs_write(F.GUEST_ACTIVITY_STATE, GuestActivityState.ACTIVE)

    def _complete_interrupts(self, exit: VmExitInfo) -> None:
        """``__vmx_complete_interrupts()``: requeue an event whose delivery the exit interrupted."""
        event = events.from_vectoring_info(exit.idt_vectoring_info, exit.idt_vectoring_error_code, exit.instruction_length)
        if event is not None:
            self.reinject = event
            if event.kind is InterruptionType.NMI_INTR:
                # vmx_set_nmi_mask(vcpu, false): the NMI was not delivered, so NMIs are not
                # blocked by it; SDM 27.3.1.5 refuses injecting an NMI while they are.
                self.vmcs_clear_bits(F.GUEST_INTERRUPTIBILITY_INFO, GuestInterruptibility.NMI)

    # =============================================================================================
    # Instruction completion
    # =============================================================================================
    def skip_instruction(self, length: int | None = None) -> None:
        """``skip_emulated_instruction()`` + ``kvm_skip_emulated_instruction()``: RIP past the
        instruction (VM_EXIT_INSTRUCTION_LEN), STI/MOV-SS blocking cleared, and a single-step
        trap (#DB, DR6.BS) if RFLAGS.TF is set."""
        if length is not None:
            n = length
        elif self.last_exit is not None:
            n = self.last_exit.instruction_length  # the exit being handled (= VM_EXIT_INSTRUCTION_LEN)
        else:
            n = self.vmcs_read(F.VM_EXIT_INSTRUCTION_LEN)
        rip = self.vmcs_read(F.GUEST_RIP) + n
        if not self.is_64_bit_mode():
            rip &= 0xFFFFFFFF
        self.vmcs_write(F.GUEST_RIP, rip)
        intr = self.vmcs_read(F.GUEST_INTERRUPTIBILITY_INFO)
        if intr & _STI_MOV_SS_BLOCKING:
            self.vmcs_write(F.GUEST_INTERRUPTIBILITY_INFO, intr & ~_STI_MOV_SS_BLOCKING)
        if self.vmcs_read(F.GUEST_RFLAGS) & _RFLAGS_TF:
            self.queue_exception(int(ExceptionVector.DB))  # the guest's own single step
        if self.guest_singlestep:
            # kvm_vcpu_do_singlestep(): the user's step ends here, in the user's debugger.
            self.singlestep_exit_pending = True

    def complete_insn_gp(self, ok: bool, note: str = "") -> Resume:
        """``kvm_complete_insn_gp()``: skip the instruction, or inject #GP(0) and stay on it."""
        if ok:
            self.skip_instruction()
            return Resume(note or "emulated")
        self.queue_exception(int(ExceptionVector.GP), 0)
        return Resume(f"{note + ': ' if note else ''}#GP injected")

    # =============================================================================================
    # Running
    # =============================================================================================
    def _arm_deadline(self, pcpu: PhysicalCpu, deadlines: list[int | None]) -> None:
        """``vmx_update_hv_timer()``: the VMX-preemption timer (SDM 26.5.1) for the earliest
        deadline, or -- on a CPU without one -- the host's timer interrupt, which exits through
        "external-interrupt exiting"."""
        targets = [d for d in deadlines if d is not None]
        if self.preemption_slice is not None:
            targets.append(pcpu.clock() + self.preemption_slice)
        pin = self.vmcs_read(F.PIN_BASED_VM_EXEC_CONTROL)
        if not targets:
            if pin & P.VMX_PREEMPTION_TIMER:
                self.vmcs_write(F.PIN_BASED_VM_EXEC_CONTROL, pin & ~int(P.VMX_PREEMPTION_TIMER))
            return
        target = min(targets) - pcpu.idle  # in the processor's own TSC
        now = pcpu.processor.read_tsc()
        if self.config.has_preemption_timer:
            rate = self.config.preemption_timer_rate
            value = max(0, ((target + (1 << rate) - 1) >> rate) - (now >> rate))
            self.vmcs_write(F.VMX_PREEMPTION_TIMER_VALUE, min(value, 0xFFFFFFFF))
            if not pin & P.VMX_PREEMPTION_TIMER:
                self.vmcs_write(F.PIN_BASED_VM_EXEC_CONTROL, pin | P.VMX_PREEMPTION_TIMER)
        elif pcpu.host_timer_at is None or pcpu.host_timer_at != target or target <= now:
            pcpu.processor.raise_interrupt(LOCAL_TIMER_VECTOR, at_tsc=max(target, now))
            pcpu.host_timer_at = target

    def _flush_msr_loads(self) -> int:
        if not self._pending_msr_loads:
            return 0
        memory = self.kvm.memory
        items = list(self._pending_msr_loads.items())[:MAX_MSR_LOADS]
        for i, (index, value) in enumerate(items):
            memory.write64(self.msr_load_area + MSR_ENTRY_SIZE * i, index)
            memory.write64(self.msr_load_area + MSR_ENTRY_SIZE * i + 8, value)
        self.vmcs_write(F.VM_ENTRY_MSR_LOAD_COUNT, len(items))
        self._pending_msr_loads.clear()
        return len(items)

    def _flush_tlb(self, pcpu: PhysicalCpu) -> None:
        """``vmx_flush_tlb_current()`` after a migration: single-context INVEPT and INVVPID."""
        processor = pcpu.processor
        eptp = self.vm.mmu.eptp
        if processor.invept(1, eptp).failed:
            processor.invept(2, 0)
        if self.vpid and processor.invvpid(1, self.vpid).failed:
            processor.invvpid(2, 0)
        self._tlb_flush_pending = False

    def run_once(self, pcpu: PhysicalCpu, *, deadlines: tuple[int | None, ...] = ()) -> HandlerOutcome:
        """``vcpu_enter_guest()``: one VM entry, one VM exit, its handler's outcome."""
        if self.triple_fault_pending:
            self.triple_fault_pending = False
            return ShutdownExit(self.vmcs_read(F.GUEST_RIP), "triple fault (exception while delivering #DF)")
        if apic_bus.wait_for_sipi(self):
            return Halt("wait-for-SIPI")
        self.load(pcpu)
        vm = self.vm
        vm.running_on = pcpu
        is_bsp = vm.bsp is self
        if is_bsp:
            vm.run_timers(pcpu.clock())
        self._fix_hlt_shadow()
        self._async_pf_work(self.guest_tsc())
        if self.async_pf.halted:
            return Halt("waiting for an asynchronous page fault")
        self._inject_pending_event()
        timer = vm.next_timer_event() if is_bsp else None
        # A page-in that completes while the guest runs its other task must end the run then, so
        # that "page ready" is delivered on time (kvm_check_async_pf_completion() at each entry).
        page_in = self.async_pf.next_completion()
        page_in_at = None if page_in is None else page_in - vm.tsc_offset - self.tsc_adjust
        self._arm_deadline(pcpu, [timer, page_in_at, self._lapic_timer_at(), *deadlines])
        self.vmcs_write(F.TSC_OFFSET, (vm.tsc_offset + self.tsc_adjust + pcpu.idle) & _U64)
        loads = self._flush_msr_loads()
        if self._tlb_flush_pending:
            self._flush_tlb(pcpu)
        processor = pcpu.processor
        launched = self.loaded_vmcs.launched
        before = processor.read_tsc()
        result = processor.vmresume() if launched else processor.vmlaunch()
        self.stats.run_tsc += processor.read_tsc() - before
        host_time.charge(pcpu, host_time.EXIT_HANDLING_TSC)  # handling what the entry returned
        self.stats.entries += 1
        if launched:
            pcpu.vmresumes += 1
        else:
            pcpu.vmlaunches += 1
            self.stats.launches += 1
        self.kvm.log_vmx("VMRESUME" if launched else "VMLAUNCH", pcpu.cpu_id, self.loaded_vmcs.address)
        if loads:
            self.vmcs_write(F.VM_ENTRY_MSR_LOAD_COUNT, 0)
        self.ran = True
        self.last_guest_tsc = max(self.last_guest_tsc, self.guest_tsc())
        return self._after_entry(result, launched)

    def _after_entry(self, result: VmxResult, launched: bool) -> HandlerOutcome:
        from pyvmx.kvm.exit_handlers import handle_exit

        status = result.status
        if status in (VmxStatus.FAIL_VALID, VmxStatus.FAIL_INVALID, VmxStatus.FAULT):
            failure = self.pcpu.processor.last_entry_failure
            code = int(result.error) if result.error is not None else 0
            return FailEntry(code, f"{result}" + (f": {failure}" if failure is not None else ""), self.dump_vmcs())
        if status is VmxStatus.STALLED:
            self.loaded_vmcs.launched = True
            stall = result.stall or ""
            if result.stall_kind is StallKind.BUDGET:
                return TimeLimitExit(self.guest_tsc())
            if result.stall_kind is StallKind.HOST_DEADLINE:
                return self._wall_clock_exit()
            if result.stall_kind is StallKind.HALTED:  # HLT not intercepted, and nothing will ever wake the guest
                return HltExit(self.vmcs_read(F.GUEST_RIP), stall)
            return InternalError(KVM_INTERNAL_ERROR_EMULATION, f"the CPU engine stopped: {stall}", 0, self.dump_vmcs())
        if status is VmxStatus.SUCCEED or result.exit is None:
            self.loaded_vmcs.launched = True
            return InternalError(KVM_INTERNAL_ERROR_EMULATION, "no CPU engine: the VM entry ran nothing")
        exit = result.exit
        if exit.failed_vmentry:
            from pyvmx.vmx.exitinfo import reason_name

            failure = self.pcpu.processor.last_entry_failure
            rule = f"{reason_name(exit.reason)}, exit qualification {exit.qualification:#x}" + (f": {failure}" if failure is not None else "")
            return FailEntry(exit.reason, rule, self.dump_vmcs())
        self.loaded_vmcs.launched = True
        self._complete_interrupts(exit)
        return handle_exit(self, exit)

    def _complete_user_exit(self) -> VcpuExit | None:
        done = self.complete_userspace_io
        if done is None:
            return None
        self.complete_userspace_io = None
        self._ensure_current()
        # Completing the instruction is the hypervisor's work too (complete_emulated_mmio(),
        # complete_fast_pio_in()); a REP MOVS/STOS to MMIO moves one element per user exit, with
        # no VM entry in between to charge -- without this its exits never reach a time limit.
        host_time.charge(self.pcpu, host_time.EXIT_HANDLING_TSC)
        return done()

    def _wake_time(self) -> int | None:
        """Host time at which a device timer or a page-in may wake this halted vCPU (None:
        none can)."""
        times = []
        page_in = self.async_pf.next_completion()
        if page_in is not None:
            times.append(page_in - self.vm.tsc_offset - self.tsc_adjust)
        if self.vm.bsp is self and self.interrupts_enabled():
            timer = self.vm.next_timer_event(wakeup=True)
            if timer is not None:
                times.append(timer)
        lapic_timer = self._lapic_timer_at()
        if lapic_timer is not None and self.interrupts_enabled():
            times.append(lapic_timer)
        return min(times) if times else None

    @property
    def cr8(self) -> int:
        """CR8 is the local APIC's TPR bits 7:4 (SDM 11.8.6, 10.8.6.1)."""
        return self.lapic.read(APIC_TASKPRI) >> 4

    @cr8.setter
    def cr8(self, value: int) -> None:
        self.lapic.write(APIC_TASKPRI, (value & 0xF) << 4)

    def _lapic_timer_at(self) -> int | None:
        """Host time of this vCPU's local APIC timer expiry (SDM 11.5.4), or None."""
        deadline = self.lapic.timer_deadline()
        return None if deadline is None else self.vm.host_time_of(deadline)

    def try_wake(self, host_time: int) -> bool:
        """Deliver the timers due by ``host_time``; True (and RUNNABLE) if the vCPU has an event."""
        if self.vm.bsp is self:
            self.vm.run_timers(host_time)
        self._async_pf_work(host_time + self.vm.tsc_offset + self.tsc_adjust)
        if self.async_pf.halted:
            return False
        if self.has_events():
            self.mp_state = MpState.RUNNABLE
            self.pv_unhalted = False
            self.stats.halt_wakeups += 1
            return True
        return False

    def _block(self, pcpu: PhysicalCpu, deadline: int | None) -> VcpuExit | None:
        """``kvm_vcpu_block()`` on a CPU with nothing else to run: idle until a timer event
        wakes the vCPU. Returns HltExit when nothing can, TimeLimitExit at the deadline."""
        self.load(pcpu)
        self.vm.running_on = pcpu
        while True:
            if self.try_wake(pcpu.clock()):
                return None
            wake = self._wake_time()
            if wake is None:
                reason = "halted with interrupts disabled" if not self.interrupts_enabled() else "halted with no wake-up event"
                return HltExit(self.vmcs_read(F.GUEST_RIP), reason)
            target = wake if deadline is None else min(wake, deadline)
            target = max(target, pcpu.clock() + 1)
            self.stats.halted_tsc += pcpu.idle_until(target)
            if deadline is not None and pcpu.clock() >= deadline:
                if self.try_wake(pcpu.clock()):
                    return None
                return TimeLimitExit(self.guest_tsc())

    def run(self, *, time_limit: int | None = None, wall_deadline: HostDeadline | None = None) -> VcpuExit:
        """KVM_RUN: run until something needs the user; ``time_limit`` in TSC ticks bounds the
        guest time this call may take (TimeLimitExit), whatever the guest does, and
        ``wall_deadline`` the host time (WallClockExit) -- checked at every exit and, while guest
        code runs, by stopping the CPU engine. A host exception that guest behaviour provokes
        comes back as an InternalError carrying it, never out of this call."""
        pcpu = self.pcpu
        with host_deadline_on(pcpu, wall_deadline):
            self.wall_deadline = wall_deadline
            try:
                return self._run(pcpu, time_limit)
            except VcpuStateError:
                raise  # the API used wrongly: the caller's bug, not the guest's
            except Exception as exc:  # noqa: BLE001 -- any other is a model bug the guest hit
                return self.host_exception(exc)
            finally:
                self.wall_deadline = None

    def host_exception(self, exc: Exception) -> InternalError:
        """An unexpected exception in the hypervisor or the machine below it, as KVM reports a
        bug it can survive: KVM_EXIT_INTERNAL_ERROR with the VMCS dump (and the exception)."""
        try:
            dump = self.dump_vmcs()
        except Exception:  # noqa: BLE001 -- the dump is best effort here
            dump = ""
        return InternalError(
            KVM_INTERNAL_ERROR_EMULATION, f"host exception {type(exc).__name__}: {exc}", 0, dump, exception=exc
        )

    def _wall_clock_exit(self) -> WallClockExit:
        seconds = self.wall_deadline.seconds if self.wall_deadline is not None else None
        return WallClockExit(self.guest_tsc(), seconds or 0.0)

    def _run(self, pcpu: PhysicalCpu, time_limit: int | None) -> VcpuExit:
        deadline = None if time_limit is None else pcpu.clock() + time_limit
        done = self._complete_user_exit()
        if done is not None:
            return done
        if self.singlestep_exit_pending:  # completing the user's I/O ended a single step
            return self._singlestep_exit()
        while True:
            now = pcpu.clock()
            if deadline is not None and now >= deadline:
                return TimeLimitExit(self.guest_tsc())
            if self.wall_deadline is not None and self.wall_deadline.passed():
                return self._wall_clock_exit()
            if self.mp_state is MpState.HALTED:
                blocked = self._block(pcpu, deadline)
                if blocked is not None:
                    return blocked
                continue
            # Exits handled in the kernel that let no guest time pass (an exception reflected
            # into a guest that faults again delivering it, ...) would keep the clock -- and so
            # ``time_limit`` -- from ever ending this loop: give up after many in a row, counted
            # across run() calls (a user exit in between does not make progress either).
            stuck, stuck_at = self._entries_without_progress
            stuck = stuck + 1 if now == stuck_at else 0
            self._entries_without_progress = (stuck, now)
            if stuck >= MAX_ENTRIES_WITHOUT_PROGRESS:
                self._entries_without_progress = (0, -1)
                return InternalError(
                    KVM_INTERNAL_ERROR_DELIVERY_EV,
                    f"no progress: {stuck} VM entries in a row without guest time advancing",
                    0,
                    self.dump_vmcs(),
                )
            outcome = self.run_once(pcpu, deadlines=(deadline,))
            if isinstance(outcome, VcpuExit):
                return outcome
            if isinstance(outcome, Halt):
                self.mp_state = MpState.HALTED
                if self.singlestep_exit_pending:  # a stepped HLT: halted, and the step is over
                    return self._singlestep_exit()
            elif isinstance(outcome, Reschedule) and self.slice_exits_to_user and outcome.note == "preemption timer":
                return TimeLimitExit(self.guest_tsc())

    def _singlestep_exit(self) -> GuestDebugExit:
        self.singlestep_exit_pending = False
        return GuestDebugExit(int(ExceptionVector.DB), self.vmcs_read(F.GUEST_RIP), DR6_BS)

    def run_slice(
        self, pcpu: PhysicalCpu, slice_end: int, deadline: int | None = None, wall_deadline: HostDeadline | None = None
    ) -> HandlerOutcome:
        """Run on ``pcpu`` until the time slice ends (host time ``slice_end``), the vCPU halts or
        yields, or the user must act -- the scheduler's unit of work. Host exceptions and the
        wall-clock limit end it as in :meth:`run`."""
        with host_deadline_on(pcpu, wall_deadline):
            self.wall_deadline = wall_deadline
            try:
                return self._run_slice(pcpu, slice_end, deadline)
            except VcpuStateError:
                raise
            except Exception as exc:  # noqa: BLE001 -- see run()
                return self.host_exception(exc)
            finally:
                self.wall_deadline = None

    def _run_slice(self, pcpu: PhysicalCpu, slice_end: int, deadline: int | None) -> HandlerOutcome:
        done = self._complete_user_exit()
        if done is not None:
            return done
        while True:
            outcome = self.run_once(pcpu, deadlines=(slice_end, deadline))
            if isinstance(outcome, Halt):
                self.mp_state = MpState.HALTED
                return outcome
            if isinstance(outcome, (VcpuExit, Reschedule)):
                return outcome
            if pcpu.clock() >= slice_end or (deadline is not None and pcpu.clock() >= deadline):
                return Reschedule("time slice")
            if self.wall_deadline is not None and self.wall_deadline.passed():
                return self._wall_clock_exit()

    # =============================================================================================
    # Tracing
    # =============================================================================================
    def record(self, exit: VmExitInfo, outcome: HandlerOutcome, rip: int, handler_ns: int = 0) -> None:
        reason = exit.exit_reason
        name = reason.name if isinstance(reason, ExitReason) else str(exit.basic_reason)
        self.stats.count(name)
        if self.tracer is not None:
            self.tracer(TraceRecord(self.id, exit.reason, name, exit.qualification, rip, self.guest_tsc(), outcome,
                                    exit=exit, handler_ns=handler_ns, next_rip=self.vmcs_read(F.GUEST_RIP)))

    @property
    def injected_event_pending(self) -> bool:
        return bool(self.vmcs_read(F.VM_ENTRY_INTR_INFO_FIELD) & INTR_INFO_VALID_MASK)

