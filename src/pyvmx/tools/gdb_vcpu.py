"""A :class:`~pyvmx.tools.gdbstub.DebugTarget` for a vCPU of the KVM-style hypervisor
(:mod:`pyvmx.kvm`), as QEMU's gdbstub drives KVM: registers through KVM_GET/SET_REGS and SREGS,
memory through the guest's page tables (kvm_read_guest_virt() without side effects), software
breakpoints as INT3 with KVM_SET_GUEST_DEBUG(ENABLE | USE_SW_BP) -- a #BP then comes back from
``run()`` as :class:`~pyvmx.kvm.exits.GuestDebugExit` -- and single step with
KVM_GUESTDBG_SINGLESTEP, which the hypervisor implements with the monitor trap flag (an MTF exit
after one instruction, SDM 26.5.2; an instruction the hypervisor emulates ends the step itself,
as kvm_vcpu_do_singlestep() does): the guest's RFLAGS.TF and its #DB are never touched.

Watchpoints (gdb's Z2/Z3/Z4) are page-granular trapping, not debug registers: the guest's DR0-DR7
stay the guest's, and the CPU engine has no data breakpoints.  The hypervisor's MMU tracks the
pages the watched range maps to (:meth:`~pyvmx.kvm.mmu.TdpMmu.track_gfn`: no EPT entry, no huge
page over them), so each access to them is a :class:`~pyvmx.kvm.exits.PageTrackExit` before the
instruction runs, with the guest-linear address of the access (SDM 28.2.1).  The target steps
that instruction with the tracking off, tracks again, and stops if it read or wrote the watched
bytes -- after the instruction, as x86 data breakpoints are traps (SDM 18.2.4).  A write hit is
exact (the bytes changed, or the write starts inside them); for a read the exit gives no size,
so a read starting up to 8 bytes before the range counts.

``cont()`` runs the vCPU in slices of guest time (``run(time_limit=...)``) and checks for gdb's
Ctrl-C between them.  When the guest ends the run (debug-exit port, shutdown, a halt nothing can
end, an error) the exit is kept in :attr:`VcpuTarget.ending` and gdb sees a SIGTRAP stop with a
console message; later resumes report the same stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import VMX_AR_DB_MASK, Cr0, ExceptionVector
from pyvmx.kvm import exits as kx
from pyvmx.kvm.mmu.guest_memory import GuestMemoryError as _KvmMemoryError
from pyvmx.kvm.mmu.guest_memory import GuestPhysicalView
from pyvmx.kvm.vmcs_setup import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_SW_BP
from pyvmx.tools.gdbstub import CORE_REGISTERS, SIGINT, SIGTRAP, SoftwareBreakpoints, StopReason, Watch, WatchKind
from pyvmx.tools.guestmem import GuestMemoryError
from pyvmx.vmx.paging import Access, lookup_linear

PAGE_SIZE = 4096
MAX_ACCESS = 8  # bytes a data access may span, for telling a read's hit (a general-purpose register)
_GPRS = CORE_REGISTERS[:17]  # rax..r15, rip
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_SELECTOR_FIELDS = {name: F[f"GUEST_{name.upper()}_SELECTOR"] for name in _SEGMENTS}


@dataclass
class VcpuTarget(SoftwareBreakpoints):
    """:class:`~pyvmx.tools.gdbstub.DebugTarget` for a :class:`pyvmx.kvm.vcpu.Vcpu`."""

    vcpu: Any
    slice_ticks: int = 200_000  # guest TSC ticks per continue slice (Ctrl-C latency)
    max_tsc: int | None = None  # guest-time budget of the whole session (None: unlimited)
    breakpoints: dict[int, bytes] = field(default_factory=dict)  # address -> original byte
    watches: list[tuple[Watch, list[int]]] = field(default_factory=list)  # with the gfns each tracks
    ending: kx.VcpuExit | None = None  # the exit that ended the run, once it has
    used: int = 0  # guest TSC ticks run so far
    _final: StopReason | None = None

    # registers -------------------------------------------------------------------------------
    def read_registers(self) -> dict[str, int]:
        vcpu = self.vcpu
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        values = {name: int(getattr(regs, name)) for name in _GPRS}
        values["eflags"] = int(regs.rflags)
        for name in _SEGMENTS:
            values[name] = sregs.segment(name).selector
        values["fs_base"] = sregs.fs.base
        values["gs_base"] = sregs.gs.base
        state = vcpu.paging_state()
        values.update(cr0=state.cr0, cr3=state.cr3, cr4=state.cr4, efer=state.efer)
        return values

    def bitness(self) -> int:
        """16, 32 or 64: the code size from CR0.PE, IA32_EFER.LMA and CS.L/CS.D (SDM 3.4.5)."""
        vcpu = self.vcpu
        if not vcpu.vmcs_read(F.GUEST_CR0) & Cr0.PE:
            return 16
        if vcpu.is_64_bit_mode():
            return 64
        return 32 if vcpu.vmcs_read(F.GUEST_CS_AR_BYTES) & VMX_AR_DB_MASK else 16

    def write_registers(self, values: dict[str, int]) -> None:
        vcpu = self.vcpu
        regs = vcpu.get_regs()
        changed = False
        for name, value in values.items():
            if name in _GPRS:
                setattr(regs, name, value & (2**64 - 1))
                changed = True
            elif name == "eflags":
                regs.rflags = value & 0x3F7FD7
                changed = True
            elif name in _SELECTOR_FIELDS and value != vcpu.vmcs_read(_SELECTOR_FIELDS[name]):
                vcpu.vmcs_write(_SELECTOR_FIELDS[name], value & 0xFFFF)  # selector only
        if changed:
            vcpu.set_regs(regs)

    # memory ----------------------------------------------------------------------------------
    def _gpa(self, linear: int, access: Access) -> int:
        """The guest-physical address of ``linear`` by the guest's page tables (no A/D updates)."""
        state = self.vcpu.paging_state()
        if not state.cr0 & 0x80000000:  # paging off: linear = physical
            return linear
        found = lookup_linear(
            linear, Access.READ, 0, cr0=state.cr0, cr3=state.cr3, cr4=state.cr4, efer=state.efer,
            memory=GuestPhysicalView(self.vcpu.vm.memory), maxphyaddr=state.maxphyaddr,
        )
        if found is None:
            raise GuestMemoryError(linear)
        return found.gpa

    def _chunks(self, address: int, size: int, access: Access) -> list[tuple[int, int, int]]:
        out, offset = [], 0
        while offset < size:
            linear = address + offset
            n = min(size - offset, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
            out.append((offset, self._gpa(linear, access), n))
            offset += n
        return out

    def read_memory(self, address: int, size: int) -> bytes:
        memory = self.vcpu.vm.memory
        data = bytearray()
        try:
            for _, gpa, n in self._chunks(address, size, Access.READ):
                data += memory.read(gpa, n)
        except _KvmMemoryError:
            raise GuestMemoryError(address) from None
        return bytes(data)

    def write_memory(self, address: int, data: bytes) -> None:
        memory = self.vcpu.vm.memory
        try:
            for offset, gpa, n in self._chunks(address, len(data), Access.WRITE):
                memory.write(gpa, data[offset : offset + n])
                self._invalidate(address + offset, gpa, n)
        except _KvmMemoryError:
            raise GuestMemoryError(address) from None

    def _invalidate(self, linear: int, gpa: int, size: int) -> None:
        """Drop the CPU engine's translated code for these bytes (an INT3 written behind the
        guest's back is self-modifying code the engine cannot see)."""
        executor = getattr(self.vcpu.pcpu.processor, "executor", None)
        cpu = getattr(executor, "cpu", None)
        if cpu is None:
            return
        cpu.invalidate_code(linear, linear + max(1, size))
        if gpa != linear:
            cpu.invalidate_code(gpa, gpa + max(1, size))

    # watchpoints --------------------------------------------------------------------------------
    def set_watchpoint(self, watch: Watch) -> None:
        """Track the guest pages the watched linear range maps to now (their every access
        exits: :class:`~pyvmx.kvm.exits.PageTrackExit`)."""
        try:
            gfns = sorted({gpa >> 12 for _, gpa, _ in self._chunks(watch.address, watch.length, Access.READ)})
        except _KvmMemoryError:
            raise GuestMemoryError(watch.address) from None
        mmu = self.vcpu.vm.mmu
        for gfn in gfns:
            mmu.track_gfn(gfn)
        self.watches.append((watch, gfns))

    def clear_watchpoint(self, watch: Watch) -> None:
        for i, (known, gfns) in enumerate(self.watches):
            if known == watch:
                for gfn in gfns:
                    self.vcpu.vm.mmu.untrack_gfn(gfn)
                del self.watches[i]
                return

    def detach(self) -> None:
        """The debugger is gone: no page stays tracked for it."""
        for watch, _ in list(self.watches):
            self.clear_watchpoint(watch)

    def _watched_bytes(self) -> dict[Watch, bytes]:
        out = {}
        for watch, _ in self.watches:
            try:
                out[watch] = self.read_memory(watch.address, watch.length)
            except GuestMemoryError:
                pass
        return out

    def _pass_tracked(self, exit: kx.PageTrackExit) -> StopReason | None:
        """Step the instruction that touched a tracked page with the tracking off, then track
        again; a watchpoint it hit stops the guest after it (x86 data breakpoints are traps,
        SDM 18.2.4: gdb expects the stop after the accessing instruction)."""
        mmu = self.vcpu.vm.mmu
        gfns = [gfn for _, tracked in self.watches for gfn in tracked]
        before = self._watched_bytes()
        for gfn in gfns:
            mmu.untrack_gfn(gfn)
        try:
            result = self._single_step()
        finally:
            for gfn in gfns:
                mmu.track_gfn(gfn)
        if isinstance(result, kx.PageTrackExit):  # nothing is tracked during the step
            return StopReason(SIGTRAP, "step")
        if result.kind != "step":
            return result
        watch = self._hit(exit, before)
        return None if watch is None else StopReason(SIGTRAP, "watch", watch=watch)

    def _hit(self, exit: kx.PageTrackExit, before: dict[Watch, bytes]) -> Watch | None:
        """The watchpoint the access hit, with the address gdb is told.  A write hits when the
        watched bytes changed or the access starts inside them; a read when the access starts
        within :data:`MAX_ACCESS` bytes before or inside them (the exit gives no size)."""
        if exit.linear is None or not exit.translated or exit.fetch:
            return None  # an instruction fetch, or the guest's paging structures
        linear = exit.linear
        for watch, _ in self.watches:
            if watch.kind is WatchKind.WRITE:
                if not exit.write:
                    continue
                changed = watch in before and self._watched_bytes().get(watch) != before[watch]
                hit = changed or watch.overlaps(linear, 1)
            else:
                wanted = exit.read if watch.kind is WatchKind.READ else exit.read or exit.write
                hit = wanted and watch.overlaps(linear, MAX_ACCESS)
            if hit:
                address = min(max(linear, watch.address), watch.address + watch.length - 1)
                return Watch(watch.kind, address, watch.length)
        return None

    # running ------------------------------------------------------------------------------------
    def _run(self, limit: int) -> kx.VcpuExit:
        vcpu = self.vcpu
        if self.max_tsc is not None:
            limit = max(1, min(limit, self.max_tsc - self.used))
        before = vcpu.guest_tsc()
        exit: kx.VcpuExit = vcpu.run(time_limit=limit)
        self.used += max(0, vcpu.guest_tsc() - before)
        return exit

    def _out_of_time(self) -> bool:
        return self.max_tsc is not None and self.used >= self.max_tsc

    def _end(self, exit: kx.VcpuExit) -> StopReason:
        """The guest ended the run: remember it, and tell gdb."""
        self.ending = exit
        self._final = StopReason(SIGTRAP, "exited", f"the run ended: {_describe(exit)}")
        return self._final

    def _limit(self) -> StopReason:
        self._final = StopReason(SIGTRAP, "exited", f"the run ended: guest-TSC limit of {self.max_tsc} reached")
        return self._final

    def step(self) -> StopReason:
        """One guest instruction (or the delivery of one event) with KVM_GUESTDBG_SINGLESTEP,
        which the hypervisor implements with the monitor trap flag: the guest's RFLAGS and
        exception bitmap are not touched, so no #DB can reach it.  Exits in between -- an EPT
        violation, an interrupt window, a preemption-timer slice, an I/O exit to user space
        (completed by the next run) -- do not end the step; an instruction the hypervisor
        emulates does (its own GuestDebugExit)."""
        if self._final is not None:
            return self._final
        result = self._single_step()
        if isinstance(result, kx.PageTrackExit):
            return self._pass_tracked(result) or StopReason(SIGTRAP, "step")
        return result

    def _single_step(self) -> StopReason | kx.PageTrackExit:
        vcpu = self.vcpu
        saved_debug = vcpu.guest_debug
        vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP)
        try:
            while True:
                exit = self._run(self.slice_ticks)
                if isinstance(exit, kx.GuestDebugExit):
                    return StopReason(SIGTRAP, "step")
                if isinstance(exit, kx.PageTrackExit):
                    return exit
                if isinstance(exit, (kx.IoExit, kx.TimeLimitExit)):
                    # An OUT/IN no device claims (the next run completes it and ends the step),
                    # or guest time passing (a halted vCPU waits for its interrupt).
                    if self._out_of_time():
                        return self._limit()
                    continue
                return self._end(exit)
        finally:
            vcpu.set_guest_debug(saved_debug)

    def cont(self, interrupted: Callable[[], bool]) -> StopReason:
        if self._final is not None:
            return self._final
        vcpu = self.vcpu
        if vcpu.rip in self.breakpoints:  # step off the breakpoint with the original byte in place
            stop = self.step()
            if stop.kind != "step":
                return stop
            if vcpu.rip in self.breakpoints:
                return StopReason(SIGTRAP, "breakpoint")
        saved_debug = vcpu.guest_debug
        vcpu.set_guest_debug(saved_debug | KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP)
        self._insert()
        try:
            while True:
                if interrupted():
                    return StopReason(SIGINT, "interrupt")
                exit = self._run(self.slice_ticks)
                if isinstance(exit, kx.GuestDebugExit):
                    if exit.rip in self.breakpoints:
                        return StopReason(SIGTRAP, "breakpoint")
                    if exit.vector == ExceptionVector.BP:  # the guest's own INT3: deliver it (SDM 6.15)
                        from pyvmx.kvm.events import software_exception

                        vcpu.queue_event(software_exception(int(ExceptionVector.BP), 1))
                        continue
                    return StopReason(SIGTRAP, "handler", f"debug exception {exit.vector} at {exit.rip:#x}")
                if isinstance(exit, kx.PageTrackExit):
                    self._remove()  # the step over it runs with the original bytes
                    watched = self._pass_tracked(exit)
                    self._insert()
                    if watched is not None:
                        return watched
                    continue
                if isinstance(exit, (kx.IoExit, kx.TimeLimitExit)):
                    if self._out_of_time():
                        return self._limit()
                    continue
                return self._end(exit)
        finally:
            self._remove()
            vcpu.set_guest_debug(saved_debug)


def _describe(exit: kx.VcpuExit) -> str:
    if isinstance(exit, kx.DebugExit):
        return f"the guest wrote {exit.code:#x} to the debug-exit port"
    if isinstance(exit, kx.HltExit):
        return f"halted at {exit.rip:#x}: {exit.reason}"
    if isinstance(exit, kx.ShutdownExit):
        return f"shutdown ({exit.reason}) at {exit.rip:#x}"
    if isinstance(exit, kx.InternalError):
        return f"internal error: {exit.reason}"
    if isinstance(exit, kx.FailEntry):
        return f"VM entry failed: {exit.rule}"
    return repr(exit)
