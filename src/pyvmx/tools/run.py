"""``pyvmx run IMAGE``: boot a guest image on the KVM-style hypervisor.

The image is a flat binary, an ELF file, or an assembly source (``.S``/``.s``/``.asm``, built
with GNU as).  The run ends on the debug-exit port, a shutdown (triple fault), a halt nothing can
end, a failed VM entry / internal error, or the guest-TSC limit; the process exit status says
which (see :data:`EXIT_STATUS`).  Everything the hypervisor handles inside (the VM exits) can be
traced (``--trace``) and counted (``--stat``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.kvm.devices.debug_exit import DEBUG_EXIT_PORT
from pyvmx.tools.intercepts import InterceptPlan, plan_intercepts
from pyvmx.tools.stats import ExitStats
from pyvmx.tools.trace import Tracer
from pyvmx.vmx.outcomes import VmExitInfo

if TYPE_CHECKING:
    from pyvmx.kvm.exits import TraceRecord, VcpuExit
    from pyvmx.kvm.vcpu import Vcpu
    from pyvmx.kvm.vm import Vm

# Process exit status of ``pyvmx run``: 0-127 is the guest's own debug-exit code (masked to 7
# bits), the rest are pyvmx's.
EXIT_HALTED = 128  # every vCPU halted with nothing that can wake it
EXIT_SHUTDOWN = 129  # triple fault
EXIT_LIMIT = 131  # the guest-TSC limit was reached
EXIT_ERROR = 132  # failed VM entry, internal error, unhandled MMIO
EXIT_STATUS = {
    "debug-exit": "the code the guest wrote to port 0xF4, & 0x7F",
    "halted": EXIT_HALTED,
    "shutdown": EXIT_SHUTDOWN,
    "limit": EXIT_LIMIT,
    "error": EXIT_ERROR,
}

ASSEMBLY_SUFFIXES = (".S", ".s", ".asm")
DEFAULT_LOAD = {"real": 0x8000, "protected": 0x10000, "long": 0x10000}


class RunError(ValueError):
    """A bad image or option: reported as one line by the CLI."""


@dataclass
class RunOptions:
    image: Path
    memory_mib: int = 16
    vcpus: int = 1
    pcpus: int = 1
    mode: str = "long"
    load_address: int | None = None
    entry: str | None = None
    intercepts: tuple[str, ...] = ()
    max_tsc: int = 200_000_000
    trace: Path | None = None
    stat: bool = False


@dataclass
class RunResult:
    ending: str  # debug-exit | halted | shutdown | limit | error
    status: int
    detail: str = ""
    serial: bytes = b""
    tracer: Tracer | None = None
    stats: ExitStats = field(default_factory=ExitStats)
    vcpu_stats: list[Any] = field(default_factory=list)


# --- building the VM -------------------------------------------------------------------------------
def load_image(vm: Vm, path: Path, mode: str, load_address: int | None) -> tuple[int, dict[str, int]]:
    """Place the image in guest memory; returns (entry point, symbols)."""
    from pyvmx.guest.assemble import AssemblyError, assemble_file
    from pyvmx.kvm.loader import ImageLoadError, load_elf, load_flat

    base = DEFAULT_LOAD[mode] if load_address is None else load_address
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror}") from None
    if not data:
        raise RunError(f"{path} is empty")
    try:
        if path.suffix in ASSEMBLY_SUFFIXES:
            image = assemble_file(path, base)
            load_flat(vm, image.code, base)
            return image.symbols.get("_start", base), dict(image.symbols)
        if data[:4] == b"\x7fELF":
            loaded = load_elf(vm, path)
            return loaded.entry, dict(loaded.symbols)
        loaded = load_flat(vm, data, base)
        return loaded.entry, dict(loaded.symbols)
    except (AssemblyError, ImageLoadError, ValueError) as exc:
        raise RunError(f"{path}: {exc}") from None


def apply_intercepts(plan: InterceptPlan, vcpu: Vcpu) -> None:
    """Program one vCPU with ``plan``.  A resource named in the plan (I/O ports, MSRs, CR0 bits)
    is intercepted *only* as listed -- seed 002's "intercept only port 0x3F8" -- while everything
    else keeps KVM's policy."""
    for field_, bits in (
        (F.PIN_BASED_VM_EXEC_CONTROL, plan.pin),
        (F.CPU_BASED_VM_EXEC_CONTROL, plan.proc & ~(C.UNCOND_IO_EXITING | C.USE_IO_BITMAPS | C.USE_MSR_BITMAPS)),
        (F.SECONDARY_VM_EXEC_CONTROL, plan.proc2),
    ):
        if bits:
            vcpu.vmcs_set_bits(field_, bits)
    if plan.io_all:
        vcpu.unconditional_io = True
    elif plan.io_ports:
        vcpu.intercept_io(sorted(plan.io_ports), only=True)
        vcpu.intercept_io(DEBUG_EXIT_PORT)  # how a guest ends the run: always reaches the device
    if plan.msr_read_all or plan.msr_write_all:
        vcpu.intercept_all_msrs()
    elif plan.msr_read or plan.msr_write:
        first = True
        for msr in sorted(plan.msr_read | plan.msr_write):
            vcpu.intercept_msr(msr, read=msr in plan.msr_read, write=msr in plan.msr_write, only=first)
            first = False
    if plan.cr0_mask:
        vcpu.intercept_cr0_bits(plan.cr0_mask, only=True)
    if plan.cr4_mask:
        vcpu.intercept_cr4_bits(plan.cr4_mask)
    for vector in range(32):
        if plan.exception_bitmap & (1 << vector):
            vcpu.intercept_exception(vector)
    if plan.preemption_timer is not None:
        vcpu.set_preemption_timer(plan.preemption_timer)


