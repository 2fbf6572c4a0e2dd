"""Guest behaviour and out-of-band writes that used to crash or hang the host process (issue 11):
each ends architecturally or as a typed exit value, never as a Python exception out of
``vcpu.run()`` and never as a run that does not end. Every run here is bounded in guest time."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.vmcs_fields import VmcsWidth
from pyvmx.engine.deadline import HostDeadline
from pyvmx.kvm import exit_handlers, host_time
from pyvmx.kvm.exit_handlers import MAX_STRING_IO_ELEMENTS
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.kvm.exits import HltExit, InternalError, IoDirection, IoExit, MmioExit, WallClockExit
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.vcpu import MAX_ENTRIES_WITHOUT_PROGRESS, Vcpu, VcpuStateError
from pyvmx.kvm.vm import Vm
from pyvmx.vmx.caps import CpuProfile
from pyvmx.vmx.vmcs import FIELD_SLOTS

from tests.kvm.hv.guests import boot, source_image
from tests.tools.cli_helpers import run_cli

_NARROW_GUEST_FIELDS = [
    f for f in F if f.width in (VmcsWidth.BITS16, VmcsWidth.BITS32) and f.name.startswith("GUEST_")
]


@pytest.mark.parametrize("field", _NARROW_GUEST_FIELDS, ids=lambda f: f.name)
def test_vmcs_memory_written_behind_the_processor_reads_masked_to_the_field_width(field: F) -> None:
    """SDM 25.11.1: software must not touch the VMCS region except with VMREAD/VMWRITE, and the
    data format is the processor's. A 16/32-bit field whose slot's high bytes were overwritten
    reads as its width holds, so the guest runs exactly as before (to its HLT) instead of the
    VM entry raising struct.error."""
    kvm = Kvm()
    vm = kvm.create_vm(memory_size=1 << 20)
    vcpu = boot(vm, source_image("hlt\n"))
    before = vcpu.vmcs_read(field)
    offset, _ = FIELD_SLOTS[int(field)]
    address = vcpu.loaded_vmcs.address + offset
    width = 2 if field.width is VmcsWidth.BITS16 else 4
    kvm.memory.write(address + width, b"\xa5" * (8 - width))
    assert vcpu.vmcs_read(field) == before
    assert isinstance(vcpu.run(time_limit=10_000), HltExit)


# --- guest time bounds every run (issue 11.4) ----------------------------------------------------
REP_OUTSB_FOREVER = """
    mov $-1, %rcx
    mov $0x1234, %dx          # no device claims this port: every exit goes to the user
    xor %esi, %esi
    rep outsb
    hlt
