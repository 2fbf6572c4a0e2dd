"""The fuzz harness itself: a hang or an exception out of a run becomes a failure kind, and only
the named known bugs are excused."""

from __future__ import annotations

import struct
import time

import pytest

from pyvmx.kvm.devices.bus import BusAccessError
from pyvmx.kvm.mmu.guest_memory import GuestMemoryError
from tests.fuzz.targets import Hang, exception_kind, is_failure, wall_clock_limit


def test_a_busy_loop_past_the_wall_clock_limit_is_a_hang() -> None:
    start = time.perf_counter()
    with pytest.raises(Hang), wall_clock_limit(0.2):
        while True:
            pass
    assert time.perf_counter() - start < 5
    assert is_failure(exception_kind(Hang("x")))


@pytest.mark.parametrize("exc", [
    GuestMemoryError(0xF0000000, 1, True),  # issue 11.5: string I/O into no RAM (fixed)
    BusAccessError("MMIO access size must be 1, 2, 4 or 8, not 3"),  # 11.5: split MMIO (fixed)
    struct.error("argument out of range"),  # 11.7: VMCS memory behind the model (fixed)
])
def test_the_fixed_bugs_count_as_failures_again(exc: BaseException) -> None:
    kind = exception_kind(exc)
    assert kind.startswith("HOST-EXCEPTION:") and is_failure(kind)


@pytest.mark.parametrize("exc", [ValueError("x"), KeyError(3), AssertionError(), BusAccessError("I/O access size must be 1, 2 or 4, not 3")])
def test_any_other_exception_is_a_host_exception(exc: BaseException) -> None:
    kind = exception_kind(exc)
    assert kind.startswith("HOST-EXCEPTION:") and is_failure(kind)


def _handle_string_io() -> None:  # named as the hypervisor's handler, to be found in a traceback
    raise Hang("input still running")


def test_a_hang_inside_string_io_is_a_hang() -> None:
    """Issue 11.4 (fixed): string I/O now moves guest time, so a hang there is a failure."""
    with pytest.raises(Hang) as info:
        _handle_string_io()
    assert exception_kind(info.value) == "HANG" and is_failure("HANG")
