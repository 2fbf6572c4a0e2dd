"""Exact guest time (the deterministic TSC): the retired-instruction count the block counter
(engine/_icount.c, or its Python fallback) keeps is exact for every code layout, and so are the
deadlines built on it -- the VMX-preemption timer (SDM 26.5.1: it counts down with the TSC and
causes a VM exit when it reaches 0).  The reference is a per-instruction count: the same image on
a bare Unicorn core with a UC_HOOK_CODE hook on every instruction."""

from __future__ import annotations

import ctypes
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, UC_PROT_ALL, Uc  # type: ignore[attr-defined]
from unicorn import x86_const as X  # type: ignore[import-untyped]

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.engine import native
from pyvmx.guest.sandbox import GUEST_CODE, GUEST_STACK_TOP, VmxSandbox

LOOPS = 40


def placements(max_blocks: int) -> st.SearchStrategy[list[int]]:
    """Distinct block addresses in guest RAM (4 MiB, identity-mapped), 16 bytes apart at least:
    a 64 KiB page ``high`` and an offset ``16 * low ^ high`` -- so that blocks in different pages
    often agree in the bits a simple hash of the address keeps (the old direct-mapped table's
    slot was ``pc ^ pc >> 16``: here ``16 * low``)."""
    address = st.builds(lambda high, low: high << 16 | (16 * low ^ high), st.integers(2, 0x3E), st.integers(0, 0x3F))
    return st.lists(address, min_size=2, max_size=max_blocks, unique_by=lambda a: (a >> 16, (a >> 4) & 0xFFF))


@pytest.fixture(params=["native", "python"])
def counter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test runs with the C block counter and with its Python fallback."""
    if request.param == "python":
        monkeypatch.setattr(native, "load_library", lambda: None)
    elif native.load_library() is None:
        pytest.skip("no C compiler: the native counter cannot be built here")
    yield str(request.param)


def layout_source(addresses: list[int], nops: list[int], order: list[int], loops: int = LOOPS) -> str:
    """Blocks at ``addresses`` (each ``nops`` NOPs, then a jump to the next block in ``order``;
    the last one loops ``loops`` times and halts)."""
    chain = {order[i]: order[i + 1] for i in range(len(order) - 1)}
    lines = [f"    mov ${loops}, %ecx", f"    jmp b{order[0]}"]
    for i in sorted(range(len(addresses)), key=lambda i: addresses[i]):
        lines += [f"    .org {addresses[i] - GUEST_CODE:#x}", f"b{i}:"] + ["    nop"] * nops[i]
        if i in chain:
            lines.append(f"    jmp b{chain[i]}")
        else:
            lines += ["    dec %ecx", f"    jnz b{order[0]}", "    hlt"]
    return "\n".join(lines) + "\n"


def reference(sb: VmxSandbox, count: int = 0) -> tuple[int, int, int]:
    """(instructions, RIP, RCX) on a bare Unicorn core counting every instruction with
    UC_HOOK_CODE: until the HLT, or ``count`` instructions."""
    code = sb.image.code
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 4 << 20, UC_PROT_ALL)
    uc.mem_write(GUEST_CODE, code)
    uc.reg_write(X.UC_X86_REG_RSP, GUEST_STACK_TOP)
    counted = [0]

    def on_code(uc: Uc, address: int, size: int, user: object) -> None:
        counted[0] += 1

    uc.hook_add(UC_HOOK_CODE, on_code)
    hlt = GUEST_CODE + code.rindex(b"\xf4")
    uc.emu_start(GUEST_CODE, hlt, count=count)
    return counted[0], uc.reg_read(X.UC_X86_REG_RIP), uc.reg_read(X.UC_X86_REG_RCX)


def run_to_hlt(source: str) -> tuple[VmxSandbox, int]:
    sb = VmxSandbox("long", source)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    start = sb.executor.instructions_retired()
    exit = sb.run()
    assert exit.exit_reason is ExitReason.HLT, exit
    return sb, sb.executor.instructions_retired() - start


def test_blocks_that_shared_a_slot_of_the_direct_mapped_table_count_exactly(counter: str) -> None:
    """Issue 12.5: blocks at 0x20000 and 0x30001 shared one slot of the old direct-mapped table
    (4,005 instead of 5,004 instructions); each must count its own instructions."""
    source = """
    mov $1000, %ecx
    jmp blk_a
    .org 0x10000
blk_a:
    nop
    nop
    jmp blk_b
    .org 0x20001
blk_b:
    dec %ecx
    jnz blk_a
    hlt
