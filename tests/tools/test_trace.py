"""Tracing: events from guests really run on the VT-x sandbox, written as JSON lines and as a
Chrome trace-event file validated against the Trace Event Format
(https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU -- the format
ui.perfetto.dev and chrome://tracing load), and ``pyvmx trace show``."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.tools.runloop import SeedHypervisor, run_sandbox
from pyvmx.tools.trace import Tracer, chrome_trace, filter_events, format_table, read_jsonl
from tests.tools.cli_helpers import run_cli

GUEST = r"""
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
next:
    lodsb
    test %al, %al
    jz done
out:
    out %al, %dx
    jmp next
done:
    mov $0xc0000080, %ecx
    rdmsr
wr:
    wrmsr
    xor %eax, %eax
id:
    cpuid
stop:
    hlt
msg:
    .asciz "Hi"
"""


def _sandbox():  # type: ignore[no-untyped-def]
    from pyvmx.guest.sandbox import VmxSandbox

    sb = VmxSandbox("long", GUEST)
    sb.use_io_bitmaps(intercept=[0x3F8])
    sb.use_msr_bitmap(write=[Msr.IA32_EFER])
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    return sb


def _ticking_clock(step: int = 1500):  # type: ignore[no-untyped-def]
    """A host clock that advances ``step`` ns per reading: deterministic handler times."""
    counter = itertools.count(0, step)
    return lambda: next(counter)


@pytest.fixture(scope="module")
def traced():  # type: ignore[no-untyped-def]
    """Two vCPUs' worth of exits (two sandboxes, vCPU 0 and 1 of VM 0)."""
    tracer = Tracer(vm_id=0, clock=_ticking_clock())
    sandboxes = []
    for vcpu in (0, 1):
        sb = _sandbox()
        handler = SeedHypervisor()
        result = run_sandbox(sb, tracer.wrap(handler), vcpu_id=vcpu)
        assert result.outcome is not None and result.outcome.note == "guest halted"
        assert handler.output == "Hi"
        sandboxes.append(sb)
    return tracer, sandboxes


def test_events_of_a_real_run(traced) -> None:  # type: ignore[no-untyped-def]
    """Each exit is preceded by its entry; the exit carries the reason by name and number
    (SDM Appendix C), the qualification decoded (SDM Table 28-5 for I/O), RIP, the instruction
    disassembled, guest TSC and the handler's outcome."""
    tracer, (sb, _) = traced
    events = [e for e in tracer.events if e.vcpu == 0]
    kinds = [e.kind for e in events]
    assert kinds == ["entry", "exit"] * (len(events) // 2)
    exits = [e for e in events if e.kind == "exit"]
    assert [e.reason for e in exits] == ["IO_INSTRUCTION", "IO_INSTRUCTION", "MSR_WRITE", "CPUID", "HLT"]
    first = exits[0]
    assert first.reason_number == 30 and first.rip == sb.symbol("out")
    assert first.qualification == 0x3F8 << 16
    assert first.qualification_fields == {"port": 0x3F8, "size": 1, "direction": "out", "string": False, "rep": False, "operand": "dx"}
    assert first.insn == "out dx, al" and first.insn_bytes == "ee"
    assert first.outcome == "resume: serial <- 'H'"
    assert exits[2].insn == "wrmsr" and exits[2].rip == sb.symbol("wr")
    assert exits[3].insn == "cpuid" and exits[4].outcome == "stop: guest halted"
    for entry, exit in zip(events[::2], events[1::2]):
        assert exit.guest_tsc == exit.tsc - entry.tsc >= 0
    assert [e.tsc for e in events] == sorted(e.tsc for e in events)
    assert all(e.handler_ns == 1500 for e in exits)


def test_jsonl_round_trip(traced, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tracer, _ = traced
    path = tmp_path / "run.jsonl"
    tracer.write_jsonl(path)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": "pyvmx-trace", "version": 1}
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert read_jsonl(path) == tracer.events


# --- Trace Event Format validation ---------------------------------------------------------------
_PHASES = {"B", "E", "X", "i", "I", "M", "C", "b", "e", "n", "s", "t", "f", "P", "O", "N", "D"}
_METADATA = {"process_name": "name", "thread_name": "name", "process_sort_index": "sort_index", "thread_sort_index": "sort_index", "process_labels": "labels"}


def validate_trace_event_format(doc: Any) -> None:
    """Structural validation of a JSON Object Format trace: required keys and types per phase,
    timestamps monotonic per thread, complete events ('X') properly nested per thread, B/E
    balanced, every (pid, tid) named by metadata events."""
    assert isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list)
    assert doc.get("displayTimeUnit", "ms") in ("ms", "ns")
    named_pids: set[int] = set()
    named_threads: set[tuple[int, int]] = set()
    used: set[tuple[int, int]] = set()
    last_ts: dict[tuple[int, int], float] = {}
    open_b: dict[tuple[int, int], list[str]] = defaultdict(list)
    slices: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    for ev in doc["traceEvents"]:
        assert isinstance(ev, dict), ev
        ph = ev.get("ph")
        assert ph in _PHASES, ev
        assert isinstance(ev.get("name"), str) and ev["name"], ev
        assert isinstance(ev.get("pid"), int) and isinstance(ev.get("tid"), int), ev
        if "args" in ev:
            assert isinstance(ev["args"], dict), ev
        if "cat" in ev:
            assert isinstance(ev["cat"], str), ev
        key = (ev["pid"], ev["tid"])
        if ph == "M":
            assert ev["name"] in _METADATA, ev
            assert _METADATA[ev["name"]] in ev["args"], ev
            if ev["name"] == "process_name":
                named_pids.add(ev["pid"])
            if ev["name"] == "thread_name":
                named_threads.add(key)
            continue
        ts = ev.get("ts")
        assert isinstance(ts, (int, float)) and not isinstance(ts, bool) and ts >= 0, ev
        assert ts >= last_ts.get(key, 0), f"ts goes back on {key}: {ev}"
        last_ts[key] = ts
        used.add(key)
        if ph == "X":
            dur = ev.get("dur")
            assert isinstance(dur, (int, float)) and dur >= 0, ev
            slices[key].append((ts, ts + dur))
        elif ph in ("i", "I"):
            assert ev.get("s", "t") in ("g", "p", "t"), ev
        elif ph == "B":
            open_b[key].append(ev["name"])
        elif ph == "E":
            assert open_b[key], f"E without B: {ev}"
            open_b[key].pop()
    assert not any(open_b.values()), "unbalanced B/E"
    eps = 1e-6
    for key, spans in slices.items():
        stack: list[tuple[float, float]] = []
        for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1][1] <= start + eps:
                stack.pop()
            if stack:
                assert end <= stack[-1][1] + eps, f"overlapping complete events on {key}: {stack[-1]} and {(start, end)}"
            stack.append((start, end))
    for pid, tid in used:
        assert pid in named_pids and (pid, tid) in named_threads, f"no process/thread name for {(pid, tid)}"