def _set_up(vcpu: Vcpu, mode: str, entry: int) -> None:
    from pyvmx.kvm.boot import setup_long_mode, setup_protected_mode, setup_real_mode

    {"real": setup_real_mode, "protected": setup_protected_mode, "long": setup_long_mode}[mode](vcpu, entry)


# --- observing -------------------------------------------------------------------------------------
class ExitObserver:
    """The hypervisor's tracer callback feeding the tools' Tracer (kvm_exit/kvm_entry pairs) and a
    kvm_stat-like ExitStats.  Guest time of an exit = guest TSC since this vCPU's previous exit."""

    def __init__(self, vm_id: int, trace: bool) -> None:
        self.tracer = Tracer(vm_id) if trace else None
        self.stats = ExitStats("guest")
        self.last_tsc: dict[int, int] = {}
        self.vcpus: dict[int, Vcpu] = {}

    def code_at(self, vcpu_id: int, rip: int) -> bytes:
        """The instruction bytes at CS:RIP, for the disassembly column.  The boot helpers map
        guest memory 1:1, so the linear address is read as guest-physical (best effort)."""
        vcpu = self.vcpus.get(vcpu_id)
        if vcpu is None:
            return b""
        linear = vcpu.vmcs_read(F.GUEST_CS_BASE) + rip
        return vcpu.read_guest_phys(linear, 15) or b""

    def __call__(self, rec: TraceRecord) -> None:
        start = self.last_tsc.get(rec.vcpu_id, 0)
        self.last_tsc[rec.vcpu_id] = rec.guest_tsc
        self.stats.add(rec.reason_name, rec.guest_tsc - start)
        if self.tracer is not None:
            self.tracer.record_entry(rec.vcpu_id, start, rec.rip)
            event = self.tracer.record_exit(
                rec.vcpu_id, rec.guest_tsc, VmExitInfo(rec.reason, rec.qualification), rec.rip,
                code=self.code_at(rec.vcpu_id, rec.rip), tsc_entry=start,
            )
            self.tracer.record_outcome(event, _outcome_text(rec.outcome))


def _outcome_text(outcome: object) -> str:
    return type(outcome).__name__ if not isinstance(outcome, str) else outcome


# --- running ---------------------------------------------------------------------------------------
def run(options: RunOptions, on_progress: Callable[[int], None] | None = None) -> RunResult:
    """Boot ``options.image`` and run it to its end (see the module docstring)."""
    from pyvmx.kvm.kvm import Kvm

    if options.mode not in DEFAULT_LOAD:
        raise RunError(f"unknown mode {options.mode!r} (real, protected, long)")
    if not 1 <= options.memory_mib <= 1024:
        raise RunError("--memory must be between 1 and 1024 MiB")
    if not 1 <= options.vcpus <= 8 or not 1 <= options.pcpus <= 8:
        raise RunError("--vcpus and --pcpus must be between 1 and 8")
    plan = plan_intercepts(options.intercepts)  # InterceptError (a ValueError) names the bad token
    kvm = Kvm(cpus=options.pcpus)
    vm = kvm.create_vm(memory_size=options.memory_mib << 20)
    entry, symbols = load_image(vm, options.image, options.mode, options.load_address)
    if options.entry is not None:
        entry = _resolve(options.entry, symbols)
    observer = ExitObserver(vm.id, options.trace is not None)
    vcpus = [vm.create_vcpu() for _ in range(options.vcpus)]
    for vcpu in vcpus:
        _set_up(vcpu, options.mode, entry)
        apply_intercepts(plan, vcpu)
        vcpu.tracer = observer
        observer.vcpus[vcpu.id] = vcpu
    if options.vcpus == 1 and options.pcpus == 1:
        ending, status, detail = _run_one(vcpus[0], options.max_tsc, on_progress)
    else:
        ending, status, detail = _run_scheduled(kvm, vcpus, options.max_tsc)
    result = RunResult(ending, status, detail, bytes(vm.serial_output), observer.tracer, observer.stats, [v.stats for v in vcpus])
    if options.trace is not None and observer.tracer is not None:
        try:
            observer.tracer.write(options.trace)
        except OSError as exc:
            raise RunError(f"cannot write the trace {options.trace}: {exc.strerror}") from None
    return result


