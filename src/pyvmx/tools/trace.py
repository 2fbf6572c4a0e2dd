"""VM-exit tracing: a record per VM entry and VM exit, written as JSON lines (one event per
line, for ``pyvmx trace show`` and ``jq``) and as a Chrome trace-event file that opens as a
timeline in ui.perfetto.dev or chrome://tracing.

The tracer is an exit-handler wrapper (:mod:`pyvmx.tools.runloop`)::

    tracer = Tracer(vm_id=0)
    run_sandbox(sb, tracer.wrap(SeedHypervisor()))
    tracer.write_jsonl("run.jsonl"); tracer.write_chrome("run.json")

or is fed directly by a run loop that does not use wrappers: :meth:`Tracer.record_entry`,
:meth:`Tracer.record_exit`, :meth:`Tracer.record_outcome`.

Time.  Events carry the guest TSC, which in this model advances only while the guest runs (one
tick per retired instruction, plus halted time).  The timeline of the Chrome file therefore
uses the guest TSC (1 tick = ``ns_per_tsc`` ns) *plus* the host time each vCPU spent in exit
handlers so far: on each vCPU's track a "guest" slice (entry to exit) is followed by a
"handle <REASON>" slice (the handler's host time) and the next guest slice; an instant event
marks each exit.  The Chrome format itself is the Trace Event Format
(https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU): ``ph`` "X"
complete events with ``ts``/``dur`` in microseconds, ``ph`` "i" instant events, ``ph`` "M"
metadata naming processes (VMs) and threads (vCPUs).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pyvmx.vmx.exitinfo import decode_intr_info, decode_qualification, reason_name
from pyvmx.tools.inputs import InputError, int_in, parse_json, read_text
from pyvmx.tools.runloop import ExitHandler, ExitRecord, Outcome
from pyvmx.vmx.outcomes import VmExitInfo

TRACE_FORMAT = "pyvmx-trace"
TRACE_VERSION = 1


def disassemble(code: bytes, address: int, bitness: int) -> tuple[str, bytes]:
    """The instruction at the start of ``code`` in Intel syntax ("out dx, al") and its bytes,
    or ("", b"") if the bytes are not a valid instruction."""
    if not code or bitness not in (16, 32, 64):
        return "", b""
    from pyvmx.vmx.decode import DecodeError, decode

    try:
        insn = decode(code, address, bitness)
    except DecodeError:
        return "", b""
    return insn.text, bytes(code[: insn.length])


@dataclass(slots=True)
class TraceEvent:
    """One VM entry or VM exit on one vCPU."""

    kind: Literal["entry", "exit"]
    tsc: int  # guest TSC at the event
    vcpu: int
    rip: int
    vm: int = 0
    seq: int = 0  # order of the event in the trace
    reason: str | None = None  # exits: "IO_INSTRUCTION"
    reason_number: int | None = None  # exits: the full exit-reason field (bit 31: failed entry)
    qualification: int | None = None
    qualification_fields: dict[str, int | bool | str] | None = None
    intr_info: int | None = None
    intr_fields: dict[str, int | bool | str] | None = None
    insn: str | None = None  # the instruction at RIP, disassembled
    insn_bytes: str | None = None  # its bytes in hex
    guest_tsc: int | None = None  # exits: TSC ticks since the entry (how long the guest ran)
    outcome: str | None = None  # exits: what the handler did
    handler_ns: int | None = None  # exits: host time in the handler
    details: dict[str, int | str] | None = None  # exits: addresses, MSR, values (tools/exit_details.py)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TraceEvent:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if known.get("kind") not in ("entry", "exit") or not isinstance(known.get("tsc"), int):
            raise ValueError("not a trace event (needs \"kind\": entry|exit and an integer \"tsc\")")
        known.setdefault("vcpu", 0)
        known.setdefault("rip", 0)
        return cls(**known)


class Tracer:
    """Collects trace events of one VM (any number of vCPUs)."""

    def __init__(self, vm_id: int = 0, *, clock: Callable[[], int] = time.perf_counter_ns, ns_per_tsc: float = 1.0, vm_name: str | None = None) -> None:
        self.vm_id = vm_id
        self.vm_names: dict[int, str] = {vm_id: vm_name or f"VM {vm_id}"}
        self.clock = clock
        self.ns_per_tsc = ns_per_tsc
        self.events: list[TraceEvent] = []
        self._lock = threading.Lock()  # vCPUs may run in threads

    def set_vm(self, vm_id: int, name: str | None = None) -> None:
        """Record the following events for another VM (another process in the timeline)."""
        self.vm_id = vm_id
        self.vm_names[vm_id] = name or f"VM {vm_id}"

    def _add(self, event: TraceEvent) -> TraceEvent:
        with self._lock:
            event.seq = len(self.events)
            self.events.append(event)
        return event

    # --- feeding ---------------------------------------------------------------------------
    def record_entry(self, vcpu: int, tsc: int, rip: int) -> TraceEvent:
        return self._add(TraceEvent("entry", tsc, vcpu, rip, vm=self.vm_id))

    def record_exit(
        self, vcpu: int, tsc: int, exit: VmExitInfo, rip: int, *, code: bytes = b"", bitness: int = 64, tsc_entry: int | None = None
    ) -> TraceEvent:
        fields = decode_qualification(exit.reason, exit.qualification, exit.intr_info)
        intr = decode_intr_info(exit.intr_info)
        text, insn_bytes = disassemble(code, rip, bitness)
        return self._add(
            TraceEvent(
                "exit", tsc, vcpu, rip, vm=self.vm_id,
                reason=reason_name(exit.reason), reason_number=exit.reason,
                qualification=exit.qualification, qualification_fields=fields or None,
                intr_info=exit.intr_info if intr.get("valid") else None, intr_fields=intr if intr.get("valid") else None,
                insn=text or None, insn_bytes=insn_bytes.hex() or None,
                guest_tsc=None if tsc_entry is None else tsc - tsc_entry,
            )
        )

    def record_outcome(self, event: TraceEvent, outcome: Outcome | str, handler_ns: int = 0) -> None:
        event.outcome = str(outcome)
        event.handler_ns = handler_ns

    def record(self, rec: ExitRecord) -> TraceEvent:
        """The entry and the exit of one :class:`ExitRecord`; returns the exit event."""
        self.record_entry(rec.vcpu_id, rec.tsc_entry, rec.entry_rip)
        return self.record_exit(rec.vcpu_id, rec.tsc_exit, rec.exit, rec.rip, code=rec.code, bitness=rec.bitness, tsc_entry=rec.tsc_entry)

    def wrap(self, inner: ExitHandler) -> ExitHandler:
        """A handler that traces each exit, then calls ``inner`` and records its outcome and time."""

        def traced(rec: ExitRecord) -> Outcome:
            event = self.record(rec)
            start = self.clock()
            outcome = inner(rec)
            self.record_outcome(event, outcome, max(0, self.clock() - start))
            return outcome

        return traced

    # --- output ----------------------------------------------------------------------------
    def write_jsonl(self, path: str | Path) -> None:
        write_jsonl(self.events, path)

    def chrome_trace(self) -> dict[str, Any]:
        return chrome_trace(self.events, ns_per_tsc=self.ns_per_tsc, vm_names=self.vm_names)

    def write_chrome(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.chrome_trace(), indent=None, separators=(",", ":")) + "\n")

    def write(self, path: str | Path) -> list[Path]:
        """Both files, always (:func:`trace_files`): the JSON lines ``pyvmx trace`` reads and the
        Perfetto timeline.  Returns [JSON lines, Perfetto]."""
        jsonl, chrome = trace_files(path)
        self.write_jsonl(jsonl)
        self.write_chrome(chrome)
        return [jsonl, chrome]


def trace_files(path: str | Path) -> tuple[Path, Path]:
    """Where ``--trace PATH`` writes (JSON lines, Perfetto timeline): ``X.jsonl`` -> X.jsonl and
    X.json; ``X.json`` -> X.jsonl and X.json (a Perfetto file never replaces the JSON lines);
    any other name ``X`` -> X and X's stem + .json."""
    p = Path(path)
    if p.suffix == ".json":
        return p.with_suffix(".jsonl"), p
    return p, p.with_suffix(".json")


