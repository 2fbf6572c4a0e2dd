"""``pyvmx run IMAGE --gdb PORT``: gdb's remote protocol for vCPU 0 of a hypervisor run --
a breakpoint at a guest label (INT3 + KVM_SET_GUEST_DEBUG, GuestDebugExit), registers, a single
step (RFLAGS.TF + KVM_GUESTDBG_SINGLESTEP), continue to the guest's debug-exit write -- by a
real gdb in batch mode (skipped when gdb is not installed), and the VcpuTarget alone."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmx.guest.assemble import assemble
from tests.tools.cli_helpers import SRC, run_cli

GUEST = """
_start:
    mov $1, %r8
bp:
    add $2, %r8
    xor %eax, %eax
id:
    cpuid
after:
    add $3, %r8
    mov $0x2a, %al
    out %al, $0xf4
    hlt
"""
needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _symbols() -> dict[str, int]:
    return dict(assemble(GUEST, 0x10000).symbols)


def _vcpu():  # type: ignore[no-untyped-def]
    from pyvmx.kvm.boot import setup_long_mode
    from pyvmx.kvm.kvm import Kvm
    from pyvmx.kvm.loader import load_flat

    image = assemble(GUEST, 0x10000)
    vm = Kvm(cpus=1).create_vm(memory_size=16 << 20)
    load_flat(vm, image.code, 0x10000)
    vcpu = vm.create_vcpu()
    setup_long_mode(vcpu, image.symbols["_start"])
    return vcpu


def test_vcpu_target_break_step_continue() -> None:
    from pyvmx.kvm.exits import DebugExit
    from pyvmx.tools.gdb_vcpu import VcpuTarget

    sym = _symbols()
    vcpu = _vcpu()
    target = VcpuTarget(vcpu)
    original = target.read_memory(sym["bp"], 4)
    assert original == bytes.fromhex("4983c002")  # add $2, %r8
    target.set_breakpoint(sym["bp"])
    assert target.cont(lambda: False).kind == "breakpoint"
    assert vcpu.rip == sym["bp"] and target.read_registers()["r8"] == 1
    assert target.read_memory(sym["bp"], 4) == original  # the INT3 is out again while stopped
    rips = []
    for _ in range(3):
        assert target.step().kind == "step"
        rips.append(vcpu.rip)
    # CPUID exits and is emulated by the hypervisor: that completes the step (DR6.BS exit).
    assert rips == [sym["bp"] + 4, sym["id"], sym["after"]]
    assert not vcpu.get_regs().rflags & 0x100  # TF is the guest's again
    stop = target.cont(lambda: False)
    assert stop.kind == "exited" and "0x2a" in stop.message
    assert target.ending == DebugExit(0x2A)
    assert target.read_registers()["r8"] == 6


def test_gdb_needs_one_vcpu(tmp_path: Path) -> None:
    image = tmp_path / "guest.S"
    image.write_text(GUEST)
    r = run_cli("run", str(image), "--gdb", str(_free_port()), "--vcpus", "2", timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--gdb" in lines[0] and "vcpus" in lines[0], r.stderr


def test_gdb_port_in_use(tmp_path: Path) -> None:
    image = tmp_path / "guest.S"
    image.write_text(GUEST)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_cli("run", str(image), "--gdb", str(port), timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0], r.stderr


@needs_gdb
def test_real_gdb_with_pyvmx_run(tmp_path: Path) -> None:
    image = tmp_path / "guest.S"
    image.write_text(GUEST)
    sym = _symbols()
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(SRC))
    server = subprocess.Popen([sys.executable, "-m", "pyvmx", "run", str(image), "--gdb", str(port)],
                              stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        assert line.strip() == f"pyvmx run: gdb server listening on 127.0.0.1:{port}", line
        argv = ["gdb", "-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex", "set pagination off",
                "-ex", f"target remote :{port}"]
        for command in (f"break *{sym['bp']:#x}", "continue", "info registers rip", "stepi",
                        "info registers rip", "continue"):
            argv += ["-ex", command]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        rips = [int(ln.split()[1], 16) for ln in r.stdout.splitlines() if ln.split()[:1] == ["rip"]]
        assert rips == [sym["bp"], sym["bp"] + 4], r.stdout + r.stderr
        assert "Breakpoint 1, 0x" in r.stdout, r.stdout + r.stderr
        assert "debug-exit port" in r.stdout + r.stderr  # the stub's console message at the end
        assert server.wait(timeout=30) == 0x2A
        rest = server.stderr.read()
        assert "exit status 42" in rest, rest
    finally:
        server.kill()
        server.wait(timeout=10)


FIRST_TOUCH = """
_start:
    mov $1, %r8
