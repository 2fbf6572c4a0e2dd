"""A guest that switches modes itself: real mode -> protected mode -> long mode, under a
hypervisor that intercepts the two steps a VMM must see -- the write of IA32_EFER (through the
MSR bitmap) and the setting of CR0.PG (through the CR0 guest/host mask) -- and emulates them
the way KVM does on a long-mode switch: the EFER write lands in GUEST_IA32_EFER; the CR0 write
lands in GUEST_CR0 and the read shadow, and with EFER.LME set it also sets EFER.LMA and the
"IA-32e mode guest" VM-entry control (Linux vmx_set_cr0 -> enter_lmode -> vmx_set_efer).

SDM references: 10.8.5 / 10.9 (initializing IA-32e mode), 25.6.6 (CR0 guest/host mask and read
shadow), 25.6.9 (MSR bitmaps), 26.1.3 (MOV to CR0, WRMSR), 27.3.1.1 (unrestricted guest:
CR0.PE and CR0.PG may be 0), 27.3.2.1 (EFER loaded, "IA-32e mode guest"), 28.2.1 Table 28-3.
"""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import VmEntryControls as E
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Efer
from pyvmx.guest.sandbox import GUEST_CODE, VmxSandbox

from .guest_library import guest_source

pytestmark = pytest.mark.machine


def _hypervisor() -> VmxSandbox:
    sb = VmxSandbox("real", guest_source("mode_switch"))
    sb.use_msr_bitmap(write=[Msr.EFER])
    sb.write(F.CR0_GUEST_HOST_MASK, Cr0.PG)  # the guest owns every CR0 bit but PG
    sb.write(F.CR0_READ_SHADOW, sb.read(F.GUEST_CR0))
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    return sb


def _emulate_wrmsr_efer(sb: VmxSandbox) -> None:
    value = (sb.gpr["rdx"] << 32 | sb.gpr["rax"] & 0xFFFFFFFF) & 0xFFFFFFFFFFFFFFFF
    sb.write(F.GUEST_IA32_EFER, value)
    sb.skip_instruction()


def _emulate_mov_to_cr0(sb: VmxSandbox, gpr: int) -> None:
    value = sb.gpr[gpr] & 0xFFFFFFFF  # 32-bit code: the low half of the register
    efer = sb.read(F.GUEST_IA32_EFER)
    if value & Cr0.PG and efer & Efer.LME and not sb.read(F.GUEST_CR0) & Cr0.PG:
        # enter_lmode(): EFER.LMA and the "IA-32e mode guest" entry control go together.
        sb.write(F.GUEST_IA32_EFER, efer | Efer.LMA)
        sb.set_bits(F.VM_ENTRY_CONTROLS, E.IA32E_MODE)
    sb.write(F.GUEST_CR0, value)
    sb.write(F.CR0_READ_SHADOW, value)
    sb.skip_instruction()


def test_real_to_protected_to_long_mode_with_intercepted_efer_and_cr0_pg() -> None:
    sb = _hypervisor()
    assert not sb.read(F.GUEST_CR0) & Cr0.PE  # starts in real-address mode

    # 1. WRMSR IA32_EFER (LME) exits: its bit is set in the write bitmap for high MSRs.
    exit = sb.run()
    assert exit.exit_reason is ExitReason.MSR_WRITE
    assert sb.rip == GUEST_CODE + sb.symbol("efer_write")  # a flat 32-bit CS now
    assert sb.gpr["rcx"] == Msr.EFER and sb.gpr["rax"] & Efer.LME
    assert sb.read(F.GUEST_CR0) & Cr0.PE  # the guest set PE on its own: PE is guest-owned
    assert sb.read(F.GUEST_CS_SELECTOR) == 0x08 and sb.read(F.GUEST_CS_AR_BYTES) & 0xC09B == 0xC09B
    assert exit.instruction_length == 2
    _emulate_wrmsr_efer(sb)

    # 2. MOV to CR0 with PG set exits: PG is host-owned and differs from the shadow.
    exit = sb.run()
    assert exit.exit_reason is ExitReason.CR_ACCESS
    assert exit.qualification == 0  # CR0, MOV to CR, EAX (SDM Table 28-3)
    assert sb.rip == GUEST_CODE + sb.symbol("cr0_write") and exit.instruction_length == 3
    assert sb.read(F.GUEST_CR4) & 0x20  # PAE, written by the guest without an exit
    assert sb.read(F.GUEST_CR3) == GUEST_CODE + sb.symbol("pml4")
    assert not sb.read(F.VM_ENTRY_CONTROLS) & E.IA32E_MODE
    _emulate_mov_to_cr0(sb, 0)

    # 3. The guest enters 64-bit code with a far jump and halts.
    exit = sb.run()
    assert exit.exit_reason is ExitReason.HLT
    assert sb.rip == GUEST_CODE + sb.symbol("done")
    assert sb.gpr["rax"] == 0x1122334455667788  # only 64-bit code has 64-bit immediates
    assert sb.gpr["rbx"] == GUEST_CODE + sb.symbol("done")  # RIP-relative addressing worked
    assert sb.read(F.VM_ENTRY_CONTROLS) & E.IA32E_MODE  # saved by the exit: EFER.LMA = 1
    assert sb.read(F.GUEST_IA32_EFER) & (Efer.LME | Efer.LMA) == Efer.LME | Efer.LMA
    assert sb.read(F.GUEST_CS_SELECTOR) == 0x18
    assert sb.read(F.GUEST_CS_AR_BYTES) & (1 << 13)  # CS.L
    assert sb.read(F.GUEST_CR0) & (Cr0.PE | Cr0.PG) == Cr0.PE | Cr0.PG


def test_without_the_emulated_long_mode_switch_the_guest_gets_pae_paging() -> None:
    """If the hypervisor only sets CR0.PG (dropping the EFER write, so no EFER.LMA and no
    "IA-32e mode guest"), the guest runs with PAE paging, not IA-32e mode (SDM 4.1.1): its
    long-mode tables are no PAE tables, the fetch after the CR0 write faults and, with no IDT,
    the #PF becomes a #DF and then a triple fault (SDM 6.15, 26.2) at the far jump."""
    sb = _hypervisor()
    assert sb.run().exit_reason is ExitReason.MSR_WRITE
    sb.skip_instruction()  # drop the EFER write
    assert sb.run().exit_reason is ExitReason.CR_ACCESS
    _emulate_mov_to_cr0(sb, 0)
    assert not sb.read(F.VM_ENTRY_CONTROLS) & E.IA32E_MODE
    exit = sb.run()
    assert exit.exit_reason is ExitReason.TRIPLE_FAULT
    assert sb.rip == GUEST_CODE + sb.symbol("cr0_write") + 3  # the far jump never ran
    assert sb.read(F.GUEST_CS_SELECTOR) == 0x08
