"""Memory a run uses stays bounded by guest RAM plus a small constant (issue 14.7, 11.8).

A wild jump into zeroed RAM (every block fresh code: ``add %al,(%rax)`` again and again) took
1.45 GB of host memory: Unicorn's translation buffer (1 GiB by default, filled before QEMU
flushes) and ~40 bytes per guest instruction of per-block address lists. And ``pyvmx run`` kept
every VM exit even when nothing asked for them. These tests check the bounds on structure sizes,
never on timings."""

from __future__ import annotations

from array import array
from pathlib import Path

import pytest

from pyvmx.engine import block_table
from pyvmx.engine.block_table import BLOCK_COST, BlockTable, compact
from pyvmx.engine.unicorn_cpu import TCG_BUFFER_SIZE
from pyvmx.kvm.exits import HltExit, TraceRecord
from pyvmx.kvm.kvm import Kvm
from pyvmx.tools import run
from pyvmx.vmx import decode
from tests.kvm.hv.guests import boot, source_image

ZEROED = 0x200000


def test_the_translation_buffer_of_every_engine_is_bounded() -> None:
    """QEMU keeps at most TCG_BUFFER_SIZE bytes of translated code, then flushes (tb_flush)."""
    kvm = Kvm(cpus=2)
    assert TCG_BUFFER_SIZE <= 64 << 20
    for pcpu in kvm.pcpus:
        assert pcpu.engine is not None
        assert pcpu.engine.cpu.uc.ctl_get_tcg_buffer_size() == TCG_BUFFER_SIZE


def test_compact_keeps_evenly_spaced_blocks_as_ranges() -> None:
    assert compact([0x1000, 0x1002, 0x1004]) == range(0x1000, 0x1006, 2)
    assert isinstance(compact([0x1000, 0x1002, 0x1004]), range)
    uneven = compact([0x1000, 0x1001, 0x1004])
    assert isinstance(uneven, array) and list(uneven) == [0x1000, 0x1001, 0x1004]
    assert isinstance(compact([7]), array) and list(compact([])) == []


def test_the_block_table_starts_over_at_its_budget() -> None:
    table = BlockTable(budget=3 * BLOCK_COST + 8)
    table.put(0x1000, [0x1000, 0x1003, 0x1004])  # an array: BLOCK_COST + 3
    table.put(0x2000, range(0x2000, 0x2100, 2))  # a range: BLOCK_COST
    assert table.units == 2 * BLOCK_COST + 3 and table.restarts == 0
    table.put(0x3000, [0x3000, 0x3001, 0x3005, 0x3009, 0x300A, 0x300C])  # over the budget
    assert table.restarts == 1 and len(table) == 1 and table.units == BLOCK_COST + 6
    assert table.get(0x1000) is None and list(table.get(0x3000) or []) == [0x3000, 0x3001, 0x3005, 0x3009, 0x300A, 0x300C]


def test_a_run_through_zeroed_memory_is_neither_decoded_nor_stored_per_instruction(monkeypatch: pytest.MonkeyPatch) -> None:
    """``00 00`` is ``add %al,(%rax)`` in every mode and nothing sensitive: blocks of zeroed
    memory are recognised without the decoder, and kept as ranges -- constant space per block,
    whatever their length."""
    decoded: list[int] = []
    scan = decode.scan_block

    def counting_scan(code: bytes, address: int, bitness: int, max_instructions: int):  # type: ignore[no-untyped-def]
        decoded.append(address)
        return scan(code, address, bitness, max_instructions)

    monkeypatch.setattr(decode, "scan_block", counting_scan)
    vm = Kvm().create_vm(memory_size=4 << 20)
    vcpu = boot(vm, source_image(f"mov ${ZEROED:#x}, %rax\nmov ${ZEROED:#x}, %rcx\njmp *%rcx\n"))
    count = 100_000
    vm.write_guest(ZEROED + 2 * count, b"\xf4")  # HLT after 100,000 zero instructions
    assert isinstance(vcpu.run(time_limit=10**9), HltExit)
    assert vcpu.guest_tsc() >= count
    engine = vcpu.pcpu.engine
    assert engine is not None
    table = engine._tb_insns
    zero_blocks = [table.get(pc) for pc in range(ZEROED, ZEROED + 2 * count, 2) if table.get(pc) is not None]
    assert len(zero_blocks) >= count // 512  # QEMU ends a block after 512 instructions at most
    # Only a block whose bytes could not all be read when it was translated (it reaches into a
    # page EPT does not map yet) goes through the decoder.
    assert len({a for a in decoded if ZEROED <= a < ZEROED + 2 * count - 64}) <= len(zero_blocks) // 20
    assert sum(isinstance(b, range) for b in zero_blocks) >= len(zero_blocks) - 2
    assert table.units <= block_table.BLOCK_TABLE_BUDGET


