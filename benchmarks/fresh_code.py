"""What running through fresh code costs: a wild jump into zeroed RAM, against the same number
of other straight-line instructions, under pyvmx and bare Unicorn.

    python benchmarks/fresh_code.py [--instructions N]

Straight-line code runs each instruction once, so translating it dominates (QEMU's TCG, far
more for an instruction with a memory operand than for a NOP). Zeroed memory is ``add
%al,(%rax)`` (00 00), a read-modify-write; the fair "ordinary" comparison is the same
instruction on another register, ``add %al,(%rbx)`` (00 03), whose blocks go through the full
scan. Reported: CPU seconds (this process, all threads) per million instructions, the ratio
zeroed/ordinary, and the peak RSS. Numbers vary with the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import resource

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc  # type: ignore[attr-defined]
from unicorn import x86_const as X  # type: ignore[import-untyped]

from pyvmx.guest.assemble import assemble
from pyvmx.kvm import Kvm
from pyvmx.kvm.boot import setup_long_mode
from pyvmx.kvm.loader import load_flat

START = 0x200000
FILLS = {"zeroed (00 00)": b"\x00\x00", "add %al,(%rbx)": b"\x00\x03", "2-byte NOP": b"\x66\x90"}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pyvmx_run(fill: bytes, count: int) -> float:
    vm = Kvm().create_vm(memory_size=16 << 20)
    code = assemble(f"mov $0x100000, %rax\nmov $0x100000, %rbx\nmov ${START:#x}, %rcx\njmp *%rcx\n", 0x10000).code
    load_flat(vm, code, 0x10000)
    vm.write_guest(START, fill * count + b"\xf4")
    vcpu = vm.create_vcpu()
    setup_long_mode(vcpu, 0x10000)
    before = cpu_seconds()
    vcpu.run(time_limit=10**12)
    return cpu_seconds() - before


def unicorn_run(fill: bytes, count: int) -> float:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_tcg_buffer_size(32 << 20)
    uc.mem_map(0, 16 << 20)
    code = fill * count + b"\xf4"
    uc.mem_write(START, code)
    uc.reg_write(X.UC_X86_REG_RAX, 0x100000)
    uc.reg_write(X.UC_X86_REG_RBX, 0x100000)
    before = cpu_seconds()
    uc.emu_start(START, START + len(code) - 1)
    return cpu_seconds() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=1_000_000)
    n = parser.parse_args().instructions
    print(f"straight-line code, {n:,} instructions (CPU s per million instructions)")
    print(f"  {'code':18} {'pyvmx':>8} {'Unicorn':>8} {'pyvmx/Unicorn':>14}")
    results = {}
    for name, fill in FILLS.items():
        ours, bare = pyvmx_run(fill, n) * 1e6 / n, unicorn_run(fill, n) * 1e6 / n
        results[name] = ours
        print(f"  {name:18} {ours:8.3f} {bare:8.3f} {ours / bare:14.2f}")
    ratio = results["zeroed (00 00)"] / results["add %al,(%rbx)"]
    print(f"  zeroed / ordinary add %al,(%rbx) under pyvmx: {ratio:.2f}  (goal <= 1)")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB")


if __name__ == "__main__":
    main()
