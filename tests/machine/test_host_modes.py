"""The host is a real processor state (SDM 27.2.4, 28.5): a 64-bit host and a 32-bit host (outside
IA-32e mode, IA32_EFER.LMA = 0) each go VMXON -> VM entry -> guest code -> VM exit -> the host
continues (VMREAD, VMRESUME) on the bare VT-x machine, with the host state each exit loads
following "host address-space size" and the processor's own control registers."""

from __future__ import annotations

import struct

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4, Efer
from pyvmx.guest.sandbox import GUEST_PD, GUEST_PML4, HOST_RIP_32, HOST_RIP_64, Mode, VmxSandbox
from pyvmx.vmx.outcomes import VmxStatus

CPUID_TWICE = """
    cpuid
    cpuid
    hlt
"""


def _sandbox(mode: Mode, source: str, host32: bool = False) -> VmxSandbox:
    sb = VmxSandbox(mode, source, host32=host32)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    return sb


def _round_trips(sb: VmxSandbox) -> None:
    """Two CPUID exits and a HLT exit; between them the host reads the exit and resumes."""
    for _ in range(2):
        exit = sb.run()
        assert exit.exit_reason is ExitReason.CPUID, exit
        # The host continues: its VMX instructions run (no #UD from a wrong mode) ...
        reason = sb.cpu.vmread(F.VM_EXIT_REASON)
        assert reason.status is VmxStatus.SUCCEED and reason.value == ExitReason.CPUID
        sb.skip_instruction()
    exit = sb.run()
    assert exit.exit_reason is ExitReason.HLT, exit


def test_28_5_64bit_host_round_trips_and_stays_in_ia32e_mode() -> None:
    """SDM 28.5.1/28.5.2: "host address-space size" = 1 loads IA32_EFER.LMA/LME = 1 and CS.L = 1."""
    sb = _sandbox("long", CPUID_TWICE)
    assert sb.read(F.VM_EXIT_CONTROLS) & X.HOST_ADDR_SPACE_SIZE
    _round_trips(sb)
    host = sb.cpu.host
    assert host.efer & Efer.LMA and host.efer & Efer.LME and host.cs_l
    assert host.rip == HOST_RIP_64 and host.cr4 & Cr4.PAE


def test_27_2_4_28_5_32bit_host_enters_a_32bit_guest_and_continues_after_each_exit() -> None:
    """SDM 27.2.4: outside IA-32e mode "host address-space size" must be 0, and with it the
    VM exit returns to a 32-bit host (SDM 28.5.1: IA32_EFER.LMA/LME = 0; 28.5.2: CS.L = 0)."""
    sb = _sandbox("protected", CPUID_TWICE, host32=True)
    assert not sb.cpu.host_ia32e_mode
    assert not sb.read(F.VM_EXIT_CONTROLS) & X.HOST_ADDR_SPACE_SIZE
    _round_trips(sb)
    host = sb.cpu.host
    assert not host.efer & (Efer.LMA | Efer.LME) and not host.cs_l
    assert host.rip == HOST_RIP_32 and host.rsp >> 32 == 0
    assert host.cr0 & Cr0.PG and not host.cr4 & Cr4.PCIDE


def test_27_2_4_32bit_host_enters_a_pae_guest() -> None:
    """A 32-bit host runs a PAE-paging guest (SDM 4.4; with EPT the PDPTEs come from the VMCS,
    SDM 27.3.2.4): the guest reads through a 2-MiB PAE mapping, exits, and the host continues."""
    magic = 0x1234ABCD
    sb = _sandbox("protected", "mov 0x40000000, %eax\ncpuid\nhlt\n", host32=True)
    # PDPTE0 -> identity-mapped first GiB; PDPTE1 -> linear 1 GiB maps guest-physical 2 MiB.
    pd_high = GUEST_PD + 0x1000
    sb.write_memory(GUEST_PML4, struct.pack("<QQ", GUEST_PD | 1, pd_high | 1))
    sb.write_memory(GUEST_PD, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))
    sb.write_memory(pd_high, struct.pack("<Q", (1 << 21) | 0x83))
    sb.write_memory(1 << 21, struct.pack("<I", magic))
    sb.write(F.GUEST_CR3, GUEST_PML4)
    sb.set_bits(F.GUEST_CR4, Cr4.PAE)
    sb.set_bits(F.GUEST_CR0, Cr0.PG)
    sb.write(F.CR0_READ_SHADOW, sb.read(F.GUEST_CR0))
    sb.write(F.GUEST_PDPTR0, GUEST_PD | 1)
    sb.write(F.GUEST_PDPTR1, pd_high | 1)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.CPUID, exit
    assert sb.gpr["rax"] == magic
    assert not sb.cpu.host_ia32e_mode and sb.cpu.host.rip == HOST_RIP_32
    sb.skip_instruction()
    assert sb.run().exit_reason is ExitReason.HLT


def test_27_2_4_vmcs_for_a_64bit_host_fails_on_a_32bit_host_vmfail_8() -> None:
    """SDM 27.2.4: a processor outside IA-32e mode refuses "host address-space size" = 1."""
    sb = _sandbox("protected", CPUID_TWICE, host32=True)
    sb.clear_bits(F.VM_EXIT_CONTROLS, X.LOAD_IA32_EFER)
    sb.set_bits(F.VM_EXIT_CONTROLS, X.HOST_ADDR_SPACE_SIZE)
    sb.set_bits(F.HOST_CR4, Cr4.PAE)
    result = sb.enter()
    assert result.status is VmxStatus.FAIL_VALID and result.error == 8, result


def test_28_5_1_exit_keeps_cr0_cd_nw_et_of_the_processor() -> None:
    """SDM 28.5.1: a VM exit does not modify CR0.ET, CD and NW (nor reserved bits): they keep the
    values the processor had, whatever the host CR0 field says."""
    sb = _sandbox("protected", CPUID_TWICE, host32=True)
    sb.cpu.host.cr0 |= int(Cr0.CD | Cr0.NW)
    sb.write(F.HOST_CR0, sb.read(F.HOST_CR0) & ~int(Cr0.ET))
    assert sb.run().exit_reason is ExitReason.CPUID
    assert sb.cpu.host.cr0 & Cr0.CD and sb.cpu.host.cr0 & Cr0.NW and sb.cpu.host.cr0 & Cr0.ET