def _resolve(entry: str, symbols: dict[str, int]) -> int:
    if entry in symbols:
        return symbols[entry]
    try:
        return int(entry, 0)
    except ValueError:
        raise RunError(f"--entry {entry!r} is neither a number nor a symbol of the image") from None


def _run_one(vcpu: Vcpu, max_tsc: int, on_progress: Callable[[int], None] | None) -> tuple[str, int, str]:
    from pyvmx.kvm import exits as kx

    used = 0
    chunk = max(1, min(max_tsc, 20_000_000))
    while True:
        before = vcpu.guest_tsc()
        exit = vcpu.run(time_limit=min(chunk, max_tsc - used))
        used += max(0, vcpu.guest_tsc() - before)
        if on_progress is not None:
            on_progress(used)
        if isinstance(exit, kx.TimeLimitExit):
            if used >= max_tsc:
                return "limit", EXIT_LIMIT, f"guest-TSC limit of {max_tsc} reached"
            continue
        if isinstance(exit, kx.IoExit):
            continue  # no device on that port: reads see all ones, writes are dropped
        ending = _ending(exit)
        if ending is not None:
            return ending


def _ending(exit: VcpuExit) -> tuple[str, int, str] | None:
    from pyvmx.kvm import exits as kx

    if isinstance(exit, kx.DebugExit):
        return "debug-exit", exit.code & 0x7F, f"the guest wrote {exit.code:#x} to the debug-exit port"
    if isinstance(exit, kx.HltExit):
        return "halted", EXIT_HALTED, f"halted at {exit.rip:#x}: {exit.reason}"
    if isinstance(exit, kx.ShutdownExit):
        return "shutdown", EXIT_SHUTDOWN, f"shutdown ({exit.reason}) at {exit.rip:#x}"
    if isinstance(exit, kx.FailEntry):
        return "error", EXIT_ERROR, f"VM entry failed: {exit.rule}"
    if isinstance(exit, kx.InternalError):
        return "error", EXIT_ERROR, f"internal error: {exit.reason}"
    if isinstance(exit, kx.MmioExit):
        return "error", EXIT_ERROR, f"MMIO {'write' if exit.is_write else 'read'} at {exit.gpa:#x} with no device"
    if isinstance(exit, kx.GuestDebugExit):
        return "error", EXIT_ERROR, f"guest debug exception {exit.vector} at {exit.rip:#x}"
    return None


def _run_scheduled(kvm: Any, vcpus: Iterable[Vcpu], max_tsc: int) -> tuple[str, int, str]:
    from pyvmx.kvm import exits as kx
    from pyvmx.kvm.scheduler import Scheduler

    endings: list[tuple[str, int, str]] = []

    def on_exit(vcpu: Vcpu, exit: VcpuExit) -> bool:
        if isinstance(exit, (kx.IoExit, kx.TimeLimitExit)):
            return True
        ending = _ending(exit)
        if ending is not None:
            endings.append(ending)
            # The VM is over (like QEMU on isa-debug-exit or a shutdown): empty the run queues.
            scheduler.runqueue.clear()
            scheduler.halted.clear()
        return False

    scheduler = Scheduler(kvm, on_exit=on_exit)
    for vcpu in vcpus:
        scheduler.add(vcpu)
    report = scheduler.run(duration=max_tsc)
    if endings:
        return endings[0]
    if "halted" in report.stopped_because:
        return "halted", EXIT_HALTED, report.stopped_because
    return "limit", EXIT_LIMIT, report.stopped_because


def print_result(result: RunResult, console: Any, *, stat: bool) -> None:
    out = sys.stdout
    if result.serial:
        out.write(result.serial.decode("latin-1"))
        if not result.serial.endswith(b"\n"):
            out.write("\n")
        out.flush()
    if stat:
        console.print(result.stats.table())
    console.print(f"[dim]pyvmx: {result.detail} (exit status {result.status})[/dim]", highlight=False)
