"""Record and replay: a run's configuration and its asynchronous inputs, stored so that the run
can be repeated to the identical sequence of VM exits.

The VT-x machine is deterministic given its inputs: guest time is retired instructions, and the
only things that do not come from the guest are the host's asynchronous events -- external
interrupts raised at a guest-TSC time, and (in the hypervisor) async page-fault completions.  A
record keeps those with the exit boundary at which the host raised them, plus every exit the
run took, so :func:`replay` can re-apply each input at the same boundary and compare.

File format (JSON)::

    {"format": "pyvmx-record", "version": 1,
     "config": {"kind": "scenario", "scenario": {... the scenario's TOML table, source inlined ...}},
     "inputs": [{"kind": "interrupt", "vector": 49, "tsc": 12345, "after_exit": 2},
                {"kind": "async-pf-ready", "token": 7, "tsc": 20000, "after_exit": 5}],
     "exits":  [{"reason": 1, "qualification": 0, "rip": 65537, "tsc": 12346,
                 "instruction_length": 0, "intr_info": 2147483697, "intr_error_code": 0}, ...],
     "ended_by": "stop: all expectations met"}

``after_exit`` = k: the input was raised after the k-th exit was handled and before the next VM
entry (0: before the first entry).  ``tsc`` is the guest TSC at which the interrupt becomes
pending (SDM 26.2: an external interrupt exits or is delivered at the first instruction boundary
where it is pending and unblocked).  The config ``kind`` says what to rebuild: "scenario" (a
:mod:`pyvmx.tools.scenario` run on the VT-x sandbox) is implemented here; the hypervisor adds
its own kind.  ``async-pf-ready`` inputs belong to the hypervisor and are refused by the sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyvmx.tools.runloop import ExitHandler, ExitRecord, Outcome
from pyvmx.vmx.exitinfo import reason_name

RECORD_FORMAT = "pyvmx-record"
RECORD_VERSION = 1
INPUT_KINDS = ("interrupt", "async-pf-ready")


class RecordError(ValueError):
    """A record file that cannot be read or replayed; the message says why."""


@dataclass(frozen=True, slots=True)
class RecordedInput:
    kind: str
    tsc: int
    after_exit: int
    vector: int | None = None  # interrupt
    token: int | None = None  # async-pf-ready

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, slots=True)
class RecordedExit:
    reason: int
    qualification: int
    rip: int
    tsc: int
    instruction_length: int = 0
    intr_info: int = 0
    intr_error_code: int = 0

    @classmethod
    def of(cls, rec: ExitRecord) -> RecordedExit:
        e = rec.exit
        return cls(e.reason, e.qualification, rec.rip, rec.tsc_exit, e.instruction_length, e.intr_info, e.intr_error_code)

    def describe(self) -> str:
        return f"{reason_name(self.reason)} at rip {self.rip:#x} tsc {self.tsc} qualification {self.qualification:#x}"


@dataclass
class Record:
    config: dict[str, Any]
    inputs: list[RecordedInput] = field(default_factory=list)
    exits: list[RecordedExit] = field(default_factory=list)
    ended_by: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "config": self.config,
            "inputs": [i.to_json() for i in self.inputs],
            "exits": [asdict(e) for e in self.exits],
            "ended_by": self.ended_by,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


class Recorder:
    """Records a run: wrap the exit handler with :meth:`wrap` and raise asynchronous inputs
    through :meth:`raise_interrupt` (it forwards them to the processor)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.record = Record(config)

    def wrap(self, inner: ExitHandler) -> ExitHandler:
        def recording(rec: ExitRecord) -> Outcome:
            self.record.exits.append(RecordedExit.of(rec))
            outcome = inner(rec)
            if outcome.stops:
                self.record.ended_by = str(outcome)
            return outcome

        return recording

    def raise_interrupt(self, target: Any, vector: int, at_tsc: int | None = None) -> None:
        """``target.cpu.raise_interrupt(vector, at_tsc)``, recorded.  An interrupt raised for a
        time already past becomes pending now, so the record keeps the later of the two."""
        now = target.cpu.read_tsc()
        tsc = now if at_tsc is None else max(at_tsc, now)
        self.record.inputs.append(RecordedInput("interrupt", tsc, len(self.record.exits), vector=vector))
        target.cpu.raise_interrupt(vector, at_tsc=tsc)

    def save(self, path: str | Path) -> None:
        self.record.save(path)


