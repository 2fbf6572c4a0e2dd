"""A GDB remote-serial-protocol stub for one guest vCPU, over TCP on localhost.

    $ pyvmx gdbserver examples/scenarios/hlt.toml --port 1234
    $ gdb -ex 'set architecture i386:x86-64' -ex 'target remote :1234'

The stub speaks to a :class:`DebugTarget` -- registers, guest-linear memory, software
breakpoints, single step, continue -- so that any vCPU can be debugged: :class:`SandboxTarget`
implements it for a :class:`~pyvmx.guest.sandbox.VmxSandbox` the way a hypervisor does it:

* breakpoints are INT3 bytes written into guest memory while the guest runs (removed whenever
  it stops, so memory reads show the original bytes), with #BP intercepted through the exception
  bitmap (SDM 25.6.3): the exit leaves RIP at the INT3 (SDM 28.2.1, 27.5.1 "fault-like");
* single step sets RFLAGS.TF with #DB intercepted: the exit comes after one instruction
  (SDM 18.3.1.4).  The monitor trap flag (SDM 26.5.2, exit reason 37) is the cleaner mechanism
  and is used when ``step_with="mtf"``;
* continue runs the guest in slices of the VMX-preemption timer (SDM 26.5.1) when the guest
  does not use the timer itself, so that a Ctrl-C from gdb stops even a guest spinning with
  interrupts off;
* every other VM exit goes to an exit handler (:mod:`pyvmx.tools.runloop`), by default the
  seed hypervisor; a handler that stops the run stops the debuggee.

Protocol (https://sourceware.org/gdb/current/onlinedocs/gdb.html/Remote-Protocol.html):
qSupported, ?, g/G, p/P, m/M, Z0/z0 (and Z1/z1 as software breakpoints), c/C, s/S, vCont?,
vCont;c/s, k, D, qAttached, Hg/Hc, qC, qfThreadInfo/qsThreadInfo, T, QStartNoAckMode.  The 'g'
packet has gdb's amd64 register layout without a target description (gdb's
features/i386/64bit-core.xml then 64bit-sse.xml): rax rbx rcx rdx rsi rdi rbp rsp r8-r15 (8 bytes
each), rip (8), eflags cs ss ds es fs gs (4 each), st0-st7 (10 each), fctrl fstat ftag fiseg
fioff foseg fooff fop (4 each), xmm0-xmm15 (16 each), mxcsr (4).
"""

from __future__ import annotations

import errno
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyvmx.arch.controls import INTR_INFO_VALID_MASK, PinBasedControls, ProcBasedControls, InterruptionType
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import ExceptionVector, Rflags
from pyvmx.tools.guestmem import GuestMemory, GuestMemoryError
from pyvmx.tools.runloop import ExitHandler, Outcome, SeedHypervisor, make_record

SIGINT, SIGTRAP = 2, 5
_ALREADY_SENT = "\x00already sent"  # dispatch() answered itself

# gdb's amd64 register numbers and sizes in the 'g' packet (no target description).
CORE_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                  "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs")
_SIZES = [8] * 17 + [4] * 7 + [10] * 8 + [4] * 8 + [16] * 16 + [4]  # 57 registers, 536 bytes
_FP_DEFAULTS = {32: 0x37F, 56: 0x1F80}  # fctrl and mxcsr after FNINIT / reset


@dataclass(frozen=True, slots=True)
class StopReason:
    """Why the debuggee stopped: a signal for gdb, what caused it, and a message for the user."""

    signal: int
    kind: str  # "breakpoint", "step", "interrupt", "handler", "stalled"
    message: str = ""


class DebugTarget(Protocol):
    """One vCPU as a debugger sees it.  Addresses are guest-linear."""

    def read_registers(self) -> dict[str, int]: ...

    def write_registers(self, values: dict[str, int]) -> None: ...

    def read_memory(self, address: int, size: int) -> bytes: ...

    def write_memory(self, address: int, data: bytes) -> None: ...

    def set_breakpoint(self, address: int) -> None: ...

    def clear_breakpoint(self, address: int) -> None: ...

    def step(self) -> StopReason: ...

    def cont(self, interrupted: Callable[[], bool]) -> StopReason: ...


class GdbStubError(OSError):
    """The stub cannot listen (bad port, port in use, permission)."""


