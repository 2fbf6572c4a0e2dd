"""How fast the VT-x machine runs guest code, side by side with bare Unicorn.

    python benchmarks/engine.py [--iterations N] [--round-trips N]

1. Guest instructions per second on a compute loop that never exits (long mode, paging and EPT
   on), under pyvmx and under bare Unicorn (the same code at the same addresses, no hooks), and
   the ratio.
2. The round trip of one VM exit handled in Python: a guest executing CPUID in a loop, the
   hypervisor advancing RIP by the VM-exit instruction length and doing VMRESUME -- the median
   over many round trips, with and without VPIDs (without them every VM entry drops the
   guest's cached translations, SDM 29.4.3.1).

With the accelerated engine built (``make accel``), the compute loops also run under it, in a
child process (PYVMX_ENGINE=accel: the engine picks its Unicorn library at import), against the
same bare *stock* Unicorn measured here.  Each time is the best of ``--repeat`` runs.

Numbers vary with the machine; nothing here is asserted.  What bounds them: the exact
instruction count (the deterministic TSC) comes from one C hook per translated block, and a
Unicorn block hook costs about as much as a short block itself; an exit round trip is a few
dozen Python calls into the engine (about 1.5 us each) plus the VM-entry checks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import pyvmx.engine.unicorn_cpu  # noqa: F401  -- picks the Unicorn library (PYVMX_ENGINE) before unicorn is imported
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc  # type: ignore[attr-defined]
from unicorn import x86_const as X  # type: ignore[import-untyped]

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.guest.sandbox import GUEST_CODE, GUEST_STACK_TOP, VmxSandbox

# Two compute loops: a tight one (3 instructions per iteration, so one translated block per
# iteration: the worst case for the per-block instruction counter) and xorshift64 (12).
LOOPS = {  # name: (source, instructions per iteration, instructions before the loop)
    "tight loop": ("""
    mov ${iterations}, %rcx
    xor %eax, %eax
1:  add %rcx, %rax
    dec %rcx
    jnz 1b
    hlt
""", 3, 2),
    "xorshift64": ("""
    mov ${iterations}, %rcx
    mov $88172645463325252, %rax
    xor %ebx, %ebx
1:  mov %rax, %rdx
    shl $13, %rdx
    xor %rdx, %rax
    mov %rax, %rdx
    shr $7, %rdx
    xor %rdx, %rax
    mov %rax, %rdx
    shl $17, %rdx
    xor %rdx, %rax
    add %rax, %rbx
    dec %rcx
    jnz 1b
    hlt
""", 12, 3),
}
CPUID_LOOP = """
1:  cpuid
    jmp 1b
