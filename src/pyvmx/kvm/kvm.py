"""The hypervisor: the host's physical CPUs in VMX root operation, its memory, and the VMs
(``/dev/kvm`` and kvm_intel's hardware_setup()/hardware_enable(); rust-vmm's ``Kvm``).

    kvm = Kvm(cpus=2)                       # VMXON on each physical CPU
    vm = kvm.create_vm(memory_size=16 << 20)
    vcpu = vm.create_vcpu()
    load_flat(vm, code, 0x10000); setup_long_mode(vcpu, entry=0x10000)
    exit = vcpu.run(time_limit=10_000_000)

Physical CPUs are :class:`~pyvmx.vmx.Processor` objects sharing one
:class:`~pyvmx.vmx.PhysicalMemory`, each with its own CPU engine (its own TSC). The host's memory
is handed out page by page (VMCS regions, bitmaps, EPT tables) and, through :class:`HostMm`, as the
VMM process's anonymous memory that backs guest RAM.

Time. Each physical CPU's clock is its TSC -- the instructions its engine retired -- plus the time
it spent idle (no runnable vCPU, or a vCPU blocked in HLT): :meth:`PhysicalCpu.clock`. Guest time
is that clock plus the VM's TSC offset (SDM 25.6.5, "TSC offsetting").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyvmx.arch.x86 import Cr4
from pyvmx.kvm.host_mm import HostMm
from pyvmx.kvm.vmcs_setup import VmcsConfig, VmxSetupError, setup_vmcs_config
from pyvmx.vmx.caps import CpuProfile
from pyvmx.vmx.memory import PAGE_SIZE, PageAllocator, PhysicalMemory
from pyvmx.vmx.processor import Processor

if TYPE_CHECKING:
    from pyvmx.engine.deadline import HostDeadline
    from pyvmx.engine.executor import VmxExecutor
    from pyvmx.kvm.vcpu import Vcpu
    from pyvmx.kvm.vm import Vm

VMX_NR_VPIDS = 1 << 16
DEFAULT_TSC_HZ = CpuProfile.tsc_hz  # the default profile's TSC rate
LOCAL_TIMER_VECTOR = 0xEC  # arch/x86/include/asm/irq_vectors.h: the host's own timer interrupt


class KvmError(RuntimeError):
    """The hypervisor could not be set up (hardware_setup()/hardware_enable() failed)."""


@dataclass(eq=False)
class PhysicalCpu:
    """One host CPU in VMX root operation, with KVM's per-CPU state (``current_vmcs``,
    ``loaded_vmcss_on_cpu``) and the idle time its clock includes."""

    cpu_id: int
    processor: Processor
    vmxon_region: int
    engine: VmxExecutor | None = None  # the CPU engine under the processor (None: none runs code)
    idle: int = 0
    current_vmcs: int | None = None
    loaded_vmcss: set[int] = field(default_factory=set)
    regfile_owner: Vcpu | None = None
    host_timer_at: int | None = None
    vmlaunches: int = 0
    vmresumes: int = 0
    vmclears: int = 0

    def clock(self) -> int:
        """This CPU's time: its TSC plus the ticks it spent idle."""
        return self.processor.read_tsc() + self.idle

    def idle_until(self, when: int) -> int:
        """Let the CPU sit idle until its clock reads ``when``; returns the ticks idled."""
        now = self.clock()
        if when <= now:
            return 0
        self.idle += when - now
        return when - now

    def __repr__(self) -> str:
        return f"PhysicalCpu({self.cpu_id}, clock={self.clock()}, vmcs={self.current_vmcs})"


@contextmanager
def host_deadline_on(pcpu: PhysicalCpu, deadline: HostDeadline | None) -> Iterator[None]:
    """Run under ``deadline`` on ``pcpu``: its CPU engine stops once the host's wall-clock limit
    passes (see :mod:`pyvmx.engine.deadline`); the previous limit comes back afterwards."""
    engine = pcpu.engine
    if engine is None or deadline is None:
        yield
        return
    before = engine.host_deadline
    engine.host_deadline = deadline
    try:
        yield
    finally:
        engine.host_deadline = before


class VpidAllocator:
    """``allocate_vpid()`` / ``free_vpid()``: VPID 0 is the host's."""

    def __init__(self) -> None:
        self._used = {0}

    def allocate(self) -> int:
        for vpid in range(1, VMX_NR_VPIDS):
            if vpid not in self._used:
                self._used.add(vpid)
                return vpid
        return 0  # out of VPIDs: run without one (KVM does the same)

    def free(self, vpid: int) -> None:
        if vpid:
            self._used.discard(vpid)


