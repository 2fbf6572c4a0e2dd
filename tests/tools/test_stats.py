"""Exit statistics like ``perf kvm stat report`` (tools/perf/builtin-kvm.c: Samples, Samples%,
Time%, Min/Max/Avg time with the relative error of the average) and kvm_stat, from real exits
of guests run on the VT-x sandbox, and wrappers composing around the real handler (hvpp)."""

from __future__ import annotations

import itertools
import math

import pytest
from rich.console import Console

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.tools.runloop import ExitRecord, Outcome, SeedHypervisor, run_sandbox
from pyvmx.tools.stats import ExitStats, ReasonStats
from pyvmx.tools.trace import Tracer

GUEST = r"""
    mov $5, %rcx
loop:
    push %rcx
    xor %eax, %eax
    cpuid
    pop %rcx
    mov $0x3f8, %dx
    mov $0x2e, %al
    out %al, %dx
    pause
    dec %rcx
    jnz loop
    hlt
"""


@pytest.fixture(scope="module")
def run():  # type: ignore[no-untyped-def]
    """CPUID, OUT to 0x3F8 and PAUSE exits five times each, then HLT; statistics and a trace
    wrap the seed hypervisor."""
    from pyvmx.guest.sandbox import VmxSandbox

    sb = VmxSandbox("long", GUEST)
    sb.use_io_bitmaps(intercept=[0x3F8])
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING | C.PAUSE_EXITING)
    stats = ExitStats()
    tracer = Tracer()
    handler = SeedHypervisor()
    start = sb.cpu.read_tsc()
    result = run_sandbox(sb, tracer.wrap(stats.wrap(handler)))
    assert result.outcome is not None and handler.output == "....."
    return stats, tracer, sb.cpu.read_tsc() - start


def test_counts_per_reason(run) -> None:  # type: ignore[no-untyped-def]
    stats, _, _ = run
    rows = {r.event: r for r in stats.rows()}
    assert {name: r.samples for name, r in rows.items()} == {"CPUID": 5, "IO_INSTRUCTION": 5, "PAUSE_INSTRUCTION": 5, "HLT": 1}
    assert stats.total_samples == 16
    assert sum(r.samples_pct for r in rows.values()) == pytest.approx(100.0)
    assert rows["CPUID"].samples_pct == pytest.approx(100 * 5 / 16)
    assert [r.event for r in stats.rows()] == ["CPUID", "IO_INSTRUCTION", "PAUSE_INSTRUCTION", "HLT"]  # samples, then name


def test_guest_time_adds_up_to_the_tsc(run) -> None:  # type: ignore[no-untyped-def]
    """The guest TSC advances only in non-root operation here, so the guest time before each
    exit adds up to the whole run's TSC."""
    stats, _, elapsed = run
    assert sum(s.total for s in stats.by_reason.values()) == elapsed
    rows = stats.rows()
    assert sum(r.time_pct for r in rows) == pytest.approx(100.0)
    for r in rows:
        assert r.min <= r.avg <= r.max
    pause = next(r for r in rows if r.event == "PAUSE_INSTRUCTION")
    # From an OUT to the PAUSE right after it: the guest runs exactly the OUT (skipped, so not
    # counted) and then reaches the PAUSE -> 0 instructions retire in between.
    assert pause.min == pause.max == 0 and pause.stddev_pct == 0.0


def test_stats_from_a_trace_equal_the_wrapper(run) -> None:  # type: ignore[no-untyped-def]
    """Wrappers compose: the tracer around the statistics saw the same exits."""
    stats, tracer, _ = run
    assert ExitStats.from_events(tracer.events).rows() == stats.rows()


def test_text_rendering(run) -> None:  # type: ignore[no-untyped-def]
    stats, _, _ = run
    text = stats.render_text().splitlines()
    assert text[0].startswith("Analyze events for all VMs, all VCPUs")
    header = next(line for line in text if line.strip().startswith("Event"))
    assert header.split() == ["Event", "Samples", "Samples%", "Time%", "Min", "time", "Max", "time", "Avg", "time", "+-"]
    cpuid = next(line for line in text if line.strip().startswith("CPUID"))
    assert cpuid.split()[1:3] == ["5", "31.25%"]
    assert text[-1] == "Total Samples:16"


def test_rich_rendering(run) -> None:  # type: ignore[no-untyped-def]
    stats, _, _ = run
    console = Console(record=True, width=120, color_system=None)
    console.print(stats.table())
    out = console.export_text()
    assert "PAUSE_INSTRUCTION" in out and "31.25%" in out and "Total Samples: 16" in out


def test_handler_time_metric() -> None:
    """metric="handler": host time in the handler, what perf kvm stat times."""
    ticks = itertools.count(0, 250)
    stats = ExitStats("handler", clock=lambda: next(ticks))
    from pyvmx.vmx.outcomes import VmExitInfo

    handler = stats.wrap(lambda rec: Outcome.resume())
    for reason in (10, 10, 12):
        handler(ExitRecord(VmExitInfo(reason), rip=0, tsc_exit=100, tsc_entry=0))
    row = stats.rows()[0]
    assert (row.event, row.samples, row.min, row.max) == ("CPUID", 2, 250, 250)
    assert "host ns" in stats.title()
    with pytest.raises(ValueError):
        ExitStats("wall")  # type: ignore[arg-type]


def test_relative_error_of_the_average() -> None:
    """perf's "( +- x% )": the standard error of the mean relative to the mean."""
    s = ReasonStats()
    values = [10, 20, 30, 40]
    for v in values:
        s.add(v)
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert s.stddev_pct == pytest.approx(100 * sd / math.sqrt(4) / mean)
    assert (s.min, s.max, s.avg) == (10, 40, 25.0)
