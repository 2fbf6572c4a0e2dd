"""Self- and cross-modifying code (SDM Vol. 3A 10.6 "Self-Modifying Code", 10.7 "Cross-Modifying
Code"): an instruction fetched after a write to its bytes is the new instruction, whoever wrote
it -- the guest itself, the host (device DMA, the hypervisor writing guest memory) or another
vCPU.  Both caches of code by address must follow: the CPU engine's translated blocks (QEMU
invalidates its TBs on a store to them, ``tb_invalidate_phys_page_fast``) and the executor's
decoded sensitive instructions (CPUID always exits, SDM 26.1.2, so a stale decoding shows as an
exit count)."""

from __future__ import annotations

import pytest

from pyvmx.kvm.boot import setup_long_mode
from pyvmx.kvm.exits import DebugExit, IoExit
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.vcpu import Vcpu
from pyvmx.kvm.vm import Vm
from pyvmx.vmx.memory import PhysicalMemory

from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, source_image

pytestmark = pytest.mark.machine

CPUID = b"\x0f\xa2"
NOP2 = b"\x66\x90"

SELF_PATCH = r"""
    xor %esi, %esi
again:
    mov $0, %eax
site:
    {first}
    inc %esi
    cmp $3, %esi
    je done
    movw ${patch}, site(%rip)    # rewrite the instruction at site, then run it again
    jmp again
done:
    mov %esi, %eax
    out %al, $0xf4
    hlt
"""


@pytest.mark.parametrize(
    ("first", "patch", "cpuid_exits"),
    [("cpuid", "0x9066", 1), ("xchg %ax, %ax", "0xa20f", 2)],
    ids=["cpuid-to-nop", "nop-to-cpuid"],
)
def test_guest_rewrites_its_own_cpuid(first: str, patch: str, cpuid_exits: int) -> None:
    """SDM 10.6: the guest stores over an instruction and jumps back to it (the jump is the
    serializing branch the SDM asks for): CPUID -> NOP leaves one CPUID exit of three passes,
    NOP -> CPUID gives two."""
    vm = Kvm().create_vm(memory_size=4 << 20)
    img = source_image(SELF_PATCH.format(first=first, patch=patch))
    assert img.code[img.symbol("site") - img.base :][:2] == (CPUID if first == "cpuid" else NOP2)
    vcpu = boot(vm, img)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(3)
    assert vcpu.stats.exits.get("CPUID", 0) == cpuid_exits


READER_WRITER = r"""
reader:
    mov $0, %eax
site:
    cpuid
value:
    mov $1, %al
    mov $0x510, %dx
    out %al, %dx               # to the user: the test interleaves here
    jmp reader
writer:
    movw $0x9066, site(%rip)   # CPUID -> NOP
    movb $2, value+1(%rip)     # mov $1, %al -> mov $2, %al
    mov $0x511, %dx
    out %al, %dx
    hlt
"""


def reader_vm(cpus: int) -> tuple[Vm, Vcpu, int, int]:
    vm = Kvm(cpus=cpus).create_vm(memory_size=4 << 20)
    img = source_image(READER_WRITER)
    reader = boot(vm, img)
    return vm, reader, img.symbol("site"), img.symbol("writer")


def read_once(vcpu: Vcpu) -> int:
    out = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(out, IoExit) and out.port == 0x510
    return out.data[0]


def test_host_rewrites_guest_code_between_runs() -> None:
    """The host (a DMA-like write of guest memory, kvm_write_guest()) patches code the engine has
    already translated and run: the next run executes the new bytes -- a changed immediate and
    CPUID -> NOP (no more CPUID exits) -- and NOP -> CPUID exits again."""
    vm, vcpu, site, _ = reader_vm(1)
    assert read_once(vcpu) == 1 and vcpu.stats.exits["CPUID"] == 1
    vm.write_guest(site, NOP2)
    vm.write_guest(site + 3, b"\x07")  # the immediate of mov $1, %al
    assert read_once(vcpu) == 7
    assert read_once(vcpu) == 7 and vcpu.stats.exits["CPUID"] == 1
    vm.write_guest(site, CPUID)
    assert read_once(vcpu) == 7 and vcpu.stats.exits["CPUID"] == 2


@pytest.mark.parametrize("cpus", [1, 2], ids=["same-cpu", "other-cpu"])
def test_second_vcpu_rewrites_code(cpus: int) -> None:
    """SDM 10.7 cross-modifying code: vCPU 1 patches code that vCPU 0 has translated and run --
    on the same physical CPU (one engine) or on another one (another engine over the same
    memory, whose store the first engine never sees)."""
    vm, reader, site, writer_entry = reader_vm(cpus)
    writer = vm.create_vcpu()
    setup_long_mode(writer, writer_entry, stack=0x9000)
    assert reader.pcpu is not writer.pcpu or cpus == 1
    # Several passes, so that the blocks the reader runs are translated once and then reused.
    assert [read_once(reader) for _ in range(3)] == [1, 1, 1] and reader.stats.exits["CPUID"] == 3
    out = writer.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(out, IoExit) and out.port == 0x511
    assert vm.read_guest(site, 2) == NOP2
    assert [read_once(reader) for _ in range(2)] == [2, 2]
    assert reader.stats.exits["CPUID"] == 3


def test_write_watch_reports_only_watched_pages() -> None:
    """PhysicalMemory reports writes that touch a watched page -- every write path, a write
    straddling into the page included -- and nothing else."""
    memory = PhysicalMemory(4 * 4096)
    seen: list[tuple[int, int]] = []
    memory.add_write_observer(lambda address, size: seen.append((address, size)))
    memory.watch_page(1)
    memory.write(0x10, b"x")
    memory.write8(0x2000, 1)
    assert seen == []
    memory.write(0xFFE, b"abcd")
    memory.write8(0x1000, 1)
    memory.write16(0x1002, 1)
    memory.write32(0x1004, 1)
    memory.write64(0x1008, 1)
    memory.fill(0x1800, 16, 0)
    memory.set_bit(0x1010, 3)
    assert seen == [(0xFFE, 4), (0x1000, 1), (0x1002, 2), (0x1004, 4), (0x1008, 8), (0x1800, 16), (0x1010, 1)]
    memory.unwatch_page(1)
    memory.write8(0x1000, 2)
    assert len(seen) == 7