"""


def pyvmx_loop(source: str) -> tuple[float, int, tuple[int, int]]:
    """Seconds, guest instructions retired (the TSC) and the result registers."""
    sb = VmxSandbox("long", source, instruction_budget=None)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    start_tsc = sb.cpu.read_tsc()
    t = time.perf_counter()
    exit = sb.run()
    elapsed = time.perf_counter() - t
    assert exit.exit_reason is ExitReason.HLT, exit
    return elapsed, sb.cpu.read_tsc() - start_tsc, (sb.gpr["rax"], sb.gpr["rbx"])


def unicorn_loop(source: str) -> tuple[float, tuple[int, int]]:
    """The same image at the same address in a bare Unicorn (no paging, no hooks)."""
    code = VmxSandbox("long", source).image.code  # only to assemble it the same way
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 4 << 20, UC_PROT_ALL)
    uc.mem_write(GUEST_CODE, code)
    uc.reg_write(X.UC_X86_REG_RSP, GUEST_STACK_TOP)
    t = time.perf_counter()
    uc.emu_start(GUEST_CODE, GUEST_CODE + len(code))  # stops at the HLT
    elapsed = time.perf_counter() - t
    return elapsed, (uc.reg_read(X.UC_X86_REG_RAX), uc.reg_read(X.UC_X86_REG_RBX))


def exit_round_trips(count: int, vpid: bool) -> list[float]:
    sb = VmxSandbox("long", CPUID_LOOP, instruction_budget=None)
    if vpid:
        sb.set_bits(F.SECONDARY_VM_EXEC_CONTROL, S.ENABLE_VPID)
        sb.write(F.VIRTUAL_PROCESSOR_ID, 1)
    cpu = sb.cpu
    assert sb.run().exit_reason is ExitReason.CPUID
    times = []
    for _ in range(count):
        t = time.perf_counter()
        rip = cpu.vmread(F.GUEST_RIP).value
        length = cpu.vmread(F.VM_EXIT_INSTRUCTION_LEN).value
        assert rip is not None and length is not None
        cpu.vmwrite(F.GUEST_RIP, rip + length)
        result = cpu.vmresume()
        times.append(time.perf_counter() - t)
    assert result.exit is not None and result.exit.exit_reason is ExitReason.CPUID
    return times


def best_of(repeat: int, fn, *args):  # type: ignore[no-untyped-def]
    """The fastest of ``repeat`` runs (the machine is shared: the minimum is the least noisy)."""
    results = [fn(*args) for _ in range(max(1, repeat))]
    return min(results, key=lambda r: r[0])


def accel_times(iterations: int, repeat: int) -> dict[str, float] | None:
    """pyvmx's compute-loop seconds under the accelerated engine (a child process), or None when
    it is not built."""
    from pyvmx.engine import accel

    if not accel.is_built():
        return None
    env = dict(os.environ, PYVMX_ENGINE="accel")
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--iterations", str(iterations), "--repeat", str(repeat)],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    return {k: float(v) for k, v in json.loads(out).items()}


def child(iterations: int, repeat: int) -> None:
    from pyvmx.engine.unicorn_cpu import ENGINE_KIND

    assert ENGINE_KIND == "accel", ENGINE_KIND
    times = {}
    for name, (template, per_iteration, setup) in LOOPS.items():
        py_time, insns, _ = best_of(repeat, pyvmx_loop, template.format(iterations=iterations))
        assert insns == per_iteration * iterations + setup  # the TSC counts exactly
        times[name] = py_time
    print(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50_000_000)
    parser.add_argument("--round-trips", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.iterations, args.repeat)
        return

    accel = accel_times(args.iterations, args.repeat)
    print(f"compute loops, {args.iterations:,} iterations, no VM exit (long mode), best of {args.repeat}")
    print(f"  {'':12} {'insn/iter':>9} {'pyvmx s':>9} {'Unicorn s':>9} {'pyvmx Mi/s':>10} {'Unicorn Mi/s':>12} {'ratio':>6}"
          + (f" {'accel s':>8} {'accel ratio':>11}" if accel else ""))
    for name, (template, per_iteration, setup) in LOOPS.items():
        source = template.format(iterations=args.iterations)
        py_time, insns, py_result = best_of(args.repeat, pyvmx_loop, source)
        uc_time, uc_result = best_of(args.repeat, unicorn_loop, source)
        assert py_result == uc_result, (py_result, uc_result)
        assert insns == per_iteration * args.iterations + setup  # the TSC counts exactly
        py_rate, uc_rate = insns / py_time, insns / uc_time
        line = (
            f"  {name:12} {per_iteration:9} {py_time:9.3f} {uc_time:9.3f} {py_rate / 1e6:10.1f}"
            f" {uc_rate / 1e6:12.1f} {py_rate / uc_rate:6.2f}"
        )
        if accel:
            line += f" {accel[name]:8.3f} {uc_time / accel[name]:11.2f}"
        print(line)
    print("  (goals: stock ratio >= 0.6, accelerated ratio >= 0.9; bare Unicorn is the stock wheel)")
    if accel is None:
        print("  (the accelerated engine is not built: `make accel` adds its column)")
    print()
    print(f"VM exit round trip (CPUID exit -> RIP += length -> VMRESUME), {args.round_trips:,} round trips")
    print(f"  {'':24} {'median us':>9} {'p10 us':>9} {'p90 us':>9}")
    for label, vpid in (("with VPID", True), ("without VPID", False)):
        times = sorted(exit_round_trips(args.round_trips, vpid))
        q = statistics.quantiles(times, n=10)
        print(f"  {label:24} {statistics.median(times) * 1e6:9.1f} {q[0] * 1e6:9.1f} {q[-1] * 1e6:9.1f}")
    print("  (goal < 5 us)")


if __name__ == "__main__":
    main()
