"""``pyvmx vmcs dump`` and :func:`pyvmx.tools.vmcs_dump.dump_vmcs`: the layout of Linux's
dump_vmcs() (arch/x86/kvm/vmx/vmx.c, with vmx_dump_sel()/vmx_dump_dtsel()), checked against a
VMCS configured here, plus the decoded lines and the JSON save format."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.tools.vmcs_dump import VmcsFileError, VmcsSnapshot, load_vmcs, save_vmcs, vmcs_from_json
from pyvmx.vmx.vmcs_dump import dump_vmcs
from tests.tools.cli_helpers import run_cli

GUEST = "mov $0x3f8, %dx\nmov $0x41, %al\nport: out %al, %dx\nhlt\n"


@pytest.fixture(scope="module")
def configured():  # type: ignore[no-untyped-def]
    """A long-mode sandbox with HLT exiting, port 0x3F8 in I/O bitmap A, #UD and #PF in the
    exception bitmap and the preemption timer armed, run to its first exit (the OUT)."""
    from pyvmx.guest.sandbox import VmxSandbox

    sb = VmxSandbox("long", GUEST)
    sb.use_io_bitmaps(intercept=[0x3F8])
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    sb.write(F.EXCEPTION_BITMAP, (1 << 6) | (1 << 14))
    sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
    sb.write(F.VMX_PREEMPTION_TIMER_VALUE, 100000)
    exit = sb.run()
    assert exit.basic_reason == 30
    return sb


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_areas_in_linux_order(configured) -> None:  # type: ignore[no-untyped-def]
    """dump_vmcs() prints the guest state, then the host state, then the controls and exit
    information (Linux arch/x86/kvm/vmx/vmx.c)."""
    text = dump_vmcs(configured.cpu.vmcs)
    guest, host, control = (text.index(h) for h in ("*** Guest State ***", "*** Host State ***", "*** Control State ***"))
    assert guest < host < control


def test_guest_state_lines(configured) -> None:  # type: ignore[no-untyped-def]
    """Segments as vmx_dump_sel() prints them: sel/attr (the VMCS access-rights format, SDM
    25.4.1)/limit/base; descriptor tables as vmx_dump_dtsel(); RIP/RSP/RFLAGS from the VMCS."""
    sb = configured
    text = dump_vmcs(sb.cpu.vmcs)
    assert _line(text, "CS:") == "CS:   sel=0x0018, attr=0x0a09b, limit=0xffffffff, base=0x0000000000000000"
    assert _line(text, "TR:") == "TR:   sel=0x0028, attr=0x0008b, limit=0x00000067, base=0x0000000000001800"
    assert _line(text, "GDTR:") == "GDTR:                           limit=0x0000002f, base=0x0000000000001000"
    assert _line(text, "LDTR:").endswith("attr=0x10000, limit=0x00000000, base=0x0000000000000000")  # unusable
    assert _line(text, "RSP = ") == f"RSP = 0x{sb.read(F.GUEST_RSP):016x}  RIP = 0x{sb.symbol('port'):016x}"
    assert _line(text, "CR0: ").startswith(f"CR0: actual=0x{sb.read(F.GUEST_CR0):016x}, shadow=")
    assert _line(text, "EFER= ") == f"EFER= 0x{sb.read(F.GUEST_IA32_EFER):016x}"
    assert "PreemptionTimer = " in text


def test_control_words_decoded_bit_by_bit(configured) -> None:  # type: ignore[no-untyped-def]
    """The raw words as Linux prints them, and the names of their set bits from
    pyvmx.arch.controls (SDM 25.6.1, 25.6.2, 25.7.1, 25.8.1)."""
    sb = configured
    text = dump_vmcs(sb.cpu.vmcs)
    cpu_based = sb.read(F.CPU_BASED_VM_EXEC_CONTROL)
    assert _line(text, "CPUBased=").startswith(f"CPUBased=0x{cpu_based:08x} SecondaryExec=0x{sb.read(F.SECONDARY_VM_EXEC_CONTROL):08x}")
    names = _line(text, "  CPUBased:").split()
    assert {"HLT_EXITING", "USE_IO_BITMAPS", "ACTIVATE_SECONDARY_CONTROLS"} <= set(names)
    assert "UNCOND_IO_EXITING" not in names
    assert "VMX_PREEMPTION_TIMER" in _line(text, "  PinBased:")
    secondary = _line(text, "  SecondaryExec:")
    assert "ENABLE_EPT" in secondary and "UNRESTRICTED_GUEST" not in secondary  # long mode needs none
    assert "IA32E_MODE" in _line(text, "  EntryControls:")
    assert "HOST_ADDR_SPACE_SIZE" in _line(text, "  ExitControls:")
    assert _line(text, "  ExceptionBitmap:").split()[1:] == ["UD", "PF"]


def test_unnamed_default1_bits_are_listed_apart() -> None:
    """Default1 bits of the primary controls (SDM A.3.2: bits 1, 4-6, 8, 13-16, 26) that the SDM
    leaves unnamed are shown as numbers; 15 and 16 are CR3-load/store exiting."""
    snap = VmcsSnapshot({F.CPU_BASED_VM_EXEC_CONTROL: 0x0401E172 | C.HLT_EXITING})
    line = _line(dump_vmcs(snap), "  CPUBased:")
    assert line.split("(")[0].split() == ["CPUBased:", "HLT_EXITING", "CR3_LOAD_EXITING", "CR3_STORE_EXITING"]
    assert "(+ unnamed bits 1,4,5,6,8,13,14,26)" in line


def test_exit_information(configured) -> None:  # type: ignore[no-untyped-def]
    """The exit reason by name and the I/O qualification split into its fields (SDM Table
    28-5); Linux's "reason=%08x qualification=%016lx" line is kept."""
    text = dump_vmcs(configured.cpu.vmcs)
    assert _line(text, "        reason=") == "        reason=0000001e qualification=0000000003f80000"
    assert _line(text, "  Exit reason:") == "  Exit reason: IO_INSTRUCTION (30)"
    assert _line(text, "  Exit qualification:") == "  Exit qualification: port=0x3f8 size=1 direction=out operand=dx"
    assert _line(text, "VMExit:").endswith("ilen=00000001")
    assert "I/O bitmap A = 0x0000000000004000" in text


