"""Running many vCPUs on few physical CPUs (seed 002's last question: "how should a single-core
hypervisor alternate two vCPUs?").

* Each vCPU has its own VMCS. Switching vCPUs on a CPU is a VMPTRLD of the other VMCS -- the
  guest state stays in each VMCS, nothing is copied (KVM's ``vmx_vcpu_load_vmcs()``); the
  registers the VMCS does not hold (GPRs, FPU/SIMD) are saved and restored with the register
  file, as KVM's vcpu_load/vcpu_put do.
* A time slice is enforced with the VMX-preemption timer (SDM 26.5.1): it counts down in guest
  mode whatever the guest does -- an endless loop with interrupts off included -- and its expiry
  is a VM exit that returns the CPU to the scheduler.
* A vCPU that executes HLT leaves the run queue until an event is pending for it: its PIT tick
  (the scheduler idles the CPU until then if nothing else can run) or a kick (KVM_HC_KICK_CPU,
  ``Vcpu.kick()``), or an NMI.
* With several CPUs (run round-robin in this one Python thread, always advancing the CPU whose
  clock is behind, so their clocks stay within a time slice of each other) a vCPU's VMCS migrates:
  VMCLEAR on the old CPU, VMPTRLD and VMLAUNCH -- not VMRESUME -- on the new one (SDM 25.11.3).
  One global run queue: whichever CPU is free takes the next vCPU, so vCPUs move.

Time is the CPUs' clocks (TSC ticks: instructions retired plus idle time); each vCPU's share is
the guest time it spent in VMX non-root operation (``ExitStats.run_tsc``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyvmx.kvm.exits import Halt, Reschedule, VcpuExit
from pyvmx.kvm.vcpu import MpState

if TYPE_CHECKING:
    from pyvmx.engine.deadline import HostDeadline
    from pyvmx.kvm.kvm import Kvm, PhysicalCpu
    from pyvmx.kvm.vcpu import Vcpu

DEFAULT_SLICE = 100_000

ExitCallback = Callable[["Vcpu", VcpuExit], bool]
"""Called when a vCPU returns an exit for the user; return True to keep scheduling it (the exit
was dealt with), False to take it off the CPUs (it stays in :attr:`ScheduleReport.exits`)."""


@dataclass
class VcpuShare:
    """One vCPU's part of a scheduler run."""

    name: str
    run_tsc: int = 0
    slices: int = 0
    halts: int = 0
    wakeups: int = 0
    migrations: int = 0
    cpus: set[int] = field(default_factory=set)


@dataclass
class ScheduleReport:
    """What :meth:`Scheduler.run` did: host time covered, each vCPU's share of guest time, the
    exits that took vCPUs off the CPUs, and why the run ended."""

    duration: int
    shares: dict[Vcpu, VcpuShare]
    exits: dict[Vcpu, VcpuExit]
    idle: dict[int, int]
    stopped_because: str

    def share(self, vcpu: Vcpu) -> VcpuShare:
        return self.shares[vcpu]


