"""The fuzz harness itself: a hang, an exception out of a run, or an InternalError that is no
documented limitation becomes a failure kind."""

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


@pytest.mark.parametrize("exc", [ValueError("x"), KeyError(3), AssertionError(), struct.error("x"),
                                 BusAccessError("MMIO access size must be 1, 2, 4 or 8, not 3"),
                                 GuestMemoryError(0xF0000000, 1, True)])
def test_any_other_exception_is_a_host_exception(exc: BaseException) -> None:
    kind = exception_kind(exc)
    assert kind.startswith("HOST-EXCEPTION:") and is_failure(kind)


def test_internal_errors_are_documented_limitations_or_failures() -> None:
    from pyvmx.kvm.exits import InternalError

    from tests.fuzz.targets import exit_kind

    assert exit_kind(InternalError(1, "MMIO emulation failed: fldenv (%rsi): not an instruction ...")) == "InternalError:MMIO emulation failed"
    assert exit_kind(InternalError(2, "exception 13 during delivery of another event")) == "InternalError:exception"
    wrapped = exit_kind(InternalError(1, "host exception GuestMemoryError: guest-physical write of 1 bytes at 0xf0000000 is not RAM"))
    assert is_failure(wrapped), wrapped