def test_validator_rejects_bad_traces() -> None:
    good_meta = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "VM 0"}},
                 {"name": "thread_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "vCPU 0"}}]
    validate_trace_event_format({"traceEvents": good_meta + [{"name": "a", "ph": "X", "ts": 0, "dur": 5, "pid": 0, "tid": 0}]})
    bad = [
        [{"name": "a", "ph": "X", "ts": 0, "pid": 0, "tid": 0}],  # no dur
        [{"name": "a", "ph": "X", "ts": 0, "dur": 5, "pid": 0, "tid": 0}, {"name": "b", "ph": "X", "ts": 3, "dur": 5, "pid": 0, "tid": 0}],
        [{"name": "a", "ph": "E", "ts": 0, "pid": 0, "tid": 0}],
        [{"name": "a", "ph": "i", "ts": 5, "pid": 0, "tid": 0}, {"name": "b", "ph": "i", "ts": 1, "pid": 0, "tid": 0}],
        [{"name": "a", "ph": "i", "ts": 5, "pid": 0, "tid": 7}],  # unnamed thread
        [{"name": "a", "ph": "Q", "ts": 5, "pid": 0, "tid": 0}],
    ]
    for events in bad:
        with pytest.raises(AssertionError):
            validate_trace_event_format({"traceEvents": good_meta + events})


def test_chrome_trace_is_valid(traced, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The file written for Perfetto / chrome://tracing: loads as JSON and passes the validator;
    pid = VM, tid = vCPU; one guest slice per entry-exit pair, an instant per exit, a handler
    slice per exit; the args carry reason, qualification and RIP."""
    tracer, (sb, _) = traced
    path = tmp_path / "run.json"
    tracer.write_chrome(path)
    doc = json.loads(path.read_text())
    validate_trace_event_format(doc)
    events = doc["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {(0, 0): "vCPU 0", (0, 1): "vCPU 1"}
    assert [e["args"]["name"] for e in events if e["name"] == "process_name"] == ["VM 0"]
    n_exits = sum(1 for e in tracer.events if e.kind == "exit")
    guest = [e for e in events if e.get("cat") == "guest"]
    instants = [e for e in events if e["ph"] == "i"]
    handlers = [e for e in events if e.get("cat") == "handler"]
    assert len(guest) == len(instants) == len(handlers) == n_exits
    first = next(e for e in instants if e["tid"] == 0)
    assert first["name"] == "IO_INSTRUCTION"
    assert first["args"]["rip"] == hex(sb.symbol("out")) and first["args"]["qualification"] == "0x3f80000"
    assert first["args"]["qualification_fields"]["port"] == 0x3F8 and first["args"]["insn"] == "out dx, al"
    # Handler slices take the host time (1.5 us each with the test clock) and push the guest's
    # next slice later on the timeline.
    assert all(h["dur"] == 1.5 for h in handlers)
    vcpu0 = sorted((e for e in events if e["ph"] == "X" and e["tid"] == 0), key=lambda e: e["ts"])
    for a, b in zip(vcpu0, vcpu0[1:]):
        assert a["ts"] + a["dur"] == pytest.approx(b["ts"])


def test_tracer_without_wrappers() -> None:
    """A run loop that does not use handler wrappers feeds the tracer directly; TSCs become the
    timeline (1 ns per tick by default, microsecond timestamps)."""
    from pyvmx.vmx.outcomes import VmExitInfo

    tracer = Tracer(vm_id=3)
    tracer.record_entry(vcpu=2, tsc=1000, rip=0x1000)
    event = tracer.record_exit(2, 4000, VmExitInfo(reason=12, instruction_length=1), 0x1004, code=b"\xf4", tsc_entry=1000)
    tracer.record_outcome(event, "stop", handler_ns=0)
    doc = tracer.chrome_trace()
    validate_trace_event_format(doc)
    guest = next(e for e in doc["traceEvents"] if e.get("cat") == "guest")
    assert (guest["pid"], guest["tid"], guest["ts"], guest["dur"]) == (3, 2, 1.0, 3.0)
    assert event.insn == "hlt" and event.guest_tsc == 3000


def test_filters_and_table(traced) -> None:  # type: ignore[no-untyped-def]
    tracer, _ = traced
    io = filter_events(tracer.events, reason="io")
    assert len(io) == 4 and {e.vcpu for e in io} == {0, 1}
    assert [e.reason for e in filter_events(tracer.events, vcpu=1, limit=2)] == ["IO_INSTRUCTION", "IO_INSTRUCTION"]
    assert len(filter_events(tracer.events, kind=None)) == len(tracer.events)
    table = format_table(filter_events(tracer.events, reason="30", vcpu=0)).splitlines()
    assert table[0].split() == ["TSC", "VM", "VCPU", "EVENT", "REASON", "RIP", "INSTRUCTION", "QUALIFICATION", "DETAILS", "OUTCOME"]
    assert "IO_INSTRUCTION (30)" in table[1] and "port=0x3f8 size=1 direction=out operand=dx" in table[1]
    assert len({line.index("IO_INSTRUCTION") for line in table[1:]}) == 1  # aligned


def test_cli_trace_show(traced, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tracer, _ = traced
    path = tmp_path / "t.jsonl"
    tracer.write_jsonl(path)
    r = run_cli("trace", "show", str(path), "--reason", "MSR_WRITE")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]
    assert len(rows) == 2 and all("MSR_WRITE (32)" in row and "wrmsr" in row for row in rows)
    r = run_cli("trace", "show", str(path), "--vcpu", "1", "--limit", "3", "--entries")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 4
    assert [line.split()[3] for line in r.stdout.splitlines()[1:]] == ["entry", "exit", "entry"]
    r = run_cli("trace", "stats", str(path), "--plain")
    assert r.returncode == 0 and "IO_INSTRUCTION" in r.stdout and "Total Samples:10" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("--reason", "FROBNICATE"), "unknown exit reason 'FROBNICATE'"),
        (("--vcpu", "-1"), "-1"),
    ],
)
def test_cli_trace_show_errors(traced, tmp_path: Path, args: tuple[str, ...], message: str) -> None:  # type: ignore[no-untyped-def]
    tracer, _ = traced
    path = tmp_path / "t.jsonl"
    tracer.write_jsonl(path)
    r = run_cli("trace", "show", str(path), *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmx: error:") and message in lines[0]


@pytest.mark.parametrize("content, message", [("{oops\n", "not JSON"), ('{"format": "x"}\n', "not a pyvmx trace"), ('{"kind": "exit"}\n', "not a trace event")])
def test_cli_trace_show_bad_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    r = run_cli("trace", "show", str(path))
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_chrome_trace_of_nothing_is_valid() -> None:
    validate_trace_event_format(chrome_trace([]))