"""
    sb, retired = run_to_hlt(source)
    assert retired == 2 + 1000 * 5
    assert reference(sb)[0] == retired


@settings(max_examples=12)
@given(data=st.data())
def test_random_block_placements_count_like_a_per_instruction_reference(data: st.DataObject) -> None:
    """Guest TSC = retired instructions, exact whatever the addresses of the translated blocks
    (property over random placements, C counter; the Python fallback shares the algorithm and
    runs in the tests above and below)."""
    addresses = data.draw(placements(24))
    n = len(addresses)
    nops = data.draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))  # >= 2 insns per block
    order = data.draw(st.permutations(range(n)))
    sb, retired = run_to_hlt(layout_source(addresses, nops, list(order)))
    assert retired == reference(sb)[0]


def crowded_addresses(count: int, size: int) -> list[int]:
    """``count`` block addresses whose blocks (``size`` bytes) hash into eight neighbouring home
    slots of the counter's table: more than fit in those slots' probe windows (8 + TB_PROBES)."""
    assert count > 8 + native.TB_PROBES
    groups: dict[int, list[int]] = {}
    for pc in range(0x20000, 0x3F0000, 16):
        group = groups.setdefault(native.slot_of(pc, size) >> 3, [])
        group.append(pc)
        if len(group) == count:
            return group
    raise AssertionError("no group of slots with enough addresses")


def test_blocks_that_overflow_the_probe_window_still_count_exactly(counter: str) -> None:
    """More blocks than TB_PROBES on one home slot: evicted blocks are decoded again when they
    run (STOP_UNKNOWN_TB), never guessed."""
    n = 8 + native.TB_PROBES + 4
    addresses = crowded_addresses(n, 5)  # each block is one 5-byte JMP rel32 (the last: DEC, JNZ)
    order = list(range(n))
    random.Random(7).shuffle(order)
    source = layout_source(addresses, [0] * n, order).replace("    jmp b", "    jmp.d32 b")
    sb, retired = run_to_hlt(source)
    assert retired == reference(sb)[0] == 2 + LOOPS * (n - 1 + 2)


@settings(max_examples=10)
@given(data=st.data())
def test_preemption_timer_expires_at_the_exact_instruction_for_any_layout(data: st.DataObject) -> None:
    """SDM 26.5.1: the VMX-preemption timer counts down at the TSC rate >> IA32_VMX_MISC[4:0]
    and causes a VM exit when it reaches 0; with the TSC = retired instructions the exit comes
    exactly after the instruction that takes the TSC to the deadline, whatever the layout."""
    addresses = data.draw(placements(12))
    n = len(addresses)
    nops = data.draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))  # >= 2 insns per block
    order = list(data.draw(st.permutations(range(n))))
    sb = VmxSandbox("long", layout_source(addresses, nops, order, loops=1000))
    total = reference(sb)[0]
    rate = sb.profile.preemption_timer_rate
    value = data.draw(st.integers(1, (total >> rate) - 1))
    sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
    sb.write(F.VMX_PREEMPTION_TIMER_VALUE, value)
    now = sb.cpu.read_tsc()
    deadline = ((now >> rate) + value) << rate
    exit = sb.run()
    assert exit.exit_reason is ExitReason.PREEMPTION_TIMER
    assert sb.cpu.read_tsc() == deadline
    _, rip, rcx = reference(sb, count=deadline - now)
    assert (sb.rip, sb.gpr["rcx"] & 0xFFFFFFFF) == (rip, rcx & 0xFFFFFFFF)


# One 3-byte block, 48 90 CB, run at the same address in compatibility mode (DEC EAX; NOP; LRET:
# 3 instructions) and in 64-bit mode (REX.W NOP; LRET: 2): one pc, one size, two counts.
TWO_MODE_BLOCK = f"""
    mov ${LOOPS}, %ebx
1:  sub $16, %rsp
    movl $block, (%rsp)
    movl $0x08, 4(%rsp)         # 32-bit code segment: compatibility mode
    movl $2f, 8(%rsp)
    movl $0x18, 12(%rsp)
    lret
2:  sub $16, %rsp
    movl $block, (%rsp)
    movl $0x18, 4(%rsp)         # 64-bit code segment
    movl $3f, 8(%rsp)
    movl $0x18, 12(%rsp)
    lret
3:  dec %ebx
    jnz 1b
    hlt
    .org 0x1000
block: .byte 0x48, 0x90, 0xcb
"""


def test_one_block_counted_differently_in_two_modes_counts_exactly(counter: str) -> None:
    """The same bytes at the same address translated in two CPU modes are two translated blocks
    with one pc and size and different instruction counts; both count exactly (the table marks
    the entry ambiguous and the executor decodes each run).  Reference: a UC_HOOK_CODE count of
    every instruction on a second run."""
    sb, retired = run_to_hlt(TWO_MODE_BLOCK)
    reference_sb = VmxSandbox("long", TWO_MODE_BLOCK)
    reference_sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    counted = [0]

    def on_code(uc: Uc, address: int, size: int, user: object) -> None:
        counted[0] += 1

    reference_sb.executor.cpu.uc.hook_add(UC_HOOK_CODE, on_code)
    assert reference_sb.run().exit_reason is ExitReason.HLT
    hlt = 1  # the hook also saw the HLT, which exits instead of retiring
    assert retired == counted[0] - hlt == 1 + LOOPS * (2 * 6 + 3 + 2 + 2)


def test_native_layout_matches_the_ctypes_mirror() -> None:
    """The ctypes mirror of icount_state_t (native.py) has the C compiler's sizeof/offsetof."""
    if native._compiler() is None:
        pytest.skip("no C compiler: the native counter cannot be built here")
    lib = ctypes.CDLL(str(native.build_library()))
    assert native.native_layout(lib) == native.python_layout()


def test_failed_native_build_warns_with_the_compiler_message(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """A native build that fails is reported (NativeBuildWarning carrying the compiler's
    message), and is an error with PYVMX_REQUIRE_NATIVE=1."""
    monkeypatch.setenv("PYVMX_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(native.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    monkeypatch.setattr(native, "_LOADED", False)
    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.delenv("PYVMX_NO_NATIVE", raising=False)
    monkeypatch.delenv("PYVMX_REQUIRE_NATIVE", raising=False)
    with pytest.warns(native.NativeBuildWarning, match="false failed on _icount.c"):
        assert native.load_library() is None
    monkeypatch.setattr(native, "_LOADED", False)
    monkeypatch.setenv("PYVMX_REQUIRE_NATIVE", "1")
    with pytest.raises(native.NativeBuildError, match="false failed"):
        native.load_library()
    monkeypatch.setattr(native, "_LOADED", False)