"""


def test_rep_outsb_with_rcx_all_ones_moves_guest_time_per_element() -> None:
    """SDM Vol. 2 "REP": a REP string instruction with RCX = 2^64-1 runs ~2^64 iterations, each
    taking time. Each IoExit hands the user a batch of elements; the guest time it took must
    grow with the batch, so a caller bounding guest time (``pyvmx run --max-tsc``, which ignores
    IoExits of ports with no device) ends. Guest time stood still before, and ran for ever."""
    vm = Kvm().create_vm(memory_size=1 << 20)
    vcpu = boot(vm, source_image(REP_OUTSB_FOREVER))
    for _ in range(3):
        before = vcpu.guest_tsc()
        exit = vcpu.run(time_limit=10_000)  # room for a few exits' round trips (vmexit_tsc_cost)
        assert isinstance(exit, IoExit) and exit.count == MAX_STRING_IO_ELEMENTS
        assert vcpu.guest_tsc() - before >= exit.count * host_time.STRING_IO_ELEMENT_TSC > 0


def test_pyvmx_run_max_tsc_ends_rep_outsb_with_rcx_all_ones(tmp_path: Path) -> None:
    """The issue's reproducer: ``pyvmx run --max-tsc 1000`` of that guest ends at the limit
    (exit status 131) instead of running for ever (the subprocess timeout bounds the test)."""
    source = tmp_path / "outsb.S"
    source.write_text(".code64\n.globl _start\n_start:\n" + REP_OUTSB_FOREVER)
    proc = run_cli("run", str(source), "--max-tsc", "1000", timeout=120)
    assert proc.returncode == 131, proc.stderr
    assert "guest-TSC limit of 1000 reached" in proc.stderr


def _tsc_after_cpuids(cost: int) -> tuple[int, int]:
    kvm = Kvm(profile=dataclasses.replace(CpuProfile.default(), vmexit_tsc_cost=cost))
    vm = kvm.create_vm(memory_size=1 << 20)
    vcpu = boot(vm, source_image("cpuid\ncpuid\ncpuid\nhlt\n"))
    assert isinstance(vcpu.run(time_limit=100_000), HltExit)
    return vcpu.guest_tsc(), vcpu.stats.entries


def test_every_vm_exit_costs_the_profiles_round_trip_time() -> None:
    """Every VM entry that comes back with an exit moves the processor's clock by the CPU
    profile's ``vmexit_tsc_cost`` (the exit/entry latency real processors have): the same
    guest run with a cost of 500 and of 0 differs by exactly 500 ticks per entry."""
    with_cost, entries = _tsc_after_cpuids(500)
    without, entries_0 = _tsc_after_cpuids(0)
    assert entries == entries_0 >= 4  # three CPUID exits and the HLT
    assert with_cost - without == 500 * entries


def test_every_exit_the_hypervisor_handles_costs_guest_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyvmx.kvm.host_time: the TSC runs on while KVM handles an exit; the same guest with a
    handling cost of 1000 and of 0 ends exactly 1000 ticks per entry apart."""
    monkeypatch.setattr(host_time, "EXIT_HANDLING_TSC", 1000)
    with_cost, entries = _tsc_after_cpuids(0)
    monkeypatch.setattr(host_time, "EXIT_HANDLING_TSC", 0)
    without, entries_0 = _tsc_after_cpuids(0)
    assert entries == entries_0 >= 4
    assert with_cost - without == 1000 * entries


