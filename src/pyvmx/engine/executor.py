"""VMX non-root operation on the Unicorn core: the GuestExecutor under VMLAUNCH/VMRESUME.

One :class:`VmxExecutor` per physical processor.  ``run_guest`` loads the guest-state area into
the core (SDM 27.3.2), injects the VM-entry event (27.6), runs guest code, and decides -- per
SDM ch. 26 -- what becomes a VM exit; then it performs the exit (28.2-28.5) and returns.

How guest execution is watched without slowing it down:
  * each newly translated block is scanned (UC_HOOK_EDGE_GENERATED) for instructions that can
    exit or that the machine must emulate; a code hook is placed on exactly those addresses;
  * the guest's memory accesses are translated by :class:`~pyvmx.vmx.translate.AddressTranslator`
    on every TLB miss, so #PF, EPT violations and misconfigurations are exact;
  * a C block hook (``_icount.c``) counts retired instructions -- the deterministic TSC -- and
    stops before a block that would run past a deadline (the VMX-preemption timer, a timed
    interrupt, the instruction budget; the few instructions left then run one by one, so
    deadlines are exact) or when an interrupt window opens;
  * exceptions that QEMU raises come back through UC_HOOK_INTR and are delivered through the
    guest's IDT by :mod:`pyvmx.vmx.delivery` or turned into exits by the exception bitmap;
  * with the monitor trap flag the core runs one instruction per run (SDM 25.5.2).
Hooks only record a decision and stop the core; everything is acted upon in one place, the loop
in ``_run``.

The VM-exit/VM-entry round trip is kept short for the common VMRESUME that changes little:
controls are decoded again only when the control area changed, the guest state is reloaded
only in the fields the hypervisor changed, an exit writes only the fields the guest changed,
and with VPIDs the TLB survives exits and entries (SDM 29.4.3.1).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, replace
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pyvmx.arch.controls import (
    INTR_INFO_DELIVER_CODE_MASK,
    INTR_INFO_VALID_MASK,
    GuestActivityState,
    GuestInterruptibility,
    InterruptionType,
    VmEntryControls,
    VmExitControls,
)
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.vmcs_fields import VmcsFieldType
from pyvmx.arch.x86 import DR6_BS, ExceptionVector
from pyvmx.engine import canonical, native, resume_flag, syscall
from pyvmx.engine import single_step as step
from pyvmx.engine.code_cache import DecodedInsnCache, engine_code
from pyvmx.engine.block_table import BlockTable
from pyvmx.engine.deadline import HostDeadline
from pyvmx.engine.unicorn_cpu import (
    GPR_IDS,
    HF_CPL_MASK,
    HF_INHIBIT_IRQ_MASK,
    REG_CR0,
    REG_CR2,
    REG_CR4,
    REG_DR0_3,
    REG_DR6,
    REG_DR7,
    REG_RFLAGS,
    REG_RIP,
    UnicornCpu,
)
from pyvmx.vmx import decode as dec
from pyvmx.vmx import event_exits
from pyvmx.vmx import exits as ex
from pyvmx.vmx.delivery import Delivered, EptExit, Event, Intercepted, TripleFault, deliver_with_escalation, is_fault
from pyvmx.vmx.faults import EptMisconfig, EptViolation, NonCanonicalAccess, TranslationFault, X86Fault
from pyvmx.vmx.memory import PAGE_SIZE, PhysicalMemory
from pyvmx.vmx.outcomes import StallKind, VmExitInfo
from pyvmx.vmx.paging import Access
from pyvmx.vmx.state import SEGMENT_NAMES, SS, TR, ArchState, Segment
from pyvmx.vmx.translate import AddressTranslator, PagingMode
from pyvmx.vmx.vmcs import AREA_RANGES, FIELD_SLOTS, VmcsRegion

if TYPE_CHECKING:
    from pyvmx.vmx.processor import Processor

UC_ERR_EXCEPTION = 21
NO_DEADLINE = 2**64 - 1
REP_BATCH = 256  # iterations of an emulated REP INS/OUTS between two looks at pending events
MAX_CODE_HOOKS = 1024  # code hooks on sensitive instructions kept at once (see _hook_sensitive)
UC_MEM_READ, UC_MEM_WRITE, UC_MEM_FETCH = 16, 17, 18
_ACCESS_OF = {UC_MEM_READ: Access.READ, UC_MEM_WRITE: Access.WRITE, UC_MEM_FETCH: Access.FETCH}

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_AC = 1 << 18
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
CR0_PE = 1
CR0_TS = 1 << 3
CR4_TSD = 1 << 2
CR4_PCE = 1 << 8
CR4_SMXE = 1 << 14
CR4_OSXSAVE = 1 << 18
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Vectors that push an error code in protected mode (SDM 6.15).
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})

_SEG_FIELDS = [
    (F[f"GUEST_{n}_SELECTOR"], F[f"GUEST_{n}_BASE"], F[f"GUEST_{n}_LIMIT"], F[f"GUEST_{n}_AR_BYTES"])
    for n in SEGMENT_NAMES
]

# Where fields live in a VMCS region, for the exit path, which writes some fifty of them.
_U64 = struct.Struct("<Q")
_EXIT_INFO_SLOTS = [
    FIELD_SLOTS[int(f)]
    for f in (
        F.VM_EXIT_REASON, F.EXIT_QUALIFICATION, F.GUEST_LINEAR_ADDRESS, F.GUEST_PHYSICAL_ADDRESS,
        F.VM_EXIT_INTR_INFO, F.VM_EXIT_INTR_ERROR_CODE, F.IDT_VECTORING_INFO_FIELD,
        F.IDT_VECTORING_ERROR_CODE, F.VM_EXIT_INSTRUCTION_LEN, F.VMX_INSTRUCTION_INFO,
    )
]
_ENTRY_INTR_INFO_SLOT = FIELD_SLOTS[int(F.VM_ENTRY_INTR_INFO_FIELD)]
_PENDING_DBG_SLOT = FIELD_SLOTS[int(F.GUEST_PENDING_DBG_EXCEPTIONS)]
_SAVED_GUEST_SLOTS = [
    FIELD_SLOTS[int(f)]
    for f in (
        F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4,
        *(field for seg in _SEG_FIELDS for field in seg),
        F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT, F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT,
        F.GUEST_FS_BASE, F.GUEST_GS_BASE,
        F.GUEST_SYSENTER_CS, F.GUEST_SYSENTER_ESP, F.GUEST_SYSENTER_EIP,
    )
]
_HOT_SAVED_SLOTS = [
    FIELD_SLOTS[int(f)]
    for f in (F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_INTERRUPTIBILITY_INFO, F.GUEST_ACTIVITY_STATE)
]
# Guest-area fields a VMRESUME may change without a full reload: their byte ranges within the
# area, and the offsets of RIP, RSP, RFLAGS and the interruptibility state.
_GUEST_AREA_START = AREA_RANGES[VmcsFieldType.GUEST_STATE][0]
_HOT_GUEST_SLOTS = [
    (FIELD_SLOTS[int(f)][0] - _GUEST_AREA_START, FIELD_SLOTS[int(f)][0] - _GUEST_AREA_START + 8)
    for f in (
        F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_INTERRUPTIBILITY_INFO, F.GUEST_ACTIVITY_STATE,
        F.VMX_PREEMPTION_TIMER_VALUE, F.GUEST_PENDING_DBG_EXCEPTIONS,
    )
]
_HOT_GUEST_OFFSETS = [lo for lo, _ in _HOT_GUEST_SLOTS[:4]]

# Control bits as plain ints (IntFlag's & is slow on the hot path).
ENTRY_IA32E_MODE = int(VmEntryControls.IA32E_MODE)
ENTRY_LOAD_IA32_EFER = int(VmEntryControls.LOAD_IA32_EFER)
ENTRY_LOAD_IA32_PAT = int(VmEntryControls.LOAD_IA32_PAT)
ENTRY_LOAD_DEBUG_CONTROLS = int(VmEntryControls.LOAD_DEBUG_CONTROLS)
EXIT_SAVE_DEBUG_CONTROLS = int(VmExitControls.SAVE_DEBUG_CONTROLS)
EXIT_SAVE_IA32_EFER = int(VmExitControls.SAVE_IA32_EFER)
EXIT_SAVE_IA32_PAT = int(VmExitControls.SAVE_IA32_PAT)
EXIT_SAVE_VMX_PREEMPTION_TIMER = int(VmExitControls.SAVE_VMX_PREEMPTION_TIMER)
EXIT_ACK_INTR_ON_EXIT = int(VmExitControls.ACK_INTR_ON_EXIT)
INTERRUPTIBILITY_STI = int(GuestInterruptibility.STI)
INTERRUPTIBILITY_MOV_SS = int(GuestInterruptibility.MOV_SS)
INTERRUPTIBILITY_SHADOW = INTERRUPTIBILITY_STI | INTERRUPTIBILITY_MOV_SS
INTERRUPTIBILITY_NMI = int(GuestInterruptibility.NMI)
ACTIVITY_ACTIVE = int(GuestActivityState.ACTIVE)
ACTIVITY_HLT = int(GuestActivityState.HLT)


# --- what a hook decided ---------------------------------------------------------------------
@dataclass(slots=True)
class ExitDecision:
    """A VM exit to perform before the instruction at ``rip`` executes (or at a boundary)."""

    reason: int
    qualification: int = 0
    instruction_length: int = 0
    instruction_info: int = 0
    guest_linear: int = 0
    guest_physical: int = 0
    intr_info: int = 0
    intr_error_code: int = 0
    rf: bool | None = None  # RFLAGS.RF the exit saves (SDM 28.3.3); None: RF as it is
    vectoring: Event | None = None  # the event being delivered when the exit occurred (SDM 28.2.4)
    pending_dbg: int | None = None  # pending debug exceptions the exit saves (SDM 28.3.4); None: as held


@dataclass(slots=True)
class Emulate:
    """Execute this sensitive instruction in Python (it must not run natively)."""

    insn: dec.DecodedInsn


@dataclass(slots=True)
class NewCode:
    """A freshly translated block holds sensitive instructions that have no hook yet."""

    start: int
    end: int
    addresses: list[int]


class VmxExecutor:
    """Runs guests for one physical processor."""

    def __init__(
        self,
        memory: PhysicalMemory,
        *,
        tsc_per_instruction: int = 1,
        instruction_budget: int | None = 2_000_000_000,
        seed: int = 0,
    ) -> None:
        self.memory = memory
        self.cpu = UnicornCpu(memory)
        # The last page of memory answers for physical addresses with nothing behind them.
        self.translator = AddressTranslator(memory, void_page=memory.size - PAGE_SIZE)
        self.tsc_per_instruction = tsc_per_instruction
        # The events whose delivery ended in the last triple fault (SDM 6.15), first to #DF.
        self.last_triple_fault: tuple[Event, ...] = ()
        self.instruction_budget = instruction_budget
        self.idle_tsc = 0  # TSC ticks in which no instruction retires (halted, VM exits, host work)
        self.rng = random.Random(seed)  # RDRAND/RDSEED: deterministic
        self.processor: Processor | None = None
        self.ctl: ex.ExecControls | None = None
        self.loaded_vmcs: int | None = None
        self.halted = False
        self.nmi_blocked = False
        self.pause_first = -1
        self.pause_last = -1
        self.preemption_deadline: int | None = None
        self._cached_tlb_tag: tuple[int, ...] | None = None  # see _tlb_tag
        self._controls_cache: dict[int, tuple[bytes, ex.ExecControls]] = {}  # VMCS -> controls
        # (VMCS, its controls, guest area) as the last VM exit saved them while the core
        # still holds that state; None once anything else may have changed the core.
        self._saved_guest: tuple[int, ex.ExecControls, bytes] | None = None
        self._resumed = False  # this entry found the guest area as the last exit saved it
        self._system_key = b""  # the core's non-hot guest state at the last full save
        self._insn_cache = DecodedInsnCache(memory)  # decoded sensitive instructions, exact
        self.mtf_pending = False  # an MTF VM exit is pending at the next boundary (SDM 25.5.2)
        self.pending_dbg = 0  # debug exceptions recognized, not yet delivered (SDM 25.4.2)
        self.monitor_armed = False  # MONITOR armed address-range monitoring (SDM 28.2.1 MWAIT)
        self._dr6_before = 0  # DR6 when the current core run started (single_step.raised_conditions)
        self._step_trap = False  # an emulated instruction retired with RFLAGS.TF = 1
        self._iret_unblocked_nmi = False  # the IRET being run removed blocking by NMI (SDM 28.2.2)
        # Data breakpoints of DR7 (single_step.py): what is watched, under which DR7/DR0-DR3,
        # the memory hooks watching, and B0-B3 met by the instruction being run.
        self._data_bps: tuple[step.DataBreakpoint, ...] = ()
        self._data_bp_key: tuple[int, ...] | None = None
        self._data_bp_hooks: list[int] = []
        self._data_hits = 0
        self._stepping_over: int | None = None  # a sensitive instruction run once without deciding
        self.stall: tuple[StallKind, str] | None = None  # why the last entry ended with no exit
        self.host_deadline: HostDeadline | None = None  # a wall-clock limit on runs (polled)
        # Filled by hooks while the core runs; consumed by _run.
        self._decision: ExitDecision | Emulate | NewCode | None = None
        self._fault: tuple[TranslationFault, int, Access] | None = None
        self._exception: tuple[int, bool] | None = None
        self._tb_insns = BlockTable()  # block -> its instructions' addresses (a bounded cache)
        self._count_start = self._count_limit = 0  # the counted run in progress (_run_core)
        self._decided_at: int | None = None  # where a hook stopped the core to act (linear)
        self._examined_at: int | None = None  # the last instruction a hook looked at (linear)
        self._mode: PagingMode | None = None
        self._to_boundary = False  # running up to the non-canonical range (_non_canonical)
        self.code = engine_code(memory, self.cpu)  # translated code vs writes behind the engine
        self.cpu.hook_tlb_fill(self._on_tlb_fill)
        self.cpu.hook_edge(self._on_new_block)
        self.cpu.hook_interrupt(self._on_interrupt)
        self.cpu.hook_invalid(self._on_invalid)

    # --- registers the VMCS does not hold ---------------------------------------------------------
    def read_gpr(self, index: int) -> int:
        return self.cpu.read(GPR_IDS[index])

    def write_gpr(self, index: int, value: int) -> None:
        self.cpu.write(GPR_IDS[index], value)

    def save_register_file(self) -> bytes:
        return self.cpu.register_file()

    def restore_register_file(self, blob: bytes) -> None:
        self.cpu.load_register_file(blob)

    def stall_reason(self) -> str:
        return self.stall[1] if self.stall is not None else "unknown"

    def stall_kind(self) -> StallKind:
        return self.stall[0] if self.stall is not None else StallKind.ENGINE_ERROR

    def _stall(self, kind: StallKind, text: str) -> ExitDecision:
        """No VM exit: the entry returns STALLED (VMRESUME continues the guest)."""
        self.stall = (kind, text)
        return ExitDecision(-1)

    # --- time ----------------------------------------------------------------------------------
    def instructions_retired(self, linear_rip: int | None = None) -> int:
        """Instructions retired, exact: the block counter minus the part of the last block that
        did not run (a hook or fault stopped it midway).  ``linear_rip``: where it stopped, if
        known (CS.base + RIP)."""
        st = self.cpu.icount_state
        count = int(st.icount)
        pc = int(st.last_pc)
        if st.last_icount:
            rip = linear_rip if linear_rip is not None else self.cpu.read(REG_RIP) + self.cpu.cs_base()
            if pc <= rip < pc + int(st.last_size):
                insns = self._block_insns(pc, int(st.last_size))
                if rip in insns:
                    count -= int(st.last_icount) - insns.index(rip)
        return count

    def _block_insns(self, pc: int, size: int) -> Sequence[int]:
        """The instruction addresses of the translated block at ``pc``: as scanned when it was
        translated, or decoded again (the scan cache is bounded)."""
        insns = self._tb_insns.get(pc)
        if insns is None or (insns and insns[-1] >= pc + size):
            addresses, _ = self._scan_block(pc, size, size)
            insns = self._tb_insns.put(pc, addresses)
        return insns

    def _scan_block(self, pc: int, size: int, count: int) -> tuple[Sequence[int], list[dec.DecodedInsn]]:
        """Decode a block: its instructions' addresses and its sensitive instructions."""
        code = self._read_code(pc, size)
        if len(code) == size and size % 2 == 0 and size // 2 <= count and not any(code):
            # Zeroed memory -- ``add %al,(%rax)`` (00 00) in every mode, nothing sensitive: the
            # usual road of a wild jump, no dearer to follow than any other code.
            return range(pc, pc + size, 2), []
        return dec.scan_block(code, pc, self._bitness(), count)

    def _learn_block(self, pc: int, size: int) -> None:
        """The block counter met a translated block its table does not hold (STOP_UNKNOWN_TB):
        decode the block, give the counter its instruction count, and hook any sensitive
        instruction in it that has no hook yet."""
        addresses, sensitive = self._scan_block(pc, size, size)
        self._tb_insns.put(pc, addresses)
        self.cpu.learn_block(pc, size, max(1, len(addresses)))
        self._note_translated(pc, size)
        missing = [i.address for i in sensitive if not self.cpu.has_code_hook(i.address)]
        for insn in sensitive:
            self._cache_insn(insn)
        if missing:
            self._hook_sensitive(missing, pc, pc + size)

    def _hook_sensitive(self, addresses: list[int], start: int, end: int) -> None:
        """Hook the sensitive instructions of the block [start, end) and have it translated
        again.  Unicorn checks every code hook at every instruction it translates, and a hook is
        kept until removed: past MAX_CODE_HOOKS (a guest running through a sled of IN, CPUID...)
        all go and every block is dropped, so that only the blocks that run again get hooks."""
        if self.cpu.code_hooks + len(addresses) > MAX_CODE_HOOKS:
            self.cpu.remove_code_hooks()
            self.cpu.flush_translations()
        for address in addresses:
            self.cpu.add_code_hook(address, self._on_sensitive)
        self.cpu.invalidate_code(start, end)

    def tsc(self) -> int:
        """The guest-visible TSC before TSC offsetting (deterministic virtual time)."""
        return self.instructions_retired() * self.tsc_per_instruction + self.idle_tsc

    def charge_tsc(self, ticks: int) -> None:
        """Time passes on this processor with no guest instruction retiring: a VM exit's round
        trip, the host's work in VMX root operation (see ``Processor.advance_tsc``)."""
        self.idle_tsc += max(0, ticks)

    def _tsc_fast(self) -> int:
        return int(self.cpu.icount_state.icount) * self.tsc_per_instruction + self.idle_tsc

    def _icount_at(self, tsc: int) -> int:
        """The instruction count at which the TSC reaches ``tsc`` (no idling in between)."""
        return max(0, -(-(tsc - self.idle_tsc) // self.tsc_per_instruction))

    # --- GuestExecutor ------------------------------------------------------------------------------
    def invalidate_translations(self, processor: Processor, kind: str, tag: int) -> None:
        """INVEPT/INVVPID: this model caches translations only in the core's TLB, and drops
        them all (invalidating more than asked is allowed, SDM 29.4.3.4)."""
        self._flush_tlb()

    @staticmethod
    def _tlb_tag(vmcs: int, ctl: ex.ExecControls, cr0: int, cr3: int, cr4: int, efer: int) -> tuple[int, ...] | None:
        """What the TLB's contents depend on, when VPIDs let them survive VM exits and entries."""
        if not ctl.vpid_enabled or not ctl.vpid:
            return None
        return (vmcs, ctl.vpid, ctl.eptp if ctl.ept_enabled else -1, cr0, cr3, cr4, efer)

    def run_guest(self, processor: Processor, vmcs: VmcsRegion, launch: bool) -> VmExitInfo:
        self.processor = processor
        self.stall = None
        self._enter(vmcs, launch)
        decision = self._inject_entry_event(vmcs)
        if decision is None:
            deadline = self.host_deadline
            if deadline is None:
                decision = self._run(vmcs)
            else:
                with deadline.attached(self.cpu.stop):  # stops native code once it passes
                    decision = self._run(vmcs)
        info = self._vm_exit(vmcs, decision)
        # The round trip itself takes time, whatever the guest did: every entry that comes back
        # moves the clock, so no chain of exits can hold guest time still.
        self.charge_tsc(processor.profile.vmexit_tsc_cost)
        return info

    # --- VM entry (SDM 27.3.2, 27.5, 27.6, 27.7) ----------------------------------------------------
    def _enter(self, vmcs: VmcsRegion, launch: bool) -> None:
        assert self.processor is not None
        self.ctl = ctl = self._exec_controls(vmcs)
        guest_area = vmcs.area_bytes(VmcsFieldType.GUEST_STATE)
        self._resumed = self._resume_loaded_state(vmcs, ctl, guest_area)
        if not self._resumed:
            self._load_guest_state(vmcs, ctl)
        self._saved_guest = None
        self.translator.eptp = ctl.eptp if ctl.ept_enabled else None
        for index, value in self.processor.entry_msr_loads:
            try:
                self.cpu.write_msr(index, value)
            except Exception:  # MSRs the core does not model are kept by the hypervisor
                pass
        intr = vmcs.read(F.GUEST_INTERRUPTIBILITY_INFO)
        self.nmi_blocked = bool(intr & INTERRUPTIBILITY_NMI)
        self.halted = vmcs.read(F.GUEST_ACTIVITY_STATE) == ACTIVITY_HLT
        self.loaded_vmcs = vmcs.address
        self.mtf_pending = False
        self.pending_dbg = vmcs.read(F.GUEST_PENDING_DBG_EXCEPTIONS) & step.PENDING_TRAP_CONDITIONS
        self.monitor_armed = False  # VM entries clear address-range monitoring (SDM 27.3.4)
        self.pause_first = self.pause_last = -1
        # The VMX-preemption timer (SDM 26.5.1) counts down from its value at entry.
        if ctl.preemption_timer:
            rate = self.processor.profile.preemption_timer_rate
            value = vmcs.read(F.VMX_PREEMPTION_TIMER_VALUE)
            now = self._tsc_fast()
            self.preemption_deadline = ((now >> rate) + value) << rate if value else now
        else:
            self.preemption_deadline = None

    def _exec_controls(self, vmcs: VmcsRegion) -> ex.ExecControls:
        """The controls snapshot, decoded again only when the control area changed."""
        controls = vmcs.area_bytes(VmcsFieldType.CONTROL)
        cached = self._controls_cache.get(vmcs.address)
        if cached is not None and cached[0] == controls:
            return cached[1]
        ctl = ex.ExecControls.from_vmcs(vmcs)
        self._controls_cache[vmcs.address] = (controls, ctl)
        return ctl

    def _resume_loaded_state(self, vmcs: VmcsRegion, ctl: ex.ExecControls, guest_area: bytes) -> bool:
        """VMRESUME of the VMCS whose state the core still holds from its last exit, with only
        RIP, RSP, RFLAGS or non-register state changed since (a hypervisor skipping an
        instruction): load just those.  False when the full load is needed."""
        saved = self._saved_guest
        if saved is None or saved[0] != vmcs.address or saved[1] is not ctl:
            return False
        old = saved[2]
        if old != guest_area:
            patched = bytearray(old)
            for lo, hi in _HOT_GUEST_SLOTS:
                patched[lo:hi] = guest_area[lo:hi]
            if patched != guest_area:
                return False
        rip, rsp, rflags, intr = (_U64.unpack_from(guest_area, off)[0] for off in _HOT_GUEST_OFFSETS)
        old_rflags, old_intr = _U64.unpack_from(old, _HOT_GUEST_OFFSETS[2])[0], _U64.unpack_from(old, _HOT_GUEST_OFFSETS[3])[0]
        if (rflags ^ old_rflags) & RFLAGS_VM or (intr ^ old_intr) & INTERRUPTIBILITY_SHADOW:
            return False  # a mode or hidden-state change: load everything
        cpu = self.cpu
        cpu.write(REG_RFLAGS, rflags)
        cpu.write(GPR_IDS[4], rsp)
        cpu.write(REG_RIP, rip)
        if self._cached_tlb_tag is None:  # no VPID: VM entry drops the cached translations
            self._flush_tlb()
        return True

    def _load_guest_state(self, vmcs: VmcsRegion, ctl: ex.ExecControls) -> None:
        """SDM 27.3.2: load the guest-state area into the core."""
        st = self._guest_state_from_vmcs(vmcs, ctl)
        # SDM 29.4.3.1: without VPIDs every VM entry invalidates linear and combined mappings;
        # with them, the TLB keeps what this VPID cached -- as long as the state it was cached
        # under (same VMCS, EPTP, paging registers) is the one being entered.
        tag = self._tlb_tag(vmcs.address, ctl, st.cr0, st.cr3, st.cr4, st.efer)
        keep = tag is not None and tag == self._cached_tlb_tag
        self.cpu.load_state(st, flush_tlb=False)
        if not keep:
            self._flush_tlb()
        cpu = self.cpu
        cpu.write_msr(0x174, vmcs.read(F.GUEST_SYSENTER_CS))
        cpu.write_msr(0x175, vmcs.read(F.GUEST_SYSENTER_ESP))
        cpu.write_msr(0x176, vmcs.read(F.GUEST_SYSENTER_EIP))
        cpu.write_msr(0xC0000100, st.segments[4].base)
        cpu.write_msr(0xC0000101, st.segments[5].base)
        if ctl.entry_controls & ENTRY_LOAD_IA32_PAT:
            cpu.write_msr(0x277, vmcs.read(F.GUEST_IA32_PAT))

    def _flush_tlb(self) -> None:
        """Drop every cached translation.  (The decoded instructions stay: each use checks the
        host-physical address and bytes they were decoded from.)"""
        self.code.flush_tlb()
        self._cached_tlb_tag = None

    def _guest_state_from_vmcs(self, vmcs: VmcsRegion, ctl: ex.ExecControls) -> ArchState:
        segments = [
            Segment(vmcs.read(sel), vmcs.read(base), vmcs.read(limit), vmcs.read(ar))
            for sel, base, limit, ar in _SEG_FIELDS
        ]
        if ctl.entry_controls & ENTRY_LOAD_IA32_EFER:
            efer = vmcs.read(F.GUEST_IA32_EFER)
        else:
            # SDM 27.3.2.1: LMA from "IA-32e mode guest", LME = LMA when CR0.PG = 1.
            efer = 0
            if ctl.entry_controls & ENTRY_IA32E_MODE:
                efer = EFER_LMA | EFER_LME
        intr = vmcs.read(F.GUEST_INTERRUPTIBILITY_INFO)
        return ArchState(
            rip=vmcs.read(F.GUEST_RIP),
            rsp=vmcs.read(F.GUEST_RSP),
            rflags=vmcs.read(F.GUEST_RFLAGS),
            cr0=vmcs.read(F.GUEST_CR0),
            cr3=vmcs.read(F.GUEST_CR3),
            cr4=vmcs.read(F.GUEST_CR4),
            efer=efer,
            dr7=vmcs.read(F.GUEST_DR7) if ctl.entry_controls & ENTRY_LOAD_DEBUG_CONTROLS else 0x400,
            segments=segments,
            gdtr_base=vmcs.read(F.GUEST_GDTR_BASE),
            gdtr_limit=vmcs.read(F.GUEST_GDTR_LIMIT),
            idtr_base=vmcs.read(F.GUEST_IDTR_BASE),
            idtr_limit=vmcs.read(F.GUEST_IDTR_LIMIT),
            interrupt_shadow=bool(intr & INTERRUPTIBILITY_SHADOW),
        )

    def _inject_entry_event(self, vmcs: VmcsRegion) -> ExitDecision | None:
        """VM-entry event injection (SDM 27.6): deliver through the guest IDT before any
        instruction; faults during delivery follow the normal rules (exception bitmap, #DF)."""
        info = vmcs.read(F.VM_ENTRY_INTR_INFO_FIELD)
        if not info & INTR_INFO_VALID_MASK:
            return self._pending_debug_after_entry(vmcs)
        kind = InterruptionType((info >> 8) & 7)
        vector = info & 0xFF
        if kind is InterruptionType.OTHER_EVENT:
            # Type 7, vector 0: a pending MTF VM exit, even with the control 0 (SDM 27.6.2); it
            # has priority over a pending debug trap, which stays pending (SDM 26.5.2).
            self.mtf_pending = vector == 0
            return None
        error = vmcs.read(F.VM_ENTRY_EXCEPTION_ERROR_CODE) if info & INTR_INFO_DELIVER_CODE_MASK else None
        length = vmcs.read(F.VM_ENTRY_INSTRUCTION_LEN)
        self.halted = False
        if kind is InterruptionType.NMI_INTR:
            self.nmi_blocked = True
        decision = self._deliver(Event(vector, kind, error, length), injected=True)
        assert self.ctl is not None
        # MTF = 1 and a vectored event injected: an MTF VM exit is pending before the first
        # instruction -- after the delivery and any nested exception (SDM 25.5.2).
        self.mtf_pending = decision is None and self.ctl.monitor_trap_flag
        return decision

    def _pending_debug_after_entry(self, vmcs: VmcsRegion) -> ExitDecision | None:
        """SDM 27.7.3: debug conditions in the pending-debug-exceptions field are recognized as
        a #DB trap right after a VM entry that injects no event -- unless blocking by MOV SS holds
        them until after the first instruction (then they join the next trap)."""
        if not self.pending_dbg or vmcs.read(F.GUEST_INTERRUPTIBILITY_INFO) & INTERRUPTIBILITY_MOV_SS:
            return None
        self._dr6_before = self.cpu.read(REG_DR6)
        # A pending event delivered before an instruction can execute is delivered even with the
        # monitor trap flag, and the MTF VM exit is pending after its delivery (SDM 26.5.2) -- an
        # MTF exit here instead would save the #DB as pending again, for ever.
        return self._debug_trap(0, after_entry=True)

    # --- the run loop ------------------------------------------------------------------------------------
    def _run(self, vmcs: VmcsRegion) -> ExitDecision:
        """Run until something causes a VM exit; returns that exit."""
        st = self.cpu.icount_state
        budget_end = None if self.instruction_budget is None else int(st.icount) + self.instruction_budget
        idle_runs, idle_at = 0, (0, 0)
        deadline = self.host_deadline
        while True:
            if deadline is not None and deadline.passed():
                limit = "ended early (Ctrl-C)" if deadline.seconds is None else f"of {deadline.seconds:g} s passed"
                return self._stall(StallKind.HOST_DEADLINE, f"the host's wall-clock limit {limit}")
            decision = self._boundary_events()
            if decision is not None:
                return decision
            if self.halted:
                decision = self._idle()
                if decision is not None:
                    return decision
                continue
            if budget_end is not None and st.icount >= budget_end:
                return self._stall(StallKind.BUDGET, "instruction budget exhausted")
            before = int(st.icount)
            decision = self._execute(budget_end)
            if decision is not None:
                return decision
            # Runs that retire nothing and leave RIP and RSP as they were, again and again (an
            # exception delivered through an IST stack to a handler that raises it again...)
            # would spin forever: report it instead of hanging the host.
            if int(st.icount) != before or self.halted:
                idle_runs = 0
                continue
            at = (self.cpu.read(REG_RIP), self.cpu.read(GPR_IDS[4]))
            idle_runs = idle_runs + 1 if at == idle_at else 1
            idle_at = at
            if idle_runs > 8:
                return self._stall(StallKind.NO_PROGRESS, f"the CPU engine makes no progress at RIP {at[0]:#x}")

    def _execute(self, budget_end: int | None) -> ExitDecision | None:
        """Run guest code up to the next stop.  With the monitor trap flag, exactly one
        instruction (or the delivery of the fault it raised), after which an MTF VM exit is
        pending (SDM 25.5.2)."""
        ctl = self.ctl
        assert ctl is not None
        st = self.cpu.icount_state
        if ctl.monitor_trap_flag:
            st.deadline, st.want_window = NO_DEADLINE, 0  # every boundary is looked at anyway
            decision, executed = self._run_core(1)
            if decision is None and executed:
                self.mtf_pending = True
            return decision
        deadline = self._arm_stops(budget_end)
        decision, _ = self._run_core(0)
        if decision is None and st.stop_reason == native.STOP_DEADLINE and st.icount < deadline:
            # The block hook stopped before a block that would run past the deadline: run the
            # instructions that are left one by one, so timers expire exactly on time.
            remaining = deadline - int(st.icount)
            st.deadline, st.want_window = NO_DEADLINE, 0
            decision, _ = self._run_core(remaining)
        return decision

    def _run_core(self, count: int) -> tuple[ExitDecision | None, bool]:
        """One run of the core from RIP (``count`` instructions at most, 0: no limit) and what
        the hooks decided; also whether the guest made progress (False when the run only
        stopped to hook new code)."""
        st = self.cpu.icount_state
        self._decision = self._fault = self._exception = None
        self._decided_at = self._examined_at = None
        self._count_start, self._count_limit = int(st.icount), count
        self.code.prepare_run()
        self._dr6_before = self.cpu.read(REG_DR6)
        self._data_hits = 0
        if self._watch_data_breakpoints() and not count:
            count = self._count_limit = 1  # one instruction per run: its trap follows it
        # RF = 1: cleared once the first instruction completes (resume_flag.py).
        st.rf_watch = native.RF_WATCH_FIRST_TB if self.cpu.read(REG_RFLAGS) & RFLAGS_RF else 0
        err = self.cpu.run(self.cpu.read(REG_RIP), count)
        while st.stop_reason == native.STOP_UNKNOWN_TB and self._decision is None and self._fault is None and self._exception is None:
            # Stopped between blocks, before one whose count the block counter lacks.
            self._learn_block(int(st.miss_pc), int(st.miss_size))
            st.last_icount = 0
            left = count - (int(st.icount) - self._count_start) if count else 0
            if count and left <= 0:
                break
            self.code.prepare_run()
            err = self.cpu.run(self.cpu.read(REG_RIP), left)
        self._count_limit = 0
        new_code = isinstance(self._decision, NewCode)
        if not new_code:
            self._settle_icount()
        armed = st.rf_watch == native.RF_WATCH_CLEAR or (self.cpu.accelerated and st.rf_watch)
        if armed and int(st.icount) != self._count_start:
            # The run stopped inside its first block, after an instruction completed (or, on the
            # accelerated engine, which has no block hook, anywhere after one did).
            self.cpu.write(REG_RFLAGS, self.cpu.read(REG_RFLAGS) & ~RFLAGS_RF)
        st.rf_watch = 0
        st.last_icount = 0
        progressed = not new_code or int(st.icount) != self._count_start
        return self._after_stop(err), progressed

    def _settle_icount(self) -> None:
        """Make the instruction counter exact after a stop inside a block (a hook, a fault or a
        counted run): the block hook counted the whole block when it started.  (A stop for new
        code comes between blocks: nothing to correct.)"""
        st = self.cpu.icount_state
        if st.stop_reason == native.STOP_NONE and st.last_icount:
            # A hook that decided stopped the core right before its instruction.
            stopped_at = self._decision.insn.address if isinstance(self._decision, Emulate) else self._decided_at
            st.icount = self.instructions_retired(stopped_at)

    def _arm_stops(self, budget_end: int | None) -> int:
        """Tell the block hook when to stop: the earliest timer deadline or the end of the
        instruction budget (returned, in instructions), and whether an interrupt window matters
        now."""
        ctl = self.ctl
        assert ctl is not None and self.processor is not None
        now = self._tsc_fast()
        # An interrupt already pending is no deadline (it would stop every block before it
        # starts): it stays pending while RFLAGS.IF = 0 and is taken at the first boundary where
        # IF = 1 and no STI/MOV-SS blocking (SDM 26.7.5, 6.8.1) -- the window stop finds that.
        # Only an interrupt that becomes pending later is a deadline.
        deadlines = [t for t in (self.preemption_deadline, self.processor.interrupts.next_tsc(after=now)) if t is not None]
        deadline = self._icount_at(min(deadlines)) if deadlines else NO_DEADLINE
        if budget_end is not None:
            deadline = min(deadline, budget_end)
        st = self.cpu.icount_state
        pending = self.processor.interrupts.pending(now)
        want = ctl.interrupt_window_exiting or (pending is not None and not ctl.external_interrupt_exiting)
        if want and self._shadowed():
            # The block hook sees only RFLAGS.IF, not STI/MOV-SS blocking: run the one shadowed
            # instruction and look again.
            deadline = min(deadline, int(st.icount) + 1)
            want = False
        st.deadline = deadline
        st.want_window = int(want)
        return deadline

    def _after_stop(self, err: int) -> ExitDecision | None:
        decision = self._decision
        if isinstance(decision, ExitDecision):
            return decision
        if isinstance(decision, NewCode):
            self._hook_sensitive(decision.addresses, decision.start, decision.end)
            return None
        if isinstance(decision, Emulate):
            return self._emulate_retiring(decision.insn)
        if self._fault is not None:
            return self._translation_fault(*self._fault)
        if self._exception is not None:
            return self._guest_exception(*self._exception)
        if err not in (0, UC_ERR_EXCEPTION):
            return self._stall(StallKind.ENGINE_ERROR, f"the CPU engine stopped with Unicorn error {err}")
        if self.host_deadline is not None and self.host_deadline.passed():
            return None  # stopped from the deadline's thread, anywhere: the run loop ends it
        if err == 0 and not self.cpu.icount_state.stop_reason and self._executed_hlt():
            # A HLT that ran natively (its block predates its hook): same as the emulated one.
            self.halted = True
        if self._data_hits:
            return self._debug_trap(0)  # a data breakpoint met by the instruction that ran
        return None  # a deadline or window stop: the boundary checks decide

    def _executed_hlt(self) -> bool:
        linear = self.cpu.read(REG_RIP) + self.cpu.cs_base() - 1
        return self._read_code(linear, 1) == b"\xf4"

    # --- events at instruction boundaries (SDM 26.7, 6.9 priorities) --------------------------------
    def _boundary_events(self) -> ExitDecision | None:
        """Events recognized between instructions, highest priority first (SDM 6.9 with the VMX
        additions of SDM 25.2, 25.5.1, 25.5.2): MTF VM exits, the VMX-preemption timer,
        NMI-window exits, NMIs, interrupt-window exits, external interrupts."""
        ctl = self.ctl
        assert ctl is not None and self.processor is not None
        if self.mtf_pending:
            self.mtf_pending = False
            return ExitDecision(int(ExitReason.MONITOR_TRAP_FLAG))
        now = self._tsc_fast()
        if self.preemption_deadline is not None and now >= self.preemption_deadline:
            return ExitDecision(int(ExitReason.PREEMPTION_TIMER))
        if ctl.nmi_window_exiting and not self.nmi_blocked and not self._shadowed():
            return ExitDecision(int(ExitReason.NMI_WINDOW))
        irqs = self.processor.interrupts
        if irqs.nmi_pending and not self.nmi_blocked:
            irqs.nmi_pending = False
            if ctl.nmi_exiting:
                info = INTR_INFO_VALID_MASK | (int(InterruptionType.NMI_INTR) << 8) | 2
                return ExitDecision(int(ExitReason.EXCEPTION_NMI), intr_info=info)
            self.nmi_blocked = True
            return self._deliver_at_boundary(Event(2, InterruptionType.NMI_INTR))
        if ctl.interrupt_window_exiting and self._interrupts_open():
            self.halted = False
            return ExitDecision(int(ExitReason.INTERRUPT_WINDOW))
        vector = irqs.pending(now)
        if vector is None:
            return None
        if ctl.external_interrupt_exiting:
            # SDM 26.2: an external interrupt causes a VM exit whatever RFLAGS.IF says.
            info = 0
            if ctl.exit_controls & EXIT_ACK_INTR_ON_EXIT:
                irqs.acknowledge(vector, now)
                info = INTR_INFO_VALID_MASK | (int(InterruptionType.EXT_INTR) << 8) | vector
            self.halted = False
            return ExitDecision(int(ExitReason.EXTERNAL_INTERRUPT), intr_info=info)
        if self._interrupts_open():
            irqs.acknowledge(vector, now)
            return self._deliver_at_boundary(Event(vector, InterruptionType.EXT_INTR))
        return None

    def _deliver_at_boundary(self, event: Event) -> ExitDecision | None:
        """Deliver an NMI or interrupt; with the monitor trap flag an MTF VM exit follows the
        delivery, before the handler's first instruction (SDM 25.5.2)."""
        assert self.ctl is not None
        self.halted = False
        decision = self._deliver(event)
        if decision is None and self.ctl.monitor_trap_flag:
            return ExitDecision(int(ExitReason.MONITOR_TRAP_FLAG))
        return decision

    def _shadowed(self) -> bool:
        return bool(self.cpu.hflags() & HF_INHIBIT_IRQ_MASK)

    def _interrupts_open(self) -> bool:
        """RFLAGS.IF = 1 and no blocking by STI or MOV SS (SDM 26.7.5)."""
        return bool(self.cpu.read(REG_RFLAGS) & RFLAGS_IF) and not self._shadowed()

    def _idle(self) -> ExitDecision | None:
        """HLT activity state: no instruction retires; time jumps to the next event that can
        wake the processor (an interrupt, an NMI, the preemption timer)."""
        assert self.processor is not None
        candidates = [t for t in (self.preemption_deadline, self.processor.interrupts.next_tsc()) if t is not None]
        if self.processor.interrupts.nmi_pending:
            candidates.append(self._tsc_fast())
        if not candidates:
            return self._stall(StallKind.HALTED, "halted with no event that can wake the processor")
        target = min(candidates)
        now = self._tsc_fast()
        if target > now:
            self.idle_tsc += target - now
        vector = self.processor.interrupts.pending(self._tsc_fast())
        ctl = self.ctl
        assert ctl is not None
        if vector is not None and not ctl.external_interrupt_exiting and not self.cpu.read(REG_RFLAGS) & RFLAGS_IF:
            # An interrupt that cannot be delivered does not end HLT; wait for the next event.
            if self.preemption_deadline is None or self.preemption_deadline <= now:
                return self._stall(StallKind.HALTED, "halted with interrupts disabled")
            self.idle_tsc += self.preemption_deadline - self._tsc_fast()
        return None

    # --- hooks (record and stop; never act) -------------------------------------------------------
    def _paging_mode(self) -> PagingMode:
        cr0, cr3, cr4, efer, hflags, eflags = self.cpu.paging_registers()
        return PagingMode(cr0, cr3, cr4, efer, hflags & HF_CPL_MASK, ac=bool(eflags & RFLAGS_AC))

    def _on_tlb_fill(self, uc: Any, vaddr: int, access: int, entry: Any, user: Any) -> bool:
        kind = _ACCESS_OF.get(access, Access.READ)
        try:
            page, perms = self.translator.translate_page(vaddr, kind, self._paging_mode())
        except TranslationFault as fault:
            self._fault = (fault, vaddr, kind)
            return False
        entry.paddr = page
        entry.perms = self.code.fill_permissions(page, perms, kind)
        return True

    def _read_code(self, linear: int, size: int) -> bytes:
        try:
            return self.translator.read_linear(linear, size, self._paging_mode(), Access.FETCH)
        except TranslationFault:
            return b""

    def _bitness(self) -> int:
        h = self.cpu.hflags()
        if h & (1 << 15):
            return 64
        return 32 if h & (1 << 4) else 16

    def _on_new_block(self, uc: Any, cur: Any, prev: Any, user: Any) -> None:
        """A block was just translated (before it runs): scan it for sensitive instructions."""
        pc, size, count = int(cur.pc), int(cur.size), int(cur.icount)
        addresses, sensitive = self._scan_block(pc, size, count)
        self._tb_insns.put(pc, addresses)
        self._note_translated(pc, size)
        for insn in sensitive:
            self._cache_insn(insn)
        missing = [i.address for i in sensitive if not self.cpu.has_code_hook(i.address)]
        if missing and self._decision is None:
            self._decision = NewCode(pc, pc + size, missing)
            self.cpu.stop()

    def _note_translated(self, pc: int, size: int) -> None:
        """Tell the code tracker where a translated block's bytes are (code_cache.py)."""
        fault = self._fault
        self.code.translated(pc, size)
        self._fault = fault  # a failed look-up is no guest fault

    def _cache_insn(self, insn: dec.DecodedInsn) -> None:
        fault = self._fault
        hpa = self.cpu.translate_fetch(insn.address)
        self._fault = fault  # a failed look-up is no guest fault
        if hpa is not None:
            self._insn_cache.put(insn, hpa)

    def _sensitive_insn(self, address: int) -> dec.DecodedInsn | None:
        """The instruction at ``address`` as decoded when its block was scanned -- if the same
        bytes are still at the same host-physical address, in the same mode -- or decoded now."""
        fault = self._fault
        hpa = self.cpu.translate_fetch(address)
        self._fault = fault
        bitness = self._bitness()
        insn = self._insn_cache.get(address, hpa, bitness) if hpa is not None else None
        if insn is not None:
            return insn
        try:
            insn = dec.decode(self._read_code(address, 15), address, bitness)
        except dec.DecodeError:
            return None
        if insn.kind is not None:
            self._cache_insn(insn)
        return insn

    def _on_sensitive(self, uc: Any, address: int, size: int, user: Any) -> None:
        """Just before a sensitive instruction executes: decide (SDM 26.1)."""
        if self._decision is not None:
            return
        if self._count_limit and self._past_counted_run(address):
            return  # Unicorn's count hook has already asked to stop before this instruction
        self._examined_at = address
        insn = self._sensitive_insn(address)
        if insn is None or insn.kind is None:
            return  # the code at this address changed since the hook was placed
        decision = self._decide(insn)
        if decision is not None:
            self._decision = decision
            self._decided_at = address
            self.cpu.stop()

    def _past_counted_run(self, address: int) -> bool:
        """Whether the instruction at ``address`` comes after the last one of the counted run in
        progress.  (Hooks run in the block that holds ``address``, the last one counted.)"""
        st = self.cpu.icount_state
        insns = self._block_insns(int(st.last_pc), int(st.last_size))
        if address not in insns:
            return False  # cannot tell: decide, as an uncounted run would
        done = int(st.icount) - int(st.last_icount) + insns.index(address) - self._count_start
        return done >= self._count_limit

    def _on_interrupt(self, uc: Any, intno: int, user: Any) -> None:
        """QEMU raised an exception or executed INT n (Unicorn does not deliver it)."""
        if self._fault is None and self._decision is None:
            self._exception = (intno, bool(self.cpu.exception_is_int()))
        self.cpu.stop()

    def _on_invalid(self, uc: Any, user: Any) -> bool:
        if self._fault is None and self._decision is None:
            self._exception = (int(ExceptionVector.UD), False)
        self.cpu.stop()
        return True

    # --- decisions for sensitive instructions (SDM 26.1) -------------------------------------------
    def _decide(self, insn: dec.DecodedInsn) -> ExitDecision | Emulate | None:
        ctl = self.ctl
        assert ctl is not None
        mode = self._paging_mode()
        k = dec.InsnKind
        kind = insn.kind
        # XSETBV with CR4.OSXSAVE = 0 is #UD, before the CPL check and the VM exit (SDM 26.1.1,
        # Vol. 2C XSETBV "Protected Mode Exceptions").
        if kind is k.XSETBV and not mode.cr4 & CR4_OSXSAVE:
            return Emulate(insn)
        # Faults based on privilege take priority over VM exits (SDM 26.1.1): let QEMU raise them.
        # MOV DR is the exception: its VM exit comes before the #GP for CPL > 0 (and the #UD for
        # DR4/DR5 with CR4.DE = 1) (SDM 26.1.3 "MOV DR").
        if mode.cpl > 0 and kind in _PRIVILEGED and not (kind in _MOV_DR and ctl.mov_dr_exiting):
            return None
        # GETSEC is #UD when CR4.SMXE = 0, and #UD has priority over the VM exit (SDM 26.1.1).
        if kind is k.GETSEC and not mode.cr4 & CR4_SMXE:
            return None
        if self._fault_before_exit(insn, mode):
            return None  # QEMU raises the fault, which goes through the exception bitmap
        if kind is k.RDPMC and self._rdpmc_faults(mode):
            return Emulate(insn)  # QEMU's RDPMC raises #UD here: the model raises the #GP
        # VMX instructions but VMCALL are #UD outside protected mode, in virtual-8086 mode and
        # in compatibility mode, before the non-root VM exit (SDM 31.3, their pseudocode).
        if kind in _VMX_UD_OUTSIDE_PROTECTED_MODE and (
            not mode.cr0 & CR0_PE
            or self.cpu.read(REG_RFLAGS) & RFLAGS_VM
            or (mode.efer & EFER_LMA and insn.bitness != 64)
        ):
            return None
        reason = ex.instruction_exits(ctl, insn)
        if reason is ex.InjectUD:
            return Emulate(insn)
        if isinstance(reason, ExitReason):
            return self._instruction_exit(reason, insn, mode)
        if kind in syscall.KIND_OF:
            return Emulate(insn)
        if kind in (k.IN, k.OUT, k.INS, k.OUTS):
            if mode.cr0 & CR0_PE and (mode.cpl > ((self.cpu.read(REG_RFLAGS) >> 12) & 3) or self.cpu.read(REG_RFLAGS) & RFLAGS_VM):
                if not self._tss_permits_io(insn, mode):
                    return None  # #GP from the TSS I/O bitmap has priority
            port = insn.port if insn.port is not None else self.cpu.read(GPR_IDS[2]) & 0xFFFF
            size = insn.io_size or 1
            if ex.io_exits(ctl, self.memory, port, size):
                return self._instruction_exit(ExitReason.IO_INSTRUCTION, insn, mode)
            return Emulate(insn)
        if kind in (k.RDMSR, k.WRMSR):
            msr = self.cpu.read(GPR_IDS[1]) & 0xFFFFFFFF
            if ex.msr_exits(ctl, self.memory, msr, kind is k.WRMSR):
                return self._instruction_exit(ExitReason.MSR_WRITE if kind is k.WRMSR else ExitReason.MSR_READ, insn, mode)
            if msr == 0x10:
                return Emulate(insn)  # the TSC is virtual
            return Emulate(insn) if kind is k.WRMSR and self._canonical_check(insn) is not None else None
        if kind is k.MOV_TO_CR:
            value = self._mov_cr_source(insn)
            if insn.cr == 0 and (ex.mov_to_cr0_exits(ctl, value)):
                return self._instruction_exit(ExitReason.CR_ACCESS, insn, mode)
            if insn.cr == 4 and ex.mov_to_cr4_exits(ctl, value):
                return self._instruction_exit(ExitReason.CR_ACCESS, insn, mode)
            if insn.cr == 3 and ex.mov_to_cr3_exits(ctl, value):
                return self._instruction_exit(ExitReason.CR_ACCESS, insn, mode)
            if insn.cr in (0, 4) and (ctl.cr0_mask if insn.cr == 0 else ctl.cr4_mask):
                return Emulate(insn)  # host-owned bits keep their value
            return None
        if kind is k.MOV_FROM_CR:
            if insn.cr in (0, 4) and (ctl.cr0_mask if insn.cr == 0 else ctl.cr4_mask):
                return Emulate(insn)
            return None
        if kind is k.SMSW:
            return Emulate(insn) if ctl.cr0_mask & 0xFFFF else None
        if kind is k.CLTS:
            if ex.clts_exits(ctl):
                return self._instruction_exit(ExitReason.CR_ACCESS, insn, mode)
            return Emulate(insn) if ctl.cr0_mask & CR0_TS else None
        if kind is k.LMSW:
            source = self._lmsw_source(insn, mode)
            if source is None:
                return None  # the operand fetch faults: before the VM exit (SDM 26.1.1)
            if ex.lmsw_exits(ctl, source):
                return self._instruction_exit(ExitReason.CR_ACCESS, insn, mode)
            return Emulate(insn) if ctl.cr0_mask & 0xF else None
        if kind is k.PAUSE:
            return self._pause(insn, mode)
        if kind is k.HLT:
            return Emulate(insn)
        if kind in (k.RDTSC, k.RDTSCP, k.RDRAND, k.RDSEED, k.RDPMC, k.MWAIT, k.MONITOR):
            return Emulate(insn)
        if kind is k.IRET and self.nmi_blocked:
            return Emulate(insn)
        if kind in canonical.CHECKED_KINDS and self._canonical_check(insn) is not None:
            return Emulate(insn)
        if kind is k.INT1:
            return Emulate(insn)  # QEMU has no ICEBP: it would raise #UD
        if kind is k.MOV_TO_DR and insn.address != self._stepping_over:
            return Emulate(insn)  # run it alone: the next run watches the new data breakpoints
        if kind is k.IRET and self._iret_loads_rf(insn):
            self.cpu.icount_state.rf_watch = native.RF_WATCH_FIRST_TB
        return None

    def _canonical_check(self, insn: dec.DecodedInsn) -> X86Fault | canonical.LoadNullLdt | None:
        """pyvmx.engine.canonical: the canonical-address fault (or null LLDT) ``insn`` needs."""
        assert self.processor is not None
        mode = replace(self._paging_mode(), cpl=0, ac=False)  # descriptor reads: implicit supervisor
        return canonical.fault_before(
            insn, self.cpu, self.processor.profile.canonical,
            lambda linear, size: self.translator.read_linear(linear, size, mode),
            lambda m: self._linear_of(m, insn),
        )

    def _fault_before_exit(self, insn: dec.DecodedInsn, mode: PagingMode) -> bool:
        """Instruction-specific faults that have priority over the instruction's VM exit and
        over its emulation here (SDM 26.1.1: #UD, faults based on privilege level): RDTSC/RDTSCP
        at CPL > 0 with CR4.TSD = 1 (after RDTSCP's #UD for "enable RDTSCP" = 0).  The caller lets
        QEMU raise them.  (XSETBV's #UD for CR4.OSXSAVE = 0 comes before even its CPL check:
        _decide delivers it first.)"""
        k = dec.InsnKind
        kind = insn.kind
        assert self.ctl is not None
        if kind is k.RDTSC or (kind is k.RDTSCP and self.ctl.rdtscp_enabled):
            return mode.cpl > 0 and bool(mode.cr4 & CR4_TSD)
        return False

    @staticmethod
    def _rdpmc_faults(mode: PagingMode) -> bool:
        """RDPMC at CPL > 0 with CR4.PCE = 0: #GP(0), before RDPMC exiting (SDM Vol. 2B RDPMC,
        26.1.1)."""
        return mode.cpl > 0 and not mode.cr4 & CR4_PCE

    def _iret_loads_rf(self, insn: dec.DecodedInsn) -> bool:
        if insn.operand_size == 16:
            return False
        st = self.cpu.save_state()
        ss = st.segments[SS]
        image = resume_flag.iret_image_address(insn.operand_size, insn.bitness, st.rsp, ss.base, bool(ss.ar & (1 << 14)))
        mode = self._paging_mode()

        def read_byte(linear: int) -> int | None:
            try:
                return self.translator.read_linear(linear, 1, mode)[0]
            except TranslationFault:
                return None

        return resume_flag.iret_loads_rf(image, read_byte)

    def _pause(self, insn: dec.DecodedInsn, mode: PagingMode) -> ExitDecision | None:
        """PAUSE exiting, or pause-loop exiting at CPL 0 (SDM 26.1.3)."""
        ctl = self.ctl
        assert ctl is not None
        if ctl.pause_exiting:
            return self._instruction_exit(ExitReason.PAUSE_INSTRUCTION, insn, mode)
        if ctl.pause_loop_exiting and mode.cpl == 0:
            now = self.tsc()
            if self.pause_last < 0 or now - self.pause_last > ctl.ple_gap:
                self.pause_first = now
            self.pause_last = now
            if now - self.pause_first > ctl.ple_window:
                self.pause_first = self.pause_last = -1
                return self._instruction_exit(ExitReason.PAUSE_INSTRUCTION, insn, mode)
        return None

    def _instruction_exit(self, reason: ExitReason, insn: dec.DecodedInsn, mode: PagingMode) -> ExitDecision:
        """Exit information for an instruction-caused exit (SDM 28.2.1, 28.2.5); RFLAGS.RF is
        saved as 0 (SDM 28.3.3)."""
        d = ExitDecision(int(reason), instruction_length=insn.length, rf=False)
        rip_next = insn.address - self.cpu.cs_base() + insn.length if insn.memory is not None else 0
        k = dec.InsnKind
        kind = insn.kind
        if reason is ExitReason.IO_INSTRUCTION:
            port = insn.port if insn.port is not None else self.cpu.read(GPR_IDS[2]) & 0xFFFF
            d.qualification = ex.io_qualification(
                insn.io_size or 1, kind in (k.IN, k.INS), kind in (k.INS, k.OUTS), insn.rep, insn.port is not None, port
            )
            if kind in (k.INS, k.OUTS):
                d.instruction_info = ex.ins_outs_instruction_info(insn.address_size, insn.memory.segment if insn.memory else 3)
                d.guest_linear = self._string_io_linear(insn)
        elif reason is ExitReason.CR_ACCESS:
            if kind is k.MOV_TO_CR:
                d.qualification = ex.cr_access_qualification(insn.cr or 0, 0, insn.gpr or 0)
            elif kind is k.MOV_FROM_CR:
                d.qualification = ex.cr_access_qualification(insn.cr or 0, 1, insn.gpr or 0)
            elif kind is k.CLTS:
                d.qualification = ex.cr_access_qualification(0, 2, 0)
            else:
                source = self._lmsw_source(insn, mode) or 0
                d.qualification = ex.cr_access_qualification(0, 3, 0, lmsw_source=source, lmsw_memory=insn.memory is not None)
                if insn.memory is not None:
                    d.guest_linear = self._linear_of(insn.memory, insn)
        elif reason is ExitReason.MWAIT_INSTRUCTION:
            d.qualification = ex.mwait_qualification(self.monitor_armed)
        elif reason is ExitReason.DR_ACCESS:
            d.qualification = ex.mov_dr_qualification(insn.dr or 0, kind is k.MOV_TO_DR, insn.gpr or 0)
        elif reason is ExitReason.INVLPG:
            assert insn.memory is not None
            d.qualification = self._linear_of(insn.memory, insn)
        elif reason in (ExitReason.GDTR_IDTR, ExitReason.LDTR_TR):
            d.instruction_info = ex.descriptor_table_instruction_info(insn)
            d.qualification = ex.exit_qualification_for_memory_operand(insn.memory, rip_next)
        elif reason in (ExitReason.RDRAND, ExitReason.RDSEED):
            d.instruction_info = ex.rdrand_instruction_info(insn.gpr or 0, insn.operand_size)
        elif kind in _VMX_INFO_KINDS:
            d.instruction_info = ex.vmx_instruction_info(insn)
            d.qualification = ex.exit_qualification_for_memory_operand(insn.memory, rip_next)
        return d

    # --- emulation of sensitive instructions that do not exit ------------------------------------------
    def _gpr(self, index: int | None) -> int:
        return self.cpu.read(GPR_IDS[index or 0])

    def _mov_cr_source(self, insn: dec.DecodedInsn) -> int:
        """The source operand of MOV to CR: the full register in 64-bit mode, its low 32 bits
        elsewhere (the operand size of MOV CR is 32 bits outside 64-bit mode, SDM Vol. 2B)."""
        value = self._gpr(insn.gpr)
        return value if insn.bitness == 64 else value & 0xFFFFFFFF

    def _set_gpr(self, index: int, value: int, size: int = 64) -> None:
        if size == 32:
            value &= 0xFFFFFFFF
        self.cpu.write(GPR_IDS[index], value)

    def _skip(self, insn: dec.DecodedInsn) -> None:
        """An instruction emulated here retires: RIP moves past it and it counts; with
        RFLAGS.TF = 1 a single-step trap follows it (SDM 18.3.1.4; the instructions emulated here
        leave TF as it was)."""
        rip = self.cpu.read(REG_RIP)
        self.cpu.write(REG_RIP, rip + insn.length)
        self.cpu.icount_state.icount += 1
        if self.cpu.read(REG_RFLAGS) & RFLAGS_TF:
            self._step_trap = True

    def _emulate_retiring(self, insn: dec.DecodedInsn) -> ExitDecision | None:
        """Emulate ``insn``; if it retired under RFLAGS.TF = 1, the single-step #DB trap that
        follows it (single_step.py)."""
        self._step_trap = False
        decision = self._emulate(insn)
        if self._step_trap:
            self._step_trap = False
            if decision is None:
                self._dr6_before = self.cpu.read(REG_DR6)
                return self._debug_trap(DR6_BS)
        return decision

    # --- debug exceptions (single_step.py) -------------------------------------------------------------
    def _debug_exception(self, error: int | None) -> ExitDecision | None:
        """A #DB QEMU raised: the single-step trap of RFLAGS.TF (DR6.BS) or a breakpoint
        condition; a general-detect fault (DR6.BD alone) is a fault like any other."""
        dr6 = self.cpu.read(REG_DR6)
        conditions = step.raised_conditions(self._dr6_before, dr6)
        if not conditions & step.TRAP_CONDITIONS:
            event = Event(int(ExceptionVector.DB), InterruptionType.HARD_EXCEPTION)
            if self._intercepted(event):
                self.cpu.write(REG_DR6, self._dr6_before)  # a #DB exit does not load DR6 (SDM 28.1)
                return self._exception_exit(event, None, None, debug=conditions)
            return self._deliver(event)
        return self._debug_trap(conditions)

    def _debug_trap(self, conditions: int, *, after_entry: bool = False) -> ExitDecision | None:
        """A #DB trap at this boundary with ``conditions`` (DR6 bits), joined by the debug
        exceptions still pending from VM entry: an MTF VM exit that saves them as pending, a VM
        exit through the exception bitmap, or delivery (SDM 26.5.2, 28.2.1, 28.3.4).
        ``after_entry``: the #DB recognized right after VM entry (SDM 27.7.3), which no MTF VM
        exit pre-empts; one is pending after its delivery instead (SDM 26.5.2)."""
        assert self.ctl is not None
        conditions |= self.pending_dbg | self._data_hits
        self.pending_dbg = self._data_hits = 0
        event = Event(int(ExceptionVector.DB), InterruptionType.HARD_EXCEPTION)
        mtf = self.ctl.monitor_trap_flag or self.mtf_pending
        fate = step.disposition(mtf=mtf and not after_entry, intercepted=self._intercepted(event))
        if fate is not step.TrapDisposition.DELIVER:
            self.cpu.write(REG_DR6, self._dr6_before)  # not delivered: DR6 is not updated
        if fate is step.TrapDisposition.MTF_EXIT:
            self.mtf_pending = False
            return ExitDecision(int(ExitReason.MONITOR_TRAP_FLAG), pending_dbg=step.pending_debug_exceptions(conditions))
        if fate is step.TrapDisposition.BITMAP_EXIT:
            return self._exception_exit(event, None, None, debug=conditions)
        self.cpu.write(REG_DR6, self.cpu.read(REG_DR6) | conditions)
        decision = self._deliver(event)
        if after_entry and decision is None and self.ctl.monitor_trap_flag:
            self.mtf_pending = True
        return decision

    def _watch_data_breakpoints(self) -> bool:
        """Keep memory hooks on the ranges of the data breakpoints DR7 enables (re-armed when
        DR7 or DR0-DR3 change); whether any is enabled."""
        dr7 = self.cpu.read(REG_DR7)
        if not step.any_data_breakpoint(dr7):
            if self._data_bp_key is not None:
                self._unhook_data_breakpoints()
            return False
        addresses = [self.cpu.read(r) for r in REG_DR0_3]
        mode = self._paging_mode()
        key = (dr7, *addresses, mode.cr0, mode.cr3, mode.cr4, mode.efer)
        if key != self._data_bp_key:
            self._unhook_data_breakpoints()
            self._data_bp_key = key
            # Unicorn's memory hooks see host-physical addresses: watch where the ranges map now.
            physical = []
            for bp in step.data_breakpoints(dr7, addresses):
                try:
                    page, _ = self.translator.translate_page(bp.start, Access.READ, replace(mode, cpl=0))
                except TranslationFault:
                    continue  # not mapped: no access can reach it
                physical.append(replace(bp, start=page | (bp.start & (PAGE_SIZE - 1))))
            self._data_bps = tuple(physical)
            for bp in self._data_bps:
                hook = self.cpu.add_data_hook(bp.start, bp.start + bp.length - 1, bp.writes_only, self._on_data_access)
                self._data_bp_hooks.append(hook)
            self.cpu.flush_translations()  # blocks translated before do not call the hooks
            self._flush_tlb()  # nor do accesses through TLB entries filled before
        return True

    def _unhook_data_breakpoints(self) -> None:
        for hook in self._data_bp_hooks:
            self.cpu.remove_hook(hook)
        self._data_bp_hooks.clear()
        self._data_bps, self._data_bp_key = (), None

    def _on_data_access(self, uc: Any, access: int, address: int, size: int, value: int, user: Any) -> None:
        """A data access to a watched range (``address``: host-physical, as Unicorn reports)."""
        self._data_hits |= step.hit_conditions(self._data_bps, address, size, access == UC_MEM_WRITE)

    def _emulate(self, insn: dec.DecodedInsn) -> ExitDecision | None:
        ctl = self.ctl
        assert ctl is not None and self.processor is not None
        k = dec.InsnKind
        kind = insn.kind
        cpu = self.cpu
        if ex.instruction_exits(ctl, insn) is ex.InjectUD or kind is k.XSETBV:
            return self._deliver_or_exit(Event(int(ExceptionVector.UD), InterruptionType.HARD_EXCEPTION))
        if kind in canonical.CHECKED_KINDS:
            action = self._canonical_check(insn)
            if isinstance(action, X86Fault):
                return self._guest_fault(action)
            if isinstance(action, canonical.LoadNullLdt):
                canonical.load_null_ldt(cpu, action)
                self._skip(insn)
                return None
            if kind is not k.WRMSR:
                return self._run_core(1)[0]  # nothing to check any more: the engine runs it
        if kind in syscall.KIND_OF:
            # A single-step trap follows if TF was set when the instruction began (SDM 18.3.1.4):
            # after SYSCALL/SYSENTER whatever FMASK does to TF, never after a SYSRET that sets it.
            trap = bool(cpu.read(REG_RFLAGS) & RFLAGS_TF)
            raised = syscall.run_fast_call(cpu, insn, self.processor.profile.canonical)
            if raised is not None:
                return self._guest_fault(raised)
            cpu.icount_state.icount += 1
            self._step_trap = trap
            return None
        if kind is k.MOV_TO_DR:
            self._stepping_over = insn.address
            try:
                return self._run_core(1)[0]
            finally:
                self._stepping_over = None
        if kind is k.INT1:
            # ICEBP: #DB as a privileged software exception (type 5), pushing the address past
            # the instruction; through the exception bitmap like any exception (SDM 26.2).
            decision = self._deliver_or_exit(
                Event(int(ExceptionVector.DB), InterruptionType.PRIV_SW_EXCEPTION, None, insn.length)
            )
            if decision is None:
                cpu.icount_state.icount += 1
            return decision
        if kind in (k.RDTSC, k.RDTSCP):
            tsc = self.tsc() + (ctl.tsc_offset if ctl.use_tsc_offsetting else 0)
            tsc &= 0xFFFFFFFFFFFFFFFF
            self._set_gpr(0, tsc & 0xFFFFFFFF)
            self._set_gpr(2, tsc >> 32)
            if kind is k.RDTSCP:
                self._set_gpr(1, cpu.read_msr(0xC0000103) & 0xFFFFFFFF)
        elif kind in (k.RDMSR, k.WRMSR):  # IA32_TSC only
            if kind is k.RDMSR:
                tsc = self.tsc() + (ctl.tsc_offset if ctl.use_tsc_offsetting else 0)
                self._set_gpr(0, tsc & 0xFFFFFFFF)
                self._set_gpr(2, (tsc >> 32) & 0xFFFFFFFF)
        elif kind in (k.RDRAND, k.RDSEED):
            bits = insn.operand_size
            value = self.rng.getrandbits(bits)
            reg = GPR_IDS[insn.gpr or 0]
            old = cpu.read(reg)
            if bits == 16:
                value = (old & ~0xFFFF) | value
            cpu.write(reg, value)
            cpu.write(REG_RFLAGS, (cpu.read(REG_RFLAGS) & ~0x8D5) | 1)  # CF=1, others 0
        elif kind is k.RDPMC:
            if self._rdpmc_faults(self._paging_mode()):
                return self._deliver_or_exit(Event(int(ExceptionVector.GP), InterruptionType.HARD_EXCEPTION, 0))
            self._set_gpr(0, 0)
            self._set_gpr(2, 0)
        elif kind is k.HLT:
            self._skip(insn)
            self.halted = True
            return None
        elif kind is k.MONITOR:
            self.monitor_armed = True
        elif kind is k.MWAIT:
            self.monitor_armed = False  # MWAIT (a no-op here) leaves the monitor disarmed
        elif kind is k.MOV_FROM_CR:
            real = cpu.read(REG_CR0 if insn.cr == 0 else REG_CR4)
            mask, shadow = (ctl.cr0_mask, ctl.cr0_shadow) if insn.cr == 0 else (ctl.cr4_mask, ctl.cr4_shadow)
            value = ex.cr_read_value(real, mask, shadow)
            self._set_gpr(insn.gpr or 0, value, 64 if insn.operand_size == 64 else 32)
        elif kind is k.SMSW:
            value = ex.cr_read_value(cpu.read(REG_CR0), ctl.cr0_mask, ctl.cr0_shadow)
            if insn.memory is not None:
                linear = self._linear_of(insn.memory, insn)
                try:
                    self.translator.write_linear(linear, (value & 0xFFFF).to_bytes(2, "little"), self._paging_mode())
                except TranslationFault as exc:
                    return self._translation_fault(exc, linear, Access.WRITE)
            else:
                size = insn.operand_size
                reg = GPR_IDS[insn.gpr or 0]
                old = cpu.read(reg)
                cpu.write(reg, (old & ~0xFFFF) | (value & 0xFFFF) if size == 16 else value & ((1 << size) - 1))
        elif kind is k.MOV_TO_CR:
            value = self._mov_cr_source(insn)
            if insn.cr == 0:
                fault = self._write_cr0(ex.cr_write_result(cpu.read(REG_CR0), value, ctl.cr0_mask))
            else:
                fault = self._write_cr4(ex.cr_write_result(cpu.read(REG_CR4), value, ctl.cr4_mask))
            if fault is not None:
                return self._deliver_or_exit(fault)
        elif kind is k.CLTS:
            if not ctl.cr0_mask & CR0_TS:
                cpu.write(REG_CR0, cpu.read(REG_CR0) & ~CR0_TS)
        elif kind is k.LMSW:
            source = self._lmsw_source(insn, self._paging_mode()) or 0
            fault = self._write_cr0(ex.lmsw_result(cpu.read(REG_CR0), source, ctl.cr0_mask))
            if fault is not None:
                return self._deliver_or_exit(fault)
        elif kind in (k.IN, k.OUT, k.INS, k.OUTS):
            return self._emulate_io(insn)
        elif kind is k.IRET:
            # Virtual-NMI / NMI blocking ends with IRET (SDM 6.7.1): run it, then unblock.  An
            # exit for a fault on this IRET reports the unblocking (SDM 28.2.2, 28.2.1).
            self.nmi_blocked = False
            st = self.cpu.icount_state
            st.deadline, st.want_window = NO_DEADLINE, 0
            self._iret_unblocked_nmi = True
            try:
                return self._run_core(1)[0]
            finally:
                self._iret_unblocked_nmi = False
        self._skip(insn)
        return None

    def _write_cr0(self, value: int) -> Event | None:
        """MOV to CR0 that did not exit: #GP for invalid combinations and the VMX fixed bits
        (SDM 26.3, 2.5) -- returned for the caller to raise (the instruction does not retire) --
        else load it (mode switches follow)."""
        assert self.processor is not None and self.ctl is not None
        profile = self.processor.profile
        fixed0 = profile.cr0_fixed0
        if self.ctl.unrestricted_guest:
            fixed0 &= ~(1 | (1 << 31))
        pg, pe = value >> 31 & 1, value & 1
        nw, cd = value >> 29 & 1, value >> 30 & 1
        if (pg and not pe) or (nw and not cd) or value & fixed0 != fixed0 or value >> 32:
            return Event(13, InterruptionType.HARD_EXCEPTION, 0)
        efer = self.cpu.read_msr(0xC0000080)
        if pg and efer & (1 << 8) and not self.cpu.read(REG_CR4) & (1 << 5):
            return Event(13, InterruptionType.HARD_EXCEPTION, 0)
        self.cpu.write(REG_CR0, value)
        self.cpu.flush_tlb()
        return None

    def _write_cr4(self, value: int) -> Event | None:
        assert self.processor is not None
        profile = self.processor.profile
        if value & profile.cr4_fixed0 != profile.cr4_fixed0 or value & ~profile.cr4_fixed1:
            return Event(13, InterruptionType.HARD_EXCEPTION, 0)
        self.cpu.write(REG_CR4, value)
        self.cpu.flush_tlb()
        return None

    def _lmsw_source(self, insn: dec.DecodedInsn, mode: PagingMode) -> int | None:
        """LMSW's source operand; None when fetching a memory operand faults."""
        if insn.memory is not None:
            try:
                return int.from_bytes(self.translator.read_linear(self._linear_of(insn.memory, insn), 2, mode), "little")
            except TranslationFault:
                return None
        return self._gpr(insn.gpr) & 0xFFFF

    def _linear_of(self, m: dec.MemOperand, insn: dec.DecodedInsn) -> int:
        regs = [self.cpu.read(r) for r in GPR_IDS]
        st = self.cpu.save_state()
        bases = [s.base for s in st.segments[:6]]
        return dec.effective_address(m, regs, bases, insn.address - self.cpu.cs_base() + insn.length)

    def _string_io_linear(self, insn: dec.DecodedInsn) -> int:
        st = self.cpu.save_state()
        mask = (1 << insn.address_size) - 1
        if insn.kind is dec.InsnKind.INS:
            return (st.segments[0].base + (self.cpu.read(GPR_IDS[7]) & mask)) & 0xFFFFFFFFFFFFFFFF
        seg = insn.memory.segment if insn.memory else 3
        return (st.segments[seg].base + (self.cpu.read(GPR_IDS[6]) & mask)) & 0xFFFFFFFFFFFFFFFF

    def _tss_permits_io(self, insn: dec.DecodedInsn, mode: PagingMode) -> bool:
        """The I/O permission bit map in the TSS (SDM 19.5.2), checked when CPL > IOPL."""
        st = self.cpu.save_state()
        tr = st.segments[TR]
        port = insn.port if insn.port is not None else self.cpu.read(GPR_IDS[2]) & 0xFFFF
        size = insn.io_size or 1
        try:
            if tr.limit < 0x67:
                return False
            base = int.from_bytes(self.translator.read_linear(tr.base + 0x66, 2, replace(mode, cpl=0)), "little")
            last = base + (port + size - 1) // 8
            if last + 1 > tr.limit:
                return False
            raw = self.translator.read_linear(tr.base + base + port // 8, 2, replace(mode, cpl=0))
        except TranslationFault:
            return False
        bits = int.from_bytes(raw, "little") >> (port % 8)
        return bits & ((1 << size) - 1) == 0

    def _string_io_address(self, linear: int, size: int, access: Access, mode: PagingMode, pages: dict[int, int]) -> int | None:
        """The host-physical address of one INS/OUTS element, translating each page once per
        batch (None: the element crosses a page boundary; go through the translator)."""
        offset = linear & (PAGE_SIZE - 1)
        if offset + size > PAGE_SIZE:
            return None
        page = linear - offset
        hpa = pages.get(page)
        if hpa is None:
            hpa, _ = self.translator.translate_page(linear, access, mode)
            pages[page] = hpa
        return hpa + offset

    def _emulate_io(self, insn: dec.DecodedInsn) -> ExitDecision | None:
        """I/O that does not exit goes to the physical platform's ports (SDM 26.1.3)."""
        assert self.processor is not None
        k = dec.InsnKind
        cpu = self.cpu
        size = insn.io_size or 1
        port = insn.port if insn.port is not None else cpu.read(GPR_IDS[2]) & 0xFFFF
        bus = self.processor
        if insn.kind is k.IN:
            value = bus.port_read(port, size)
            rax = cpu.read(GPR_IDS[0])
            if size == 4:
                cpu.write(GPR_IDS[0], value & 0xFFFFFFFF)
            else:
                mask = (1 << (8 * size)) - 1
                cpu.write(GPR_IDS[0], (rax & ~mask) | (value & mask))
        elif insn.kind is k.OUT:
            bus.port_write(port, size, cpu.read(GPR_IDS[0]) & ((1 << (8 * size)) - 1))
        else:
            mode = self._paging_mode()
            amask = (1 << insn.address_size) - 1
            count = cpu.read(GPR_IDS[1]) & amask if insn.rep else 1
            step = -size if cpu.read(REG_RFLAGS) & (1 << 10) else size
            index = 7 if insn.kind is k.INS else 6
            st = cpu.save_state()
            seg_base = st.segments[0].base if insn.kind is k.INS else st.segments[insn.memory.segment if insn.memory else 3].base
            done = 0
            # A REP string instruction may stop between iterations (SDM Vol. 1 7.3.9.2): do at
            # most a batch here, then let timers and interrupts have their boundary.
            access = Access.WRITE if insn.kind is k.INS else Access.READ
            pages: dict[int, int] = {}  # linear page -> host-physical page, for this batch
            while count and done < REP_BATCH:
                ptr = cpu.read(GPR_IDS[index])
                linear = (seg_base + (ptr & amask)) & 0xFFFFFFFFFFFFFFFF
                try:
                    hpa = self._string_io_address(linear, size, access, mode, pages)
                    if insn.kind is k.INS:
                        data = bus.port_read(port, size).to_bytes(size, "little")
                        if hpa is None:
                            self.translator.write_linear(linear, data, mode)
                        else:
                            self.memory.write(hpa, data)
                    else:
                        data = self.translator.read_linear(linear, size, mode) if hpa is None else self.memory.read(hpa, size)
                        bus.port_write(port, size, int.from_bytes(data, "little"))
                except TranslationFault as fault:
                    return self._translation_fault(fault, linear, access)
                cpu.write(GPR_IDS[index], (ptr & ~amask) | ((ptr + step) & amask))
                count -= 1
                done += 1
                if insn.rep:
                    rcx = cpu.read(GPR_IDS[1])
                    cpu.write(GPR_IDS[1], (rcx & ~amask) | ((rcx - 1) & amask))
            # Each iteration counts as an instruction, as QEMU counts the REP string
            # instructions it runs itself; the last one retires the instruction.
            if count:
                cpu.icount_state.icount += done
                return None
            cpu.icount_state.icount += max(0, done - 1)
        self._skip(insn)
        return None

    # --- faults and exceptions ------------------------------------------------------------------------
    def _exact_fault_address(self, page: int, access: Access) -> int:
        """The byte address of a fault the TLB reported by page: the instruction's memory operand
        that lies on that page (or the page itself for a fetch / access that crossed into it)."""
        if self.cpu.exact_fill_address:
            return page  # the accelerated engine's TLB fill reported the byte address itself
        rip = self.cpu.read(REG_RIP) + self.cpu.cs_base()
        if access is Access.FETCH:
            return rip if rip & ~(PAGE_SIZE - 1) == page else page
        code = self._read_code(rip, 15)
        try:
            accesses = dec.memory_operands(code, rip, self._bitness())
        except dec.DecodeError:
            return page
        regs = [self.cpu.read(r) for r in GPR_IDS]
        st = self.cpu.save_state()
        bases = [s.base for s in st.segments[:6]]
        next_rip = self.cpu.read(REG_RIP) + (len(dec.decode(code, rip, self._bitness()).raw) if code else 0)
        for m in accesses:
            linear = dec.effective_address(m, regs, bases, next_rip)
            if linear & ~(PAGE_SIZE - 1) == page:
                return linear
            if linear < page < linear + m.size:
                return page
        return page

    def _translation_fault(self, fault: TranslationFault, address: int, access: Access) -> ExitDecision | None:
        """A TLB fill that failed: a #PF for the guest (or the exception bitmap), or an EPT
        violation / misconfiguration exit (SDM 28.2.1 Table 28-7, 29.3.3)."""
        if isinstance(fault, NonCanonicalAccess):
            return self._non_canonical(address, access)
        if isinstance(fault, X86Fault):
            cr2 = fault.cr2 if fault.cr2 is not None else address
            if cr2 & (PAGE_SIZE - 1) == 0:
                cr2 = self._exact_fault_address(cr2, access)
            return self._guest_fault(X86Fault(fault.vector, fault.error_code, cr2=cr2))
        if isinstance(fault, EptViolation):
            linear = fault.guest_linear if fault.guest_linear is not None else address
            exact = self._exact_fault_address(linear & ~(PAGE_SIZE - 1), access) if linear & (PAGE_SIZE - 1) == 0 else linear
            gpa = fault.guest_physical
            if fault.qualification & (1 << 8):  # an access to the linear address: same offset
                gpa = (gpa & ~(PAGE_SIZE - 1)) | (exact & (PAGE_SIZE - 1))
            return ExitDecision(
                int(ExitReason.EPT_VIOLATION),
                qualification=fault.qualification | self._nmi_unblocking_bit(),
                guest_linear=exact if fault.qualification & (1 << 7) else 0,
                guest_physical=gpa,
                rf=True,  # not during event delivery (SDM 28.3.3)
            )
        assert isinstance(fault, EptMisconfig)
        gpa = fault.guest_physical
        if not fault.paging_structure:  # the access itself: the offset of its linear address
            linear = self._exact_fault_address(address & ~(PAGE_SIZE - 1), access) if address & (PAGE_SIZE - 1) == 0 else address
            gpa = (gpa & ~(PAGE_SIZE - 1)) | (linear & (PAGE_SIZE - 1))
        return ExitDecision(int(ExitReason.EPT_MISCONFIG), guest_physical=gpa, rf=True)

    def _non_canonical(self, address: int, access: Access) -> ExitDecision | None:
        """#GP(0) / #SS(0) for a non-canonical access (pyvmx.engine.canonical); a fetch right
        after a near branch is the branch's #GP. QEMU translates a block ahead of execution:
        a fetch that failed beyond the instruction at RIP is run up to, one instruction at a
        time, so the #GP comes where execution reaches the non-canonical range."""
        assert self.processor is not None
        st = self.cpu.icount_state
        if access is Access.FETCH:
            rip = self.cpu.read(REG_RIP) + self.cpu.cs_base()
            ahead = address - rip
            if 0 < ahead and canonical.insn_fits(self._read_code(rip, min(ahead, 15)), rip, self._bitness()):
                if self._to_boundary:
                    return None  # the step ran; the engine's count stop looked ahead: next step
                # One instruction, translated alone: QEMU ends a block after one instruction
                # when it starts in an interrupt shadow (and drops the shadow after it).
                self._to_boundary = True
                try:
                    canonical.translate_one_instruction(self.cpu)
                    return self._run_core(1)[0]
                finally:
                    self._to_boundary = False
            if int(st.icount) > self._count_start and st.last_size:
                insns = self._block_insns(int(st.last_pc), int(st.last_size))
                if insns and canonical.rewind_branch(self.cpu, self._read_code(insns[-1], 15), insns[-1], self._bitness()):
                    st.icount -= 1  # the branch did not retire
            return self._guest_fault(X86Fault(13, 0))
        rip = self.cpu.read(REG_RIP) + self.cpu.cs_base()
        return self._guest_fault(
            canonical.access_fault(self.cpu, self._read_code(rip, 15), rip, self._bitness(), self.processor.profile.canonical)
        )

    def _nmi_unblocking_bit(self) -> int:
        """Bit 12 of an EPT-violation qualification: the access was made by an IRET that had
        removed blocking by NMI (SDM 28.2.1, Table 28-7) -- not during event delivery."""
        return 1 << 12 if self._iret_unblocked_nmi else 0

    def _guest_exception(self, vector: int, is_int: bool) -> ExitDecision | None:
        """An exception QEMU raised, or INT n / INT3 / INTO it executed."""
        error = self.cpu.pending_error_code()
        self.cpu.end_exception()
        if vector in (ExceptionVector.UD, ExceptionVector.GP) and not is_int:
            decision = self._decide_unhooked()
            if isinstance(decision, ExitDecision):
                return decision
            if isinstance(decision, Emulate):
                return self._emulate_retiring(decision.insn)
        if vector == ExceptionVector.DB and not is_int:
            return self._debug_exception(error)
        rip = self.cpu.read(REG_RIP)
        if is_int:
            # Unicorn has already moved RIP past the instruction; find where it started.
            start, length, kind = self._software_interrupt_origin(rip, vector)
            self.cpu.write(REG_RIP, start)
            return self._deliver_or_exit(Event(vector, kind, None, length))
        pushes_error = vector in _ERROR_CODE_VECTORS and self.cpu.read(REG_CR0) & CR0_PE
        return self._guest_fault(X86Fault(vector, error if pushes_error else None))

    def _decide_unhooked(self) -> ExitDecision | Emulate | None:
        """QEMU checks some instructions while translating them -- opcodes it does not know
        (VMCALL, the VMX instructions), privilege (MOV DR at CPL 3) -- and ends the block before
        them, so no hook saw them.  When it raises #UD or #GP at such an instruction, decide as a
        hook would have: its VM exit may have priority over the fault (SDM 26.1.1, 26.1.3)."""
        bitness = self._bitness()
        # Outside 64-bit mode linear addresses are 32 bits (SDM 3.4); the core's RIP can hold a
        # 32-bit EIP sign-extended (a 66H-prefixed near jump in 16-bit code), found by tests/fuzz.
        linear = (self.cpu.read(REG_RIP) + self.cpu.cs_base()) & ((1 << 64) - 1 if bitness == 64 else 0xFFFFFFFF)
        if self._examined_at == linear:
            return None  # its hook ran and let it execute: the fault is the outcome
        try:
            insn = dec.decode(self._read_code(linear, 15), linear, bitness)
        except dec.DecodeError:
            return None
        return self._decide(insn) if insn.kind is not None else None

    def _software_interrupt_origin(self, next_rip: int, vector: int) -> tuple[int, int, InterruptionType]:
        st = self.cpu.icount_state
        insns = self._block_insns(int(st.last_pc), int(st.last_size)) if st.last_size else []
        linear_next = next_rip + self.cpu.cs_base()
        start = insns[-1] if insns else linear_next - 2
        for a in insns:
            if a < linear_next:
                start = a
        length = linear_next - start
        code = self._read_code(start, length)
        if code[:1] == b"\xcc":
            kind = InterruptionType.SOFT_EXCEPTION
        elif code[:1] == b"\xce":
            kind = InterruptionType.SOFT_EXCEPTION
        elif code[:1] == b"\xf1":
            kind = InterruptionType.PRIV_SW_EXCEPTION
        else:
            kind = InterruptionType.SOFT_INTR
        return start - self.cpu.cs_base(), length, kind

    def _guest_fault(self, fault: X86Fault) -> ExitDecision | None:
        kind = InterruptionType.HARD_EXCEPTION
        return self._deliver_or_exit(Event(fault.vector, kind, fault.error_code), cr2=fault.cr2)

    def _intercepted(self, event: Event) -> bool:
        """The exception bitmap (SDM 26.2), for exceptions and INT3/INTO -- not for INT n."""
        assert self.ctl is not None
        if event.type not in (InterruptionType.HARD_EXCEPTION, InterruptionType.SOFT_EXCEPTION, InterruptionType.PRIV_SW_EXCEPTION):
            return False
        return ex.exception_exits(self.ctl, event.vector, event.error_code or 0)

    @staticmethod
    def _pushed_rf(event: Event) -> bool | None:
        """RF in the RFLAGS image ``event`` would push (SDM 18.3.1.1), which is what a VM exit it
        causes directly saves (SDM 28.3.3): 1 for a fault, 0 for software interrupts and
        exceptions (RF is cleared when an instruction starts), as it is otherwise."""
        if is_fault(event):
            return True
        if event.type in _SOFTWARE_EVENTS:
            return False
        return None

    def _exception_exit(self, event: Event, cr2: int | None, vectoring: Event | None, *, debug: int = 0) -> ExitDecision:
        """A VM exit through the exception bitmap (SDM 26.2) with the information of SDM 28.2.1,
        28.2.2, 28.2.4, 28.2.5 (vmx/event_exits.py)."""
        info = event_exits.exception_exit(
            event, vectoring=vectoring, cr2=cr2, debug=debug, nmi_unblocked_by_iret=self._iret_unblocked_nmi
        )
        return ExitDecision(
            int(ExitReason.EXCEPTION_NMI), qualification=info.qualification, instruction_length=info.instruction_length,
            intr_info=info.intr_info, intr_error_code=info.intr_error_code, rf=self._pushed_rf(event), vectoring=vectoring,
        )

    def _deliver_or_exit(self, event: Event, cr2: int | None = None) -> ExitDecision | None:
        if self._intercepted(event):
            return self._exception_exit(event, cr2, None)
        return self._deliver(event, cr2=cr2)

    def _deliver(self, event: Event, *, injected: bool = False, cr2: int | None = None) -> ExitDecision | None:
        """Deliver an event through the guest's IVT/IDT (SDM 6.12, 27.6.1.1); faults push RF = 1
        (SDM 18.3.1.1), except an injected event, which pushes the guest's RF."""
        st = self.cpu.save_state()
        if event.vector == 14 and cr2 is not None:
            self.cpu.write(REG_CR2, cr2)
        memory = _DeliveryMemory(self)
        outcome = deliver_with_escalation(st, memory, event, self._intercepted, fault_rf=True, injected=injected)
        if isinstance(outcome, Delivered):
            if outcome.cr2 is not None:
                self.cpu.write(REG_CR2, outcome.cr2)
            st.interrupt_shadow = False
            self.cpu.load_state(st)
            self.halted = False
            return None
        # A #PF met during the delivery and turned into #DF loaded CR2 before the exit.
        if outcome.loaded_cr2 is not None:
            self.cpu.write(REG_CR2, outcome.loaded_cr2)
        if isinstance(outcome, Intercepted):
            return self._exception_exit(outcome.event, outcome.cr2, outcome.vectoring)
        if isinstance(outcome, TripleFault):
            # SDM 28.2.4: a triple fault is not an exit during event delivery.
            self.last_triple_fault = outcome.chain  # not in the VMCS: for the person debugging
            return ExitDecision(int(ExitReason.TRIPLE_FAULT))
        assert isinstance(outcome, EptExit)
        length = event_exits.exit_instruction_length(None, outcome.vectoring)
        # SDM 28.3.3: during delivery, RF is what the event being delivered would have pushed.
        rf = self._pushed_rf(outcome.vectoring)
        if injected and outcome.vectoring is event:
            rf = None
        fault = outcome.fault
        if isinstance(fault, EptViolation):
            return ExitDecision(
                int(ExitReason.EPT_VIOLATION), qualification=fault.qualification,
                guest_linear=fault.guest_linear or 0, guest_physical=fault.guest_physical, rf=rf,
                instruction_length=length, vectoring=outcome.vectoring,
            )
        return ExitDecision(
            int(ExitReason.EPT_MISCONFIG), guest_physical=fault.guest_physical, rf=rf,
            instruction_length=length, vectoring=outcome.vectoring,
        )

    # --- VM exit (SDM 28) -------------------------------------------------------------------------------
    def _vm_exit(self, vmcs: VmcsRegion, d: ExitDecision) -> VmExitInfo:
        assert self.processor is not None and self.ctl is not None
        ctl = self.ctl
        view = vmcs.memory.view(vmcs.address, PAGE_SIZE)
        if d.reason < 0:
            # Not a VM exit: the processor would wait forever or has run past its budget.
            self._save_guest_state(vmcs, view, ctl, None)
            return VmExitInfo(reason=-1)
        vectoring_info, vectoring_error = event_exits.idt_vectoring(d.vectoring)
        # SDM 28.2: the VM-exit information fields.
        values = (
            d.reason, d.qualification, d.guest_linear, d.guest_physical, d.intr_info, d.intr_error_code,
            vectoring_info, vectoring_error, d.instruction_length, d.instruction_info,
        )
        for (offset, mask), value in zip(_EXIT_INFO_SLOTS, values):
            _U64.pack_into(view, offset, value & mask)
        # SDM 28.2.1: VM exits clear the valid bit of the VM-entry interruption-information field.
        offset, _ = _ENTRY_INTR_INFO_SLOT
        _U64.pack_into(view, offset, _U64.unpack_from(view, offset)[0] & ~INTR_INFO_VALID_MASK)
        # SDM 28.3.4: the pending debug exceptions -- a debug trap an MTF VM exit met, or those
        # still pending from VM entry; 0 otherwise.
        pending = self.pending_dbg if d.pending_dbg is None else d.pending_dbg
        _U64.pack_into(view, _PENDING_DBG_SLOT[0], pending & _PENDING_DBG_SLOT[1])
        self.pending_dbg = 0
        self.monitor_armed = False  # VM exits clear address-range monitoring (SDM 28.5.6)
        self._save_guest_state(vmcs, view, ctl, d.rf)
        self.processor.load_host_state(vmcs)
        return VmExitInfo(
            reason=d.reason,
            qualification=d.qualification,
            guest_linear_address=d.guest_linear,
            guest_physical_address=d.guest_physical,
            intr_info=d.intr_info,
            intr_error_code=d.intr_error_code,
            idt_vectoring_info=vectoring_info,
            idt_vectoring_error_code=vectoring_error,
            instruction_length=d.instruction_length,
            instruction_info=d.instruction_info,
        )

    def _save_guest_state(self, vmcs: VmcsRegion, view: memoryview, ctl: ex.ExecControls, rf: bool | None) -> None:
        """SDM 28.3: save the guest's registers into the guest-state area; ``rf``: the RF value
        the exit saves (SDM 28.3.3), None for RF as it is."""
        if not self._save_changed_state(vmcs, view, ctl, rf):
            self._save_full_state(vmcs, view, ctl, rf)
        # What the core holds now, for a VMRESUME that changes little (_resume_loaded_state).
        self._saved_guest = (vmcs.address, ctl, vmcs.area_bytes(VmcsFieldType.GUEST_STATE))

    def _save_changed_state(self, vmcs: VmcsRegion, view: memoryview, ctl: ex.ExecControls, rf: bool | None) -> bool:
        """The exit after a VMRESUME that found the guest area as the last exit left it: if the
        guest changed nothing but RIP, RSP, RFLAGS and non-register state, the other fields
        already hold their values -- write just those.  False when the full save is needed.
        IA32_PAT is outside the compared state: with "save IA32_PAT" (KVM sets it) it is read
        and stored on every exit, as the full save does (SDM 28.3.1)."""
        key, rip, rsp, hflags = self.cpu.quick_state()
        if not self._resumed or key != self._system_key:
            return False
        rflags = self.cpu.read(REG_RFLAGS)
        self._store_hot_fields(view, rip, rsp, rflags, bool(hflags & HF_INHIBIT_IRQ_MASK), rf)
        if ctl.exit_controls & EXIT_SAVE_IA32_PAT:
            vmcs.write(F.GUEST_IA32_PAT, self.cpu.read_msr(0x277))
        self._save_timer(vmcs, ctl)
        return True

    def _store_hot_fields(self, view: memoryview, rip: int, rsp: int, rflags: int, shadow: bool, rf: bool | None) -> None:
        """RIP, RSP, RFLAGS (with the RF the exit saves), interruptibility and activity state."""
        if rf is not None:
            rflags = rflags | RFLAGS_RF if rf else rflags & ~RFLAGS_RF
        intr = 0
        # In the HLT activity state there is no STI/MOV-SS blocking: the blocked instruction was
        # the HLT, and it has retired (SDM 26.6.2; 27.3.1.5 rejects blocking with HLT).
        if shadow and not self.halted:
            intr |= INTERRUPTIBILITY_STI if rflags & RFLAGS_IF else INTERRUPTIBILITY_MOV_SS
        if self.nmi_blocked:
            intr |= INTERRUPTIBILITY_NMI
        values = (rip, rsp, rflags, intr, ACTIVITY_HLT if self.halted else ACTIVITY_ACTIVE)
        for (offset, mask), value in zip(_HOT_SAVED_SLOTS, values):
            _U64.pack_into(view, offset, value & mask)

    def _save_timer(self, vmcs: VmcsRegion, ctl: ex.ExecControls) -> None:
        if ctl.exit_controls & EXIT_SAVE_VMX_PREEMPTION_TIMER and self.preemption_deadline is not None:
            rate = self.processor.profile.preemption_timer_rate if self.processor else 0
            now = self._tsc_fast()
            left = max(0, (self.preemption_deadline >> rate) - (now >> rate))
            vmcs.write(F.VMX_PREEMPTION_TIMER_VALUE, left)

    def _save_full_state(self, vmcs: VmcsRegion, view: memoryview, ctl: ex.ExecControls, rf: bool | None) -> None:
        cpu = self.cpu
        st = cpu.save_state()
        self._system_key = cpu.quick_state()[0]
        self._cached_tlb_tag = self._tlb_tag(vmcs.address, ctl, st.cr0, st.cr3, st.cr4, st.efer)
        self._store_hot_fields(view, st.rip, st.rsp, st.rflags, st.interrupt_shadow, rf)
        values: list[int] = [st.cr0, st.cr3, st.cr4]
        for seg in st.segments:
            values += (seg.selector, seg.base, seg.limit, seg.ar)
        values += (st.gdtr_base, st.gdtr_limit, st.idtr_base, st.idtr_limit)
        values += (st.segments[4].base, st.segments[5].base)  # IA32_FS_BASE, IA32_GS_BASE
        values += cpu.saved_sysenter()
        pack = _U64.pack_into
        for (offset, mask), value in zip(_SAVED_GUEST_SLOTS, values):
            pack(view, offset, value & mask)
        exit_controls = ctl.exit_controls
        if exit_controls & EXIT_SAVE_DEBUG_CONTROLS:
            vmcs.write(F.GUEST_DR7, st.dr7)
        if exit_controls & EXIT_SAVE_IA32_EFER:
            vmcs.write(F.GUEST_IA32_EFER, st.efer)
        if exit_controls & EXIT_SAVE_IA32_PAT:
            vmcs.write(F.GUEST_IA32_PAT, cpu.read_msr(0x277))
        # SDM 28.2.3: the "IA-32e mode guest" VM-entry control receives IA32_EFER.LMA.
        entry = vmcs.read(F.VM_ENTRY_CONTROLS)
        long_mode = entry | ENTRY_IA32E_MODE if st.efer & EFER_LMA else entry & ~ENTRY_IA32E_MODE
        if long_mode != entry:
            vmcs.write(F.VM_ENTRY_CONTROLS, long_mode)
        self._save_timer(vmcs, ctl)


class _DeliveryMemory:
    """Linear memory as event delivery sees it: the guest's paging and EPT, at CPL 0 for
    implicit supervisor accesses."""

    def __init__(self, executor: VmxExecutor) -> None:
        self.x = executor
        self.mode = executor._paging_mode()

    def read(self, linear: int, size: int, *, supervisor: bool) -> bytes:
        # Implicit supervisor-mode accesses: SMAP applies whatever RFLAGS.AC (SDM 4.6.1).
        mode = replace(self.mode, cpl=0, ac=False) if supervisor else self.mode
        return self.x.translator.read_linear(linear & 0xFFFFFFFFFFFFFFFF, size, mode)

    def write(self, linear: int, data: bytes, *, supervisor: bool) -> None:
        mode = replace(self.mode, cpl=0, ac=False) if supervisor else self.mode
        self.x.translator.write_linear(linear & 0xFFFFFFFFFFFFFFFF, data, mode)


_k = dec.InsnKind
_PRIVILEGED = frozenset(
    {_k.HLT, _k.INVD, _k.INVLPG, _k.LGDT, _k.LIDT, _k.LLDT, _k.LTR, _k.LMSW, _k.CLTS, _k.MOV_TO_CR,
     _k.MOV_FROM_CR, _k.MOV_TO_DR, _k.MOV_FROM_DR, _k.RDMSR, _k.WRMSR, _k.WBINVD, _k.XSETBV,
     _k.MWAIT, _k.MONITOR, _k.INVPCID}
)
_MOV_DR = frozenset({_k.MOV_TO_DR, _k.MOV_FROM_DR})
_VMX_UD_OUTSIDE_PROTECTED_MODE = frozenset(
    {_k.VMCLEAR, _k.VMLAUNCH, _k.VMPTRLD, _k.VMPTRST, _k.VMREAD, _k.VMRESUME, _k.VMWRITE, _k.VMXOFF,
     _k.VMXON, _k.INVEPT, _k.INVVPID}
)
_SOFTWARE_EVENTS = frozenset(
    {InterruptionType.SOFT_INTR, InterruptionType.SOFT_EXCEPTION, InterruptionType.PRIV_SW_EXCEPTION}
)
_VMX_INFO_KINDS = frozenset(
    {_k.VMCLEAR, _k.VMPTRLD, _k.VMPTRST, _k.VMXON, _k.VMREAD, _k.VMWRITE, _k.INVEPT, _k.INVVPID, _k.INVPCID}
)
