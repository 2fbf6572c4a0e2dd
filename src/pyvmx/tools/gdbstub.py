"""A GDB remote-serial-protocol stub for one guest vCPU, over TCP on localhost.

    $ pyvmx gdbserver examples/scenarios/hlt.toml --port 1234
    $ gdb -ex 'target remote :1234'

The stub speaks to a :class:`DebugTarget` -- registers, guest-linear memory, software
breakpoints, watchpoints, single step, continue -- so that any vCPU can be debugged:
:class:`SandboxTarget` implements it for a :class:`~pyvmx.guest.sandbox.VmxSandbox` the way a
hypervisor does it (:mod:`pyvmx.tools.gdb_vcpu` does it for a vCPU of :mod:`pyvmx.kvm`):

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
qSupported, qXfer:features:read (the target description, :mod:`pyvmx.tools.gdb_tdesc`), ?,
g/G, p/P, m/M, Z0/z0 (and Z1/z1 as software breakpoints), Z2-Z4/z2-z4 (watchpoints, where the
target has them), c/C, s/S, vCont?, vCont;c/s, k, D, qAttached, Hg/Hc, qC,
qfThreadInfo/qsThreadInfo, T, QStartNoAckMode.  Framing and field parsing are in
:mod:`pyvmx.tools.gdb_rsp`; the peer is untrusted.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from pyvmx.arch.controls import INTR_INFO_VALID_MASK, PinBasedControls, ProcBasedControls, InterruptionType
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import ExceptionVector, Rflags
from pyvmx.tools.gdb_rsp import MAX_PACKET, OVERLONG, Connection, MalformedPacket, fields, hex_bytes, hex_int
from pyvmx.tools.gdb_tdesc import LEGACY, Register, encode_value, layout_for, merge
from pyvmx.tools.guestmem import GuestMemory, GuestMemoryError, guest_bitness, guest_efer
from pyvmx.tools.runloop import ExitHandler, Outcome, SeedHypervisor, make_record

SIGINT, SIGTRAP = 2, 5
_ALREADY_SENT = "\x00already sent"  # dispatch() answered itself
ERR_MALFORMED = "E01"  # a packet or field the protocol does not allow
ERR_MEMORY = "E14"  # EFAULT: the guest-linear address has no translation
MAX_MEMORY_READ = (MAX_PACKET - 4) // 2  # bytes of memory per 'm' reply (two hex digits each)
MAX_WATCH_LENGTH = 4096
LOG_PACKETS = 64

CORE_REGISTERS = tuple(reg.name for reg in LEGACY.registers[:24])  # rax..r15, rip, eflags, selectors


class WatchKind(IntEnum):
    """The Z packet types of watchpoints, and the stop-reply keyword of each."""

    WRITE = 2
    READ = 3
    ACCESS = 4

    @property
    def keyword(self) -> str:
        return {WatchKind.WRITE: "watch", WatchKind.READ: "rwatch", WatchKind.ACCESS: "awatch"}[self]


@dataclass(frozen=True, slots=True)
class Watch:
    """A watchpoint: ``length`` bytes at a guest-linear ``address``."""

    kind: WatchKind
    address: int
    length: int

    def __post_init__(self) -> None:
        if not 0 < self.length <= MAX_WATCH_LENGTH or self.address + self.length > 1 << 64:
            raise MalformedPacket(f"bad watchpoint length {self.length}")

    def overlaps(self, address: int, size: int) -> bool:
        return address < self.address + self.length and self.address < address + size


class WatchpointUnsupported(ValueError):
    """The target has no watchpoints (gdb then uses software watchpoints)."""


@dataclass(frozen=True, slots=True)
class StopReason:
    """Why the debuggee stopped: a signal for gdb, what caused it, and a message for the user."""

    signal: int
    kind: str  # "breakpoint", "step", "interrupt", "handler", "stalled", "watch", "exited"
    message: str = ""
    watch: Watch | None = None


class DebugTarget(Protocol):
    """One vCPU as a debugger sees it.  Addresses are guest-linear."""

    def read_registers(self) -> dict[str, int]: ...

    def write_registers(self, values: dict[str, int]) -> None: ...

    def bitness(self) -> int: ...

    def read_memory(self, address: int, size: int) -> bytes: ...

    def write_memory(self, address: int, data: bytes) -> None: ...

    def set_breakpoint(self, address: int) -> None: ...

    def clear_breakpoint(self, address: int) -> None: ...

    def set_watchpoint(self, watch: Watch) -> None: ...

    def clear_watchpoint(self, watch: Watch) -> None: ...

    def detach(self) -> None: ...

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
        regs["cr0"], regs["cr3"], regs["cr4"] = sb.read(F.GUEST_CR0), sb.read(F.GUEST_CR3), sb.read(F.GUEST_CR4)
        regs["efer"] = guest_efer(sb)
        return regs

    def bitness(self) -> int:
        return guest_bitness(self.sb)

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

    def set_watchpoint(self, watch: Watch) -> None:
        raise WatchpointUnsupported("the sandbox target has no watchpoints")

    def clear_watchpoint(self, watch: Watch) -> None:
        raise WatchpointUnsupported("the sandbox target has no watchpoints")

    def detach(self) -> None:
        pass  # breakpoints are out of guest memory whenever the guest is stopped

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
def _executable(address: int, bitness: int) -> bool:
    """Whether the vCPU can resume at ``address``: canonical in 64-bit mode (SDM 3.3.7.1), an
    offset within 4 GBytes (32-bit) or 64 KBytes (16-bit) otherwise."""
    if bitness == 64:
        return address < 1 << 47 or address >= (1 << 64) - (1 << 47)
    return address < 1 << bitness


class GdbStub:
    """Serves one gdb connection for one :class:`DebugTarget`.  The peer is untrusted: every
    packet gets an answer (``E01`` for a malformed one), and nothing it sends grows memory or
    time without bound (see :mod:`pyvmx.tools.gdb_rsp`)."""

    def __init__(self, target: DebugTarget, port: int = 0, host: str = "127.0.0.1") -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise GdbStubError(errno.EINVAL, f"bad TCP port {port!r} (0..65535; 0 picks a free one)")
        self.target = target
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A port a finished session freed is in TIME_WAIT for a minute: take it at once, as
        # gdbserver and QEMU do (a port another process listens on is still refused).
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
        self.layout = LEGACY  # until gdb reads the target description
        self.log: deque[str] = deque(maxlen=LOG_PACKETS)  # the last packets received (tests, --verbose)
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
        self.serve_connection(sock)

    def serve_connection(self, sock: socket.socket) -> None:
        """Serve gdb on a connected socket until it kills, detaches or disconnects."""
        conn = Connection(sock)
        try:
            while True:
                packet = conn.read_packet()
                self.log.append(packet[:64])
                reply = self.answer(packet, conn)
                if reply is None:  # k, or D after its OK
                    return
                if reply is not _ALREADY_SENT:
                    conn.send(reply)
        except (EOFError, ConnectionError):
            return
        finally:
            sock.close()
            self.target.detach()

    def answer(self, packet: str, conn: Connection) -> str | None:
        """:meth:`dispatch`, with a malformed packet answered by an error, never an exception."""
        if packet == OVERLONG.decode("latin-1"):
            return ERR_MALFORMED
        try:
            return self.dispatch(packet, conn)
        except MalformedPacket:
            return ERR_MALFORMED
        except GuestMemoryError:
            return ERR_MEMORY

    # ------------------------------------------------------------------------------------------
    def _stop_reply(self, stop: StopReason, conn: Connection | None = None) -> str:
        self.last_stop = stop
        if stop.message and conn is not None:
            conn.send("O" + f"pyvmx: {stop.message}\n".encode().hex())
        extra = "swbreak:;" if stop.kind == "breakpoint" else ""
        if stop.watch is not None:
            extra = f"{stop.watch.kind.keyword}:{stop.watch.address:x};"
        return f"T{stop.signal:02x}{extra}thread:1;"

    def _register(self, packet: str) -> Register:
        number = hex_int(packet, 16)
        if number >= len(self.layout.registers):
            raise MalformedPacket(f"no register {number}")
        return self.layout.registers[number]

    def dispatch(self, packet: str, conn: Connection) -> str | None:
        t = self.target
        if packet.startswith("qSupported"):
            return f"PacketSize={MAX_PACKET:x};qXfer:features:read+;swbreak+;vContSupported+;QStartNoAckMode+"
        if packet == "QStartNoAckMode":
            conn.send("OK")
            conn.ack = False
            return _ALREADY_SENT
        if packet.startswith("qXfer:features:read:"):
            return self._features(packet[len("qXfer:features:read:"):])
        if packet == "?":
            return self._stop_reply(self.last_stop)
        if packet == "g":
            return self.layout.encode(t.read_registers())
        if packet.startswith("G"):
            t.write_registers(self.layout.decode(hex_bytes(packet[1:]), t.read_registers()))
            return "OK"
        if packet.startswith("p"):
            reg = self._register(packet[1:])
            return encode_value(self.layout.value(reg, t.read_registers()), reg.size)
        if packet.startswith("P"):
            number, value = fields(packet[1:], "=", 2)
            reg = self._register(number)
            data = hex_bytes(value)
            if not reg.writable or len(data) != reg.size:
                return ERR_MALFORMED
            t.write_registers({reg.source: merge(reg, int.from_bytes(data, "little"), t.read_registers())})
            return "OK"
        if packet.startswith("m"):
            address, length = (hex_int(f) for f in fields(packet[1:], ",", 2))
            # A reply may hold fewer bytes than asked for (gdb manual, 'm' packet): at most what
            # fits in a packet, so a huge length is answered at once.
            length = min(length, MAX_MEMORY_READ, (1 << 64) - address)
            return t.read_memory(address, length).hex()
        if packet.startswith("M"):
            head, hexdata = fields(packet[1:], ":", 2)
            address, length = (hex_int(f) for f in fields(head, ",", 2))
            data = hex_bytes(hexdata)
            if len(data) != length or address + length > 1 << 64:
                return ERR_MALFORMED
            t.write_memory(address, data)
            return "OK"
        if packet[:1] in ("Z", "z"):
            return self._point(packet)
        if packet[:1] in ("c", "C", "s", "S"):
            step = packet[0] in "sS"
            arg = packet[1:]
            if packet[0] in "CS":
                signal, _, arg = arg.partition(";")
                hex_int(signal, 8)
            if arg:
                address = hex_int(arg)
                if not _executable(address, t.bitness()):
                    return ERR_MALFORMED
                t.write_registers({"rip": address})
            return self._resume(step, conn)
        if packet == "vCont?":
            return "vCont;c;C;s;S"
        if packet.startswith("vCont;"):
            actions = [a.partition(":")[0] for a in packet[6:].split(";")]
            if not all(a[:1] in ("c", "C", "s", "S") for a in actions):
                return ERR_MALFORMED
            step = any(a[:1] in ("s", "S") for a in actions)
            return self._resume(step, conn)
        if packet.startswith("v"):
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
            return "OK" if packet[1:] in ("1", "01") else ERR_MALFORMED
        if packet == "k":
            return None
        if packet.startswith("D"):
            conn.send("OK")
            return None
        return ""

    def _features(self, request: str) -> str:
        """``qXfer:features:read:ANNEX:OFFSET,LENGTH``: the target description, in pieces
        ('m' more follows, 'l' last).  The register layout follows the vCPU's mode now."""
        annex, _, span = request.partition(":")
        offset, length = (hex_int(f) for f in fields(span, ",", 2))
        if annex != "target.xml":
            return "E00"
        self.layout = layout_for(self.target.bitness())
        document = self.layout.xml().encode()
        piece = document[offset : offset + min(length, MAX_MEMORY_READ)]
        more = offset + len(piece) < len(document)
        return ("m" if more else "l") + piece.decode()

    def _point(self, packet: str) -> str:
        """Z/z TYPE,ADDR,KIND: breakpoints (0 software, 1 hardware: both INT3 here) and
        watchpoints (2 write, 3 read, 4 access) on guest-linear addresses."""
        kind_text, address_text, size_text = fields(packet[1:], ",", 3)
        kind, address = hex_int(kind_text, 8), hex_int(address_text)
        size = hex_int(size_text.partition(";")[0], 32)
        t = self.target
        insert = packet[0] == "Z"
        if kind in (0, 1):
            if insert:
                t.set_breakpoint(address)
            else:
                t.clear_breakpoint(address)
            return "OK"
        if kind in (2, 3, 4):
            watch = Watch(WatchKind(kind), address, size)
            try:
                if insert:
                    t.set_watchpoint(watch)
                else:
                    t.clear_watchpoint(watch)
            except WatchpointUnsupported:
                return ""  # gdb falls back to software watchpoints (single steps)
            return "OK"
        return ""

    def _resume(self, step: bool, conn: Connection) -> str:
        stop = self.target.step() if step else self.target.cont(conn.poll_interrupt)
        return self._stop_reply(stop, conn)
