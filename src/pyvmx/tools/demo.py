"""``pyvmx demo``: seed 002's questions answered by one guest on the VT-x machine.

A long-mode guest prints through port 0x3F8 (the only port intercepted, via I/O bitmap A), pokes
the POST port 0x80 (not intercepted: no exit), writes IA32_EFER (the only MSR write intercepted,
via the MSR bitmap's write-high half), rewrites CR0 changing only TS (no exit: only CR0.PG is
host-owned) and then PG (exit), asks CPUID (always exits) and halts (HLT exiting).  The loop below
is the hypervisor: it handles each exit the way KVM would and counts them, like kvm_stat.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0
from pyvmx.vmx.outcomes import VmExitInfo

GUEST = r"""
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
next:
    lodsb
    test %al, %al
    jz done
    out %al, %dx            # exits: port 0x3F8 is set in I/O bitmap A
    jmp next
done:
    mov $0x80, %dx
    out %al, %dx            # no exit: port 0x80 is clear
    mov $0xc0000080, %ecx
    rdmsr                   # no exit: only writes of IA32_EFER are intercepted
    wrmsr                   # exits: write-high bitmap bit 0x80
    mov %cr0, %rax
    xor $0x8, %rax
    mov %rax, %cr0          # no exit: TS is guest-owned
    btr $31, %rax
    mov %rax, %cr0          # exits: PG differs from the read shadow
    xor %eax, %eax
    cpuid                   # exits unconditionally
    hlt                     # exits: HLT exiting
msg:
    .asciz "Hello from VMX non-root operation!\n"
"""


@dataclass
class DemoResult:
    output: str = ""
    exits: Counter[str] = field(default_factory=Counter)
    trace: list[tuple[int, str, int, str]] = field(default_factory=list)  # tsc, reason, rip, outcome


def run_demo() -> DemoResult:
    """Run the demo guest to its HLT; return what the hypervisor saw."""
    from pyvmx.guest.sandbox import VmxSandbox

    sb = VmxSandbox("long", GUEST)
    sb.use_io_bitmaps(intercept=[0x3F8])
    sb.use_msr_bitmap(write=[Msr.IA32_EFER])
    sb.write(F.CR0_GUEST_HOST_MASK, Cr0.PG)
    sb.write(F.CR0_READ_SHADOW, sb.read(F.GUEST_CR0))
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    result = DemoResult()
    for _ in range(1000):
        exit = sb.run()
        reason = exit.exit_reason
        name = reason.name if isinstance(reason, ExitReason) else str(exit.reason)
        result.exits[name] += 1
        rip = sb.rip
        outcome = _handle(sb, exit, result)
        result.trace.append((sb.cpu.read_tsc(), name, rip, outcome))
        if outcome == "stop":
            break
    return result


def _handle(sb, exit: VmExitInfo, result: DemoResult) -> str:  # type: ignore[no-untyped-def]
    """The hypervisor's exit handlers: emulate, then skip the instruction."""
    reason = exit.exit_reason
    if reason is ExitReason.IO_INSTRUCTION:
        result.output += chr(sb.gpr["rax"] & 0xFF)
        outcome = f"serial <- {chr(sb.gpr['rax'] & 0xFF)!r}"
    elif reason is ExitReason.MSR_WRITE:
        value = (sb.gpr["rdx"] << 32) | (sb.gpr["rax"] & 0xFFFFFFFF)
        sb.write(F.GUEST_IA32_EFER, value)
        outcome = f"IA32_EFER <- {value:#x}"
    elif reason is ExitReason.CR_ACCESS:
        outcome = "CR0.PG clear refused (guest keeps paging)"
    elif reason is ExitReason.CPUID:
        sb.gpr["rax"] = sb.gpr["rbx"] = sb.gpr["rcx"] = sb.gpr["rdx"] = 0
        outcome = "cpuid -> zeros"
    elif reason is ExitReason.HLT:
        return "stop"
    else:
        return "stop"
    sb.skip_instruction()
    return outcome


def print_demo(console: Console) -> int:
    result = run_demo()
    console.print("[bold]pyvmx demo[/bold]: one long-mode guest on the software VT-x machine\n")
    console.print("Guest serial output (port 0x3F8, the only intercepted port):")
    console.print(f"  {result.output.rstrip()}\n")
    table = Table(title="VM exits (kvm_stat)")
    table.add_column("Event")
    table.add_column("Samples", justify="right")
    table.add_column("Samples%", justify="right")
    total = sum(result.exits.values())
    for name, count in result.exits.most_common():
        table.add_row(name, str(count), f"{100 * count / total:.1f}%")
    console.print(table)
    shown = [t for t in result.trace if t[1] != "IO_INSTRUCTION"]
    console.print("\nNon-I/O exits (guest TSC, reason, RIP, handler):")
    for tsc, name, rip, outcome in shown:
        console.print(f"  {tsc:>8}  {name:<16} {rip:#x}  {outcome}")
    return 0
