"""Intercept specs as people say them, resolved through the architecture tables, and the VMCS
settings they produce (SDM 25.6: controls, exception bitmap, I/O and MSR bitmaps, CR masks)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4
from pyvmx.tools.intercepts import Intercept, InterceptError, parse_intercept, plan_intercepts


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("io", Intercept("io")),
        ("io:0x3f8", Intercept("io", 0x3F8, 0x3F8)),
        ("IO:1016", Intercept("io", 0x3F8, 0x3F8)),
        ("io:0x3f8-0x3ff", Intercept("io", 0x3F8, 0x3FF)),
        ("msr", Intercept("msr")),
        ("msr-write:IA32_EFER", Intercept("msr-write", 0xC0000080)),
        ("msr_write:efer", Intercept("msr-write", 0xC0000080)),
        ("msr-read:MSR_LSTAR", Intercept("msr-read", 0xC0000082)),
        ("msr:0x10", Intercept("msr", 0x10)),
        ("cr0:PG", Intercept("cr0", 1 << 31)),
        ("cr0:PG+TS", Intercept("cr0", (1 << 31) | (1 << 3))),
        ("cr0:31", Intercept("cr0", 1 << 31)),
        ("cr4:VMXE", Intercept("cr4", 1 << 13)),
        ("exception:PF", Intercept("exception", 14)),
        ("exception:#GP", Intercept("exception", 13)),
        ("exception:page-fault", Intercept("exception", 14)),
        ("exception:6", Intercept("exception", 6)),
        ("exception", Intercept("exception")),
        ("hlt", Intercept("hlt")),
        ("PAUSE", Intercept("pause")),
        ("interrupt_window", Intercept("interrupt-window")),
        ("external-interrupt", Intercept("external-interrupt", option="ack")),
        ("external-interrupt:noack", Intercept("external-interrupt", option="noack")),
        ("preemption-timer:100", Intercept("preemption-timer", 100)),
        ("control:unrestricted-guest", Intercept("control", int(S.UNRESTRICTED_GUEST), option="UNRESTRICTED_GUEST")),
        ("control:CPU_BASED_RDTSC_EXITING", Intercept("control", int(C.RDTSC_EXITING), option="CPU_BASED_RDTSC_EXITING")),
        ("cpuid", Intercept("cpuid")),
    ],
)
def test_parse(spec: str, expected: Intercept) -> None:
    got = parse_intercept(spec)
    assert (got.kind, got.target, got.end, got.option) == (expected.kind, expected.target, expected.end, expected.option)
    assert str(got) == spec


@pytest.mark.parametrize(
    "spec, token",
    [
        ("frobnicate", "'frobnicate'"),
        ("io:0x3g8", "'0x3g8'"),
        ("io:0x10000", "0x10000"),
        ("io:0x3ff-0x3f8", "0x3ff-0x3f8"),
        ("msr-write:IA32_EFFER", "'IA32_EFFER'"),
        ("msr:0x100000000", "0x100000000"),
        ("cr0:PQ", "'PQ'"),
        ("cr0:64", "'64'"),
        ("exception:XX", "'XX'"),
        ("exception:32", "'32'"),
        ("hlt:1", "'hlt'"),
        ("preemption-timer", "preemption-timer"),
        ("preemption-timer:soon", "preemption-timer:soon"),
        ("external-interrupt:maybe", "'maybe'"),
        ("control:NO_SUCH", "'NO_SUCH'"),
        ("io:", "io:"),
        ("", "empty"),
    ],
)
def test_bad_specs_name_the_token(spec: str, token: str) -> None:
    with pytest.raises(InterceptError) as info:
        parse_intercept(spec)
    message = str(info.value)
    assert token in message and "\n" not in message


@given(st.integers(0, 0xFFFF))
def test_any_port_number(port: int) -> None:
    i = parse_intercept(f"io:{port:#x}")
    assert i.target == i.end == port


def test_plan_gathers_settings() -> None:
    plan = plan_intercepts(
        ["io:0x3f8", "io:0x60-0x64", "msr-write:IA32_EFER", "msr-read:0x10", "cr0:PG", "cr0:TS", "cr4:PAE",
         "exception:PF", "exception:UD", "hlt", "pause", "rdrand", "external-interrupt", "preemption-timer:100", "cpuid"]
    )
    assert plan.io_ports == {0x3F8, 0x60, 0x61, 0x62, 0x63, 0x64} and plan.uses_io_bitmaps and not plan.io_all
    assert plan.msr_write == {0xC0000080} and plan.msr_read == {0x10} and plan.uses_msr_bitmap
    assert plan.cr0_mask == Cr0.PG | Cr0.TS and plan.cr4_mask == Cr4.PAE
    assert plan.exception_bitmap == (1 << 14) | (1 << 6)
    assert plan.proc == C.HLT_EXITING | C.PAUSE_EXITING and plan.proc2 == S.RDRAND_EXITING
    assert plan.pin == P.EXT_INTR_MASK | P.VMX_PREEMPTION_TIMER
    assert plan.exit_controls == X.ACK_INTR_ON_EXIT | X.SAVE_VMX_PREEMPTION_TIMER
    assert plan.preemption_timer == 100
    assert any("cpuid" in note for note in plan.notes)


def test_msrs_outside_the_bitmap_always_exit() -> None:
    """SDM 26.1.3: RDMSR/WRMSR of an MSR outside 0-0x1FFF and 0xC0000000-0xC0001FFF exits
    whatever the bitmap holds."""
    plan = plan_intercepts(["msr-read:KVM_WALL_CLOCK_NEW"])
    assert plan.msr_read == {0x4B564D00} and "always exit" in plan.notes[0]


# --- applied to the sandbox: the seed's answers bit for bit -------------------------------------------
@pytest.fixture
def sandbox():  # type: ignore[no-untyped-def]
    from pyvmx.guest.sandbox import VmxSandbox

    return VmxSandbox("long", "hlt\n")


def test_io_bitmap_bit_0x3f8(sandbox) -> None:  # type: ignore[no-untyped-def]
    """Seed 002: use I/O bitmaps (primary bit 25), bitmap A bit 0x3F8 set, nothing else
    (SDM 25.6.4: A covers ports 0-0x7FFF, one bit per port)."""
    from pyvmx.guest.sandbox import IO_BITMAP_A, IO_BITMAP_B
    from pyvmx.tools.intercepts import apply_to_sandbox

    apply_to_sandbox(plan_intercepts(["io:0x3f8", "io:0x8000"]), sandbox)
    proc = sandbox.read(F.CPU_BASED_VM_EXEC_CONTROL)
    assert proc & C.USE_IO_BITMAPS and not proc & C.UNCOND_IO_EXITING
    a = sandbox.memory.read(IO_BITMAP_A, 4096)
    b = sandbox.memory.read(IO_BITMAP_B, 4096)
    assert a == bytes(0x7F) + b"\x01" + bytes(4096 - 0x80)
    assert b == b"\x01" + bytes(4095)


def test_msr_bitmap_only_efer_writes(sandbox) -> None:  # type: ignore[no-untyped-def]
    """Seed 002: the MSR bitmap all clear but bit 0x80 of the write-high quarter (offset 0xC00,
    SDM 25.6.9), i.e. bit 3072*8 + 0x80 of the page; primary control bit 28."""
    from pyvmx.guest.sandbox import MSR_BITMAP
    from pyvmx.tools.intercepts import apply_to_sandbox

    apply_to_sandbox(plan_intercepts(["msr-write:IA32_EFER"]), sandbox)
    assert sandbox.read(F.CPU_BASED_VM_EXEC_CONTROL) & C.USE_MSR_BITMAPS
    page = sandbox.memory.read(MSR_BITMAP, 4096)
    assert [(i, byte) for i, byte in enumerate(page) if byte] == [(0xC00 + 0x80 // 8, 1)]


def test_msr_bitmap_all(sandbox) -> None:  # type: ignore[no-untyped-def]
    from pyvmx.guest.sandbox import MSR_BITMAP
    from pyvmx.tools.intercepts import apply_to_sandbox

    apply_to_sandbox(plan_intercepts(["msr-read", "msr-write:0x10"]), sandbox)
    page = sandbox.memory.read(MSR_BITMAP, 4096)
    assert page[:2048] == b"\xff" * 2048  # read-low and read-high
    assert [(i, byte) for i, byte in enumerate(page[2048:], 2048) if byte] == [(0x800 + 2, 1)]


def test_cr0_mask_and_shadow(sandbox) -> None:  # type: ignore[no-untyped-def]
    """Seed 002: CR0 guest/host mask = bit 31; the shadow holds the guest's current PG so only a
    change exits (SDM 25.6.6).  CR4.VMXE, owned before, keeps its shadow of 0."""
    from pyvmx.tools.intercepts import apply_to_sandbox

    cr0, cr4 = sandbox.read(F.GUEST_CR0), sandbox.read(F.GUEST_CR4)
    apply_to_sandbox(plan_intercepts(["cr0:PG", "cr4:PAE"]), sandbox)
    assert sandbox.read(F.CR0_GUEST_HOST_MASK) == Cr0.PG
    assert sandbox.read(F.CR0_READ_SHADOW) & Cr0.PG == cr0 & Cr0.PG
    assert sandbox.read(F.CR4_GUEST_HOST_MASK) == Cr4.VMXE | Cr4.PAE
    assert sandbox.read(F.CR4_READ_SHADOW) == cr4 & Cr4.PAE


def test_controls_checked_against_the_cpu() -> None:
    """A control the CPU profile does not allow (allowed-1 bit clear, SDM A.3) is refused with
    the intercept that needed it."""
    from pyvmx.guest.sandbox import VmxSandbox
    from pyvmx.tools.capsview import profile_without
    from pyvmx.tools.intercepts import apply_to_sandbox

    sb = VmxSandbox("long", "hlt\n", profile=profile_without(("VMX_PREEMPTION_TIMER",)))
    with pytest.raises(InterceptError, match="VMX_PREEMPTION_TIMER.*preemption-timer:5"):
        apply_to_sandbox(plan_intercepts(["preemption-timer:5"]), sb)