# --- the sandbox as a debug target -------------------------------------------------------------
_SEGMENTS = {"cs": F.GUEST_CS_SELECTOR, "ss": F.GUEST_SS_SELECTOR, "ds": F.GUEST_DS_SELECTOR,
             "es": F.GUEST_ES_SELECTOR, "fs": F.GUEST_FS_SELECTOR, "gs": F.GUEST_GS_SELECTOR}
_GPRS_IN_ENGINE = tuple(r for r in CORE_REGISTERS[:16] if r != "rsp")
INT3 = b"\xcc"


class SoftwareBreakpoints:
    """INT3 breakpoints for a target with ``breakpoints`` (address -> original byte) and
    ``read_memory``/``write_memory``: the INT3s are in guest memory only while the guest runs."""

    breakpoints: dict[int, bytes]

    def read_memory(self, address: int, size: int) -> bytes:
        raise NotImplementedError

    def write_memory(self, address: int, data: bytes) -> None:
        raise NotImplementedError

    def set_breakpoint(self, address: int) -> None:
        if address not in self.breakpoints:
            self.breakpoints[address] = self.read_memory(address, 1)  # raises if unmapped

    def clear_breakpoint(self, address: int) -> None:
        self.breakpoints.pop(address, None)

    def _insert(self) -> None:
        for address in self.breakpoints:
            self.write_memory(address, INT3)

    def _remove(self) -> None:
        for address, original in self.breakpoints.items():
            self.write_memory(address, original)


