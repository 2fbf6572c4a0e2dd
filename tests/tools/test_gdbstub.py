"""The GDB stub: the remote serial protocol (gdb manual, "Remote Protocol") spoken to a guest on
the VT-x sandbox -- breakpoints as INT3 with #BP intercepted (SDM 25.6.3; the exit leaves RIP at
the INT3, SDM 27.5.1/28.2.1), single step with RFLAGS.TF and #DB intercepted (SDM 18.3.1.4),
Ctrl-C through VMX-preemption-timer slices (SDM 26.5.1) -- first by a small client written here,
then by a real gdb in batch mode (skipped when gdb is not installed)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.tools.gdbstub import GdbStub, GdbStubError, SandboxTarget
from tests.tools.cli_helpers import run_cli

GUEST = """
start:
    mov $1, %r8
again:
    add $1, %r8
bp:
    add $2, %r8
    xor %eax, %eax
id:
    cpuid
after:
    add $3, %r8
    cmp $30, %r8
    jb again
stop:
    hlt
"""
SPIN = "cli\nspin: jmp spin\n"


def _sandbox(source: str = GUEST):  # type: ignore[no-untyped-def]
    from pyvmx.guest.sandbox import VmxSandbox

    sb = VmxSandbox("long", source)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    return sb


class Client:
    """A minimal gdb: framing, checksums, acks."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""

    def _read(self) -> None:
        data = self.sock.recv(65536)
        assert data, "stub closed the connection"
        self.buf += data

    def send(self, payload: str) -> None:
        data = payload.encode()
        self.sock.sendall(b"$" + data + b"#" + f"{sum(data) & 0xFF:02x}".encode())
        while not self.buf:
            self._read()
        assert self.buf[:1] == b"+", self.buf
        self.buf = self.buf[1:]

    def reply(self) -> str:
        while True:
            start = self.buf.find(b"$")
            end = self.buf.find(b"#", start)
            if start != -1 and end != -1 and len(self.buf) >= end + 3:
                payload = self.buf[start + 1 : end]
                assert int(self.buf[end + 1 : end + 3], 16) == sum(payload) & 0xFF
                self.buf = self.buf[end + 3 :]
                self.sock.sendall(b"+")
                return payload.decode()
            self._read()

    def ask(self, payload: str) -> str:
        self.send(payload)
        answer = self.reply()
        while answer.startswith("O") and answer != "OK":  # console output before a stop reply
            answer = self.reply()
        return answer

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def session() -> Iterator[tuple[Client, GdbStub, object]]:
    sb = _sandbox()
    stub = GdbStub(SandboxTarget(sb), port=0)
    thread = threading.Thread(target=stub.serve, kwargs={"accept_timeout": 20}, daemon=True)
    thread.start()
    client = Client(stub.port)
    yield client, stub, sb
    client.close()
    thread.join(10)
    assert not thread.is_alive()


def _regs(hexdata: str) -> dict[str, int]:
    raw = bytes.fromhex(hexdata)
    names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)] + ["rip"]
    regs = {n: int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i, n in enumerate(names)}
    regs["eflags"] = int.from_bytes(raw[136:140], "little")
    regs["cs"] = int.from_bytes(raw[140:144], "little")
    return regs


def test_handshake_and_registers(session) -> None:  # type: ignore[no-untyped-def]
    """The 'g' packet: gdb's amd64 layout without a target description -- 16 GPRs in gdb's order
    (rax rbx rcx rdx rsi rdi rbp rsp r8-r15), rip, then eflags and six selectors of 4 bytes,
    x87 and SSE state: 536 bytes (gdb features/i386/64bit-core.xml, 64bit-sse.xml)."""
    client, _, sb = session
    assert "PacketSize=" in client.ask("qSupported:multiprocess+;swbreak+")
    assert client.ask("?").startswith("T05")
    assert client.ask("qAttached") == "1" and client.ask("qC") == "QC1" and client.ask("Hg0") == "OK"
    assert client.ask("qfThreadInfo") == "m1" and client.ask("qsThreadInfo") == "l"
    g = client.ask("g")
    assert len(g) == 2 * 536
    regs = _regs(g)
    assert regs["rip"] == sb.symbol("start") and regs["rsp"] == 0x8000
    assert regs["eflags"] == 0x2 and regs["cs"] == 0x18
    assert client.ask("p10") == sb.symbol("start").to_bytes(8, "little").hex()  # register 16 = rip
    assert client.ask("p11") == "02000000"  # eflags, 4 bytes
    assert client.ask("p38") == "801f0000"  # mxcsr at reset
    assert client.ask("p99") == "E01"  # no such register in the layout
    assert client.ask("vMustReplyEmpty") == ""