def describe_trace_files(files: list[Path]) -> str:
    """The one line a user reads about where a trace went."""
    jsonl, chrome = files
    return f"trace: {jsonl} (JSON lines: pyvmx trace show/stats) and {chrome} (Perfetto: ui.perfetto.dev)"


# --- JSON lines -------------------------------------------------------------------------------
def write_jsonl(events: Iterable[TraceEvent], path: str | Path) -> None:
    with open(path, "w") as f:
        f.write(json.dumps({"format": TRACE_FORMAT, "version": TRACE_VERSION}) + "\n")
        for event in events:
            f.write(json.dumps(event.to_json(), separators=(",", ":")) + "\n")


class TraceFileError(InputError):
    """A trace file that cannot be read; the message names the file and line."""


_EVENT_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "tsc": (int,), "vcpu": (int,), "rip": (int,), "vm": (int,), "seq": (int,), "reason": (str,),
    "reason_number": (int,), "qualification": (int,), "qualification_fields": (dict,), "intr_info": (int,),
    "intr_fields": (dict,), "insn": (str,), "insn_bytes": (str,), "guest_tsc": (int,), "outcome": (str,), "handler_ns": (int,),
    "details": (dict,),
}
_FIELD_VALUE_TYPES = (int, str)  # bool is an int
_REASON_NAME = re.compile(r"[A-Z][A-Z0-9_]*( \(VM-entry failure\))?")  # as reason_name() writes them


