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

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pyvmx.tools.inputs import InputError, check_int, check_str, int_in, is_int, read_json

from pyvmx.tools.runloop import ExitHandler, ExitRecord, Outcome
from pyvmx.vmx.exitinfo import reason_name

RECORD_FORMAT = "pyvmx-record"
RECORD_VERSION = 1
INPUT_KINDS = ("interrupt", "async-pf-ready")


class RecordError(InputError):
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
    """Read and check a record file; every problem is a :class:`RecordError` naming it."""
    try:
        data = read_json(path, what="pyvmx record")
    except InputError as exc:
        raise RecordError(str(exc)) from None
    return record_from_json(data, str(path))


U32, U64 = 0xFFFFFFFF, (1 << 64) - 1
_EXIT_RANGES = {"reason": U32, "qualification": U64, "rip": U64, "tsc": U64, "instruction_length": 15, "intr_info": U32, "intr_error_code": U32}
_INPUT_FIELDS = {"interrupt": ("vector", 255), "async-pf-ready": ("token", U64)}


def _exit_from_json(item: object, where: str) -> RecordedExit:
    if not isinstance(item, dict) or set(item) - set(_EXIT_RANGES) or not {"reason", "qualification", "rip", "tsc"} <= set(item):
        raise RecordError(f"{where}: malformed exit (an object with reason, qualification, rip, tsc and optionally {', '.join(list(_EXIT_RANGES)[4:])})")
    for key, value in item.items():
        check_int(value, 0, _EXIT_RANGES[key], key, where)
    return RecordedExit(**item)


def _input_from_json(item: object, where: str) -> RecordedInput:
    if not isinstance(item, dict) or item.get("kind") not in INPUT_KINDS:
        kind = item.get("kind") if isinstance(item, dict) else item
        raise RecordError(f"{where}: unknown input kind {kind!r} (known: {', '.join(INPUT_KINDS)})")
    field_name, high = _INPUT_FIELDS[item["kind"]]
    if set(item) != {"kind", "tsc", "after_exit", field_name}:
        raise RecordError(f"{where}: malformed input (an {item['kind']!r} input has kind, tsc, after_exit and {field_name})")
    check_int(item["tsc"], 0, U64, "tsc", where)
    check_int(item["after_exit"], 0, U64, "after_exit", where)
    check_int(item[field_name], 0, high, field_name, where)
    return RecordedInput(**item)


def _list(data: dict[str, Any], key: str, source: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise RecordError(f"{source}: \"{key}\" must be a list")
    return value


def record_from_json(data: Any, source: str = "record") -> Record:
    """A record from its JSON value, every field checked (types, ranges) before any is used."""
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise RecordError(f"{source}: not a pyvmx record (expected \"format\": \"{RECORD_FORMAT}\")")
    if data.get("version") != RECORD_VERSION or not is_int(data.get("version")):
        raise RecordError(f"{source}: unsupported record version {data.get('version')!r}")
    config = data.get("config")
    if not isinstance(config, dict):
        raise RecordError(f"{source}: missing \"config\"")
    inputs = [_input_from_json(item, f"{source}: input #{n}") for n, item in enumerate(_list(data, "inputs", source), 1)]
    exits = [_exit_from_json(item, f"{source}: exit #{n}") for n, item in enumerate(_list(data, "exits", source), 1)]
    ended_by = data.get("ended_by", "")
    if not isinstance(ended_by, str):
        raise RecordError(f"{source}: \"ended_by\" must be a string")
    if config.get("kind") == "run":
        run_config_from_json(config, source)
    elif config.get("kind") == "scenario" and not isinstance(config.get("scenario"), dict):
        raise RecordError(f"{source}: the scenario record has no \"scenario\" table")
    return Record(config, inputs, exits, ended_by)


@dataclass(frozen=True)
class RunConfig:
    """The configuration of a ``pyvmx run --record`` record, checked.  ``image_name`` is only
    shown and gives the image's kind by its suffix: it is never used as a path."""

    image_name: str
    image: bytes
    memory_mib: int
    vcpus: int
    pcpus: int
    mode: str
    load_address: int | None
    entry: str | None
    intercepts: tuple[str, ...]
    max_tsc: int
    swap_out: tuple[int, ...]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.image_name).suffix


def run_config_from_json(config: dict[str, Any], source: str = "record") -> RunConfig:
    where = f"{source}: run configuration"
    missing = [k for k in ("image_name", "image", "memory_mib", "vcpus", "pcpus", "mode", "max_tsc") if k not in config]
    if missing:
        raise RecordError(f"{where}: missing \"{missing[0]}\"")
    memory_mib = check_int(config["memory_mib"], 1, 1024, "memory_mib", where)
    try:
        image = base64.b64decode(check_str(config["image"], "image", where, limit=(memory_mib << 20) * 4 // 3 + 4), validate=True)
    except binascii.Error as exc:
        raise RecordError(f"{where}: image is not base64 ({exc})") from None
    if not image:
        raise RecordError(f"{where}: the image is empty")
    mode = check_str(config["mode"], "mode", where)
    if mode not in ("real", "protected", "long"):
        raise RecordError(f"{where}: mode must be real, protected or long, not {mode!r}")
    load_address = config.get("load_address")
    entry = config.get("entry")
    intercepts, swap_out = config.get("intercepts", []), config.get("swap_out", [])
    if not isinstance(intercepts, list) or not isinstance(swap_out, list):
        raise RecordError(f"{where}: intercepts and swap_out must be lists")
    exit_vcpus, events = config.get("exit_vcpus", []), config.get("events", {})
    if not isinstance(exit_vcpus, list) or not all(int_in(v, 0, 7) for v in exit_vcpus):
        raise RecordError(f"{where}: \"exit_vcpus\" must be a list of vCPU numbers")
    if not isinstance(events, dict) or not all(is_int(v) for v in events.values()):
        raise RecordError(f"{where}: \"events\" must be an object of counts")
    return RunConfig(
        image_name=check_str(config["image_name"], "image_name", where, limit=255), image=image, memory_mib=memory_mib,
        vcpus=check_int(config["vcpus"], 1, 8, "vcpus", where), pcpus=check_int(config["pcpus"], 1, 8, "pcpus", where), mode=mode,
        load_address=None if load_address is None else check_int(load_address, 0, U64, "load_address", where),
        entry=None if entry is None else check_str(entry, "entry", where, limit=256),
        intercepts=tuple(check_str(i, "an intercept", where, limit=256) for i in intercepts),
        max_tsc=check_int(config["max_tsc"], 1, U64, "max_tsc", where),
        swap_out=tuple(check_int(g, 0, U64, "a swap_out address", where) for g in swap_out),
    )


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

    scenario = record.config.get("scenario")
    if not isinstance(scenario, dict):
        raise RecordError("the record has no \"scenario\" table")
    try:
        sc = scenario_from_dict(dict(scenario))
    except ScenarioError as exc:
        raise RecordError(f"the record's scenario is not valid: {exc}") from None
    recorder = Recorder(record.config)
    result = run_scenario(sc, wrap=recorder.wrap, before_entry=input_applier(record.inputs))
    if result.run is None:  # the guest could not be set up (it does not assemble, or reads host files)
        raise RecordError(f"the record's scenario: {result.failures[0]}")
    replayed = recorder.record.exits
    return ReplayResult(record, replayed, first_difference(record.exits, replayed))