def test_memory_is_guest_linear(session) -> None:  # type: ignore[no-untyped-def]
    """m/M go through the guest's page tables and EPT (SDM 4.5, 29.3)."""
    client, _, sb = session
    code = sb.image.code
    assert client.ask(f"m{sb.symbol('start'):x},8") == code[:8].hex()
    assert client.ask("m40000000,4") == "E14"  # not mapped by the guest's 1-GiB identity map
    assert client.ask("M8000,4:deadbeef") == "OK"
    assert sb.read_memory(0x8000, 4) == bytes.fromhex("deadbeef")


def test_breakpoint_step_continue(session) -> None:  # type: ignore[no-untyped-def]
    client, _, sb = session
    bp = sb.symbol("bp")
    assert client.ask(f"Z0,{bp:x},1") == "OK"
    assert client.ask(f"m{bp:x},1") == f"{sb.image.code[bp - 0x10000]:02x}"  # original byte shown
    stop = client.ask("vCont;c")
    assert stop.startswith("T05") and "swbreak:" in stop
    regs = _regs(client.ask("g"))
    assert regs["rip"] == bp and regs["r8"] == 2
    # Continue again: the stub steps off the breakpoint first, comes round the loop once.
    assert client.ask("c").startswith("T05")
    assert _regs(client.ask("g"))["r8"] == 2 + 2 + 3 + 1
    assert client.ask(f"z0,{bp:x},1") == "OK"
    assert client.ask(f"m{bp:x},1") == f"{sb.image.code[bp - 0x10000]:02x}"
    # Single steps: one instruction each; CPUID exits and is emulated by the handler.
    assert client.ask("s").startswith("T05")
    assert _regs(client.ask("g"))["rip"] == bp + 4  # after "add $2, %r8" comes "xor"
    assert client.ask("vCont;s:1").startswith("T05")
    assert _regs(client.ask("g"))["rip"] == sb.symbol("id")
    assert client.ask("s").startswith("T05")
    regs = _regs(client.ask("g"))
    assert regs["rip"] == sb.symbol("after") and regs["rax"] == 0
    assert not sb.read(F.GUEST_RFLAGS) & 0x100 and not sb.read(F.EXCEPTION_BITMAP)  # TF and #DB restored
    # Continue to the end: HLT exiting stops the guest; the stub says so.
    assert client.ask("c").startswith("T05")
    assert _regs(client.ask("g"))["rip"] == sb.symbol("stop")
    client.send("k")


def test_register_writes(session) -> None:  # type: ignore[no-untyped-def]
    client, _, sb = session
    assert client.ask("P8=" + (0x1234).to_bytes(8, "little").hex()) == "OK"  # r8
    assert sb.gpr["r8"] == 0x1234
    g = bytearray(bytes.fromhex(client.ask("g")))
    g[0:8] = (0x55).to_bytes(8, "little")  # rax
    g[56:64] = (0x7000).to_bytes(8, "little")  # rsp lives in the VMCS
    assert client.ask("G" + g.hex()) == "OK"
    assert sb.gpr["rax"] == 0x55 and sb.read(F.GUEST_RSP) == 0x7000
    assert client.ask("D") == "OK"


def test_ctrl_c_stops_a_spinning_guest() -> None:
    """A guest spinning with interrupts off: the stub runs it in VMX-preemption-timer slices and
    checks for gdb's interrupt byte (0x03) between them."""
    sb = _sandbox(SPIN)
    stub = GdbStub(SandboxTarget(sb, slice_ticks=50), port=0)
    thread = threading.Thread(target=stub.serve, kwargs={"accept_timeout": 20}, daemon=True)
    thread.start()
    client = Client(stub.port)
    client.send("vCont;c")
    threading.Timer(0.3, lambda: client.sock.sendall(b"\x03")).start()
    assert client.reply().startswith("T02")  # SIGINT
    assert _regs(client.ask("g"))["rip"] in (sb.symbol("spin"),)
    assert not sb.read(F.PIN_BASED_VM_EXEC_CONTROL) & (1 << 6)  # the slice timer is off again
    client.send("k")
    client.close()
    thread.join(10)
    assert not thread.is_alive()


