"""Random remote-serial-protocol input never kills the GDB stub (the stub is a network service;
gdb manual, Remote Protocol): random bytes, valid-looking commands with random fields, packets
cut short, bad checksums.  After any of it the stub still answers a well-formed packet, unless
the input itself asked it to end the session (``k``, ``D``).

Deterministic (derandomized) and bounded: ``PYVMX_FUZZ_SCALE`` multiplies the number of examples
(``make fuzz``), and each input's outcome goes to the suite's ledger.  The target is a vCPU of the hypervisor with a small guest-time budget, so that
a random ``c`` or ``s`` ends quickly whatever the registers and memory were set to."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmx.tools.gdb_rsp import MAX_PACKET, MAX_PENDING, Connection, PacketReader, frame
from pyvmx.tools.gdbstub import GdbStub
from tests.fuzz.ledger import Stopwatch, examples

REPLY_TIMEOUT = 30.0
GUEST = "_start:\n mov $1, %r8\nloop:\n add $1, %r8\n jmp loop\n"

_hex = st.text("0123456789abcdef", min_size=0, max_size=20)
_junk = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
_field = st.one_of(_hex, _junk, st.sampled_from(["", "-1", "0x10", "ffffffffffffffff", "10000", "1" * 40]))
_command = st.one_of(
    st.builds(lambda a: "g" + a, st.just("")),
    st.builds(lambda d: "G" + d, st.one_of(_hex, st.text("0123456789abcdefxz", max_size=1200))),
    st.builds(lambda n: "p" + n, _field),
    st.builds(lambda n, v: f"P{n}={v}", _field, _field),
    st.builds(lambda n, v: f"P{n}{v}", _field, _field),
    st.builds(lambda a, n: f"m{a},{n}", _field, _field),
    st.builds(lambda a, n, d: f"M{a},{n}:{d}", _field, _field, _field),
    st.builds(lambda t, a, k: f"Z{t},{a},{k}", st.sampled_from(["0", "1", "2", "3", "4", "5", "z"]), _field, _field),
    st.builds(lambda t, a, k: f"z{t},{a},{k}", st.sampled_from(["0", "1", "2", "3", "4"]), _field, _field),
    st.builds(lambda c, a: c + a, st.sampled_from(["c", "s", "C", "S", "C05;", "S05;", "vCont;", "vCont;s:", "vCont;c:"]), _field),
    st.builds(lambda a, b: f"qXfer:features:read:{a}:{b}", st.sampled_from(["target.xml", "x", ""]), _field),
    st.sampled_from(["?", "qC", "qSupported:swbreak+", "QStartNoAckMode", "vCont?", "Hg0", "T1", "qfThreadInfo"]),
    _junk,
)
_ENDS = ("k", "D")


def _packet(payload: str, good: bool) -> bytes:
    data = frame(payload.encode("latin-1"))
    return data if good else data[:-2] + b"zz"


_chunk = st.one_of(
    st.builds(_packet, _command, st.booleans()),  # a whole packet, checksum right or wrong
    st.builds(lambda p, cut: _packet(p, True)[:cut], _command, st.integers(0, 40)),  # cut short
    st.binary(max_size=64),  # noise
    st.sampled_from([b"\x03", b"+", b"-", b"$", b"#", b"}"]),
)


class _Client(threading.Thread):
    """Reads the stub's packets, acknowledges each, and tells when a wanted reply came."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock, self.reader = sock, PacketReader(limit=1 << 20)
        self.replies: list[bytes] = []
        self.changed = threading.Condition()

    def run(self) -> None:
        try:
            while data := self.sock.recv(65536):
                self.reader.feed(data)
                while self.reader.packets:
                    payload, _ = self.reader.packets.popleft()
                    self.sock.sendall(b"+")
                    with self.changed:
                        self.replies.append(payload)
                        self.changed.notify_all()
        except OSError:
            pass
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, reply: bytes, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: reply in self.replies or not self.is_alive(), timeout) and reply in self.replies