def test_the_no_progress_guard_counts_entries_across_run_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every time charge at 0 (a CPU profile without exit cost, no cost per string element),
    the REP OUTS above returns an IoExit per run() and guest time stands still: the guard against
    entries without progress must count across run() calls and end it as an InternalError --
    it restarted at 0 on each call, and the loop never ended."""
    monkeypatch.setattr(exit_handlers, "MAX_STRING_IO_ELEMENTS", 1)
    monkeypatch.setattr(host_time, "STRING_IO_ELEMENT_TSC", 0)
    monkeypatch.setattr(host_time, "EXIT_HANDLING_TSC", 0)
    kvm = Kvm(profile=dataclasses.replace(CpuProfile.default(), vmexit_tsc_cost=0))
    vcpu = boot(kvm.create_vm(memory_size=1 << 20), source_image(REP_OUTSB_FOREVER))
    for calls in range(1, MAX_ENTRIES_WITHOUT_PROGRESS + 100):
        exit = vcpu.run(time_limit=1000)
        if not isinstance(exit, IoExit):
            break
    assert isinstance(exit, InternalError) and "no progress" in exit.reason
    assert calls <= MAX_ENTRIES_WITHOUT_PROGRESS + 2


# --- host time: a wall-clock limit the engine polls (issue 11.4, 14.7) --------------------------
def test_host_deadline_stops_an_attached_engine_from_its_timer_thread() -> None:
    """pyvmx.engine.deadline: once the deadline passes, the timer thread calls every attached
    stop function (uc_emu_stop for a CPU engine) until it is detached -- no signal involved."""
    stopped = threading.Event()
    deadline = HostDeadline(0.05)
    with deadline.attached(stopped.set):
        assert stopped.wait(30)
    assert deadline.passed() and deadline.remaining() == 0
    assert not HostDeadline(None).passed() and HostDeadline(None).remaining() is None
    with pytest.raises(ValueError):
        HostDeadline(-1)


def test_a_passed_wall_deadline_ends_run_with_wall_clock_exit() -> None:
    """run(wall_deadline=...) checks the deadline at every exit and before every entry: a
    deadline already passed returns WallClockExit at once, the guest state intact, and a later
    run() without it continues the guest to its HLT."""
    vm = Kvm().create_vm(memory_size=1 << 20)
    vcpu = boot(vm, source_image("mov $7, %eax\nhlt\n"))
    exit = vcpu.run(time_limit=10**9, wall_deadline=HostDeadline(0))
    assert isinstance(exit, WallClockExit) and exit.seconds == 0
    assert isinstance(vcpu.run(time_limit=10**9), HltExit)
    assert vcpu.get_gpr(0) == 7


# --- guest actions that crashed the host (issue 11.5) -------------------------------------------
def _guest(source: str, memory: int = 1 << 20) -> tuple[Vm, Vcpu]:
    vm = Kvm().create_vm(memory_size=memory)
    return vm, boot(vm, source_image(source))


@pytest.mark.parametrize("write", [False, True], ids=["load", "store"])
def test_access_split_at_the_end_of_ram_goes_to_mmio_as_its_own_piece(write: bool) -> None:
    """An 8-byte access at RAM end - 3: 3 bytes of RAM, then 5 bytes with nothing behind them.
    The MMIO piece is a 5-byte KVM_EXIT_MMIO (what KVM's emulator hands the VMM for the part of
    a split access that is MMIO, x86.c emulator_read_write_onepage()); completing it finishes
    the instruction. It raised BusAccessError ("size must be 1, 2, 4 or 8") out of run()."""
    op = "mov %rbx, (%rax)" if write else "mov (%rax), %rbx"
    vm, vcpu = _guest(f"mov $0xffffd, %rax\nmov $0x8877665544332211, %rbx\n{op}\nhlt\n")
    vm.write_guest(0xFFFFD, b"\xaa\xbb\xcc")
    exit = vcpu.run(time_limit=100_000)
    assert isinstance(exit, MmioExit) and (exit.gpa, exit.size, exit.is_write) == (0x100000, 5, write)
    if write:
        assert bytes(exit.data) == bytes.fromhex("4455667788")
        assert vm.read_guest(0xFFFFD, 3) == bytes.fromhex("112233")
    else:
        exit.data[:] = bytes.fromhex("0102030405")
    assert isinstance(vcpu.run(time_limit=100_000), HltExit)
    if not write:
        assert vcpu.get_gpr(3) == 0x0504030201CCBBAA


def test_rep_insb_from_an_unclaimed_port_into_no_ram_drops_the_data() -> None:
    """REP INSB to a guest-physical address with no RAM and no device: the user answers the
    IoExit, the elements' writes go nowhere (a bus with nothing there, QEMU unassigned_mem_ops)
    and the instruction retires with RDI and RCX advanced (SDM Vol. 2 INS). The completion
    raised GuestMemoryError out of run()."""
    vm, vcpu = _guest("mov $0x200000, %rdi\nmov $4, %rcx\nmov $0x1234, %dx\nrep insb\nhlt\n")
    exit = vcpu.run(time_limit=100_000)
    assert isinstance(exit, IoExit) and exit.count == 4 and exit.direction is IoDirection.IN
    assert isinstance(vcpu.run(time_limit=100_000), HltExit)
    assert (vcpu.get_gpr(7), vcpu.get_gpr(1)) == (0x200004, 0)


@pytest.mark.parametrize(
    "source",
    [
        "mov $0x200000, %rdi\nmov $4, %rcx\nmov $0x3f8, %dx\nrep insb\nhlt\n",  # COM1 claims the port
        "mov $0xfffff, %rdi\nmov $4, %rcx\nmov $0x3fd, %dx\nrep insw\nhlt\n",  # the first element straddles RAM's end
    ],
    ids=["device-port", "straddling-ram-end"],
)
def test_string_io_into_no_ram_from_a_device_port_retires(source: str) -> None:
    """The same with an in-kernel device on the port: the instruction retires (it injected #GP
    for the missing memory, which no IDT could deliver: a triple fault). The part of an element
    that is RAM is written."""
    vm, vcpu = _guest(source)
    assert isinstance(vcpu.run(time_limit=100_000), HltExit)
    assert vcpu.get_gpr(1) == 0
    if "insw" in source:
        assert vm.read_guest(0xFFFFF, 1) == b"\x60"  # COM1's LSR (THR and transmitter empty)


def test_rep_outsb_from_no_ram_sends_all_ones() -> None:
    vm, vcpu = _guest("mov $0x200000, %rsi\nmov $4, %rcx\nmov $0x1234, %dx\nrep outsb\nhlt\n")
    exit = vcpu.run(time_limit=100_000)
    assert isinstance(exit, IoExit) and bytes(exit.data) == b"\xff" * 4
    assert isinstance(vcpu.run(time_limit=100_000), HltExit)


def test_an_unexpected_host_exception_becomes_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug the guest provokes in the hypervisor (here: the CPUID handler raising) ends run()
    as KVM_EXIT_INTERNAL_ERROR with the VMCS dump and the exception, never as a traceback; API
    misuse (VcpuStateError) still raises."""
    vm, vcpu = _guest("cpuid\nhlt\n")

    def broken(vcpu_: Vcpu, exit_: object) -> None:
        raise ZeroDivisionError("a model bug")

    monkeypatch.setitem(exit_handlers.EXIT_HANDLERS, ExitReason.CPUID, broken)
    exit = vcpu.run(time_limit=100_000)
    assert isinstance(exit, InternalError) and isinstance(exit.exception, ZeroDivisionError)
    assert "host exception ZeroDivisionError: a model bug" in exit.reason and "Guest State" in exit.dump

    def misuse(vcpu_: Vcpu, exit_: object) -> None:
        raise VcpuStateError("misused")

    monkeypatch.setitem(exit_handlers.EXIT_HANDLERS, ExitReason.CPUID, misuse)
    with pytest.raises(VcpuStateError):
        vcpu.run(time_limit=100_000)


