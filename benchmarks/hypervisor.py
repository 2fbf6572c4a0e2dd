"""The cost of one VM exit through the KVM-style hypervisor (``vcpu.run``), next to a bare-Unicorn
loop whose CPUID is answered by a Python hook -- the same loop, in the same run.

    python benchmarks/hypervisor.py [--exits N]

A long-mode guest executes CPUID (KVM always intercepts it: kvm_emulate_cpuid) N times, then
writes a byte N times to the UART's THR (port 0x3F8: an I/O exit the 16550 model handles), then
ends on the debug-exit port.  One ``vcpu.run`` call runs it all: every exit goes through the
exit-handler table.  The bare-Unicorn row runs the same CPUID loop with a Python UC_HOOK_INSN
hook writing EAX..EDX: the least a Python-answered CPUID can cost.  The issue-13 target: the
hypervisor path at most 2x the bare hook, and <= 25 us per exit.  Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import time

import pyvmx.engine.unicorn_cpu  # noqa: F401  -- picks the Unicorn library (PYVMX_ENGINE) first
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_PROT_ALL, Uc  # type: ignore[attr-defined]
from unicorn import x86_const as X  # type: ignore[import-untyped]

from pyvmx.guest.assemble import assemble
from pyvmx.kvm import Kvm, load_flat, setup_long_mode
from pyvmx.kvm import exits as kx

CODE = 0x10000


def guest(cpuids: int, outs: int) -> str:
    return f"""
        mov ${cpuids}, %r8
    1:  xor %eax, %eax
        cpuid
        dec %r8
        jnz 1b
        mov ${outs}, %r8
        mov $0x3f8, %dx
        mov $'.', %al
    2:  out %al, %dx
        dec %r8
        jnz 2b
        mov $0xf4, %dx
        xor %eax, %eax
        out %al, %dx
        hlt
    """


def hypervisor(cpuids: int, outs: int) -> tuple[float, dict[str, int]]:
    code = assemble(guest(cpuids, outs), CODE).code
    kvm = Kvm(cpus=1)
    vm = kvm.create_vm(memory_size=16 << 20)
    vcpu = vm.create_vcpu()
    load_flat(vm, code, CODE)
    setup_long_mode(vcpu, CODE)
    t = time.perf_counter()
    exit = vcpu.run(time_limit=10**12)
    elapsed = time.perf_counter() - t
    assert isinstance(exit, kx.DebugExit), exit
    assert len(vm.serial_output) == outs
    return elapsed, dict(vcpu.stats.exits)


def bare_unicorn(cpuids: int) -> float:
    code = assemble(guest(cpuids, 1), CODE).code
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 1 << 20, UC_PROT_ALL)
    uc.mem_write(CODE, code)
    answered = [0]

    def on_cpuid(uc: Uc, user: object) -> int:
        answered[0] += 1
        for reg, value in ((X.UC_X86_REG_RAX, 0xD), (X.UC_X86_REG_RBX, 0x756E6547), (X.UC_X86_REG_RCX, 0x6C65746E), (X.UC_X86_REG_RDX, 0x49656E69)):
            uc.reg_write(reg, value)
        return 1  # handled: Unicorn skips its own CPUID

    uc.hook_add(UC_HOOK_INSN, on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
    end = code.index(b"\x66\xba\xf8\x03")  # stop before the UART loop (mov $0x3f8, %dx)
    t = time.perf_counter()
    uc.emu_start(CODE, CODE + end)
    elapsed = time.perf_counter() - t
    assert answered[0] == cpuids, answered
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=5_000)
    args = parser.parse_args()
    n = args.exits
    cpuid_only, exits_c = hypervisor(n, 1)
    both, exits_b = hypervisor(n, n)
    bare = bare_unicorn(n)
    per_cpuid = cpuid_only / exits_c["CPUID"]
    per_out = (both - cpuid_only) / max(1, exits_b["IO_INSTRUCTION"] - exits_c["IO_INSTRUCTION"])
    per_bare = bare / n
    print(f"one VM exit through the hypervisor (vcpu.run), {n:,} exits of each kind")
    print(f"  {'':44} {'us/exit':>8} {'vs bare hook':>12}")
    print(f"  {'CPUID, hypervisor (vcpu.run)':44} {per_cpuid * 1e6:8.1f} {per_cpuid / per_bare:11.1f}x")
    print(f"  {'OUT to the UART THR, hypervisor (vcpu.run)':44} {per_out * 1e6:8.1f} {per_out / per_bare:11.1f}x")
    print(f"  {'CPUID answered by a Python hook, bare Unicorn':44} {per_bare * 1e6:8.1f} {1.0:11.1f}x")
    print("  (goals: <= 25 us per exit, and <= 2x the bare hook)")


if __name__ == "__main__":
    main()
