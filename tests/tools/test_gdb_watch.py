"""Watchpoints (Z2 write, Z3 read, Z4 access) on guest-linear addresses, through real gdb and
the remote protocol: the stop comes right after the accessing instruction, as x86 data
breakpoints are traps (SDM 18.2.4, 18.3.1.2), with ``T05watch:ADDR;`` / ``rwatch`` / ``awatch``
(gdb manual, "Stop Reply Packets").

Mechanism: the pages the watched range maps to are tracked by the hypervisor's MMU (their EPT
entries are removed, no huge page may cover them: Linux's kvm_page_track does the same for
write tracking), so every access to them is an EPT violation given to the debugger (SDM 28.2.1,
with the guest-linear address of the access); the debugger steps that instruction with the
tracking off (monitor trap flag) and checks whether it touched the watched bytes.  The guest's
debug registers are left to the guest."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pyvmx.guest.assemble import assemble
from tests.tools.gdb_session import needs_gdb, registers, run_with_gdb
from tests.tools.test_gdbstub import Client

GUEST = Path(__file__).parent / "guests" / "gdb_watch.S"
SYM = dict(assemble(GUEST.read_text(), 0x10000).symbols)
COUNTER = SYM["counter"]


def _target():  # type: ignore[no-untyped-def]
    from pyvmx.kvm.boot import setup_long_mode
    from pyvmx.kvm.kvm import Kvm
    from pyvmx.kvm.loader import load_flat
    from pyvmx.tools.gdb_vcpu import VcpuTarget

    image = assemble(GUEST.read_text(), 0x10000)
    vm = Kvm(cpus=1).create_vm(memory_size=16 << 20)
    load_flat(vm, image.code, 0x10000)
    vcpu = vm.create_vcpu()
    setup_long_mode(vcpu, image.symbols["_start"])
    return VcpuTarget(vcpu)


@pytest.mark.parametrize(("z", "stops"), [
    ("Z2", [("watch", "after1"), ("watch", "after2")]),
    ("Z3", [("rwatch", "_start+14"), ("rwatch", "after_read")]),
    ("Z4", [("awatch", "_start+14"), ("awatch", "after1"), ("awatch", "after_read"), ("awatch", "after2")]),
])
def test_watchpoint_stop_replies(z: str, stops: list[tuple[str, str]]) -> None:
    from pyvmx.tools.gdbstub import GdbStub

    target = _target()
    stub = GdbStub(target, port=0)
    thread = threading.Thread(target=stub.serve, kwargs={"accept_timeout": 20}, daemon=True)
    thread.start()
    client = Client(stub.port)
    try:
        assert client.ask(f"{z},{COUNTER:x},8") == "OK"
        for keyword, label in stops:
            name, _, offset = label.partition("+")
            reply = client.ask("c")
            assert reply.startswith(f"T05{keyword}:{COUNTER:x};"), reply
            assert target.vcpu.rip == SYM[name] + int(offset or 0)
        assert client.ask(f"z{z[1]},{COUNTER:x},8") == "OK"
        assert not target.vcpu.vm.mmu.is_tracked(COUNTER >> 12)
        assert client.ask("c").startswith("T05thread")  # no more stops: the guest's end
        assert target.read_registers()["rax"] & 0xFF == 0x2A
    finally:
        client.send("k")
        client.close()
        thread.join(10)


def test_a_write_beside_the_watched_word_does_not_stop() -> None:
    """The write to ``other`` (same page, 8 bytes before) and the read at _start are stepped over
    without a stop: only the writes of the watched word stop."""
    target = _target()
    from pyvmx.tools.gdbstub import Watch, WatchKind

    target.set_watchpoint(Watch(WatchKind.WRITE, COUNTER, 8))
    first = target.cont(lambda: False)
    assert first.kind == "watch" and target.vcpu.rip == SYM["after1"]
    assert target.read_memory(SYM["other"], 8) == (1).to_bytes(8, "little")  # the write beside it happened
    target.detach()
    assert not target.vcpu.vm.mmu.is_tracked(COUNTER >> 12)
    assert target.cont(lambda: False).kind == "exited"


def test_a_tracked_gfn_is_never_inside_a_huge_page() -> None:
    """kvm_mmu_max_mapping_level() with a tracked gfn in the 2-MByte range: 4-KByte pages only;
    every access to the gfn is an EPT violation given to the user (PageTrackExit)."""
    from pyvmx.kvm.exits import PageTrackExit

    target = _target()
    vcpu = target.vcpu
    mmu = vcpu.vm.mmu
    mmu.pre_fault_memory(0, 2 << 20)  # map the first 2 MBytes (huge where allowed)
    assert mmu.spte(COUNTER)[1] == 2  # a 2-MByte leaf holds the counter
    mmu.track_gfn(COUNTER >> 12)
    assert mmu.spte(COUNTER)[0] == 0 or not mmu.spte(COUNTER)[0] & 7  # no mapping
    exit = vcpu.run(time_limit=10**6)
    assert isinstance(exit, PageTrackExit) and exit.read and exit.linear == COUNTER and exit.translated
    mmu.pre_fault_memory(0x10000, 0x1000)
    assert mmu.spte(0x10000)[1] == 1  # the code page beside it: a 4-KByte leaf now
    mmu.untrack_gfn(COUNTER >> 12)
    assert not mmu.is_tracked(COUNTER >> 12)


@needs_gdb
@pytest.mark.parametrize(("command", "stops"), [
    ("watch", ["after1", "after2"]),
    ("rwatch", ["_start+14", "after_read"]),
    ("awatch", ["_start+14", "after1", "after_read", "after2"]),
])
def test_real_gdb_watchpoints(command: str, stops: list[str]) -> None:
    commands = [f"{command} *(long*){COUNTER:#x}"] + ["c", "info registers rip"] * len(stops) + ["delete", "c"]
    session = run_with_gdb(GUEST, commands)
    expected = [SYM[s.partition("+")[0]] + int(s.partition("+")[2] or 0) for s in stops]
    assert registers(session.gdb.stdout, "rip") == expected, session.gdb_output
    assert "Hardware" in session.gdb.stdout, session.gdb_output  # gdb took them as hardware watchpoints
    if command == "watch":
        assert "Old value = 0\nNew value = 5" in session.gdb.stdout and "Old value = 5\nNew value = 7" in session.gdb.stdout
    assert session.status == 42, session.stderr


def test_watch_on_an_unmapped_address_is_an_error() -> None:
    from pyvmx.tools.gdbstub import GdbStub

    stub = GdbStub(_target(), port=0)
    thread = threading.Thread(target=stub.serve, kwargs={"accept_timeout": 20}, daemon=True)
    thread.start()
    client = Client(stub.port)
    try:
        assert client.ask("Z2,7fff00000000,8") == "E14"
        assert client.ask("?").startswith("T05")
    finally:
        client.send("k")
        client.close()
        thread.join(10)