def _event_from_json(data: dict[str, Any]) -> TraceEvent:
    """A :class:`TraceEvent` from one JSON line, every known key type-checked (an integer is a
    JSON integer in 0..2^64-1, never a boolean); unknown keys are ignored (newer pyvmx), null
    is the same as absent."""
    data = {k: v for k, v in data.items() if v is not None}
    for key, types in _EVENT_TYPES.items():
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, types) or (types == (int,) and not int_in(value, 0, (1 << 64) - 1)):
            raise TraceFileError(f"\"{key}\" has a bad value {value!r:.40}")
        if isinstance(value, dict) and not all(isinstance(v, _FIELD_VALUE_TYPES) for v in value.values()):
            raise TraceFileError(f"\"{key}\" must map names to numbers, booleans or strings")
    if "reason" in data and not _REASON_NAME.fullmatch(data["reason"]):
        raise TraceFileError(f"\"reason\" {data['reason']!r:.40} is not an exit-reason name")
    return TraceEvent.from_json(data)


def read_jsonl(path: str | Path) -> list[TraceEvent]:
    """The events of a JSON-lines trace written by :func:`write_jsonl`."""
    try:
        lines = read_text(path, what="pyvmx trace (JSON lines)").splitlines()
    except InputError as exc:
        raise TraceFileError(str(exc)) from None
    events = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = parse_json(line, f"{path}:{number}", what="trace event")
        except InputError as exc:
            raise TraceFileError(str(exc)) from None
        if not isinstance(data, dict):
            raise TraceFileError(f"{path}:{number}: expected a JSON object")
        if "format" in data:
            if data["format"] != TRACE_FORMAT:
                raise TraceFileError(f"{path}:{number}: not a pyvmx trace (format {data['format']!r:.40})")
            continue
        try:
            events.append(_event_from_json(data))
        except (TypeError, ValueError) as exc:
            raise TraceFileError(f"{path}:{number}: {exc}") from None
    return events


def filter_events(events: Iterable[TraceEvent], *, reason: str | None = None, vcpu: int | None = None, kind: str | None = "exit", limit: int | None = None) -> list[TraceEvent]:
    """Exits (by default) of one reason and/or one vCPU; ``reason`` is matched as
    :func:`~pyvmx.vmx.exitinfo.parse_exit_reason` reads it (name or number)."""
    wanted: int | None = None
    if reason is not None:
        from pyvmx.vmx.exitinfo import parse_exit_reason

        wanted = int(parse_exit_reason(reason))
    out = []
    for e in events:
        if kind is not None and e.kind != kind:
            continue
        if vcpu is not None and e.vcpu != vcpu:
            continue
        if wanted is not None and (e.reason_number is None or e.reason_number & 0xFFFF != wanted):
            continue
        out.append(e)
        if limit is not None and len(out) >= limit:
            break
    return out