def test_pyvmx_run_keeps_counters_not_exits_unless_asked() -> None:
    """``ExitObserver`` without --trace/--record counts exits (kvm_stat) and keeps none of them;
    with keep_exits (what --record and replay use) it keeps each."""
    counters = run.ExitObserver(0, trace=False)
    keeping = run.ExitObserver(0, trace=False, keep_exits=True)
    for i in range(10_000):
        rec = TraceRecord(0, 10, "CPUID", 0, 0x1000, 10 * i, None)  # type: ignore[arg-type]
        counters(rec)
        keeping(rec)
    assert counters.exits == [] and counters.exit_vcpus == []
    assert counters.stats.by_reason["CPUID"].samples == 10_000
    assert len(keeping.exits) == 10_000 and keeping.stats.by_reason["CPUID"].samples == 10_000


def test_pyvmx_run_result_has_no_exit_list_without_record(tmp_path: Path) -> None:
    source = tmp_path / "g.S"
    source.write_text(".code64\n.globl _start\n_start:\n    mov $50, %esi\n1:  cpuid\n    dec %esi\n    jnz 1b\n    hlt\n")
    plain = run.run(run.RunOptions(source, max_tsc=10**7))
    assert plain.exits == [] and plain.stats.by_reason["CPUID"].samples == 50
    kept = run.run(run.RunOptions(source, max_tsc=10**7, keep_exits=True))
    assert len(kept.exits) == kept.stats.total_samples >= 50


def test_a_sled_of_sensitive_instructions_keeps_the_code_hooks_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """One code hook per sensitive instruction, kept for ever and checked by Unicorn at every
    instruction it translates, made a sled of IN (I/O passed through) quadratic in time and
    unbounded in memory. Past MAX_CODE_HOOKS every hook goes and the blocks are translated (and
    hooked) again; each IN still runs exactly once (SDM Vol. 2 IN: AL from the port -- all ones
    from the empty platform) and guest time counts every instruction."""
    from pyvmx.engine import executor

    monkeypatch.setattr(executor, "MAX_CODE_HOOKS", 600)
    count = 1300
    vm = Kvm().create_vm(memory_size=4 << 20)
    vcpu = boot(vm, source_image(f"mov $0x80, %dx\nxor %eax, %eax\nmov ${ZEROED:#x}, %rcx\njmp *%rcx\n"))
    vcpu.intercept_io(0x3F8, only=True)
    vm.write_guest(ZEROED, b"\xec" * count + b"\xf4")  # 1300 x in (%dx),%al; hlt
    start = vcpu.guest_tsc()
    assert isinstance(vcpu.run(time_limit=10**9), HltExit)
    assert vcpu.rip == ZEROED + count + 1 and vcpu.get_gpr(0) & 0xFF == 0xFF
    engine = vcpu.pcpu.engine
    # At most the cap plus one block's worth (QEMU ends a block after 512 instructions); one
    # hook per IN of the sled (1300) without the cap.
    assert engine is not None and engine.cpu.code_hooks <= 600 + 512
    assert vcpu.guest_tsc() - start >= count