@dataclass
class SandboxTarget(SoftwareBreakpoints):
    """:class:`DebugTarget` for a :class:`~pyvmx.guest.sandbox.VmxSandbox`."""

    sb: Any
    handler: ExitHandler = field(default_factory=SeedHypervisor)
    step_with: str = "tf"  # "tf" (RFLAGS.TF + #DB intercept) or "mtf" (monitor trap flag)
    slice_ticks: int = 2000  # preemption-timer value per continue slice
    breakpoints: dict[int, bytes] = field(default_factory=dict)  # address -> original byte
    exits: int = 0

    def __post_init__(self) -> None:
        self.mem = GuestMemory(self.sb)

    # registers -------------------------------------------------------------------------------
    def read_registers(self) -> dict[str, int]:
        sb = self.sb
        regs = {r: sb.gpr[r] for r in _GPRS_IN_ENGINE}
        regs["rsp"] = sb.read(F.GUEST_RSP)  # RSP lives in the VMCS (SDM 27.3.2.3, 28.3.2)
        regs["rip"] = sb.read(F.GUEST_RIP)
        regs["eflags"] = sb.read(F.GUEST_RFLAGS)
        for name, fld in _SEGMENTS.items():
            regs[name] = sb.read(fld)
        regs["fs_base"] = sb.read(F.GUEST_FS_BASE)
        regs["gs_base"] = sb.read(F.GUEST_GS_BASE)
        return regs

    def write_registers(self, values: dict[str, int]) -> None:
        sb = self.sb
        for name, value in values.items():
            if name in _GPRS_IN_ENGINE:
                sb.gpr[name] = value
            elif name == "rsp":
                sb.write(F.GUEST_RSP, value)
            elif name == "rip":
                sb.write(F.GUEST_RIP, value)
            elif name == "eflags":
                sb.write(F.GUEST_RFLAGS, (value | Rflags.FIXED) & 0x3F7FD7)
            elif name in _SEGMENTS and value != sb.read(_SEGMENTS[name]):
                sb.write(_SEGMENTS[name], value & 0xFFFF)  # the selector only: base/limit/AR stay

    # memory ----------------------------------------------------------------------------------
    def read_memory(self, address: int, size: int) -> bytes:
        return self.mem.read_linear(address, size)

    def write_memory(self, address: int, data: bytes) -> None:
        self.mem.write_linear(address, data)
        self._invalidate(address, len(data))

    def _invalidate(self, address: int, size: int) -> None:
        """Drop the CPU engine's translated code for these bytes (self-modifying code from the
        host's side, e.g. an INT3 written behind the guest's back)."""
        cpu = getattr(getattr(self.sb, "executor", None), "cpu", None)
        if cpu is not None:
            cpu.invalidate_code(address, address + max(1, size))

    # running ------------------------------------------------------------------------------------
    def _enter(self) -> tuple[Any, int, int]:
        sb = self.sb
        tsc, rip = sb.cpu.read_tsc(), sb.rip
        return sb.enter(), tsc, rip

    def _handle(self, result: Any, tsc: int, rip: int) -> StopReason | None:
        """Give a non-debug exit to the handler; a stop becomes a StopReason."""
        if result.exit is None:
            return StopReason(SIGTRAP, "stalled", f"the guest cannot run: {result.stall or result}")
        record = make_record(self.sb, result.exit, tsc, rip, index=self.exits)
        self.exits += 1
        outcome: Outcome = self.handler(record)
        if outcome.stops:
            return StopReason(SIGTRAP, "handler", f"{record.reason_name} at {record.rip:#x}: {outcome.note or 'stopped'}")
        return None

    @staticmethod
    def _is_exception(exit: Any, vector: int) -> bool:
        info = exit.intr_info
        return exit.basic_reason == ExitReason.EXCEPTION_NMI and bool(info & INTR_INFO_VALID_MASK) and info & 0xFF == vector

    def step(self) -> StopReason:
        sb = self.sb
        if self.step_with == "mtf":
            sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, ProcBasedControls.MONITOR_TRAP_FLAG)
            try:
                result, tsc, rip = self._enter()
            finally:
                sb.clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, ProcBasedControls.MONITOR_TRAP_FLAG)
            if result.exit is not None and result.exit.basic_reason == ExitReason.MONITOR_TRAP_FLAG:
                return StopReason(SIGTRAP, "step")
            return self._handle(result, tsc, rip) or StopReason(SIGTRAP, "step")
        flags = sb.read(F.GUEST_RFLAGS)
        bitmap = sb.read(F.EXCEPTION_BITMAP)
        sb.write(F.GUEST_RFLAGS, flags | Rflags.TF)
        sb.write(F.EXCEPTION_BITMAP, bitmap | (1 << ExceptionVector.DB))
        try:
            result, tsc, rip = self._enter()
        finally:
            after = sb.read(F.GUEST_RFLAGS)
            sb.write(F.GUEST_RFLAGS, (after & ~Rflags.TF) | (flags & Rflags.TF))
            sb.write(F.EXCEPTION_BITMAP, bitmap)
        if result.exit is not None and self._is_exception(result.exit, ExceptionVector.DB):
            sb.write(F.GUEST_PENDING_DBG_EXCEPTIONS, 0)
            return StopReason(SIGTRAP, "step")
        # The instruction exited before it completed (CPUID, OUT ...): the handler emulates it,
        # which completes the step.
        return self._handle(result, tsc, rip) or StopReason(SIGTRAP, "step")

    def cont(self, interrupted: Callable[[], bool]) -> StopReason:
        sb = self.sb
        if sb.rip in self.breakpoints:  # step off the breakpoint with the original byte in place
            stop = self.step()
            if stop.kind != "step":
                return stop
            if sb.rip in self.breakpoints:
                return StopReason(SIGTRAP, "breakpoint")
        bitmap = sb.read(F.EXCEPTION_BITMAP)
        pin = sb.read(F.PIN_BASED_VM_EXEC_CONTROL)
        slicing = not pin & PinBasedControls.VMX_PREEMPTION_TIMER
        own_bp = not bitmap & (1 << ExceptionVector.BP)
        sb.write(F.EXCEPTION_BITMAP, bitmap | (1 << ExceptionVector.BP))
        if slicing:
            sb.write(F.PIN_BASED_VM_EXEC_CONTROL, pin | PinBasedControls.VMX_PREEMPTION_TIMER)
        self._insert()
        try:
            while True:
                if interrupted():
                    return StopReason(SIGINT, "interrupt")
                if slicing:
                    sb.write(F.VMX_PREEMPTION_TIMER_VALUE, self.slice_ticks)
                result, tsc, rip = self._enter()
                exit = result.exit
                if exit is not None and self._is_exception(exit, ExceptionVector.BP):
                    if sb.rip in self.breakpoints:
                        return StopReason(SIGTRAP, "breakpoint")
                    if own_bp:  # the guest's own INT3: deliver it to the guest (SDM 27.6)
                        sb.write(F.VM_ENTRY_INTR_INFO_FIELD, INTR_INFO_VALID_MASK | (InterruptionType.SOFT_EXCEPTION << 8) | 3)
                        sb.write(F.VM_ENTRY_INSTRUCTION_LEN, exit.instruction_length)
                        continue
                if slicing and exit is not None and exit.basic_reason == ExitReason.PREEMPTION_TIMER:
                    continue
                handled = self._handle(result, tsc, rip)
                if handled is not None:
                    return handled
        finally:
            self._remove()
            sb.write(F.EXCEPTION_BITMAP, bitmap)
            if slicing:
                sb.write(F.PIN_BASED_VM_EXEC_CONTROL, pin)