class Kvm:
    """The hypervisor (see the module docstring).

    ``cpus``: physical CPUs. ``memory_size``: host-physical memory in bytes. ``profile``: the
    VMX capabilities of the CPUs. ``engine``: run guest code (False gives processors without a
    CPU engine: VMX instructions work, nothing runs -- for tests of handlers with made-up exits).
    ``tsc_hz``: the TSC rate the guest's devices assume and CPUID reports (default: the
    profile's). ``tsc_per_instruction``: TSC ticks per retired instruction.
    ``instruction_budget``: a safety net per VM entry (None: no limit;
    time limits are normally enforced with the VMX-preemption timer)."""

    def __init__(
        self,
        *,
        cpus: int = 1,
        memory_size: int = 128 << 20,
        profile: CpuProfile | None = None,
        engine: bool = True,
        tsc_hz: int | None = None,
        tsc_per_instruction: int = 1,
        instruction_budget: int | None = None,
    ) -> None:
        if cpus < 1:
            raise ValueError(f"a host needs at least one CPU, not {cpus}")
        self.memory = PhysicalMemory(memory_size)
        # The last page answers for unbacked physical addresses (the engine's void page).
        self.allocator = PageAllocator(self.memory, PAGE_SIZE, memory_size - PAGE_SIZE)
        self.host_mm = HostMm(self.allocator)
        self.profile = profile or CpuProfile.default()
        self.tsc_hz = tsc_hz if tsc_hz is not None else self.profile.tsc_hz
        self.pcpus: list[PhysicalCpu] = []
        for cpu_id in range(cpus):
            executor = None
            if engine:
                from pyvmx.engine.executor import VmxExecutor

                executor = VmxExecutor(
                    self.memory, tsc_per_instruction=tsc_per_instruction, instruction_budget=instruction_budget
                )
            processor = Processor(self.memory, self.profile, executor=executor, cpu_id=cpu_id)
            pcpu = self._hardware_enable(processor)
            pcpu.engine = executor
            self.pcpus.append(pcpu)
        try:
            self.config: VmcsConfig = setup_vmcs_config(
                self.pcpus[0].processor.rdmsr, maxphyaddr=self.profile.physical_address_width
            )
        except VmxSetupError as exc:
            raise KvmError(str(exc)) from exc
        self.vpids = VpidAllocator()
        self.host_cr3 = self.alloc_page()  # the host kernel's page tables (HOST_CR3)
        self.vms: list[Vm] = []
        self.vmx_log: list[tuple[str, int, int]] | None = None  # (instruction, CPU, VMCS) when on

    def log_vmx(self, instruction: str, cpu: int, vmcs: int) -> None:
        """Record a VMCS-state instruction (VMCLEAR, VMPTRLD, VMLAUNCH, VMRESUME) when
        :attr:`vmx_log` is a list -- for checking the launch-state discipline."""
        if self.vmx_log is not None:
            self.vmx_log.append((instruction, cpu, vmcs))

    def _hardware_enable(self, processor: Processor) -> PhysicalCpu:
        """``hardware_enable()`` / ``kvm_cpu_vmxon()``: CR4.VMXE, then VMXON with a region
        carrying the VMCS revision identifier."""
        processor.host.cr4 |= Cr4.VMXE
        region = int(self.allocator.alloc_page())
        self.memory.write32(region, processor.profile.revision_id)
        result = processor.vmxon(region)
        if not result.succeeded:
            raise KvmError(f"VMXON on CPU {processor.cpu_id} failed: {result}")
        return PhysicalCpu(processor.cpu_id, processor, region)

    def alloc_page(self, fill: int = 0) -> int:
        """A zeroed (or ``fill``-ed) 4-KiB host page: __get_free_page(GFP_KERNEL)."""
        return int(self.allocator.alloc_page(fill))

    def host_clock(self) -> int:
        """The host's time: the earliest of the CPUs' clocks (they are kept within a time slice
        of each other by whoever runs them)."""
        return min(p.clock() for p in self.pcpus)

    def create_vm(self, memory_size: int = 0, *, platform: bool = True, name: str = "") -> Vm:
        """KVM_CREATE_VM, plus (``memory_size``) RAM at guest-physical 0 and (``platform``) the
        PC devices: PIC, PIT, COM1, debug-exit port."""
        from pyvmx.kvm.vm import Vm

        vm = Vm(self, len(self.vms), name=name or f"vm{len(self.vms)}", platform=platform)
        if memory_size:
            vm.add_ram(0, memory_size)
        self.vms.append(vm)
        return vm
