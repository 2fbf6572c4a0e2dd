"""What the fuzz suite ran and how each input ended, for the summary ``make fuzz`` prints
(tests/fuzz/conftest.py): inputs by generator, outcomes by kind, inputs per second.

Every fuzz test records each input it runs with :func:`record`. An outcome kind is the name
of the typed value the run ended with (``IoExit``, ``FailEntry``, ``VM_EXIT:EPT_VIOLATION`` ...),
``known-bug:<name>`` for inputs that hit a bug another change is fixing (counted, not failed),
or ``HOST-EXCEPTION:<type>`` / ``HANG`` -- which also fail the test."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

# Kinds that fail their test (targets.is_failure): a host exception, also when run() reports it as
# an InternalError that is no documented limitation, a hang, a broken guest-time bound.
FAILURE_KINDS = ("HOST-EXCEPTION", "HANG", "UNDOCUMENTED", "TIME-LIMIT-OVERRUN", "NO-TIME-PROGRESS", "NOT-AN-EXIT")

SCALE_ENV = "PYVMX_FUZZ_SCALE"  # every fuzz test: file mutations, RSP packets, guest inputs
GUEST_SCALE_ENV = "PYVMX_GUEST_FUZZ_SCALE"  # the guest-input tests only (else PYVMX_FUZZ_SCALE)


def scale() -> float:
    """How many times the CI example counts of the guest-input tests to run: ``make fuzz`` sets
    PYVMX_GUEST_FUZZ_SCALE (guest inputs are cheap; ~900 per unit) and PYVMX_FUZZ_SCALE."""
    value = os.environ.get(GUEST_SCALE_ENV) or os.environ.get(SCALE_ENV) or "1"
    try:
        return max(0.01, float(value))
    except ValueError:
        return 1.0


def examples(n: int) -> int:
    """``n`` Hypothesis examples in CI, ``n`` times the scale under ``make fuzz``."""
    return max(1, round(n * scale()))


@dataclass
class FuzzLedger:
    inputs: Counter[str] = field(default_factory=Counter)  # generator -> inputs run
    guest_inputs: Counter[str] = field(default_factory=Counter)  # generator -> inputs that ran guest code
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (generator, kind) -> count
    seconds: Counter[str] = field(default_factory=Counter)  # generator -> wall time in inputs
    cpu_seconds: Counter[str] = field(default_factory=Counter)  # generator -> this process's CPU time

    def record(self, generator: str, kind: str, *, seconds: float = 0.0, cpu_seconds: float = 0.0, guest: bool = True) -> None:
        self.inputs[generator] += 1
        if guest:
            self.guest_inputs[generator] += 1
        self.outcomes[(generator, kind)] += 1
        self.seconds[generator] += seconds
        self.cpu_seconds[generator] += cpu_seconds

    def lines(self) -> list[str]:
        if not self.inputs:
            return []
        out = [f"fuzz inputs: {sum(self.inputs.values())} total, {sum(self.guest_inputs.values())} guest inputs "
               f"(ran guest code), {sum(self.seconds.values()):.1f} s inside inputs "
               f"({sum(self.cpu_seconds.values()):.1f} s CPU)"]
        for gen in sorted(self.inputs):
            n, secs, cpu = self.inputs[gen], self.seconds[gen], self.cpu_seconds[gen]
            rate = f"{n / secs:8.0f} inputs/s wall" if secs else ""
            rate += f", {n / cpu:.0f}/s per CPU second" if cpu else ""
            out.append(f"  {gen:32} {n:8d} inputs {rate}")
            kinds = sorted(((k, c) for (g, k), c in self.outcomes.items() if g == gen), key=lambda kc: -kc[1])
            for kind, count in kinds:
                out.append(f"      {count:8d}  {kind}")
        totals: Counter[str] = Counter()
        for (_, kind), count in self.outcomes.items():
            totals[kind.split(":")[0] if kind.startswith(("VM_EXIT", "STALL")) else kind] += count
        bad = sum(c for k, c in totals.items() if k.startswith(FAILURE_KINDS))
        known = sum(c for k, c in totals.items() if k.startswith("known-bug"))
        out.append("outcomes by kind (all generators): " + ", ".join(f"{k} {c}" for k, c in totals.most_common()))
        out.append(f"host exceptions, hangs and other failures: {bad}; inputs that hit a known bug being fixed elsewhere: {known}")
        return out


LEDGER = FuzzLedger()


class Stopwatch:
    """Wall-clock and CPU time since it was made (the machine is shared: CPU time is what an
    input costs, wall time what the run took)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    def record(self, generator: str, kind: str, *, guest: bool = True) -> None:
        LEDGER.record(generator, kind, seconds=time.perf_counter() - self.start,
                      cpu_seconds=time.process_time() - self.cpu_start, guest=guest)


def record(generator: str, kind: str, *, seconds: float = 0.0, cpu_seconds: float = 0.0, guest: bool = True) -> None:
    """Count one input of ``generator`` that ended as ``kind`` (for helpers without a Stopwatch)."""
    LEDGER.record(generator, kind, seconds=seconds, cpu_seconds=cpu_seconds, guest=guest)


def record_counts(generator: str, outcomes: Counter[str], *, guest: bool = False) -> None:
    """Count inputs already tallied by outcome (generators that keep their own Counter)."""
    for kind, count in outcomes.items():
        for _ in range(count):
            LEDGER.record(generator, kind, guest=guest)
