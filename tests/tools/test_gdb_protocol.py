"""The GDB stub is a network service: each malformed packet gets an ``Exx`` reply and the session
goes on; nothing a peer sends makes it hang or grow memory without bound (gdb manual, Remote
Protocol: "Standard Replies" -- ``E NN`` for an error; the 'm' reply "may contain fewer
addressable memory units than requested"; ``PacketSize`` in the qSupported reply bounds what the
peer may send)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmx.tools.gdb_rsp import MAX_PACKET, MAX_PENDING, PacketReader, frame
from pyvmx.tools.gdbstub import MAX_MEMORY_READ, GdbStub
from tests.tools.gdb_session import free_port
from tests.tools.test_gdbstub import Client, _sandbox

MALFORMED = [
    "G0",  # odd number of hex digits
    "Gzz",  # not hex
    "pzz", "p", "p-1", "p0x10", "p 1", "p1_0", "p99",
    "P10", "P10=", "Pzz=00", "P10=zz", "P10=0", "P10=00",  # no '=', bad number/value, wrong size
    "Z0", "Z0,", "Z0,10000", "Z0,zz,1", "Zq,10000,1", "Z0,10000,1,2", "Z2,10000,0",
    "z1,,", "Z9999999999999999999,1,1",
    "czz", "c-1", "c1ffffffffffffffff", "Czz", "C05;zz", "szz", "Sxx;1",
    "c800000000000000", "s0000800000000000", "C05;ffff7fffffffffff",  # not canonical (SDM 3.3.7.1)
    "m", "m1", "mzz,1", "m1,zz", "m,", "M1,2:zz", "M1,2:00", "M1:00", "Mzz,1:00",
    "vCont;q", "vCont;", "qXfer:features:read:target.xml:zz,1", "qXfer:features:read:target.xml",
]


@pytest.fixture
def session() -> Iterator[tuple[Client, GdbStub, threading.Thread]]:
    stub = GdbStub(_sandbox_target(), port=0)
    thread = threading.Thread(target=stub.serve, kwargs={"accept_timeout": 20}, daemon=True)
    thread.start()
    client = Client(stub.port)
    yield client, stub, thread
    client.close()
    thread.join(10)
    assert not thread.is_alive()


def _sandbox_target():  # type: ignore[no-untyped-def]
    from pyvmx.tools.gdbstub import SandboxTarget

    return SandboxTarget(_sandbox())


@pytest.mark.parametrize("packet", MALFORMED)
def test_a_malformed_packet_gets_an_error_and_the_session_goes_on(packet: str, session) -> None:  # type: ignore[no-untyped-def]
    client, _, thread = session
    assert client.ask(packet).startswith("E"), packet
    assert client.ask("?").startswith("T05") and thread.is_alive()
    client.send("k")


def test_a_huge_read_is_answered_at_once_and_bounded(session) -> None:  # type: ignore[no-untyped-def]
    """``m0,ffffffffffffffff``: a reply of at most what fits in a packet, or an error -- not a
    read of 2^64 bytes."""
    client, _, _ = session
    client.sock.settimeout(10)
    reply = client.ask("m10000,ffffffffffffffff")
    assert len(reply) == 2 * MAX_MEMORY_READ, len(reply)
    assert client.ask("mffffffffffffffff,ffffffffffffffff").startswith("E")
    client.send("k")


def test_an_endless_packet_is_dropped_not_buffered(session) -> None:  # type: ignore[no-untyped-def]
    """A packet with no '#' longer than PacketSize: its bytes are counted and dropped; when its
    '#' comes it is answered with an error; the stub is still there."""
    client, stub, thread = session
    client.sock.sendall(b"$m")
    chunk = b"1" * 65536
    for _ in range(64):  # 4 MiB without '#'
        client.sock.sendall(chunk)
    client.sock.sendall(b"#00")
    while not client.buf:
        client._read()
    assert client.buf[:1] == b"+"
    client.buf = client.buf[1:]
    assert client.reply() == "E01"
    assert client.ask("?").startswith("T05") and thread.is_alive()
    client.send("k")


def test_packet_reader_memory_is_bounded() -> None:
    reader = PacketReader()
    reader.feed(b"$")
    for _ in range(100):
        reader.feed(b"x" * 100_000)
        assert len(reader.payload) <= MAX_PACKET
    for _ in range(10 * MAX_PENDING):
        reader.feed(frame(b"g"))
    assert len(reader.packets) == MAX_PENDING


def test_run_with_gdb_survives_malformed_packets(tmp_path: Path) -> None:
    """``pyvmx run --gdb``: a peer sending garbage does not lose the guest run -- after a detach
    the guest runs on to its end (exit status 42)."""
    from tests.tools.cli_helpers import SRC

    image = tmp_path / "guest.S"
    image.write_text("_start:\n mov $0x2a, %al\n out %al, $0xf4\n hlt\n")
    port = free_port()
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    server = subprocess.Popen([sys.executable, "-m", "pyvmx", "run", str(image), "--gdb", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stderr is not None
        assert "listening" in server.stderr.readline()
        client = _connect(port)
        for packet in MALFORMED:
            assert client.ask(packet).startswith("E"), packet
        assert client.ask("D") == "OK"
        client.close()
        out, err = server.communicate(timeout=60)
        assert server.returncode == 42, err
    finally:
        server.kill()
        server.wait(timeout=10)


def _connect(port: int) -> Client:
    deadline = time.monotonic() + 30
    while True:
        try:
            return Client(port)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_freed_port_can_be_reused_at_once() -> None:
    """SO_REUSEADDR (as gdbserver and QEMU set it): the port of a session that just ended -- its
    connection in TIME_WAIT on the stub's side -- is free for the next stub at once.  A port
    another process listens on is still refused."""
    stub = GdbStub(_sandbox_target(), port=0)
    port = stub.port
    thread = threading.Thread(target=stub.serve, kwargs={"accept_timeout": 20}, daemon=True)
    thread.start()
    client = Client(port)
    client.send("k")  # the stub closes first: its side of the connection goes to TIME_WAIT
    thread.join(10)
    client.close()
    again = GdbStub(_sandbox_target(), port=port)
    assert again.port == port and again.host == "127.0.0.1"
    again.close()


def test_listens_on_loopback_only_by_default() -> None:
    stub = GdbStub(_sandbox_target(), port=0)
    try:
        assert stub.listener.getsockname()[0] == "127.0.0.1"
        with socket.socket() as probe, pytest.raises(OSError):
            probe.settimeout(2)
            probe.connect((_non_loopback_address(), stub.port))
    finally:
        stub.close()


def _non_loopback_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
            address = str(s.getsockname()[0])
        except OSError:
            address = "0.0.0.0"
    if address.startswith("127.") or address == "0.0.0.0":
        pytest.skip("this host has no non-loopback IPv4 address")
    return address
