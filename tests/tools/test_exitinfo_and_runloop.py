"""Exit information decoded for people (SDM 28.2.1 qualification layouts, 25.9.2 interruption
information, Appendix C reasons) and the tools' exit loop on the sandbox: handlers, stalls,
the watchdog that turns a guest spinning forever into a stall instead of a hang."""

from __future__ import annotations

import time

import pytest

from pyvmx.arch.controls import ProcBasedControls
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.msr import UnknownNameError
from pyvmx.vmx.exitinfo import decode_intr_info, decode_qualification, format_fields, parse_exit_reason, reason_name
from pyvmx.tools.runloop import ExitRecord, Outcome, SeedHypervisor, run_sandbox


@pytest.mark.parametrize(
    "reason, qualification, intr_info, fields",
    [
        (28, 0x0000_0300, 0, {"cr": 0, "access": "mov-to-cr", "gpr": "rbx"}),  # MOV CR0 <- RBX (Table 28-3)
        (28, 0x0000_0413, 0, {"cr": 3, "access": "mov-from-cr", "gpr": "rsp"}),
        (28, 0x0020_0030 | 0x40, 0, {"cr": 0, "access": "lmsw", "lmsw_operand": "memory", "lmsw_source": 0x20}),
        (29, 0x0000_0517, 0, {"dr": 7, "direction": "mov-from-dr", "gpr": "rbp"}),  # Table 28-4
        (30, 0x0071_0048, 0, {"port": 0x71, "size": 1, "direction": "in", "string": False, "rep": False, "operand": "imm"}),
        (30, 0x0080_0031, 0, {"port": 0x80, "size": 2, "direction": "out", "string": True, "rep": True, "operand": "dx"}),
        (48, 0x0000_0182, 0, {"read": False, "write": True, "fetch": False, "readable": False, "writable": False,
                              "executable": False, "gla_valid": True, "translated": True, "nmi_unblocking": False}),  # Table 28-7
        (9, 0x4000_0028, 0, {"selector": 0x28, "source": "iret"}),
        (0, 0x4000_0000, 0x8000_0B0E, {"linear_address": 0x40000000}),  # #PF: CR2 value
        (0, 0x0000_4001, 0x8000_0301, {"b0_b3": 1, "bd": False, "bs": True, "bld": False, "rtm": False}),  # #DB
        (0, 0, 0x8000_0603, {}),  # #BP: no qualification
        (12, 0, 0, {}),
    ],
)
def test_decode_qualification(reason: int, qualification: int, intr_info: int, fields: dict[str, object]) -> None:
    assert decode_qualification(reason, qualification, intr_info) == fields


def test_intr_info_and_names() -> None:
    """SDM 25.9.2: vector 7:0, type 10:8, error code valid 11, NMI unblocking 12, valid 31."""
    assert decode_intr_info(0x8000_0B0E) == {"valid": True, "vector": 14, "type": "HARD_EXCEPTION", "error_code_valid": True, "exception": "PF"}
    assert decode_intr_info(0x8000_0031) == {"valid": True, "vector": 0x31, "type": "EXT_INTR", "error_code_valid": False}
    assert decode_intr_info(0x31) == {"valid": False}
    assert reason_name(30) == "IO_INSTRUCTION" and reason_name(0x8000_0021) == "INVALID_STATE (VM-entry failure)"
    assert reason_name(99) == "UNKNOWN_99"
    assert format_fields({"port": 0x3F8, "size": 1, "string": False, "rep": True, "operand": "dx"}) == "port=0x3f8 size=1 rep operand=dx"


@pytest.mark.parametrize(
    "text, reason",
    [("HLT", ExitReason.HLT), ("hlt", ExitReason.HLT), ("EXIT_REASON_HLT", ExitReason.HLT), ("io-instruction", ExitReason.IO_INSTRUCTION),
     ("io", ExitReason.IO_INSTRUCTION), ("pause", ExitReason.PAUSE_INSTRUCTION), ("wrmsr", ExitReason.MSR_WRITE),
     ("VMXOFF", ExitReason.VMOFF), (12, ExitReason.HLT), ("0x30", ExitReason.EPT_VIOLATION), ("mtf", ExitReason.MONITOR_TRAP_FLAG)],
)
def test_parse_exit_reason(text: str | int, reason: ExitReason) -> None:
    assert parse_exit_reason(text) is reason


@pytest.mark.parametrize("text", ["HALT", 35, "0x23", ""])
def test_parse_exit_reason_unknown(text: str | int) -> None:
    with pytest.raises(UnknownNameError):
        parse_exit_reason(text)


def test_handlers_compose_and_see_one_record() -> None:
    from pyvmx.guest.sandbox import VmxSandbox

    seen: list[ExitRecord] = []

    def spy(inner):  # type: ignore[no-untyped-def]
        def handler(rec: ExitRecord) -> Outcome:
            seen.append(rec)
            return inner(rec)

        return handler

    sb = VmxSandbox("long", "mov $7, %eax\nhere: cpuid\nhlt\n")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, ProcBasedControls.HLT_EXITING)
    result = run_sandbox(sb, spy(SeedHypervisor()), vcpu_id=3, vm_id=2)
    assert result.ended_by == "stop: guest halted" and result.exits == 2
    first = seen[0]
    assert (first.reason, first.rip, first.vcpu_id, first.vm_id, first.index) == (ExitReason.CPUID, sb.symbol("here"), 3, 2, 0)
    assert first.code[:2] == b"\x0f\xa2" and first.bitness == 64 and first.entry_rip == 0x10000
    assert first.guest_tsc == first.tsc_exit - first.tsc_entry == 1  # the MOV retired, the CPUID exited
    assert seen[1].tsc_entry == first.tsc_exit  # the TSC does not run while the host handles an exit


def test_halted_forever_is_a_stall() -> None:
    from pyvmx.guest.sandbox import VmxSandbox

    result = run_sandbox(VmxSandbox("long", "hlt\n"), SeedHypervisor())
    assert result.exits == 0 and result.stall is not None and "halted" in result.ended_by


def test_spinning_guest_ends_as_a_stall() -> None:
    """A guest that never exits: the watchdog stops the CPU engine after a second of wall time
    so that its instruction budget is checked, instead of hanging the tool."""
    from pyvmx.guest.sandbox import VmxSandbox

    sb = VmxSandbox("long", "spin: jmp spin\n", instruction_budget=1_000_000)
    start = time.monotonic()
    result = run_sandbox(sb, SeedHypervisor(), watchdog_after=0.2)
    assert result.stall == "instruction budget exhausted"
    assert time.monotonic() - start < 30
