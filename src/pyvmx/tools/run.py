"""``pyvmx run IMAGE``: boot a guest image on the KVM-style hypervisor.

The image is a flat binary, an ELF file, or an assembly source (``.S``/``.s``/``.asm``, built
with GNU as).  The run ends on the debug-exit port, a shutdown (triple fault), a halt nothing can
end, a failed VM entry / internal error, or the guest-TSC limit; the process exit status says
which (see :data:`EXIT_STATUS`).  Everything the hypervisor handles inside (the VM exits) can be
traced (``--trace``) and counted (``--stat``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.engine.deadline import HostDeadline
from pyvmx.kvm.devices.debug_exit import DEBUG_EXIT_PORT
from pyvmx.tools.exit_details import exit_details
from pyvmx.tools.inputs import InputError, read_bytes
from pyvmx.tools.intercepts import InterceptPlan, plan_intercepts
from pyvmx.tools.replay import Record, RecordedExit, RecordError, ReplayResult, first_difference, run_config_from_json
from pyvmx.tools.stats import ExitStats, per_vcpu_table
from pyvmx.tools.trace import Tracer, describe_trace_files
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
EXIT_TIMEOUT = 133  # the wall-clock limit (--timeout) passed
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_STATUS = {
    "debug-exit": "the code the guest wrote to port 0xF4, & 0x7F",
    "halted": EXIT_HALTED,
    "shutdown": EXIT_SHUTDOWN,
    "limit": EXIT_LIMIT,
    "error": EXIT_ERROR,
    "timeout": EXIT_TIMEOUT,
    "interrupted": EXIT_INTERRUPTED,
}

MAX_MEMORY_MIB = 1024  # --memory's range (the CLI states it in --help)
MAX_VCPUS = 8
HOST_MIB = 128  # the host's physical memory for a guest that fits with room to spare
HOST_OVERHEAD_MIB = 32  # the hypervisor's own pages beside guest RAM: VMCS regions, bitmaps, EPT
PROCESS_MARGIN_MIB = 512  # what the pyvmx process needs beside guest RAM (Python, Unicorn's caches)

ASSEMBLY_SUFFIXES = (".S", ".s", ".asm")
DEFAULT_LOAD = {"real": 0x8000, "protected": 0x10000, "long": 0x10000}
MAX_MEMORY_MIB = 1024


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
    swap_out: tuple[int, ...] = ()  # guest pages the host swaps out before the run (async PF)
    record: Path | None = None
    gdb: int | None = None  # serve gdb's remote protocol for vCPU 0 on this TCP port
    timeout: float | None = None  # wall-clock seconds the run may take (None: no limit)
    keep_exits: bool = False  # keep every exit in RunResult.exits (replays; --record keeps them)
    append: str = ""  # a Multiboot kernel's arguments (QEMU's -append)


@dataclass
class RunResult:
    ending: str  # debug-exit | halted | shutdown | limit | error | timeout | interrupted
    status: int
    detail: str = ""
    serial: bytes = b""
    tracer: Tracer | None = None
    stats: ExitStats = field(default_factory=ExitStats)
    vcpu_stats: list[Any] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    exits: list[RecordedExit] = field(default_factory=list)  # with RunOptions.keep_exits / record
    exit_vcpus: list[int] = field(default_factory=list)
    trace_files: list[Path] = field(default_factory=list)  # [JSON lines, Perfetto] with --trace


class CtrlC:
    """Ctrl-C during a run: the first press makes the run's host deadline pass now, so the vCPUs
    stop at their next exit or block boundary with the guest state saved (a WallClockExit), and
    the run ends as ``interrupted`` with its trace and statistics written; a second press
    interrupts the process as usual.  Installed only in the main thread (signal handlers live
    there); nothing is raised from the handler (see pyvmx.engine.deadline)."""

    def __init__(self, deadline: HostDeadline) -> None:
        self.deadline = deadline
        self.pressed = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: object) -> None:
        self.pressed = True
        self.deadline.expire()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# --- building the VM -------------------------------------------------------------------------------
def load_image(vm: Vm, path: Path, mode: str, load_address: int | None) -> tuple[int, dict[str, int]]:
    """Place the image in guest memory; returns (entry point, symbols)."""
    from pyvmx.guest.assemble import AssemblyError, assemble_file
    from pyvmx.kvm.loader import ImageLoadError, load_elf, load_flat

    base = DEFAULT_LOAD[mode] if load_address is None else load_address
    try:  # a regular file no larger than the largest guest RAM (not a FIFO, not /dev/zero)
        data = read_bytes(path, what="guest image", limit=MAX_MEMORY_MIB << 20)
    except InputError as exc:
        raise RunError(str(exc)) from None
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
    except AssemblyError as exc:  # its message names the file and line already
        raise RunError(str(exc)) from None
    except (ImageLoadError, ValueError) as exc:
        raise RunError(f"{path}: {exc}") from None


def apply_intercepts(plan: InterceptPlan, vcpu: Vcpu) -> None:
    """Program one vCPU with ``plan``.  A resource named in the plan (I/O ports, MSRs, CR0 bits)
    is intercepted *only* as listed -- "intercept only port 0x3F8" -- while everything
    else keeps KVM's policy."""
    for field_, bits in (
        (F.PIN_BASED_VM_EXEC_CONTROL, plan.pin),
        (F.CPU_BASED_VM_EXEC_CONTROL, plan.proc & ~(C.UNCOND_IO_EXITING | C.USE_IO_BITMAPS | C.USE_MSR_BITMAPS)),
        (F.SECONDARY_VM_EXEC_CONTROL, plan.proc2),
        (F.VM_EXIT_CONTROLS, plan.exit_controls),
        (F.VM_ENTRY_CONTROLS, plan.entry_controls),
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
    if plan.proc & C.INTR_WINDOW_EXITING:
        vcpu.request_interrupt_window = True  # exit once the guest can take an interrupt
    if plan.proc & C.NMI_WINDOW_EXITING:
        vcpu.request_nmi_window = True
    if plan.preemption_timer is not None:  # the VMCS value counts TSC >> rate (SDM 25.5.1)
        vcpu.set_preemption_timer(plan.preemption_timer << vcpu.config.preemption_timer_rate)


def _set_up(vcpu: Vcpu, mode: str, entry: int) -> None:
    from pyvmx.kvm.boot import setup_long_mode, setup_protected_mode, setup_real_mode

    {"real": setup_real_mode, "protected": setup_protected_mode, "long": setup_long_mode}[mode](vcpu, entry)


# --- observing -------------------------------------------------------------------------------------
class ExitObserver:
    """The hypervisor's tracer callback feeding the tools' Tracer (kvm_exit/kvm_entry pairs) and a
    kvm_stat-like ExitStats.  Guest time of an exit = guest TSC since this vCPU's previous exit.

    Without tracing or recording it keeps counters only (memory stays constant however many
    exits a run takes); ``keep_exits`` keeps every exit, for ``--record`` and replays."""

    def __init__(self, vm_id: int, trace: bool, *, keep_exits: bool = False) -> None:
        self.tracer = Tracer(vm_id) if trace else None
        self.stats = ExitStats("guest")
        self.last_tsc: dict[int, int] = {}
        self.entry_rip: dict[int, int] = {}  # the RIP each vCPU's next VM entry enters at
        self.vcpus: dict[int, Vcpu] = {}
        self.keep_exits = keep_exits
        self.exits: list[RecordedExit] = []  # every VM exit, with keep_exits (--record / replay)
        self.exit_vcpus: list[int] = []

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
        if self.keep_exits:
            self.exits.append(RecordedExit(rec.reason, rec.qualification, rec.rip, rec.guest_tsc))
            self.exit_vcpus.append(rec.vcpu_id)
        if self.tracer is not None:
            vcpu = self.vcpus.get(rec.vcpu_id)
            entered = self.entry_rip.get(rec.vcpu_id, rec.rip if vcpu is None else -1)
            self.tracer.record_entry(rec.vcpu_id, start, entered if entered >= 0 else rec.rip)
            exit = rec.exit if rec.exit is not None else VmExitInfo(rec.reason, rec.qualification)
            event = self.tracer.record_exit(
                rec.vcpu_id, rec.guest_tsc, exit, rec.rip, code=self.code_at(rec.vcpu_id, rec.rip), tsc_entry=start,
            )
            if vcpu is not None:
                event.details = exit_details(exit, vcpu.get_gpr) or None
            self.tracer.record_outcome(event, _outcome_text(rec.outcome), rec.handler_ns)
            self.entry_rip[rec.vcpu_id] = rec.next_rip


def _outcome_text(outcome: object) -> str:
    return type(outcome).__name__ if not isinstance(outcome, str) else outcome


# --- running ---------------------------------------------------------------------------------------
def run(options: RunOptions, on_progress: Callable[[int], None] | None = None) -> RunResult:
    """Boot ``options.image`` and run it to its end (see the module docstring)."""
    from pyvmx.kvm.kvm import Kvm

    if options.mode not in DEFAULT_LOAD:
        raise RunError(f"unknown mode {options.mode!r} (real, protected, long)")
    if not 1 <= options.memory_mib <= MAX_MEMORY_MIB:
        raise RunError(f"--memory must be between 1 and {MAX_MEMORY_MIB} MiB")
    backable = host_backable_mib()
    if options.memory_mib > backable:
        raise RunError(f"--memory {options.memory_mib} MiB is more than this host can back: at most {backable} MiB (its available RAM less what pyvmx itself needs)")
    if not 1 <= options.vcpus <= MAX_VCPUS or not 1 <= options.pcpus <= MAX_VCPUS:
        raise RunError(f"--vcpus and --pcpus must be between 1 and {MAX_VCPUS}")
    if options.max_tsc < 1:
        raise RunError(f"--max-tsc must be at least 1, not {options.max_tsc}")
    if options.timeout is not None and not options.timeout >= 0:
        raise RunError(f"--timeout must be a number of seconds >= 0, not {options.timeout}")
    if options.gdb is not None and (options.vcpus != 1 or options.pcpus != 1):
        raise RunError("--gdb debugs a single vCPU: use it with --vcpus 1 --pcpus 1")
    plan = plan_intercepts(options.intercepts)  # InterceptError (a ValueError) names the bad token
    for what, path in (("trace", options.trace), ("record", options.record)):
        if path is not None and not path.resolve().parent.is_dir():
            raise RunError(f"cannot write the {what} {path}: no such directory")  # say so before running
    # The modelled host backs every byte of guest RAM (pages are real only once touched).
    kvm = Kvm(cpus=options.pcpus, memory_size=max(HOST_MIB, options.memory_mib + HOST_OVERHEAD_MIB) << 20)
    vm = kvm.create_vm(memory_size=options.memory_mib << 20)
    from pyvmx.tools.multiboot_run import boot_multiboot, qemu_exit_status, setup_vcpu

    multiboot = boot_multiboot(vm, options.image, options.append, options.vcpus, options.memory_mib << 20)  # None: no Multiboot header
    entry, symbols = (multiboot.entry, multiboot.symbols) if multiboot else load_image(vm, options.image, options.mode, options.load_address)
    if options.entry is not None:
        entry = _resolve(options.entry, symbols)
    for gpa in options.swap_out:
        _swap_out(kvm, vm, gpa)
    observer = ExitObserver(vm.id, options.trace is not None, keep_exits=options.keep_exits or options.record is not None)
    vcpus = [vm.create_vcpu() for _ in range(options.vcpus)]
    for vcpu in vcpus:
        setup_vcpu(vcpu, multiboot) if multiboot else _set_up(vcpu, options.mode, entry)
        apply_intercepts(plan, vcpu)
        vcpu.tracer = observer
        observer.vcpus[vcpu.id] = vcpu
        observer.entry_rip[vcpu.id] = vcpu.rip  # the first VM entry enters here
    wall = HostDeadline(options.timeout or None)  # starts counting now; Ctrl-C makes it pass
    if options.gdb is not None:  # gdb's own Ctrl-C stops the guest; the process keeps SIGINT
        ending, status, detail = _run_gdb(vcpus[0], options.gdb, options.max_tsc, options.timeout)
    else:
        with CtrlC(wall) as ctrl_c:
            if options.vcpus == 1 and options.pcpus == 1:
                ending, status, detail = _run_one(vcpus[0], options.max_tsc, on_progress, wall)
            else:
                ending, status, detail = _run_scheduled(kvm, vcpus, options.max_tsc, wall)
        if ctrl_c.pressed and ending == "timeout":
            at = ", ".join(f"vCPU {v.id} RIP {v.rip:#x}" for v in vcpus)
            ending, status, detail = "interrupted", EXIT_INTERRUPTED, f"interrupted (Ctrl-C) at {at}"
    if multiboot and ending == "debug-exit":
        status = qemu_exit_status(vm)
    result = RunResult(ending, status, detail, bytes(vm.serial_output), observer.tracer, observer.stats, [v.stats for v in vcpus])
    if options.record is not None and ending == "interrupted":
        result.detail += "; no record written (an interrupted run does not replay)"
    elif options.record is not None:
        record = Record(_record_config(options), exits=observer.exits, ended_by=detail)
        record.config["exit_vcpus"] = observer.exit_vcpus
        record.config["events"] = _events(vcpus, vm)
        try:
            record.save(options.record)
        except OSError as exc:
            raise RunError(f"cannot write the record {options.record}: {exc.strerror}") from None
    result.events = _events(vcpus, vm)
    result.exit_vcpus = observer.exit_vcpus
    result.exits = observer.exits
    if options.trace is not None and observer.tracer is not None:
        try:
            result.trace_files = observer.tracer.write(options.trace)
        except OSError as exc:
            raise RunError(f"cannot write the trace {options.trace}: {exc.strerror}") from None
    return result


def host_backable_mib() -> int:
    """The most guest RAM (MiB) this machine can back: its available physical memory less what
    the process needs beside guest RAM, at most MAX_MEMORY_MIB (MAX_MEMORY_MIB where the
    system does not say)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    except (AttributeError, OSError, ValueError):
        return MAX_MEMORY_MIB
    return max(0, min(MAX_MEMORY_MIB, available - PROCESS_MARGIN_MIB - HOST_OVERHEAD_MIB))


def _resolve(entry: str, symbols: dict[str, int]) -> int:
    if entry in symbols:
        return symbols[entry]
    try:
        return int(entry, 0)
    except ValueError:
        raise RunError(f"--entry {entry!r} is neither a number nor a symbol of the image") from None


def _run_one(
    vcpu: Vcpu, max_tsc: int, on_progress: Callable[[int], None] | None, wall: HostDeadline | None = None
) -> tuple[str, int, str]:
    from pyvmx.kvm import exits as kx

    used = 0
    chunk = max(1, min(max_tsc, 20_000_000))
    while True:
        if used >= max_tsc:
            return "limit", EXIT_LIMIT, f"guest-TSC limit of {max_tsc} reached"
        before = vcpu.guest_tsc()
        exit = vcpu.run(time_limit=min(chunk, max_tsc - used), wall_deadline=wall)
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


def _run_gdb(vcpu: Vcpu, port: int, max_tsc: int, timeout: float | None = None) -> tuple[str, int, str]:
    """Serve gdb for ``vcpu`` until it detaches or kills the guest; a detached guest runs on to
    its end as usual (``timeout``, in wall-clock seconds, counts from the detach: a debugging
    session takes the time the person at gdb takes)."""
    from pyvmx.tools.gdb_vcpu import VcpuTarget
    from pyvmx.tools.gdbstub import GdbStub, GdbStubError

    target = VcpuTarget(vcpu, max_tsc=max_tsc)
    try:
        stub = GdbStub(target, port=port)
    except GdbStubError as exc:
        raise RunError(f"--gdb: {exc.args[-1]}") from None
    print(f"pyvmx run: gdb server listening on {stub.host}:{stub.port}", file=sys.stderr, flush=True)
    try:
        stub.serve()
    finally:
        stub.close()
    if target.ending is not None:
        return _ending(target.ending) or ("error", EXIT_ERROR, repr(target.ending))
    if target.max_tsc is not None and target.used >= target.max_tsc:
        return "limit", EXIT_LIMIT, f"guest-TSC limit of {max_tsc} reached"
    if stub.log and stub.log[-1] == "k":
        return "error", EXIT_ERROR, f"killed by gdb at {vcpu.rip:#x}"
    return _run_one(vcpu, max(1, max_tsc - target.used), None, HostDeadline(timeout) if timeout else None)


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
    if isinstance(exit, kx.WallClockExit):
        return "timeout", EXIT_TIMEOUT, f"wall-clock limit of {exit.seconds:g} s reached (guest TSC {exit.guest_tsc})"
    return None


def _run_scheduled(kvm: Any, vcpus: Iterable[Vcpu], max_tsc: int, wall: HostDeadline | None = None) -> tuple[str, int, str]:
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
    report = scheduler.run(duration=max_tsc, wall_deadline=wall)
    if endings:
        return endings[0]
    if wall is not None and wall.passed():
        return "timeout", EXIT_TIMEOUT, f"wall-clock limit of {wall.seconds or 0:g} s reached"
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
        console.print(per_vcpu_table({vcpu: dict(s.exits) for vcpu, s in enumerate(result.vcpu_stats)}))
    if result.trace_files:
        console.print(f"pyvmx: {describe_trace_files(result.trace_files)}", highlight=False, markup=False)
    console.print(f"[dim]pyvmx: {result.detail} (exit status {result.status})[/dim]", highlight=False)


# --- swapping, recording, replaying -----------------------------------------------------------------
def _swap_out(kvm: Any, vm: Vm, gpa: int) -> None:
    """Populate the guest page at ``gpa`` and push it to the host's backing store, so that the
    guest's first touch of it is an EPT violation on a non-resident page (async PF)."""
    page = gpa & ~0xFFF
    slot = vm.memslots.gfn_to_memslot(page >> 12)
    if slot is None:
        raise RunError(f"--swap-out {gpa:#x}: no guest RAM there")
    vm.write_guest(page, vm.read_guest(page, 8))  # touch it, so there is something to swap
    kvm.host_mm.swap_out(slot.gfn_to_hva(page >> 12), 4096)


def _events(vcpus: Iterable[Vcpu], vm: Vm) -> dict[str, int]:
    """The asynchronous events the run delivered: timer and other interrupts injected, exceptions
    injected (async "page not present" included), async PFs taken by the guest."""
    vcpus = list(vcpus)
    return {
        "irq_injections": sum(v.stats.irq_injections for v in vcpus),
        "exception_injections": sum(v.stats.exception_injections for v in vcpus),
        "pf_guest": int(vm.mmu.stats.get("pf_guest", 0)),
    }


def _record_config(options: RunOptions) -> dict[str, Any]:
    import base64

    return {
        "kind": "run",
        "image_name": options.image.name,
        "image": base64.b64encode(options.image.read_bytes()).decode(),
        "memory_mib": options.memory_mib, "vcpus": options.vcpus, "pcpus": options.pcpus,
        "mode": options.mode, "load_address": options.load_address, "entry": options.entry,
        "intercepts": list(options.intercepts), "max_tsc": options.max_tsc,
        "swap_out": list(options.swap_out),
    }


def replay_run(record: Record) -> ReplayResult:
    """Re-run a ``pyvmx run --record`` record: the machine is deterministic (guest time is retired
    instructions; the PIT and page-ins run on guest time), so the same image and options must give
    the same VM exits at the same guest TSC, and deliver the same asynchronous events."""
    import tempfile

    c = record.config
    config = run_config_from_json(c)
    with tempfile.TemporaryDirectory() as tmp:
        # The record's image name is shown, never used as a path (it could be "/etc/x" or
        # "../x"): the image is written under a fixed name, keeping only an assembly suffix.
        image = Path(tmp) / ("image" + (config.suffix if config.suffix in ASSEMBLY_SUFFIXES else ""))
        image.write_bytes(config.image)
        options = RunOptions(
            image, config.memory_mib, config.vcpus, config.pcpus, config.mode, config.load_address, config.entry,
            config.intercepts, config.max_tsc, swap_out=config.swap_out, keep_exits=True,
        )
        try:
            result = run(options)
        except ValueError as exc:
            raise RecordError(f"the record's run cannot be set up: {exc}") from None
    difference = first_difference(record.exits, result.exits)
    if difference is None and c.get("exit_vcpus") != result.exit_vcpus:
        difference = "the same exits, but on different vCPUs"
    if difference is None and c.get("events") != result.events:
        difference = f"asynchronous events differ: recorded {c.get('events')}, replayed {result.events}"
    return ReplayResult(record, result.exits, difference)