class Scheduler:
    """A round-robin scheduler of vCPUs (of one or several VMs) over physical CPUs."""

    def __init__(
        self,
        kvm: Kvm,
        *,
        slice_tsc: int = DEFAULT_SLICE,
        cpus: Iterable[PhysicalCpu] | None = None,
        on_exit: ExitCallback | None = None,
    ) -> None:
        if slice_tsc <= 0:
            raise ValueError(f"a time slice must be positive, not {slice_tsc}")
        self.kvm = kvm
        self.slice_tsc = slice_tsc
        self.cpus = list(cpus) if cpus is not None else list(kvm.pcpus)
        self.on_exit = on_exit
        self.runqueue: deque[Vcpu] = deque()
        self.halted: list[Vcpu] = []
        self.affinity: dict[Vcpu, PhysicalCpu] = {}
        self.exits: dict[Vcpu, VcpuExit] = {}
        self.vcpus: list[Vcpu] = []

    def add(self, vcpu: Vcpu, *, cpu: PhysicalCpu | None = None) -> None:
        """Put a vCPU on the run queue (``cpu`` pins it to one physical CPU)."""
        if vcpu in self.vcpus:
            raise ValueError(f"{vcpu} is already scheduled")
        self.vcpus.append(vcpu)
        if cpu is not None:
            self.affinity[vcpu] = cpu
        if vcpu.mp_state is MpState.HALTED:
            self.halted.append(vcpu)
        else:
            self.runqueue.append(vcpu)

    # --- the loop ---------------------------------------------------------------------------------
    def _pick(self, cpu: PhysicalCpu) -> Vcpu | None:
        for i, vcpu in enumerate(self.runqueue):
            pinned = self.affinity.get(vcpu)
            if pinned is None or pinned is cpu:
                del self.runqueue[i]
                return vcpu
        return None

    def _wake(self, now: int, shares: dict[Vcpu, VcpuShare]) -> None:
        still = []
        for vcpu in self.halted:
            if vcpu.try_wake(now):
                shares[vcpu].wakeups += 1
                self.runqueue.append(vcpu)
            else:
                still.append(vcpu)
        self.halted = still

    def _next_wake(self) -> int | None:
        times = [t for t in (v._wake_time() for v in self.halted) if t is not None]
        return min(times) if times else None

    def run(self, *, duration: int, wall_deadline: HostDeadline | None = None) -> ScheduleReport:
        """Schedule for ``duration`` TSC ticks of host time (every CPU's clock reaches the end),
        until no vCPU can ever run again, or until ``wall_deadline`` (host wall-clock time)
        passes."""
        start = {cpu.cpu_id: cpu.clock() for cpu in self.cpus}
        idle_start = {cpu.cpu_id: cpu.idle for cpu in self.cpus}
        end = min(start.values()) + duration
        shares = {v: VcpuShare(f"{v.vm.name}:{v.id}") for v in self.vcpus}
        run_before = {v: v.stats.run_tsc for v in self.vcpus}
        migrations_before = {v: v.stats.migrations for v in self.vcpus}
        reason = "duration reached"
        while True:
            cpu = min(self.cpus, key=lambda c: c.clock())
            now = cpu.clock()
            if now >= end:
                break
            if wall_deadline is not None and wall_deadline.passed():
                reason = "the host's wall-clock limit passed"
                break
            self._wake(now, shares)
            vcpu = self._pick(cpu)
            if vcpu is None:
                if not self.runqueue and not self.halted:
                    reason = "no vCPU left to run"
                    break
                wake = self._next_wake()
                others_ahead = [c.clock() for c in self.cpus if c is not cpu and c.clock() > now]
                if wake is None and not self.runqueue and not others_ahead:
                    reason = "every vCPU is halted with nothing to wake it"
                    break
                # Nothing for this CPU: idle until a halted vCPU's timer, another CPU catches
                # up, or one time slice has passed -- whichever comes first.
                candidates = [t for t in (wake, end) if t is not None and t > now] + others_ahead
                cpu.idle_until(min([*candidates, now + self.slice_tsc]))
                continue
            share = shares[vcpu]
            share.slices += 1
            share.cpus.add(cpu.cpu_id)
            outcome = vcpu.run_slice(cpu, min(now + self.slice_tsc, end), end, wall_deadline)
            if isinstance(outcome, Halt):
                share.halts += 1
                self.halted.append(vcpu)
            elif isinstance(outcome, Reschedule):
                self.runqueue.append(vcpu)
            else:
                assert isinstance(outcome, VcpuExit)
                if self.on_exit is not None and self.on_exit(vcpu, outcome):
                    self.runqueue.append(vcpu)
                else:
                    self.exits[vcpu] = outcome
        for v in self.vcpus:
            shares[v].run_tsc = v.stats.run_tsc - run_before[v]
            shares[v].migrations = v.stats.migrations - migrations_before[v]
        return ScheduleReport(
            duration=min(c.clock() for c in self.cpus) - min(start.values()),
            shares=shares,
            exits=dict(self.exits),
            idle={c.cpu_id: c.idle - idle_start[c.cpu_id] for c in self.cpus},
            stopped_because=reason,
        )