def test_port_in_use_and_bad_port() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(GdbStubError, match=f"port {port} is already in use"):
            GdbStub(SandboxTarget(_sandbox()), port=port)
        r = run_cli("gdbserver", "examples/scenarios/hlt.toml", "--port", str(port))
        assert r.returncode == 2 and r.stderr.strip() == f"pyvmx: error: port {port} is already in use"
    finally:
        taken.close()
    with pytest.raises(GdbStubError, match="bad TCP port 70000"):
        GdbStub(SandboxTarget(_sandbox()), port=70000)
    r = run_cli("gdbserver", "examples/scenarios/hlt.toml", "--port", "70000")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "70000" in r.stderr


# --- a real gdb ----------------------------------------------------------------------------------------
needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


def _gdb(port: int, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = ["gdb", "-nx", "-batch", "-ex", "set architecture i386:x86-64", "-ex", "set pagination off", "-ex", f"target remote :{port}"]
    for command in commands:
        argv += ["-ex", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _value(stdout: str, register: str) -> list[int]:
    return [int(line.split()[1], 16) for line in stdout.splitlines() if line.split()[:1] == [register]]


@needs_gdb
def test_real_gdb_session() -> None:
    """break at a guest label, read registers, step, continue, and continue to the guest's end."""
    sb = _sandbox()
    stub = GdbStub(SandboxTarget(sb), port=0)
    thread = threading.Thread(target=stub.serve, kwargs={"accept_timeout": 30}, daemon=True)
    thread.start()
    bp = sb.symbol("bp")
    r = _gdb(
        stub.port,
        "info registers rip",
        f"break *{bp:#x}",
        "continue",
        "info registers rip r8",
        "stepi",
        "info registers rip",
        "x/2xb $pc",
        "continue",
        "info registers rip r8",
        "delete",
        "continue",
        "info registers rip r8",
        "kill",
    )
    thread.join(20)
    out = r.stdout
    assert "Breakpoint 1, 0x" in out, out + r.stderr
    assert _value(out, "rip") == [sb.symbol("start"), bp, bp + 4, bp, sb.symbol("stop")]
    assert _value(out, "r8") == [2, 8, 31]
    assert "0x31\t0xc0" in out  # x/2xb at bp+4: "xor %eax, %eax" (31 c0), read through the guest page tables
    assert "guest halted" in r.stderr  # the stub's console message when HLT exiting stops the guest
    assert not thread.is_alive()


@needs_gdb
def test_real_gdb_with_the_cli() -> None:
    """``pyvmx gdbserver SCENARIO --port N`` serves the scenario's guest (intercepts applied)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    import os
    import sys
    from pathlib import Path

    from tests.tools.cli_helpers import SRC

    env = dict(os.environ, PYTHONPATH=str(SRC))
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen([sys.executable, "-m", "pyvmx", "gdbserver", str(root / "examples/scenarios/hlt.toml"), "--port", str(port)],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stderr is not None
        assert "listening on 127.0.0.1:" in server.stderr.readline()
        r = _gdb(port, "continue", "info registers rip", "kill")
        assert _value(r.stdout, "rip") == [0x10002], r.stdout + r.stderr  # the HLT at label stop
        assert server.wait(timeout=20) == 0
    finally:
        server.kill()


def _engine_has_mtf() -> bool:
    """Whether the CPU engine delivers monitor-trap-flag exits (SDM 26.5.2) yet."""
    sb = _sandbox("nop\nnop\nhlt\n")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MONITOR_TRAP_FLAG)
    return sb.run().basic_reason == 37


@pytest.mark.parametrize("step_with", ["tf", "mtf"])
def test_single_step_methods(step_with: str) -> None:
    """One instruction per step with either mechanism; an instruction that exits (CPUID,
    SDM 26.1.2) is emulated by the handler, which completes the step; the guest-visible
    RFLAGS.TF, the exception bitmap and the primary controls are as before."""
    if step_with == "mtf" and not _engine_has_mtf():
        pytest.skip("the CPU engine does not deliver MTF exits yet")
    sb = _sandbox()
    target = SandboxTarget(sb, step_with=step_with)
    controls, bitmap = sb.read(F.CPU_BASED_VM_EXEC_CONTROL), sb.read(F.EXCEPTION_BITMAP)
    rips = []
    for _ in range(6):
        assert target.step().kind == "step"
        rips.append(sb.rip)
    start = sb.symbol("start")
    assert rips == [start + 7, sb.symbol("bp"), sb.symbol("bp") + 4, sb.symbol("id"), sb.symbol("after"), sb.symbol("after") + 4]
    assert sb.gpr["r8"] == 1 + 1 + 2 + 3
    assert sb.read(F.CPU_BASED_VM_EXEC_CONTROL) == controls and sb.read(F.EXCEPTION_BITMAP) == bitmap
    assert not sb.read(F.GUEST_RFLAGS) & 0x100
