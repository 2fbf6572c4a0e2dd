"""The accelerated engine (pyvmx.engine.accel): Unicorn 2.1.4 built from its source with pyvmx's
patch, which counts instructions in the exit-request check every translated block already runs
and gives the TLB-fill hook the full faulting address.  It must change nothing a guest can see:
the whole suite runs on it in CI (PYVMX_ENGINE=accel), and here the two engines run the same
demo side by side and must print the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyvmx.engine import accel
from pyvmx.engine.accel_icount import AccelIcountState, UcPyvmxIcount
from pyvmx.engine.unicorn_cpu import ENGINE_KIND, UnicornCpu
from pyvmx.vmx.memory import PhysicalMemory


def _need_accel() -> None:
    if not accel.is_built():
        if os.environ.get("PYVMX_REQUIRE_ACCEL"):
            pytest.fail("PYVMX_REQUIRE_ACCEL is set but the accelerated engine is not built (make accel)")
        pytest.skip("the accelerated engine is not built (make accel)")


def test_fast_deadline_invariant() -> None:
    """The patch's fast path counts a block only while icount + N <= fast_deadline; the owner
    keeps fast_deadline = deadline when counting with no interrupt window wanted, else 0 (so
    every block takes the checked path, which stops for the window: SDM 26.7.5)."""
    raw = UcPyvmxIcount()
    st = AccelIcountState(raw)
    assert raw.enabled == 1 and raw.fast_deadline == raw.deadline == 2**64 - 1
    st.deadline = 1000
    assert raw.fast_deadline == 1000
    st.want_window = 1
    assert raw.fast_deadline == 0 and st.deadline == 1000
    st.want_window = 0
    assert raw.fast_deadline == 1000
    raw.last_tbinfo = 37 << 16 | 9  # a 37-byte block of 9 instructions
    assert (st.last_size, st.last_icount) == (37, 9)
    st.last_icount = 0
    assert (st.last_size, st.last_icount) == (37, 0)


def test_the_engine_is_the_one_requested() -> None:
    """PYVMX_ENGINE picks the library once per process; a core says which one it runs on, and
    only the patched library reports exact fill addresses."""
    requested = accel.requested_engine()
    expected = {"stock": "stock", "accel": "accel", "auto": "accel" if accel.is_built() else "stock"}[requested]
    assert ENGINE_KIND == expected
    cpu = UnicornCpu(PhysicalMemory(1 << 20))
    assert cpu.accelerated == (ENGINE_KIND == "accel")
    assert cpu.exact_fill_address == cpu.accelerated


def test_unknown_engine_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVMX_ENGINE", "turbo")
    with pytest.raises(accel.AccelError, match="PYVMX_ENGINE='turbo'"):
        accel.requested_engine()


@pytest.mark.slow
def test_both_engines_print_the_same_demo() -> None:
    """Same guest, same results bit for bit: the demo (real -> long mode, first-touch EPT
    violations, two vCPUs sliced by the preemption timer, an async page fault) prints the same
    bytes -- exit counts per reason, guest TSC per vCPU, loop iterations -- on both engines."""
    _need_accel()
    outputs = []
    for engine in ("stock", "accel"):
        env = dict(os.environ, PYVMX_ENGINE=engine)
        done = subprocess.run([sys.executable, "-m", "pyvmx.tools.cli", "demo"], env=env, capture_output=True, timeout=600)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    assert b"EPT_VIOLATION" in outputs[0]
