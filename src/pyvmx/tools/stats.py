"""VM-exit statistics: a table like ``perf kvm stat report`` (tools/perf/builtin-kvm.c) and
kvm_stat -- per exit reason the number of samples, their share, the share of time, and the
minimum, maximum and average time with the relative standard error of the average.

Two times can be counted per exit:

* ``"guest"`` (default): guest TSC ticks from the VM entry to this exit -- how long the guest
  ran before an exit of this kind stopped it.  Deterministic on the VT-x machine.
* ``"handler"``: host nanoseconds spent in the exit handler -- what perf kvm stat calls the
  event's time (exit to next entry).  Depends on the host.

:class:`ExitStats` is an exit-handler wrapper (:mod:`pyvmx.tools.runloop`)::

    stats = ExitStats()
    run_sandbox(sb, stats.wrap(SeedHypervisor()))
    print(stats.render_text())
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from rich import box
from rich.table import Table
from rich.text import Text

from pyvmx.tools.runloop import ExitHandler, ExitRecord, Outcome

Metric = Literal["guest", "handler"]


@dataclass(slots=True)
class ReasonStats:
    """Samples and times of one exit reason (times in the metric's unit)."""

    samples: int = 0
    total: int = 0
    sum_squares: int = 0
    min: int = 0
    max: int = 0

    def add(self, value: int) -> None:
        if self.samples == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.samples += 1
        self.total += value
        self.sum_squares += value * value

    @property
    def avg(self) -> float:
        return self.total / self.samples if self.samples else 0.0

    @property
    def stddev_pct(self) -> float:
        """Relative standard error of the average, in percent (perf's "( +- x% )")."""
        n = self.samples
        if n < 2 or self.total == 0:
            return 0.0
        mean = self.total / n
        variance = max(0.0, (self.sum_squares - n * mean * mean) / (n - 1))
        return 100.0 * math.sqrt(variance / n) / mean


@dataclass(frozen=True, slots=True)
class StatsRow:
    event: str
    samples: int
    samples_pct: float
    time_pct: float
    min: int
    max: int
    avg: float
    stddev_pct: float


class ExitStats:
    """Counts exits and their times per exit reason."""

    def __init__(self, metric: Metric = "guest", *, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        if metric not in ("guest", "handler"):
            raise ValueError(f"metric must be 'guest' or 'handler', not {metric!r}")
        self.metric = metric
        self.clock = clock
        self.by_reason: dict[str, ReasonStats] = {}
        self._lock = threading.Lock()  # vCPUs may run in threads

    @property
    def unit(self) -> str:
        return "TSC" if self.metric == "guest" else "ns"

    def add(self, reason: str, guest_tsc: int, handler_ns: int = 0) -> None:
        value = guest_tsc if self.metric == "guest" else handler_ns
        with self._lock:
            self.by_reason.setdefault(reason, ReasonStats()).add(max(0, value))

    def wrap(self, inner: ExitHandler) -> ExitHandler:
        """A handler that counts each exit, then calls ``inner``."""

        def counted(rec: ExitRecord) -> Outcome:
            start = self.clock()
            outcome = inner(rec)
            self.add(rec.reason_name, rec.guest_tsc, max(0, self.clock() - start))
            return outcome

        return counted

    @classmethod
    def from_events(cls, events: Iterable[object], metric: Metric = "guest") -> ExitStats:
        """Statistics of the exits of a trace (:class:`~pyvmx.tools.trace.TraceEvent`s)."""
        stats = cls(metric)
        for e in events:
            if getattr(e, "kind", None) == "exit":
                stats.add(getattr(e, "reason", None) or "?", getattr(e, "guest_tsc", None) or 0, getattr(e, "handler_ns", None) or 0)
        return stats

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.by_reason.values())

    def rows(self) -> list[StatsRow]:
        """One row per reason, most samples first (perf's default sort), then by name."""
        samples = self.total_samples
        total_time = sum(s.total for s in self.by_reason.values())
        rows = [
            StatsRow(
                reason, s.samples, 100.0 * s.samples / samples if samples else 0.0,
                100.0 * s.total / total_time if total_time else 0.0, s.min, s.max, s.avg, s.stddev_pct,
            )
            for reason, s in self.by_reason.items()
        ]
        rows.sort(key=lambda r: (-r.samples, r.event))
        return rows

    # --- rendering -------------------------------------------------------------------------
    HEADER = ("Event", "Samples", "Samples%", "Time%", "Min time", "Max time", "Avg time", "+-")

    def _cells(self, row: StatsRow) -> tuple[str, ...]:
        return (
            row.event, str(row.samples), f"{row.samples_pct:.2f}%", f"{row.time_pct:.2f}%",
            str(row.min), str(row.max), f"{row.avg:.2f}", f"{row.stddev_pct:.2f}%",
        )

    def title(self) -> str:
        what = "guest TSC ticks from VM entry to the exit" if self.metric == "guest" else "host ns in the exit handler"
        return f"Analyze events for all VMs, all VCPUs\n(times: {what})"

    def render_text(self) -> str:
        """perf kvm stat report's layout, as plain text."""
        rows = [self._cells(r) for r in self.rows()]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(self.HEADER)]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()

        total = f"Total Samples:{self.total_samples}"
        return "\n".join([self.title(), "", line(self.HEADER), ""] + [line(r) for r in rows] + ["", total]) + "\n"

    def table(self) -> Table:
        """The same as a rich table."""
        table = Table(
            title=self.title(), title_justify="left", caption=f"Total Samples: {self.total_samples}",
            caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), show_edge=False,
        )
        for i, name in enumerate(self.HEADER):
            table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
        for row in self.rows():  # Text: an event name from a trace file is not rich markup
            table.add_row(*(Text(cell) for cell in self._cells(row)))
        return table


def per_vcpu_table(exits: Mapping[int, Mapping[str, int]], title: str = "VM exits by reason (kvm_stat)") -> Table:
    """VM exits counted per reason and per vCPU (kvm_stat's per-vCPU fields): one row per reason,
    most exits first, one column per vCPU.  ``exits`` maps a vCPU id to its reason -> count."""
    table = Table(title=title)
    table.add_column("Event")
    vcpus = sorted(exits)
    for vcpu in vcpus:
        table.add_column(f"vCPU {vcpu}", justify="right")
    reasons = sorted({r for per in exits.values() for r in per}, key=lambda r: (-sum(p.get(r, 0) for p in exits.values()), r))
    for reason in reasons:
        table.add_row(Text(reason), *(str(exits[v].get(reason, 0)) for v in vcpus))
    return table