# --- the protocol --------------------------------------------------------------------------------
def _checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def _le(value: int, size: int) -> str:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little").hex()


class _Connection:
    """Packet framing over one socket: $payload#cs, acks, and the out-of-band Ctrl-C byte."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.ack = True
        self.interrupt = False

    def _recv(self, timeout: float | None) -> bool:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("gdb closed the connection")
        self.buf += data
        return True

    def _drain_noise(self) -> None:
        """Consume acks and Ctrl-C bytes before the next packet."""
        while self.buf and self.buf[0] != ord("$"):
            if self.buf[0] == 0x03:
                self.interrupt = True
            del self.buf[0]

    def poll_interrupt(self) -> bool:
        while self._recv(0):
            pass
        self._drain_noise()
        hit, self.interrupt = self.interrupt, False
        return hit

    def read_packet(self) -> str:
        while True:
            self._drain_noise()
            end = self.buf.find(b"#")
            if self.buf.startswith(b"$") and end != -1 and len(self.buf) >= end + 3:
                payload = bytes(self.buf[1:end])
                cs = bytes(self.buf[end + 1 : end + 3])
                del self.buf[: end + 3]
                if self.ack:
                    good = cs.lower() == f"{_checksum(payload):02x}".encode()
                    self.sock.sendall(b"+" if good else b"-")
                    if not good:
                        continue
                return payload.decode("latin-1")
            self._recv(None)

    def send(self, payload: str) -> None:
        data = payload.encode("latin-1")
        self.sock.sendall(b"$" + data + b"#" + f"{_checksum(data):02x}".encode())
        if not self.ack:
            return
        for _ in range(100):  # wait for the ack; '-' asks for a resend
            while not self.buf:
                self._recv(None)
            byte = self.buf[0]
            if byte == ord("+"):
                del self.buf[0]
                return
            if byte == ord("-"):
                del self.buf[0]
                self.sock.sendall(b"$" + data + b"#" + f"{_checksum(data):02x}".encode())
                continue
            return  # a packet arrived instead of an ack: leave it for read_packet


class GdbStub:
    """Serves one gdb connection for one :class:`DebugTarget`."""

    def __init__(self, target: DebugTarget, port: int = 0, host: str = "127.0.0.1") -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise GdbStubError(errno.EINVAL, f"bad TCP port {port!r} (0..65535; 0 picks a free one)")
        self.target = target
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.listener.bind((host, port))
            self.listener.listen(1)
        except OSError as exc:
            self.listener.close()
            if exc.errno == errno.EADDRINUSE:
                raise GdbStubError(exc.errno, f"port {port} is already in use") from None
            if exc.errno == errno.EACCES:
                raise GdbStubError(exc.errno, f"no permission to listen on port {port}") from None
            raise GdbStubError(exc.errno or 0, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host = host
        self.port = int(self.listener.getsockname()[1])
        self.last_stop = StopReason(SIGTRAP, "attach")
        self.log: list[str] = []  # the packets received, for tests and --verbose
        self.ready = threading.Event()

    def close(self) -> None:
        self.listener.close()

    def serve(self, accept_timeout: float | None = None) -> None:
        """Accept one connection and serve it until gdb kills or detaches (or disconnects)."""
        self.listener.settimeout(accept_timeout)
        self.ready.set()
        try:
            sock, _ = self.listener.accept()
        except TimeoutError:
            raise GdbStubError(errno.ETIMEDOUT, "no debugger connected") from None
        finally:
            self.listener.close()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(sock)
        try:
            while True:
                packet = conn.read_packet()
                self.log.append(packet)
                reply = self.dispatch(packet, conn)
                if reply is None:  # k, or D after its OK
                    return
                if reply is not _ALREADY_SENT:
                    conn.send(reply)
        except (EOFError, ConnectionError):
            return
        finally:
            sock.close()

    # ------------------------------------------------------------------------------------------
    def _stop_reply(self, stop: StopReason, conn: _Connection | None = None) -> str:
        self.last_stop = stop
        if stop.message and conn is not None:
            conn.send("O" + f"pyvmx: {stop.message}\n".encode().hex())
        extra = "swbreak:;" if stop.kind == "breakpoint" else ""
        return f"T{stop.signal:02x}{extra}thread:1;"

    def _registers_hex(self) -> str:
        regs = self.target.read_registers()
        out = []
        for number, size in enumerate(_SIZES):
            value = regs.get(CORE_REGISTERS[number], 0) if number < len(CORE_REGISTERS) else _FP_DEFAULTS.get(number, 0)
            out.append(_le(value, size))
        return "".join(out)

    def dispatch(self, packet: str, conn: _Connection) -> str | None:
        t = self.target
        if packet.startswith("qSupported"):
            return "PacketSize=4000;swbreak+;vContSupported+;QStartNoAckMode+"
        if packet == "QStartNoAckMode":
            conn.send("OK")
            conn.ack = False
            return _ALREADY_SENT
        if packet == "?":
            return self._stop_reply(self.last_stop)
        if packet == "g":
            return self._registers_hex()
        if packet.startswith("G"):
            data = bytes.fromhex(packet[1:])
            values, offset = {}, 0
            for number, name in enumerate(CORE_REGISTERS):
                size = _SIZES[number]
                if offset + size > len(data):
                    break
                values[name] = int.from_bytes(data[offset : offset + size], "little")
                offset += size
            t.write_registers(values)
            return "OK"
        if packet.startswith("p"):
            number = int(packet[1:], 16)
            if number < len(CORE_REGISTERS):
                return _le(t.read_registers().get(CORE_REGISTERS[number], 0), _SIZES[number])
            if number < len(_SIZES):
                return _le(_FP_DEFAULTS.get(number, 0), _SIZES[number])
            return "xx"  # not available (gdb checks only the first character)
        if packet.startswith("P"):
            reg, _, value = packet[1:].partition("=")
            number = int(reg, 16)
            if number < len(CORE_REGISTERS):
                t.write_registers({CORE_REGISTERS[number]: int.from_bytes(bytes.fromhex(value), "little")})
                return "OK"
            return "E01"
        if packet.startswith("m"):
            addr, _, length = packet[1:].partition(",")
            try:
                return t.read_memory(int(addr, 16), int(length, 16)).hex()
            except (GuestMemoryError, ValueError):
                return "E14"
        if packet.startswith("M"):
            head, _, hexdata = packet[1:].partition(":")
            addr, _, _length = head.partition(",")
            try:
                t.write_memory(int(addr, 16), bytes.fromhex(hexdata))
            except (GuestMemoryError, ValueError):
                return "E14"
            return "OK"
        if packet[:2] in ("Z0", "Z1", "z0", "z1"):
            _, addr, _kind = packet.split(",")
            try:
                if packet[0] == "Z":
                    t.set_breakpoint(int(addr, 16))
                else:
                    t.clear_breakpoint(int(addr, 16))
            except GuestMemoryError:
                return "E14"
            return "OK"
        if packet[:1] in ("Z", "z"):
            return ""  # watchpoints: not supported
        if packet.startswith(("c", "C")) or packet.startswith(("s", "S")):
            step = packet[0] in "sS"
            arg = packet[1:]
            if packet[0] in "CS":
                arg = arg.partition(";")[2]
            if arg:
                t.write_registers({"rip": int(arg, 16)})
            return self._resume(step, conn)
        if packet == "vCont?":
            return "vCont;c;C;s;S"
        if packet.startswith("vCont;"):
            actions = [a.partition(":")[0] for a in packet[6:].split(";")]
            step = any(a[:1] in ("s", "S") for a in actions)
            return self._resume(step, conn)
        if packet.startswith("vMustReplyEmpty") or packet.startswith("v"):
            return ""
        if packet.startswith("H"):
            return "OK"
        if packet == "qC":
            return "QC1"
        if packet == "qfThreadInfo":
            return "m1"
        if packet == "qsThreadInfo":
            return "l"
        if packet.startswith("qAttached"):
            return "1"
        if packet.startswith("qSymbol"):
            return "OK"
        if packet.startswith("T"):
            return "OK" if packet[1:] in ("1", "01") else "E01"
        if packet == "k":
            return None
        if packet.startswith("D"):
            conn.send("OK")
            return None
        return ""

    def _resume(self, step: bool, conn: _Connection) -> str:
        stop = self.target.step() if step else self.target.cont(conn.poll_interrupt)
        return self._stop_reply(stop, conn)
