"""Host-side interrupt sources of one physical processor: what the platform (devices, the host's
own timer, another CPU's IPI) signals to the logical processor, by virtual time.

Whether a pending interrupt becomes a VM exit or is delivered to the guest is decided by the
VM-execution controls in non-root operation (SDM 26.2, 26.7.5); this module only keeps the queue.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(order=True)
class ScheduledInterrupt:
    tsc: int
    seq: int
    vector: int = field(compare=False)


class InterruptQueue:
    """External interrupts raised at a TSC value (deterministic), plus a pending NMI latch."""

    def __init__(self) -> None:
        self._scheduled: list[ScheduledInterrupt] = []
        self._seq = 0
        self.nmi_pending = False

    def raise_at(self, tsc: int, vector: int) -> None:
        if not 0 <= vector <= 255:
            raise ValueError(f"interrupt vector {vector} is outside 0..255")
        self._seq += 1
        bisect.insort(self._scheduled, ScheduledInterrupt(tsc, self._seq, vector))

    def next_tsc(self, after: int | None = None) -> int | None:
        """When the earliest interrupt becomes pending (None if none is scheduled); with
        ``after``, the earliest one still in the future (TSC > ``after``) -- those already
        pending are no deadline: they wait for the guest to accept them."""
        for item in self._scheduled:
            if after is None or item.tsc > after:
                return item.tsc
        return None

    def pending(self, now: int) -> int | None:
        """The vector of the highest-priority interrupt pending at ``now`` (vector >> 4 is the
        priority class, as the local APIC orders them), or None."""
        best: ScheduledInterrupt | None = None
        for item in self._scheduled:
            if item.tsc > now:
                break
            if best is None or item.vector >> 4 > best.vector >> 4:
                best = item
        return None if best is None else best.vector

    def acknowledge(self, vector: int, now: int) -> None:
        """Remove the pending interrupt with ``vector`` (the INTA cycle)."""
        for i, item in enumerate(self._scheduled):
            if item.tsc <= now and item.vector == vector:
                del self._scheduled[i]
                return
        raise LookupError(f"no pending interrupt with vector {vector:#x}")

    def clear(self) -> None:
        self._scheduled.clear()
        self.nmi_pending = False

    def __len__(self) -> int:
        return len(self._scheduled)