touch:
    mov %r8, data(%rip)
    add $0x29, %r8
    mov %r8, %rax
    out %al, $0xf4
    hlt
.align 4096
data: .quad 0
"""


def _vcpus(source: str, count: int):  # type: ignore[no-untyped-def]
    from pyvmx.kvm.boot import setup_long_mode
    from pyvmx.kvm.kvm import Kvm
    from pyvmx.kvm.loader import load_flat

    image = assemble(source, 0x10000)
    vm = Kvm(cpus=count).create_vm(memory_size=16 << 20)
    load_flat(vm, image.code, 0x10000)
    vcpus = [vm.create_vcpu() for _ in range(count)]
    for vcpu in vcpus:
        setup_long_mode(vcpu, image.symbols["_start"])
    return vcpus, dict(image.symbols)


@pytest.mark.parametrize("which", [0, 1])
def test_step_over_a_first_touch_then_continue_delivers_no_db(which: int) -> None:
    """KVM_GUESTDBG_SINGLESTEP through the monitor trap flag (SDM 26.5.2): a step that first
    meets an EPT violation (first touch of the data page) retries the instruction and exits
    after it; the guest's RFLAGS.TF and exception bitmap are never changed, so the continue
    that follows runs to the guest's end with no #DB for the guest (it would triple-fault: no
    IDT).  On the BSP and on a second vCPU alike."""
    from pyvmx.arch.controls import ProcBasedControls
    from pyvmx.arch.vmcs_fields import VmcsField as F
    from pyvmx.kvm.exits import DebugExit
    from pyvmx.tools.gdb_vcpu import VcpuTarget

    vcpus, sym = _vcpus(FIRST_TOUCH, 2)
    vcpu = vcpus[which]
    target = VcpuTarget(vcpu)
    bitmap = vcpu.vmcs_read(F.EXCEPTION_BITMAP)
    assert target.step().kind == "step" and vcpu.rip == sym["touch"]
    assert target.step().kind == "step" and vcpu.rip == sym["touch"] + 7  # past the first touch
    assert not vcpu.vmcs_read(F.GUEST_RFLAGS) & 0x100
    assert not vcpu.vmcs_read(F.CPU_BASED_VM_EXEC_CONTROL) & ProcBasedControls.MONITOR_TRAP_FLAG
    assert vcpu.vmcs_read(F.EXCEPTION_BITMAP) == bitmap
    stop = target.cont(lambda: False)
    assert stop.kind == "exited" and target.ending == DebugExit(0x2A), stop


def test_step_keeps_the_guests_own_trap_flag() -> None:
    """A guest that single-steps itself (RFLAGS.TF, SDM 18.3.1.4) keeps its #DB while the user
    steps: the user's step is the monitor trap flag, not TF.  The #DB is delivered through the
    guest's IDT; with none, the guest shuts down exactly as it does without gdb."""
    from pyvmx.kvm.exits import ShutdownExit
    from pyvmx.tools.gdb_vcpu import VcpuTarget

    source = "_start:\n pushf\n orq $0x100, (%rsp)\n popf\n nop\n nop\n hlt\n"
    plain, _ = _vcpus(source, 1)
    alone = plain[0].run(time_limit=10**6)
    vcpus, sym = _vcpus(source, 1)
    target = VcpuTarget(vcpus[0])
    stops = [target.step() for _ in range(6)]
    assert stops[-1].kind == "exited" and isinstance(target.ending, ShutdownExit), stops
    assert isinstance(alone, ShutdownExit) and alone.rip == target.ending.rip