@pytest.fixture(scope="module")
def target() -> Iterator[object]:
    from pyvmx.guest.assemble import assemble
    from pyvmx.kvm.boot import setup_long_mode
    from pyvmx.kvm.kvm import Kvm
    from pyvmx.kvm.loader import load_flat
    from pyvmx.tools.gdb_vcpu import VcpuTarget

    image = assemble(GUEST, 0x10000)
    vm = Kvm(cpus=1).create_vm(memory_size=4 << 20)
    load_flat(vm, image.code, 0x10000)
    vcpu = vm.create_vcpu()
    setup_long_mode(vcpu, image.symbols["_start"])
    yield VcpuTarget(vcpu, slice_ticks=2000, max_tsc=200_000)


@settings(max_examples=examples(100), derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(chunks=st.lists(_chunk, max_size=12))
def test_the_stub_answers_after_any_input(target: object, chunks: list[bytes]) -> None:
    clock = Stopwatch()
    stub = GdbStub(target, port=0)  # type: ignore[arg-type]
    stub.close()  # no listener: served over a socket pair
    ours, theirs = socket.socketpair()
    ours.settimeout(REPLY_TIMEOUT)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            stub.serve_connection(theirs)
        except BaseException as exc:  # noqa: BLE001 - the property: nothing escapes
            errors.append(exc)

    server = threading.Thread(target=serve, daemon=True)
    client = _Client(ours)
    server.start()
    client.start()
    try:
        ours.sendall(b"".join(chunks) + b"#00" + frame(b"qC"))
        answered = client.wait_for(b"QC1", REPLY_TIMEOUT)
        ended = not server.is_alive() and bool(stub.log) and stub.log[-1].startswith(_ENDS)
        kind = "answered" if answered else "session ended by k/D" if ended else "HANG"
        clock.record("rsp-packets", f"HOST-EXCEPTION:{type(errors[0]).__name__}" if errors else kind, guest=False)
        assert answered or ended, (chunks, list(stub.log)[-5:], errors)
    finally:
        ours.shutdown(socket.SHUT_RDWR)  # wakes both threads (a plain close() would not)
        ours.close()
        server.join(REPLY_TIMEOUT)
        client.join(REPLY_TIMEOUT)
    assert not server.is_alive() and not errors, errors


@settings(max_examples=examples(200), derandomize=True, deadline=None)
@given(data=st.lists(st.binary(max_size=3000), max_size=20))
def test_framing_is_bounded_for_any_bytes(data: list[bytes]) -> None:
    """Whatever arrives, the framer holds at most PacketSize bytes of a packet and at most
    MAX_PENDING packets, and never raises."""
    reader = PacketReader(limit=1000)
    for chunk in data:
        reader.feed(chunk)
        assert len(reader.payload) <= 1000 and len(reader.packets) <= MAX_PENDING


@settings(max_examples=examples(100), derandomize=True, deadline=None)
@given(payloads=st.lists(st.binary(max_size=200).filter(lambda b: b"#" not in b and b"$" not in b), max_size=8),
       cuts=st.lists(st.integers(1, 50), max_size=30))
def test_framing_finds_the_same_packets_however_the_bytes_are_split(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"+".join(frame(p) for p in payloads)
    reader, at = PacketReader(limit=MAX_PACKET), 0
    for cut in cuts:
        reader.feed(stream[at : at + cut])
        at += cut
    reader.feed(stream[at:])
    assert list(reader.packets) == [(p, True) for p in payloads]


def test_connection_checks_checksums_while_acking() -> None:
    """In acknowledgement mode a packet with a bad checksum is answered '-' and dropped."""
    ours, theirs = socket.socketpair()
    ours.settimeout(REPLY_TIMEOUT)
    theirs.settimeout(REPLY_TIMEOUT)
    conn = Connection(theirs)
    ours.sendall(frame(b"g")[:-2] + b"00" + frame(b"?"))
    assert conn.read_packet() == "?"
    assert ours.recv(2) == b"-+"
    ours.close()
    theirs.close()