def load_record(path: str | Path) -> Record:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise RecordError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return record_from_json(data, str(path))


def record_from_json(data: Any, source: str = "record") -> Record:
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise RecordError(f"{source}: not a pyvmx record (expected \"format\": \"{RECORD_FORMAT}\")")
    if data.get("version") != RECORD_VERSION:
        raise RecordError(f"{source}: unsupported record version {data.get('version')!r}")
    config = data.get("config")
    if not isinstance(config, dict):
        raise RecordError(f"{source}: missing \"config\"")
    try:
        inputs = [RecordedInput(**i) for i in data.get("inputs", [])]
        exits = [RecordedExit(**e) for e in data.get("exits", [])]
    except TypeError as exc:
        raise RecordError(f"{source}: malformed input or exit entry ({exc})") from None
    for i in inputs:
        if i.kind not in INPUT_KINDS:
            raise RecordError(f"{source}: unknown input kind {i.kind!r} (known: {', '.join(INPUT_KINDS)})")
    return Record(config, inputs, exits, str(data.get("ended_by", "")))


def first_difference(recorded: list[RecordedExit], replayed: list[RecordedExit]) -> str | None:
    """None if the two exit sequences are equal, else where they first differ."""
    for i, (a, b) in enumerate(zip(recorded, replayed)):
        if a != b:
            return f"exit #{i + 1} differs: recorded {a.describe()}, replayed {b.describe()}"
    if len(recorded) != len(replayed):
        n = min(len(recorded), len(replayed))
        longer = recorded if len(recorded) > n else replayed
        which = "recorded" if longer is recorded else "replayed"
        return f"the {which} run has more exits: #{n + 1} is {longer[n].describe()} ({len(recorded)} recorded, {len(replayed)} replayed)"
    return None


def input_applier(inputs: list[RecordedInput]) -> Callable[[Any, int], None]:
    """A ``before_entry(target, exit_index)`` hook that raises each input at its boundary."""
    by_boundary: dict[int, list[RecordedInput]] = {}
    for i in inputs:
        by_boundary.setdefault(i.after_exit, []).append(i)

    def apply(target: Any, index: int) -> None:
        for i in by_boundary.get(index, []):
            if i.kind == "interrupt":
                assert i.vector is not None
                target.cpu.raise_interrupt(i.vector, at_tsc=i.tsc)
            else:
                raise RecordError(f"input {i.kind!r} needs the hypervisor: the VT-x sandbox cannot replay it")

    return apply


@dataclass
class ReplayResult:
    record: Record
    exits: list[RecordedExit]
    difference: str | None

    @property
    def identical(self) -> bool:
        return self.difference is None


def replay(record: Record) -> ReplayResult:
    """Re-run ``record``'s configuration with its inputs and compare the exit sequences."""
    kind = record.config.get("kind")
    if kind == "run":
        from pyvmx.tools.run import replay_run

        return replay_run(record)
    if kind != "scenario":
        raise RecordError(f"cannot replay a record of kind {kind!r} here (this pyvmx replays 'scenario' records)")
    from pyvmx.tools.scenario import ScenarioError, run_scenario, scenario_from_dict

    try:
        sc = scenario_from_dict(dict(record.config.get("scenario", {})))
    except ScenarioError as exc:
        raise RecordError(f"the record's scenario is not valid: {exc}") from None
    recorder = Recorder(record.config)
    run_scenario(sc, wrap=recorder.wrap, before_entry=input_applier(record.inputs))
    replayed = recorder.record.exits
    return ReplayResult(record, replayed, first_difference(record.exits, replayed))