def format_table(events: Iterable[TraceEvent]) -> str:
    """Events as an aligned text table: TSC, VM, vCPU, kind, reason, RIP, instruction,
    qualification, outcome."""
    from pyvmx.vmx.exitinfo import format_fields

    from pyvmx.tools.exit_details import format_details

    header = ("TSC", "VM", "VCPU", "EVENT", "REASON", "RIP", "INSTRUCTION", "QUALIFICATION", "DETAILS", "OUTCOME")
    rows: list[tuple[str, ...]] = []
    for e in events:
        if e.kind == "exit":
            qual = format_fields(e.qualification_fields) if e.qualification_fields else f"{e.qualification or 0:#x}"
            rows.append((str(e.tsc), str(e.vm), str(e.vcpu), "exit", f"{e.reason} ({(e.reason_number or 0) & 0xFFFF})",
                         f"{e.rip:#x}", e.insn or "", qual, format_details(e.details) if e.details else "", e.outcome or ""))
        else:
            rows.append((str(e.tsc), str(e.vm), str(e.vcpu), "entry", "", f"{e.rip:#x}", "", "", "", ""))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    right = {0, 1, 2}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header)] + [line(r) for r in rows]) + "\n"


# --- Chrome trace-event format -----------------------------------------------------------------
def _us(ns: int) -> float:
    return ns / 1000.0


def chrome_trace(events: Iterable[TraceEvent], *, ns_per_tsc: float = 1.0, vm_names: dict[int, str] | None = None) -> dict[str, Any]:
    """The Trace Event Format object for ``events`` (see the module docstring for the layout)."""
    out: list[dict[str, Any]] = []
    names = dict(vm_names or {})
    handler_ns: dict[tuple[int, int], int] = {}  # host time spent in handlers, per (vm, vcpu)
    open_entry: dict[tuple[int, int], tuple[int, TraceEvent]] = {}
    seen_threads: set[tuple[int, int]] = set()
    seen_vms: set[int] = set()
    meta: list[dict[str, Any]] = []
    for e in sorted(events, key=lambda ev: ev.seq):
        key = (e.vm, e.vcpu)
        if e.vm not in seen_vms:
            seen_vms.add(e.vm)
            meta.append({"name": "process_name", "ph": "M", "pid": e.vm, "tid": 0, "args": {"name": names.get(e.vm, f"VM {e.vm}")}})
        if key not in seen_threads:
            seen_threads.add(key)
            meta.append({"name": "thread_name", "ph": "M", "pid": e.vm, "tid": e.vcpu, "args": {"name": f"vCPU {e.vcpu}"}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": e.vm, "tid": e.vcpu, "args": {"sort_index": e.vcpu}})
        now = round(e.tsc * ns_per_tsc) + handler_ns.get(key, 0)
        if e.kind == "entry":
            open_entry[key] = (now, e)
            continue
        args: dict[str, Any] = {
            "reason": e.reason, "reason_number": e.reason_number, "qualification": f"{e.qualification or 0:#x}",
            "rip": f"{e.rip:#x}", "tsc": e.tsc,
        }
        if e.qualification_fields:
            args["qualification_fields"] = e.qualification_fields
        if e.intr_fields:
            args["intr_info"] = e.intr_fields
        if e.insn:
            args["insn"] = e.insn
        start = open_entry.pop(key, None)
        if start is not None:
            begin, entry = start
            out.append({
                "name": "guest", "cat": "guest", "ph": "X", "ts": _us(begin), "dur": _us(max(0, now - begin)),
                "pid": e.vm, "tid": e.vcpu,
                "args": {"entry_rip": f"{entry.rip:#x}", "exit_reason": e.reason, "tsc_entry": entry.tsc, "tsc_exit": e.tsc},
            })
        out.append({"name": e.reason or "exit", "cat": "exit", "ph": "i", "s": "t", "ts": _us(now), "pid": e.vm, "tid": e.vcpu, "args": args})
        spent = e.handler_ns or 0
        out.append({
            "name": f"handle {e.reason}", "cat": "handler", "ph": "X", "ts": _us(now), "dur": _us(spent),
            "pid": e.vm, "tid": e.vcpu, "args": {"outcome": e.outcome or "", "reason": e.reason, "rip": f"{e.rip:#x}"},
        })
        handler_ns[key] = handler_ns.get(key, 0) + spent
    return {
        "traceEvents": meta + out,
        "displayTimeUnit": "ns",
        "otherData": {"generator": "pyvmx", "clock": f"guest TSC ({ns_per_tsc} ns per tick) + host time in exit handlers"},
    }


def iter_exits(events: Iterable[TraceEvent]) -> Iterator[TraceEvent]:
    return (e for e in events if e.kind == "exit")


__all__ = [
    "TraceEvent",
    "TraceFileError",
    "Tracer",
    "chrome_trace",
    "disassemble",
    "filter_events",
    "format_table",
    "iter_exits",
    "read_jsonl",
    "write_jsonl",
]