def test_failed_entry_and_exception_exit() -> None:
    """Bit 31 of the exit-reason field marks a failed VM entry (SDM 25.9.1); a #PF exit's
    qualification is the linear address (SDM 28.2.1)."""
    failed = dump_vmcs(VmcsSnapshot({F.VM_EXIT_REASON: 0x80000021}))
    assert "Exit reason: INVALID_STATE (VM-entry failure) (33)" in failed
    pf = dump_vmcs(VmcsSnapshot({F.VM_EXIT_REASON: 0, F.VM_EXIT_INTR_INFO: 0x80000B0E, F.EXIT_QUALIFICATION: 0x40000000}))
    assert "Exit qualification: linear_address=0x40000000" in pf
    assert "VMExit intr_info: valid vector=0xe type=HARD_EXCEPTION error_code_valid exception=PF" in pf


def test_any_reader_works(configured) -> None:  # type: ignore[no-untyped-def]
    """The processor's CurrentVmcs (VMREAD), the VmcsRegion in memory and a snapshot dump alike."""
    sb = configured
    region = sb.cpu.current_vmcs_region()
    assert dump_vmcs(region) == dump_vmcs(sb.cpu.vmcs) == dump_vmcs(VmcsSnapshot.copy_of(sb.cpu.vmcs))


def test_save_and_load_round_trip(configured, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "vmcs.json"
    save_vmcs(configured.cpu.vmcs, path)
    data = json.loads(path.read_text())
    assert data["format"] == "pyvmx-vmcs" and data["version"] == 1
    assert data["fields"]["GUEST_RIP"] == hex(configured.symbol("port"))
    assert dump_vmcs(load_vmcs(path)) == dump_vmcs(configured.cpu.vmcs)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"format": "other"}, "not a saved VMCS"),
        ({"format": "pyvmx-vmcs", "version": 9, "fields": {}}, "unsupported version"),
        ({"format": "pyvmx-vmcs", "version": 1, "fields": {"GUEST_RIPP": 1}}, "unknown VMCS field 'GUEST_RIPP'"),
        ({"format": "pyvmx-vmcs", "version": 1, "fields": {"GUEST_CS_SELECTOR": "0x10000"}}, "16-bit field"),
        ({"format": "pyvmx-vmcs", "version": 1, "fields": {"GUEST_RIP": "twelve"}}, "GUEST_RIP"),
    ],
)
def test_bad_saved_vmcs(data: object, message: str) -> None:
    with pytest.raises(VmcsFileError, match=re.escape(message)):
        vmcs_from_json(data)


def test_missing_fields_read_as_zero() -> None:
    """A file lists only the fields it has; the others are 0, as after VMCLEAR."""
    snap = vmcs_from_json({"format": "pyvmx-vmcs", "version": 1, "fields": {"GUEST_RIP": 4096}})
    assert snap.read(F.GUEST_RIP) == 0x1000 and snap.read(F.GUEST_RSP) == 0


# --- the command line ------------------------------------------------------------------------------
def test_cli_dump_example(tmp_path: Path) -> None:
    saved = tmp_path / "v.json"
    r = run_cli("vmcs", "dump", "--example", "long", "--save", str(saved))
    assert r.returncode == 0, r.stderr
    assert "*** Guest State ***" in r.stdout and "*** Control State ***" in r.stdout
    assert "Exit reason: IO_INSTRUCTION (30)" in r.stdout
    again = run_cli("vmcs", "dump", "--from", str(saved))
    assert again.returncode == 0, again.stderr
    body = lambda out: out.split("\n", 1)[1]  # noqa: E731 - the first line is the title
    assert body(again.stdout) == body(r.stdout)


def test_cli_dump_real_mode_before_launch() -> None:
    """Real mode needs "unrestricted guest" (SDM 27.3.1.1): the dump shows it, and no exit yet."""
    r = run_cli("vmcs", "dump", "--example", "real", "--no-run")
    assert r.returncode == 0, r.stderr
    assert "UNRESTRICTED_GUEST" in _line(r.stdout, "  SecondaryExec:")
    assert "reason=00000000" in r.stdout


@pytest.mark.parametrize(
    "args",
    [("vmcs", "dump", "--from", "/no/such/file.json"), ("vmcs", "dump", "--example", "long", "--from", "x.json"), ("vmcs", "dump", "--example", "v86")],
)
def test_cli_dump_errors_are_one_line(args: tuple[str, ...]) -> None:
    r = run_cli(*args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pyvmx: error:")


def test_cli_dump_bad_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run_cli("vmcs", "dump", "--from", str(bad))
    assert r.returncode == 2 and r.stderr.startswith("pyvmx: error:") and "not JSON" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
