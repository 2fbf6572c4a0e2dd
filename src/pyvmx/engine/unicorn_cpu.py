"""One emulated x86-64 core over simulated physical memory (the Unicorn engine).

What Unicorn does not expose -- the hidden part of the segment registers, hflags, the pending
exception's error code -- is read and written through Unicorn's saved-context blob, a copy of
QEMU's CPUX86State.  The offsets are checked against known register values when the first core
is created, so a different Unicorn build fails loudly instead of corrupting state.

Unicorn's own MMU is replaced (UC_TLB_VIRTUAL): every TLB miss calls back into Python, which
walks the guest's page tables and the EPT; Unicorn's physical address space *is* host-physical
memory, mapped once with zero copies.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, Callable

from pyvmx.engine import accel

# Unicorn's binding loads its library when imported: choose it (PYVMX_ENGINE) first.
try:
    ENGINE_KIND = accel.select_library()
    _ENGINE_ERROR: str | None = None
except accel.AccelError as _exc:
    ENGINE_KIND, _ENGINE_ERROR = "stock", str(_exc)

from unicorn import (  # type: ignore[attr-defined]  # noqa: E402
    UC_ARCH_X86,
    UC_HOOK_BLOCK,
    UC_HOOK_CODE,
    UC_HOOK_EDGE_GENERATED,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_WRITE,
    UC_HOOK_TLB_FILL,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn import x86_const as X  # type: ignore[import-untyped]  # noqa: E402
from unicorn.unicorn_py3.unicorn import uclib  # type: ignore[import-untyped]  # noqa: E402

from pyvmx.engine import accel_icount, native  # noqa: E402
from pyvmx.vmx.memory import PhysicalMemory  # noqa: E402
from pyvmx.vmx.state import CS, DS, ES, FS, SS, TR, ArchState, Segment

# --- CPUX86State layout (QEMU 5.0.x as built into Unicorn 2.1.x, TARGET_X86_64) ---------------
CTX_HEADER = 40  # sizeof(struct uc_context) before data[]
ENV_RSP = 4 * 8  # target_ulong regs[16] come first
ENV_EIP = 128
ENV_EFLAGS = 136
ENV_CC_OP = 168
ENV_HFLAGS = 176
ENV_HFLAGS2 = 180
ENV_SEGS = 184  # SegmentCache segs[6], then ldt, tr, gdt, idt; 24 bytes each
SEGCACHE_SIZE = 24
ENV_LDT = ENV_SEGS + 6 * SEGCACHE_SIZE
ENV_TR = ENV_LDT + SEGCACHE_SIZE
ENV_GDT = ENV_TR + SEGCACHE_SIZE
ENV_IDT = ENV_GDT + SEGCACHE_SIZE
ENV_CR = ENV_IDT + SEGCACHE_SIZE  # target_ulong cr[9]
ENV_SYSENTER = 4800  # uint32 sysenter_cs (padded), target_ulong sysenter_esp, sysenter_eip
ENV_EFER = 592
ENV_ERROR_CODE = 5384
ENV_EXCEPTION_IS_INT = 5388
ENV_DR7 = 5400 + 7 * 8  # target_ulong dr[8], after error_code, exception_is_int, exception_next_eip
ENV_OLD_EXCEPTION = 5496  # after dr[8] and the four breakpoint pointers
ENV_XCR0 = 4904  # uint64_t xcr0 (after the XSAVE component state, before pkru)

# QEMU hflags (target/i386/cpu.h)
HF_CPL_MASK = 3
HF_INHIBIT_IRQ_MASK = 1 << 3
HF_CS32_MASK = 1 << 4
HF_SS32_MASK = 1 << 5
HF_ADDSEG_MASK = 1 << 6
HF_PE_MASK = 1 << 7
HF_TF_MASK = 1 << 8
HF_MP_MASK = 1 << 9
HF_EM_MASK = 1 << 10
HF_TS_MASK = 1 << 11
HF_IOPL_MASK = 3 << 12
HF_LMA_MASK = 1 << 14
HF_CS64_MASK = 1 << 15
HF_VM_MASK = 1 << 17
HF_OSFXSR_MASK = 1 << 22
HF_SMAP_MASK = 1 << 23
_HF_RECOMPUTED = (
    HF_CPL_MASK | HF_INHIBIT_IRQ_MASK | HF_CS32_MASK | HF_SS32_MASK | HF_ADDSEG_MASK | HF_PE_MASK
    | HF_TF_MASK | HF_MP_MASK | HF_EM_MASK | HF_TS_MASK | HF_IOPL_MASK | HF_LMA_MASK
    | HF_CS64_MASK | HF_VM_MASK | HF_OSFXSR_MASK | HF_SMAP_MASK
)
DESC_B_MASK = 1 << 22
TSS16_AVAILABLE, TSS_AVAILABLE = 0x01, 0x09  # system-segment types (S = 0, SDM 3.5 Table 3-2)
TSS_BUSY_FLAG = 0x02  # type 1 -> 3, 9 -> 11
VMX_AR_DPL_MASK = 3 << 5
DESC_L_MASK = 1 << 21

# QEMU's segment order R_ES..R_GS, then ldt and tr, is the VMCS order too (pyvmx.vmx.state).

GPR_IDS = (
    X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX,
    X.UC_X86_REG_RSP, X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI,
    X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11,
    X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15,
)
REG_RIP = X.UC_X86_REG_RIP
REG_RFLAGS = X.UC_X86_REG_RFLAGS
REG_CR0 = X.UC_X86_REG_CR0
REG_CR2 = X.UC_X86_REG_CR2
REG_CR3 = X.UC_X86_REG_CR3
REG_CR4 = X.UC_X86_REG_CR4
REG_CR8 = X.UC_X86_REG_CR8
REG_DR0_3 = (X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3)
REG_DR6 = X.UC_X86_REG_DR6
REG_DR7 = X.UC_X86_REG_DR7
REG_CS = X.UC_X86_REG_CS
REG_EFLAGS = X.UC_X86_REG_EFLAGS
REG_XCR0 = getattr(X, "UC_X86_REG_XCR0", None)

_UC_PROT_EXEC = 4
_UC_CTL_WRITE = 1 << 30
_UC_CTL_TB_FLUSH = 10
TCG_BUFFER_SIZE = 32 << 20  # bytes of host code QEMU keeps before it flushes its translations
_UC_CTL_TLB_FLUSH = 11

_SEG = struct.Struct("<I4xQII")  # SegmentCache: selector, base, limit, flags


class EngineError(RuntimeError):
    """The CPU engine failed in a way that is not an architectural event (wraps the cause)."""


def ar_to_qemu_flags(ar: int) -> int:
    """VMX access rights (SDM 25.4.1) -> QEMU's descriptor-high-word segment flags.
    An unusable segment (bit 16) becomes a not-present one."""
    if ar & 0x10000:
        return 0
    return (ar & 0xF0FF) << 8


def qemu_flags_to_ar(flags: int, usable: bool = True) -> int:
    if not usable:
        return 0x10000
    ar = (flags >> 8) & 0xF0FF
    if ar & 0x10:
        # A code/data segment register always holds an accessed descriptor: the processor sets
        # the A bit when it loads one (SDM 3.4.5.1), which VM entry then requires (27.3.1.2).
        # QEMU does not set it on every load path (far JMP), so the model does it here.
        ar |= 1
    return ar


def compute_hflags(old: int, st: ArchState, smap: bool = False) -> int:
    """QEMU's x86_update_hflags(): the translation-relevant flags derived from the state."""
    cs_flags = ar_to_qemu_flags(st.segments[CS].ar)
    ss_flags = ar_to_qemu_flags(st.segments[SS].ar)
    h = old & ~_HF_RECOMPUTED
    h |= (ss_flags >> 13) & HF_CPL_MASK
    h |= (st.cr0 & 1) << 7
    h |= (st.cr0 << 8) & (HF_MP_MASK | HF_EM_MASK | HF_TS_MASK)
    h |= st.rflags & (HF_TF_MASK | HF_VM_MASK | HF_IOPL_MASK)
    if st.cr4 & (1 << 9):
        h |= HF_OSFXSR_MASK
    if smap and st.cr4 & (1 << 21):
        h |= HF_SMAP_MASK
    if st.efer & (1 << 10):
        h |= HF_LMA_MASK
    if h & HF_LMA_MASK and cs_flags & DESC_L_MASK:
        h |= HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK
    else:
        h |= (cs_flags & DESC_B_MASK) >> (22 - 4)
        h |= (ss_flags & DESC_B_MASK) >> (22 - 5)
        if not st.cr0 & 1 or st.rflags & (1 << 17) or not h & HF_CS32_MASK:
            h |= HF_ADDSEG_MASK
        elif st.segments[DS].base | st.segments[ES].base | st.segments[SS].base:
            h |= HF_ADDSEG_MASK
    if st.interrupt_shadow:
        h |= HF_INHIBIT_IRQ_MASK
    return h