def test_a_load_split_into_two_mmio_exits_completes_and_moves_guest_time() -> None:
    """An 8-byte load at 0x100ffd with nothing there is two MMIO pieces (3 bytes, then 5 on the
    next page, x86.c emulator_read_write_onepage()): the second KVM_EXIT_MMIO comes from
    completing the first, with no VM entry in between. Completing an access is host work and
    costs guest time (pyvmx.kvm.host_time), so no chain of such exits holds guest time still."""
    vm, vcpu = _guest("mov $0x100ffd, %rax\nmov (%rax), %rbx\nhlt\n")
    first = vcpu.run(time_limit=100_000)
    assert isinstance(first, MmioExit) and (first.gpa, first.size) == (0x100FFD, 3)
    first.data[:] = bytes.fromhex("010203")
    before = vcpu.guest_tsc()
    second = vcpu.run(time_limit=100_000)
    assert isinstance(second, MmioExit) and (second.gpa, second.size) == (0x101000, 5)
    assert vcpu.guest_tsc() - before >= host_time.EMULATED_ACCESS_TSC > 0
    second.data[:] = bytes.fromhex("0405060708")
    # The load completes with both pieces (KVM's mmio_fragments); it asked for the first
    # piece again, for ever, when the emulator forgot it.
    assert isinstance(vcpu.run(time_limit=100_000), HltExit)
    assert vcpu.get_gpr(3) == 0x0807060504030201


@pytest.mark.parametrize("op, index", [("insb", 7), ("outsb", 6)])
def test_string_io_to_a_port_not_intercepted_with_mmio_memory_is_emulated(op: str, index: int) -> None:
    """With only port 0x3f8 intercepted, REP INSB/OUTSB on port 0x1234 reaches the (empty)
    platform directly, but its memory side has no RAM: the EPT violation is MMIO and KVM's
    emulator carries the string instruction out (em_in/em_out with a string operand), one
    KVM_EXIT_MMIO per element here. It ended in "MMIO emulation failed" before."""
    pointer = "rdi" if op == "insb" else "rsi"
    vm, vcpu = _guest(f"mov $0x200000, %{pointer}\nmov $3, %rcx\nmov $0x1234, %dx\nrep {op}\nhlt\n")
    vcpu.intercept_io(0x3F8, only=True)
    exits = []
    for _ in range(10):
        exit = vcpu.run(time_limit=100_000)
        if not isinstance(exit, MmioExit):
            break
        exits.append((exit.gpa, exit.size, exit.is_write, bytes(exit.data)))
    assert isinstance(exit, HltExit)
    if op == "insb":  # the empty platform port reads all ones, written to MMIO
        assert exits == [(0x200000 + i, 1, True, b"\xff") for i in range(3)]
    else:
        assert [(gpa, size, write) for gpa, size, write, _ in exits] == [(0x200000 + i, 1, False) for i in range(3)]
    assert (vcpu.get_gpr(index), vcpu.get_gpr(1)) == (0x200003, 0)
