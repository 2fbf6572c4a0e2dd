"""GDB remote serial protocol framing and field parsing, for a peer that is not trusted.

A packet is ``$payload#cc`` with ``cc`` the payload's byte sum modulo 256 in two hex digits; the
receiver answers ``+`` (good) or ``-`` (resend) until ``QStartNoAckMode``; a lone 0x03 byte is
gdb's Ctrl-C (gdb manual, "Overview" and "Interrupts" of the Remote Protocol appendix).

Everything here is bounded whatever the peer sends:

* a packet longer than :data:`MAX_PACKET` (the ``PacketSize`` the stub advertises) is not
  buffered: its bytes are counted and dropped up to its ``#``, and it is delivered as
  :data:`OVERLONG` so the stub can answer with an error;
* bytes between packets are scanned slice-wise (no per-byte Python loop, no quadratic search);
* at most :data:`MAX_PENDING` complete packets wait while the guest runs (gdb sends none then,
  except Ctrl-C); more are dropped unacknowledged, and gdb resends.

Fields are parsed strictly (:func:`hex_int`, :func:`hex_bytes`): a malformed field raises
:class:`MalformedPacket` (a ``ValueError``), which the stub answers with ``E01``.
"""

from __future__ import annotations

import re
import select
import socket
from collections import deque
from enum import Enum

MAX_PACKET = 0x4000  # the PacketSize we advertise: the largest payload we accept, in bytes
MAX_PENDING = 16  # complete packets kept while the guest runs
_RECV_CHUNK = 65536
_POLL_CHUNKS = 64  # reads per poll for Ctrl-C while the guest runs (a flood cannot stall it)
_HEX = re.compile(rb"[0-9a-fA-F]*")


class MalformedPacket(ValueError):
    """A packet or a field in it is not what the protocol allows."""


class _State(Enum):
    BETWEEN = 0  # looking for '$' (acks and Ctrl-C bytes pass here)
    PAYLOAD = 1  # inside $...#
    CHECKSUM = 2  # the two hex digits after '#'


OVERLONG = b"\x00overlong"
"""The payload delivered for a packet longer than :data:`MAX_PACKET` (never a real payload:
a real payload is at most :data:`MAX_PACKET` bytes and this marker's first byte is NUL)."""


class PacketReader:
    """Incremental framing: :meth:`feed` bytes as they arrive, take complete packets from
    :attr:`packets` as ``(payload, checksum_ok)``."""

    def __init__(self, limit: int = MAX_PACKET) -> None:
        self.limit = limit
        self.state = _State.BETWEEN
        self.payload = bytearray()
        self.overlong = False
        self.checksum = bytearray()
        self.packets: deque[tuple[bytes, bool]] = deque()
        self.last_ack: int | None = None  # the last '+' or '-' seen between packets
        self.interrupt = False  # a Ctrl-C byte was seen

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.state is _State.BETWEEN:
                start = data.find(b"$", i)
                end = n if start < 0 else start
                self._between(data[i:end])
                if start < 0:
                    return
                self.state, self.overlong = _State.PAYLOAD, False
                self.payload.clear()
                i = start + 1
            elif self.state is _State.PAYLOAD:
                hash_at = data.find(b"#", i)
                end = n if hash_at < 0 else hash_at
                if len(self.payload) + (end - i) > self.limit:
                    self.overlong = True
                    self.payload.clear()
                if not self.overlong:
                    self.payload += data[i:end]
                if hash_at < 0:
                    return
                self.state = _State.CHECKSUM
                self.checksum.clear()
                i = hash_at + 1
            else:
                take = min(2 - len(self.checksum), n - i)
                self.checksum += data[i : i + take]
                i += take
                if len(self.checksum) == 2:
                    self._complete()

    def _between(self, noise: bytes) -> None:
        if not noise:
            return
        if b"\x03" in noise:
            self.interrupt = True
        last = max(noise.rfind(b"+"), noise.rfind(b"-"))
        if last >= 0:
            self.last_ack = noise[last]

    def _complete(self) -> None:
        self.state = _State.BETWEEN
        if len(self.packets) >= MAX_PENDING:
            return  # dropped unacknowledged: gdb resends
        if self.overlong:
            self.packets.append((OVERLONG, True))
            return
        payload = bytes(self.payload)
        good = bytes(self.checksum).lower() == f"{checksum(payload):02x}".encode()
        self.packets.append((payload, good))


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    return b"$" + payload + b"#" + f"{checksum(payload):02x}".encode()


class Connection:
    """One gdb connection: packets in, replies out, acks until ``QStartNoAckMode``."""

    def __init__(self, sock: socket.socket, limit: int = MAX_PACKET) -> None:
        self.sock = sock
        self.reader = PacketReader(limit)
        self.ack = True

    def _recv(self, timeout: float | None) -> bool:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        data = self.sock.recv(_RECV_CHUNK)
        if not data:
            raise EOFError("gdb closed the connection")
        self.reader.feed(data)
        return True

    def poll_interrupt(self) -> bool:
        """Whether gdb sent Ctrl-C (reads what is waiting, a bounded amount, without blocking)."""
        for _ in range(_POLL_CHUNKS):
            if not self._recv(0):
                break
        hit, self.reader.interrupt = self.reader.interrupt, False
        return hit

    def read_packet(self) -> str:
        """The next packet's payload; :data:`OVERLONG` (as text) for one that was too long."""
        while True:
            packets = self.reader.packets
            if packets:
                payload, good = packets.popleft()
                if self.ack:
                    self.sock.sendall(b"+" if good else b"-")
                    if not good:
                        continue
                return payload.decode("latin-1")
            self._recv(None)

    def send(self, payload: str) -> None:
        data = frame(payload.encode("latin-1"))
        self.sock.sendall(data)
        if not self.ack:
            return
        for _ in range(100):  # wait for the ack; '-' asks for a resend
            self.reader.last_ack = None
            while self.reader.last_ack is None and not self.reader.packets:
                self._recv(None)
            if self.reader.last_ack != ord("-"):
                return  # '+', or a packet arrived instead of an ack
            self.sock.sendall(data)


# --- fields ------------------------------------------------------------------------------------
def hex_int(text: str, bits: int = 64) -> int:
    """A hex number of at most ``bits`` bits, digits only (no sign, prefix, space or '_')."""
    if not text or len(text) > bits // 4 or not _HEX.fullmatch(text.encode("latin-1")):
        raise MalformedPacket(f"bad hex number {text[:20]!r}")
    return int(text, 16)


def hex_bytes(text: str) -> bytes:
    """An even number of hex digits, as bytes."""
    if len(text) % 2 or not _HEX.fullmatch(text.encode("latin-1")):
        raise MalformedPacket("bad hex data")
    return bytes.fromhex(text)


def fields(text: str, separator: str, count: int) -> list[str]:
    """``text`` split at ``separator`` into exactly ``count`` fields."""
    parts = text.split(separator)
    if len(parts) != count:
        raise MalformedPacket(f"expected {count} fields separated by {separator!r}")
    return parts