class UnicornCpu:
    """An x86-64 core: registers, hidden state, hooks, and a run loop primitive."""

    _layout_checked = False

    def __init__(self, memory: PhysicalMemory) -> None:
        if _ENGINE_ERROR is not None:
            raise EngineError(_ENGINE_ERROR)
        self.memory = memory
        try:
            self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
            # Before anything initializes QEMU's TCG: its translation buffer bounds the host
            # memory translated code takes (Unicorn's default, 1 GiB, fills before QEMU flushes:
            # a guest running through fresh code grew the process by that much).
            self.uc.ctl_set_tcg_buffer_size(TCG_BUFFER_SIZE)  # type: ignore[attr-defined]
            # The CPU model decides which instructions QEMU translates (its CPUID feature words):
            # Skylake-Server has what pyvmx.kvm.cpuid advertises -- SMAP's CLAC/STAC, ADX,
            # CLFLUSHOPT/CLWB, which Unicorn's default (Haswell-like) model turns into #UD.
            self.uc.ctl_set_cpu_model(X.UC_CPU_X86_SKYLAKE_SERVER)
            self.uc.mem_map_ptr(0, memory.size, UC_PROT_ALL, memory.host_pointer)
            self.uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)  # type: ignore[attr-defined]
            self.uc.ctl_exits_enabled(True)  # no "until" address: we stop emulation ourselves
            self.uc.ctl_set_exits([])
        except UcError as exc:
            raise EngineError(f"cannot create the Unicorn core: {exc}") from exc
        self._h = self.uc._uch
        self._val = ctypes.c_uint64()
        self._pval = ctypes.byref(self._val)
        self._ctx = self.uc.context_save()
        self._ctx_addr = (ctypes.cast(self._ctx.context, ctypes.c_void_p).value or 0) + CTX_HEADER
        self._ctx_size = self._ctx.size - CTX_HEADER
        self._env = (ctypes.c_char * self._ctx_size).from_address(self._ctx_addr)
        if not UnicornCpu._layout_checked:
            self._check_layout()
            UnicornCpu._layout_checked = True
        # The accelerated engine (pyvmx.engine.accel) counts instructions inside Unicorn and gives
        # the TLB-fill hook the full faulting address; the stock one needs the C block hook.
        self.accelerated = ENGINE_KIND == "accel" and hasattr(uclib, "uc_pyvmx_icount_state")
        if ENGINE_KIND == "accel" and not self.accelerated:
            raise EngineError("PYVMX_ENGINE=accel, but the loaded Unicorn library is not the patched one")
        self.exact_fill_address = self.accelerated
        self.icount_state: native.IcountState | accel_icount.AccelIcountState
        self._stock_icount = native.IcountState()  # the block hooks' counter (stock engine)
        if self.accelerated:
            self.icount_state = accel_icount.AccelIcountState(accel_icount.bind(uclib, self._h))
        else:
            stock = self._stock_icount
            stock.deadline = 2**64 - 1
            stock.emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
            stock.reg_read = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value
            stock.reg_write = ctypes.cast(uclib.uc_reg_write, ctypes.c_void_p).value
            stock.eflags_regid = REG_EFLAGS
            self.icount_state = stock
        self._native_hooks: list[ctypes.c_size_t] = []
        self._native_lib: ctypes.CDLL | None = None
        self._py_hooks: dict[int, int] = {}  # address -> code hook handle
        self._counting = False  # the last run counted instructions (Unicorn's count hook is on)
        self._prime_block_chain()
        if isinstance(self.icount_state, accel_icount.AccelIcountState):
            self.icount_state.reset()  # the priming block is no guest's time
        self.native = self.accelerated or self._install_icount()

    # --- layout self-check --------------------------------------------------------------------
    def _check_layout(self) -> None:
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_RIP, 0x1122334455)
        uc.reg_write(X.UC_X86_REG_CR3, 0x7777000)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x4444444444, 0x5555, 0))
        uc.reg_write(X.UC_X86_REG_FS_BASE, 0x8888888888)
        uc.msr_write(0xC0000080, 0x500)
        uc.msr_write(0x174, 0x33)
        uc.msr_write(0x175, 0x6666666666)
        uc.reg_write(X.UC_X86_REG_RSP, 0x3333333333)
        uc.reg_write(X.UC_X86_REG_DR7, 0x2222222222)
        self._pull()
        env = self._env
        ok = (
            struct.unpack_from("<Q", env, ENV_EIP)[0] == 0x1122334455
            and struct.unpack_from("<Q", env, ENV_CR + 3 * 8)[0] == 0x7777000
            and struct.unpack_from("<QI", env, ENV_GDT + 8) == (0x4444444444, 0x5555)
            and struct.unpack_from("<Q", env, ENV_SEGS + FS * SEGCACHE_SIZE + 8)[0] == 0x8888888888
            and struct.unpack_from("<Q", env, ENV_EFER)[0] == 0x500
            and struct.unpack_from("<I4xQ", env, ENV_SYSENTER) == (0x33, 0x6666666666)
            and struct.unpack_from("<Q", env, ENV_RSP)[0] == 0x3333333333
            and struct.unpack_from("<Q", env, ENV_DR7)[0] == 0x2222222222
            and self._xgetbv() == struct.unpack_from("<Q", env, ENV_XCR0)[0]
        )
        if not ok:
            raise EngineError("this Unicorn build's CPUX86State layout is not the one pyvmx knows (need unicorn==2.1.4)")
        uc.msr_write(0xC0000080, 0)
        uc.msr_write(0x174, 0)
        uc.msr_write(0x175, 0)
        uc.reg_write(X.UC_X86_REG_RSP, 0)
        uc.reg_write(X.UC_X86_REG_DR7, 0x400)
        uc.reg_write(X.UC_X86_REG_FS_BASE, 0)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, 0, 0xFFFF, 0))

    def _xgetbv(self) -> int:
        """XCR0 as XGETBV returns it (for the layout check of ENV_XCR0)."""
        uc = self.uc
        scratch = self.memory.size - 4096
        code = b"\x31\xc9\x0f\x01\xd0\xf4"  # xor ecx, ecx; xgetbv; hlt
        saved = self.memory.read(scratch, len(code))
        cr4 = uc.reg_read(X.UC_X86_REG_CR4)
        self.memory.write(scratch, code)
        try:
            uc.reg_write(X.UC_X86_REG_CR4, cr4 | (1 << 18))  # CR4.OSXSAVE
            uc.emu_start(scratch, scratch + len(code) - 1)
            value = (uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFFFFFF) | (uc.reg_read(X.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32
        except UcError:
            value = -1
        finally:
            uc.reg_write(X.UC_X86_REG_CR4, cr4)
            self.memory.write(scratch, saved)
            self.invalidate_code(scratch, scratch + len(code))
        self._pull()
        return int(value)

    def _prime_block_chain(self) -> None:
        """Run one throw-away block to completion.  Unicorn reports a newly translated block
        (UC_HOOK_EDGE_GENERATED) only once some block has *completed* before it (a block left by
        an exception does not count), so without this the very first guest block would never be
        scanned for sensitive instructions."""
        scratch = self.memory.size - 4096
        code = b"\xeb\x00\xf4"  # jmp next; next: hlt
        saved = self.memory.read(scratch, len(code))
        self.memory.write(scratch, code)
        try:
            self.uc.emu_start(scratch, 0)
        finally:
            self.memory.write(scratch, saved)
            self.invalidate_code(scratch, scratch + len(code))

    def _pull(self) -> None:
        """Copy QEMU's CPU state into the context blob."""
        self.uc.context_update(self._ctx)

    def _push(self) -> None:
        self.uc.context_restore(self._ctx)

    # --- the native instruction counter ------------------------------------------------------
    def _install_icount(self) -> bool:
        lib = native.load_library()
        self._native_lib = lib
        if lib is None:
            self.uc.hook_add(UC_HOOK_EDGE_GENERATED, self._py_on_edge)
            self.uc.hook_add(UC_HOOK_BLOCK, self._py_on_block)
            return False
        for kind, fn in ((UC_HOOK_EDGE_GENERATED, lib.pyvmx_on_edge), (UC_HOOK_BLOCK, lib.pyvmx_on_block)):
            handle = ctypes.c_size_t()
            err = uclib.uc_hook_add(
                self._h, ctypes.byref(handle), kind, ctypes.cast(fn, ctypes.c_void_p),
                ctypes.byref(self._stock_icount), ctypes.c_uint64(1), ctypes.c_uint64(0),
            )
            if err:
                raise EngineError(f"cannot install the instruction counter (uc error {err})")
            self._native_hooks.append(handle)
        return True

    def _py_on_edge(self, uc: Any, cur: Any, prev: Any, user: Any) -> None:
        native.tb_insert(self._stock_icount, cur.pc, cur.size, cur.icount)

    def _py_on_block(self, uc: Any, pc: int, size: int, user: Any) -> None:
        st = self._stock_icount
        n: int | None
        if st.grant_size and st.grant_pc == pc and st.grant_size == size:
            n = int(st.grant_icount)
        else:
            n = native.tb_find(st, pc, size)
        st.grant_size = 0
        if n is None:
            st.stop_reason = native.STOP_UNKNOWN_TB
            st.miss_pc, st.miss_size = pc, size
            uc.emu_stop()
            return
        if st.icount + n > st.deadline:
            st.stop_reason = native.STOP_DEADLINE
            uc.emu_stop()
            return
        if st.want_window and self.read(REG_EFLAGS) & (1 << 9):
            st.stop_reason = native.STOP_WINDOW
            uc.emu_stop()
            return
        if st.rf_watch == native.RF_WATCH_FIRST_TB:
            st.rf_watch = native.RF_WATCH_CLEAR
        elif st.rf_watch == native.RF_WATCH_CLEAR:
            self.write(REG_EFLAGS, self.read(REG_EFLAGS) & ~(1 << 16))
            st.rf_watch = 0
        st.icount += n
        st.last_pc, st.last_size, st.last_icount = pc, size, n

    def learn_block(self, pc: int, size: int, icount: int) -> None:
        """Record the instruction count of a translated block the counter's table lacks or holds
        as ambiguous (the block hook stopped before it with STOP_UNKNOWN_TB), and grant that count
        to the block hook that comes next for it."""
        if self.accelerated:
            return  # the accelerated engine counts every block itself
        st = self._stock_icount
        if self._native_lib is not None:
            self._native_lib.pyvmx_tb_insert(
                ctypes.byref(st), ctypes.c_uint64(pc), ctypes.c_uint32(size), ctypes.c_uint32(icount)
            )
        else:
            native.tb_insert(st, pc, size, icount)
        st.grant_pc, st.grant_size, st.grant_icount = pc, size, icount

    # --- registers -----------------------------------------------------------------------------
    def read(self, regid: int) -> int:
        uclib.uc_reg_read(self._h, regid, self._pval)
        return self._val.value

    def write(self, regid: int, value: int) -> None:
        self._val.value = value & 0xFFFFFFFFFFFFFFFF
        uclib.uc_reg_write(self._h, regid, self._pval)

    def read_gprs(self) -> list[int]:
        return [self.read(r) for r in GPR_IDS]

    def write_gprs(self, values: list[int]) -> None:
        for r, v in zip(GPR_IDS, values):
            self.write(r, v)

    def read_msr(self, index: int) -> int:
        return int(self.uc.msr_read(index))

    def write_msr(self, index: int, value: int) -> None:
        self.uc.msr_write(index, value)

    # --- whole-state load/save through the context blob ----------------------------------------
    def load_state(self, st: ArchState, flush_tlb: bool = True) -> None:
        """Load the guest-state area's registers, hidden segment state included (VM entry).
        ``flush_tlb`` False keeps the cached translations (the caller knows they still hold)."""
        self._pull()
        env = self._env
        for i, seg in enumerate(st.segments):
            off = ENV_SEGS + i * SEGCACHE_SIZE
            _SEG.pack_into(env, off, seg.selector, seg.base, seg.limit, ar_to_qemu_flags(seg.ar))
        struct.pack_into("<QI", env, ENV_GDT + 8, st.gdtr_base, st.gdtr_limit)
        struct.pack_into("<QI", env, ENV_IDT + 8, st.idtr_base, st.idtr_limit)
        struct.pack_into("<Q", env, ENV_CR, st.cr0)
        struct.pack_into("<Q", env, ENV_CR + 24, st.cr3)
        struct.pack_into("<Q", env, ENV_CR + 32, st.cr4)
        struct.pack_into("<Q", env, ENV_EFER, st.efer)
        old = struct.unpack_from("<I", env, ENV_HFLAGS)[0]
        struct.pack_into("<I", env, ENV_HFLAGS, compute_hflags(old, st, smap=True))
        self._push()
        self.write(REG_RFLAGS, st.rflags)
        self.write(GPR_IDS[4], st.rsp)
        self.write(REG_RIP, st.rip)
        self.write(REG_DR7, st.dr7)
        if flush_tlb:
            self.flush_tlb()

    def save_state(self) -> ArchState:
        """The current architectural state (VM exit)."""
        self._pull()
        env = self._env
        hflags = struct.unpack_from("<I", env, ENV_HFLAGS)[0]
        segs = []
        for i in range(8):
            sel, base, limit, flags = _SEG.unpack_from(env, ENV_SEGS + i * SEGCACHE_SIZE)
            usable = bool(flags & (1 << 15)) or i in (CS, TR)
            ar = qemu_flags_to_ar(flags, usable)
            if i == TR and (ar & 0x1F) in (TSS16_AVAILABLE, TSS_AVAILABLE):
                # LTR marks the TSS busy in the GDT and in TR (SDM Vol. 2A LTR: "Set busy flag
                # of TSS descriptor"); QEMU's helper_ltr caches the descriptor before setting
                # the flag, so TR would read type 9 -- which VM entry refuses (SDM 27.3.1.2).
                ar |= TSS_BUSY_FLAG
            elif i == SS:
                # SS.DPL is the CPL (SDM 5.5, 28.3.2); QEMU loads a null SS in 64-bit mode with
                # DPL 0 whatever the RPL, and keeps the CPL in hflags.
                ar = (ar & ~VMX_AR_DPL_MASK) | (hflags & HF_CPL_MASK) << 5
            segs.append(Segment(sel, base, limit, ar))
        gdt_base, gdt_limit = struct.unpack_from("<QI", env, ENV_GDT + 8)
        idt_base, idt_limit = struct.unpack_from("<QI", env, ENV_IDT + 8)
        cr = struct.unpack_from("<9Q", env, ENV_CR)
        return ArchState(
            rip=struct.unpack_from("<Q", env, ENV_EIP)[0],
            rsp=struct.unpack_from("<Q", env, ENV_RSP)[0],
            rflags=self.read(REG_RFLAGS),  # QEMU computes the arithmetic flags lazily
            cr0=cr[0],
            cr3=cr[3],
            cr4=cr[4],
            efer=struct.unpack_from("<Q", env, ENV_EFER)[0],
            dr7=struct.unpack_from("<Q", env, ENV_DR7)[0],
            segments=segs,
            gdtr_base=gdt_base,
            gdtr_limit=gdt_limit,
            idtr_base=idt_base,
            idtr_limit=idt_limit,
            interrupt_shadow=bool(hflags & HF_INHIBIT_IRQ_MASK),
        )

    def quick_state(self) -> tuple[bytes, int, int, int]:
        """One copy of the CPU state, reduced to what changes at nearly every VM exit -- RIP,
        RSP, hflags -- and, as raw bytes to compare, everything else the guest-state area holds
        (segment caches, descriptor tables, CR0-CR4, EFER, DR7, SYSENTER MSRs)."""
        self._pull()
        env = self._env
        key = b"".join((
            env[ENV_SEGS:ENV_CR + 5 * 8], env[ENV_EFER:ENV_EFER + 8], env[ENV_DR7:ENV_DR7 + 8],
            env[ENV_SYSENTER:ENV_SYSENTER + 24],
        ))
        rip = struct.unpack_from("<Q", env, ENV_EIP)[0]
        rsp = struct.unpack_from("<Q", env, ENV_RSP)[0]
        hflags = struct.unpack_from("<I", env, ENV_HFLAGS)[0]
        return key, int(rip), int(rsp), int(hflags)

    def saved_sysenter(self) -> tuple[int, int, int]:
        """IA32_SYSENTER_CS, _ESP, _EIP as of the last :meth:`save_state` (no second copy of
        the CPU state)."""
        cs, esp, eip = struct.unpack_from("<I4xQQ", self._env, ENV_SYSENTER)
        return int(cs), int(esp), int(eip)

    def hflags(self) -> int:
        self._pull()
        return int(struct.unpack_from("<I", self._env, ENV_HFLAGS)[0])

    def paging_registers(self) -> tuple[int, int, int, int, int, int]:
        """CR0, CR3, CR4, IA32_EFER, QEMU's hflags (CPL in bits 1:0) and env->eflags (the
        system flags: AC, IF, VM...; not the arithmetic ones) in one copy of the CPU state --
        what every TLB fill needs, several times cheaper than six register reads."""
        self._pull()
        env = self._env
        cr0, _, _, cr3, cr4 = struct.unpack_from("<5Q", env, ENV_CR)
        efer = struct.unpack_from("<Q", env, ENV_EFER)[0]
        hflags = struct.unpack_from("<I", env, ENV_HFLAGS)[0]
        eflags = struct.unpack_from("<Q", env, ENV_EFLAGS)[0]
        return int(cr0), int(cr3), int(cr4), int(efer), int(hflags), int(eflags)

    def pending_error_code(self) -> int:
        """The error code of the exception QEMU just raised (env->error_code)."""
        self._pull()
        return int(struct.unpack_from("<i", self._env, ENV_ERROR_CODE)[0]) & 0xFFFFFFFF

    def end_exception(self) -> None:
        """Forget the exception QEMU raised (env->old_exception = -1).  QEMU clears it only once
        it has delivered an exception itself -- which it never does here -- and would otherwise
        turn the guest's next contributory fault or #PF into a #DF of its own."""
        self._pull()
        struct.pack_into("<i", self._env, ENV_OLD_EXCEPTION, -1)
        self._push()

    def read_xcr0(self) -> int:
        """XCR0 (env->xcr0): XGETBV runs natively and reads it, XSAVE/XRSTOR mask with it."""
        self._pull()
        return int(struct.unpack_from("<Q", self._env, ENV_XCR0)[0])

    def write_xcr0(self, value: int) -> None:
        """Load XCR0, as a hypervisor does before entering a guest (XSETBV always exits)."""
        self._pull()
        struct.pack_into("<Q", self._env, ENV_XCR0, value & 0xFFFFFFFFFFFFFFFF)
        self._push()

    def exception_is_int(self) -> bool:
        """Whether the exception QEMU just raised came from INT n / INT3 / INTO."""
        self._pull()
        return bool(struct.unpack_from("<i", self._env, ENV_EXCEPTION_IS_INT)[0])

    def cs_base(self) -> int:
        """CS.base: translated-block and hook addresses are linear (CS.base + RIP)."""
        self._pull()
        return int(struct.unpack_from("<Q", self._env, ENV_SEGS + CS * SEGCACHE_SIZE + 8)[0])

    def register_file(self) -> bytes:
        """The whole register file (GPRs, FPU, SIMD...): QEMU's saved CPU state."""
        self._pull()
        return bytes(self._env)

    def load_register_file(self, blob: bytes) -> None:
        """Restore GPRs and FPU/SIMD state saved by :meth:`register_file`; the VMCS-managed
        registers (segments, control registers, RIP/RSP/RFLAGS) are not touched."""
        self._pull()
        keep = bytes(self._env[ENV_EIP:ENV_EFER + 8])
        ctypes.memmove(self._ctx_addr, blob, min(len(blob), self._ctx_size))
        ctypes.memmove(self._ctx_addr + ENV_EIP, keep, len(keep))
        self._push()

    def set_segment(self, index: int, seg: Segment) -> None:
        """Replace one segment register, hidden part included (used by event delivery)."""
        st = self.save_state()
        st.segments[index] = seg
        self.load_state(st)

    # --- hooks -----------------------------------------------------------------------------------
    def hook_tlb_fill(self, callback: Callable[..., bool]) -> None:
        self.uc.hook_add(UC_HOOK_TLB_FILL, callback)

    def hook_edge(self, callback: Callable[..., None]) -> None:
        self.uc.hook_add(UC_HOOK_EDGE_GENERATED, callback)

    def hook_interrupt(self, callback: Callable[..., None]) -> None:
        self.uc.hook_add(UC_HOOK_INTR, callback)

    def hook_invalid(self, callback: Callable[..., bool]) -> None:
        self.uc.hook_add(UC_HOOK_INSN_INVALID, callback)

    def has_code_hook(self, address: int) -> bool:
        return address in self._py_hooks

    def add_code_hook(self, address: int, callback: Callable[..., None]) -> None:
        """A Python call before the instruction at ``address`` (a virtual address) executes."""
        if address not in self._py_hooks:
            self._py_hooks[address] = self.uc.hook_add(UC_HOOK_CODE, callback, begin=address, end=address)

    @property
    def code_hooks(self) -> int:
        return len(self._py_hooks)

    def remove_code_hooks(self) -> None:
        """Remove every code hook (translated blocks keep calling them until dropped: flush)."""
        for handle in self._py_hooks.values():
            self.uc.hook_del(handle)
        self._py_hooks.clear()

    def add_data_hook(self, start: int, end: int, writes_only: bool, callback: Callable[..., None]) -> int:
        """A Python call at every data access to host-physical addresses [start, end] (inclusive:
        Unicorn bounds memory hooks by the physical address, and reports it), or only at writes;
        returns the handle for :meth:`remove_hook`."""
        kinds = UC_HOOK_MEM_WRITE if writes_only else UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE
        return int(self.uc.hook_add(kinds, callback, begin=start, end=end))

    def remove_hook(self, handle: int) -> None:
        self.uc.hook_del(handle)

    def invalidate_code(self, start: int, end: int) -> None:
        """Drop translated blocks covering [start, end) so they are translated again."""
        try:
            self.uc.ctl_remove_cache(start, end)
        except UcError:
            pass

    def flush_translations(self) -> None:
        """Drop every translated block (UC_CTL_TB_FLUSH): they are translated again on use."""
        uclib.uc_ctl(self._h, _UC_CTL_WRITE | _UC_CTL_TB_FLUSH)

    def translate_fetch(self, address: int) -> int | None:
        """The host-physical address the core fetches ``address`` (a linear address) from, or
        None; a TLB miss asks the TLB-fill hook, which must not record a fault for it."""
        if uclib.uc_vmem_translate(self._h, ctypes.c_uint64(address), _UC_PROT_EXEC, self._pval):
            return None
        return self._val.value

    def flush_tlb(self) -> None:
        """UC_CTL_TLB_FLUSH (the Python binding of Unicorn 2.1.4 has no wrapper for it)."""
        uclib.uc_ctl(self._h, _UC_CTL_WRITE | _UC_CTL_TLB_FLUSH)

    # --- running -----------------------------------------------------------------------------------
    @property
    def icount(self) -> int:
        return int(self.icount_state.icount)

    def run(self, rip: int, count: int = 0) -> int:
        """Run from ``rip`` until a hook stops emulation or the CPU halts -- or, with ``count``,
        after that many instructions; returns Unicorn's error code (0, or UC_ERR_EXCEPTION after
        a refused TLB fill / unhandled exception).  Switching between counted and uncounted runs
        makes Unicorn drop its translated blocks, so counted runs are for the few instructions a
        deadline or single-stepping needs."""
        self.icount_state.stop_reason = native.STOP_NONE
        if count and not self._counting:
            # Unicorn adds its instruction-counting hook without retranslating: blocks made
            # before would run uncounted (it drops them itself when the hook goes).
            self.flush_translations()
        self._counting = bool(count)
        return int(uclib.uc_emu_start(self._h, rip, 0, 0, count))

    def stop(self) -> None:
        uclib.uc_emu_stop(self._h)
