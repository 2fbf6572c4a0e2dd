"""Scenario files: a guest, the intercepts to set, and the VM exits the SDM says must follow --
checked on the VT-x machine by ``pyvmx check FILE...``.

A scenario is TOML::

    name = "Only port 0x3F8 exits"            # optional (default: the file name)
    description = "I/O bitmap A with bit 0x3F8 set"
    mode = "long"                             # real | protected | long
    source = '''                              # GNU as source; or source_file = "guest.S"
        mov $0x3f8, %dx
    one: out %al, %dx
        hlt
    '''
    intercept = ["io:0x3f8", "hlt"]           # see pyvmx.tools.intercepts
    output = "A"                              # optional: the guest's COM1 output at the end

    [vmcs]                                    # optional raw VMCS writes, by Linux field name
    GUEST_RFLAGS = 0x202

    [[interrupt]]                             # optional external interrupts from the host
    vector = 0x31
    at = 1000                                 # guest TSC ticks after the first VM entry

    [run]                                     # optional
    max_exits = 1000
    exhaustive = false                        # true: after the last expectation run on to
                                              # the end (a stall) and fail on any other exit
    instruction_budget = 10000000

    [[expect]]                                # the exits, in order
    reason = "IO_INSTRUCTION"                 # name (or number) as in ExitReason / Linux
    rip = "one"                               # a label of the source, or a number
    qualification = { port = 0x3f8, size = 1, direction = "out" }   # fields, or an integer
    instruction_length = 1
    # vector = "PF", error_code = 0           # interruption information of the exit
    # regs = { rbx = 0x31 }                   # guest registers at the exit
    # count = 3                               # this many consecutive exits match
    # action = "skip"                         # skip | resume | reinject | stop

A scenario file is untrusted input: ``source_file`` must lie in the scenario's directory (unless
``pyvmx check --allow-outside-sources``), and the guest source's ``.include``/``.incbin`` may read
only files of that directory, named by relative paths without ``..``
(:mod:`pyvmx.guest.includes`).  Assembler errors name the TOML file and its line.

The hypervisor loop is the smallest one: each exit is compared with the next expectation, then
the instruction is emulated minimally and skipped (instruction exits), the guest resumed
(interrupts, timers, windows), the event reinjected, or the run stopped.  The run ends after the
last expectation (or at the end of the guest when ``exhaustive``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pyvmx.arch.controls import INTR_INFO_UNBLOCK_NMI, INTR_INFO_VALID_MASK, InterruptionType
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import UnknownNameError
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.vmcs_fields import width_bits
from pyvmx.guest.assemble import SourceOrigin
from pyvmx.vmx.exitinfo import FieldValue, format_fields, parse_exit_reason, vector_name
from pyvmx.tools.intercepts import InterceptError, InterceptPlan, apply_to_sandbox, parse_vector, plan_intercepts
from pyvmx.tools.inputs import MAX_SCENARIO_BYTES, InputError, int_in, parse_toml, read_text
from pyvmx.vmx.delivery import shutdown_chain_text
from pyvmx.tools.runloop import (
    ASYNC_EXITS, INSTRUCTION_EXITS, ExitHandler, ExitRecord, Outcome, RunResult, SeedHypervisor, entry_failure_text, run_sandbox,
)

MODES = ("real", "protected", "long")
ACTIONS = ("skip", "resume", "reinject", "stop")
GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_TOP_KEYS = {"name", "description", "mode", "source", "source_file", "intercept", "output", "vmcs", "interrupt", "run", "expect"}
_RUN_KEYS = {"max_exits", "exhaustive", "instruction_budget"}
_EXPECT_KEYS = {"reason", "rip", "qualification", "instruction_length", "vector", "error_code", "regs", "count", "action"}


class ScenarioError(InputError):
    """A scenario file that cannot be used; the message names the file and the problem."""


@dataclass
class Expectation:
    reason: ExitReason
    rip: int | str | None = None
    qualification: int | dict[str, FieldValue] | None = None
    instruction_length: int | None = None
    vector: int | None = None
    error_code: int | None = None
    regs: dict[str, int] = field(default_factory=dict)
    count: int = 1
    action: str | None = None

    def describe(self) -> str:
        text = self.reason.name
        if self.rip is not None:
            text += f" at {self.rip if isinstance(self.rip, str) else hex(self.rip)}"
        if self.vector is not None:
            text += f" vector {vector_name(self.vector)}"
        return text

    def default_action(self) -> str:
        if self.reason in INSTRUCTION_EXITS:
            return "skip"
        if self.reason in ASYNC_EXITS:
            return "resume"
        return "stop"

    def mismatch(self, rec: ExitRecord, symbol: Callable[[str], int]) -> str | None:
        """Why ``rec`` does not match, or None."""
        got = f"got {rec.reason_name} at {rec.rip:#x}"
        if rec.exit.basic_reason != self.reason or rec.exit.failed_vmentry:
            return got
        if self.rip is not None:
            want = symbol(self.rip) if isinstance(self.rip, str) else self.rip
            if rec.rip != want:
                return f"{got}, expected RIP {want:#x}"
        if self.instruction_length is not None and rec.exit.instruction_length != self.instruction_length:
            return f"{got} with instruction length {rec.exit.instruction_length}, expected {self.instruction_length}"
        if self.qualification is not None:
            if isinstance(self.qualification, int):
                if rec.exit.qualification != self.qualification:
                    return f"{got} with qualification {rec.exit.qualification:#x}, expected {self.qualification:#x}"
            else:
                fields = rec.qualification_fields()
                for name, want_value in self.qualification.items():
                    if name not in fields:
                        known = ", ".join(fields) or "none: compare the raw value"
                        return f"{got}: its qualification has no field {name!r} (fields: {known})"
                    if not _same(fields[name], want_value):
                        return f"{got} with qualification {format_fields(fields)}, expected {name}={_show(want_value)}"
        if self.vector is not None or self.error_code is not None:
            info = rec.exit.intr_info
            if not info & INTR_INFO_VALID_MASK:
                return f"{got} without interruption information, expected vector {vector_name(self.vector or 0)}"
            if self.vector is not None and info & 0xFF != self.vector:
                return f"{got} with vector {vector_name(info & 0xFF)}, expected {vector_name(self.vector)}"
            if self.error_code is not None and rec.exit.intr_error_code != self.error_code:
                return f"{got} with error code {rec.exit.intr_error_code:#x}, expected {self.error_code:#x}"
        for reg, want_value in self.regs.items():
            value = rec.target.read(F.GUEST_RFLAGS) if reg == "rflags" else rec.target.gpr[reg]
            if value != want_value:
                return f"{got} with {reg}={value:#x}, expected {reg}={want_value:#x}"
        return None


def _same(got: FieldValue, want: FieldValue) -> bool:
    if isinstance(want, str) and isinstance(got, str):
        return got.lower() == want.lower()
    if isinstance(want, bool) or isinstance(got, bool):
        return bool(got) == bool(want) and isinstance(want, bool) == isinstance(got, bool)
    return got == want


def _show(value: FieldValue) -> str:
    return hex(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 10 else str(value)


@dataclass
class Scenario:
    name: str
    mode: str
    source: str
    path: Path | None = None
    description: str = ""
    intercepts: list[str] = field(default_factory=list)
    plan: InterceptPlan = field(default_factory=InterceptPlan)
    vmcs: dict[F, int] = field(default_factory=dict)
    interrupts: list[tuple[int, int]] = field(default_factory=list)  # (vector, TSC after first entry)
    expectations: list[Expectation] = field(default_factory=list)
    output: str | None = None
    max_exits: int = 1000
    exhaustive: bool = False
    instruction_budget: int = 10_000_000
    config: dict[str, Any] = field(default_factory=dict)  # the file's contents, source inlined
    origin: SourceOrigin = field(default_factory=SourceOrigin)  # what errors call the source; its include directory

    def record_config(self) -> dict[str, Any]:
        """The scenario as a replay record's config (:mod:`pyvmx.tools.replay`)."""
        return {"kind": "scenario", "scenario": {"name": self.name, **{k: v for k, v in self.config.items() if k != "name"}}}

    @property
    def label(self) -> str:
        return self.path.name if self.path is not None else self.name


# --- loading ---------------------------------------------------------------------------------------
MAX_EXITS_LIMIT = 10_000_000
U64 = (1 << 64) - 1


def load_scenario(path: str | Path, *, allow_outside_sources: bool = False) -> Scenario:
    """Read and check a scenario file; every problem is a :class:`ScenarioError` naming it.
    ``source_file`` must lie in the scenario's directory unless ``allow_outside_sources``."""
    p = Path(path)
    try:
        text = read_text(p, what="scenario (TOML)", limit=MAX_SCENARIO_BYTES)
        data = parse_toml(text, p, what="scenario")
    except InputError as exc:
        raise ScenarioError(str(exc)) from None
    return scenario_from_dict(data, p, text=text, allow_outside_sources=allow_outside_sources)


_SOURCE_KEY = re.compile("\\s*source\\s*=\\s*('{3}|\"{3}|'|\")(.*)$")


def _source_line(text: str) -> int:
    """The line of a TOML file where its top-level ``source`` string's text starts (TOML drops
    a newline right after an opening triple quote); 1 if it cannot be found."""
    for number, line in enumerate(text.splitlines(), 1):
        match = _SOURCE_KEY.match(line)
        if match:
            triple = len(match.group(1)) == 3
            return number + 1 if triple and not match.group(2).strip() else number
        if line.lstrip().startswith("["):
            break  # the top-level keys end at the first table
    return 1


def _source_of(data: dict[str, Any], path: Path | None, text: str | None, allow_outside: bool, bad: Callable[[str], ScenarioError]) -> tuple[str, SourceOrigin]:
    """The guest source text and where it comes from (for its diagnostics and includes)."""
    if ("source" in data) == ("source_file" in data):
        raise bad("give the guest as exactly one of 'source' (assembly text) or 'source_file' (a path)")
    if "source" in data:
        source = data["source"]
        if not isinstance(source, str):
            raise bad("'source' must be a string of assembly source")
        if path is None:  # from a record: no directory of its own, so no host file
            return source, SourceOrigin("the scenario's source")
        return source, SourceOrigin(str(path), _source_line(text or ""), path.parent)
    name = data["source_file"]
    if not isinstance(name, str) or not name:
        raise bad("'source_file' must be a path (a string)")
    if path is None:
        raise bad("'source_file' is not allowed here: the source must be inlined as 'source'")
    src_path = path.parent / name
    try:
        inside = src_path.resolve().is_relative_to(path.parent.resolve())
    except (OSError, RuntimeError, ValueError) as exc:  # a symbolic-link loop, a NUL byte
        raise bad(f"cannot read source_file {name!r}: {exc}") from None
    if not inside and not allow_outside:
        raise bad(f"source_file {name!r} is outside the scenario's directory (pass --allow-outside-sources to allow it)")
    try:
        source = read_text(src_path, what="guest source", limit=MAX_SCENARIO_BYTES)
    except InputError as exc:
        raise bad(str(exc).replace("cannot read ", "cannot read source_file ", 1)) from None
    return source, SourceOrigin(str(src_path), 1, path.parent if inside else src_path.parent)


def scenario_from_dict(data: dict[str, Any], path: Path | None = None, *, text: str | None = None, allow_outside_sources: bool = False) -> Scenario:
    """A scenario from its TOML table (``path``: the file it was read from, ``text``: its
    contents).  Without a path (a record's scenario) the source must be inline and may read no
    host file."""
    where = str(path) if path is not None else "scenario"

    def bad(message: str) -> ScenarioError:
        return ScenarioError(f"{where}: {message}")

    if not isinstance(data, dict):
        raise bad("a scenario must be a table")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise bad(f"unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    mode = data.get("mode", "long")
    if mode not in MODES:
        raise bad(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    for key in ("name", "description", "output"):
        if key in data and not isinstance(data[key], str):
            raise bad(f"'{key}' must be a string")
    source, origin = _source_of(data, path, text, allow_outside_sources, bad)
    intercepts = data.get("intercept", [])
    if isinstance(intercepts, str):
        intercepts = [intercepts]
    if not isinstance(intercepts, list) or not all(isinstance(i, str) for i in intercepts):
        raise bad("'intercept' must be a list of strings such as \"io:0x3f8\"")
    try:
        plan = plan_intercepts(intercepts)
    except InterceptError as exc:
        raise bad(str(exc)) from None
    vmcs: dict[F, int] = {}
    raw_vmcs = data.get("vmcs", {})
    if not isinstance(raw_vmcs, dict):
        raise bad("[vmcs] must be a table of FIELD_NAME = value")
    for name, value in raw_vmcs.items():
        fld = F.__members__.get(str(name).upper())
        if fld is None:
            raise bad(f"unknown VMCS field {name!r} in [vmcs] (names as in 'pyvmx vmcs fields')")
        bits = width_bits(fld.width) or 64
        if not int_in(value, 0, (1 << bits) - 1):
            raise bad(f"[vmcs] {name} must be an integer that fits the {bits}-bit field")
        vmcs[fld] = value
    interrupts = []
    raw_interrupts = data.get("interrupt", [])
    if not isinstance(raw_interrupts, list):
        raise bad("[[interrupt]] must be an array of tables")
    for i, item in enumerate(raw_interrupts):
        if not isinstance(item, dict) or set(item) - {"vector", "at"} or "vector" not in item:
            raise bad(f"[[interrupt]] #{i + 1} needs 'vector' and optionally 'at' (TSC ticks after the first entry)")
        vector, at = item["vector"], item.get("at", 0)
        if not int_in(vector, 0, 255) or not int_in(at, 0, U64):
            raise bad(f"[[interrupt]] #{i + 1}: vector must be 0..255 and 'at' a non-negative integer")
        interrupts.append((vector, at))
    run = data.get("run", {})
    if not isinstance(run, dict) or set(run) - _RUN_KEYS:
        raise bad(f"[run] accepts only {', '.join(sorted(_RUN_KEYS))}")
    if not int_in(run.get("max_exits", 1), 1, MAX_EXITS_LIMIT):
        raise bad(f"[run] max_exits must be an integer in 1..{MAX_EXITS_LIMIT}")
    if not int_in(run.get("instruction_budget", 1), 1, U64):
        raise bad("[run] instruction_budget must be a positive integer")
    if not isinstance(run.get("exhaustive", False), bool):
        raise bad("[run] exhaustive must be true or false")
    raw_expect = data.get("expect", [])
    if not isinstance(raw_expect, list):
        raise bad("[[expect]] must be an array of tables")
    expectations = [_expectation(e, i, bad) for i, e in enumerate(raw_expect)]
    output = data.get("output")
    if not expectations and output is None:
        raise bad("nothing to check: add [[expect]] tables and/or 'output'")
    config = dict(data)
    config.pop("source_file", None)
    config["source"] = source
    return Scenario(
        name=str(data.get("name", path.stem if path is not None else "scenario")),
        mode=mode, source=source, path=path, description=str(data.get("description", "")),
        intercepts=list(intercepts), plan=plan, vmcs=vmcs, interrupts=interrupts, expectations=expectations,
        output=output, max_exits=int(run.get("max_exits", 1000)), exhaustive=bool(run.get("exhaustive", False)),
        instruction_budget=int(run.get("instruction_budget", 10_000_000)), config=config, origin=origin,
    )


def _expectation(e: Any, i: int, bad: Callable[[str], ScenarioError]) -> Expectation:
    where = f"[[expect]] #{i + 1}"
    if not isinstance(e, dict):
        raise bad(f"{where} must be a table")
    unknown = set(e) - _EXPECT_KEYS
    if unknown:
        raise bad(f"{where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_EXPECT_KEYS))})")
    if "reason" not in e:
        raise bad(f"{where} needs a 'reason'")
    if not isinstance(e["reason"], (int, str)) or ("vector" in e and not isinstance(e["vector"], (int, str))):
        raise bad(f"{where}: 'reason' and 'vector' are names or numbers")
    try:
        reason = parse_exit_reason(e["reason"])
        vector = parse_vector(str(e["vector"]), limit=256) if "vector" in e else None
    except (UnknownNameError, InterceptError) as exc:
        raise bad(f"{where}: {exc}") from None
    rip = e.get("rip")
    if rip is not None and not (isinstance(rip, str) or int_in(rip, 0, U64)):
        raise bad(f"{where}: 'rip' must be a label or a number")
    qual = e.get("qualification")
    if qual is not None and not (int_in(qual, 0, U64) or isinstance(qual, dict)):
        raise bad(f"{where}: 'qualification' must be an integer or a table of fields")
    if isinstance(qual, dict) and not all(isinstance(v, (int, str)) for v in qual.values()):
        raise bad(f"{where}: the qualification's fields must be integers, booleans or strings")
    for key, high in (("instruction_length", 15), ("error_code", 0xFFFFFFFF)):
        if key in e and not int_in(e[key], 0, high):
            raise bad(f"{where}: '{key}' must be an integer in 0..{high:#x}")
    regs = e.get("regs", {})
    if not isinstance(regs, dict):
        raise bad(f"{where}: 'regs' must be a table such as {{ rbx = 0x31 }}")
    for reg, value in regs.items():
        if reg.lower() not in GPR_NAMES + ("rflags",) or not int_in(value, 0, U64):
            raise bad(f"{where}: bad register check {reg!r} (general-purpose registers or rflags, 64-bit integer values)")
    count = e.get("count", 1)
    if not int_in(count, 1, MAX_EXITS_LIMIT):
        raise bad(f"{where}: 'count' must be a positive integer")
    action = e.get("action")
    if action is not None and action not in ACTIONS:
        raise bad(f"{where}: 'action' must be one of {', '.join(ACTIONS)}")
    return Expectation(
        reason=reason, rip=rip, qualification=qual, instruction_length=e.get("instruction_length"),
        vector=vector, error_code=e.get("error_code"), regs={k.lower(): v for k, v in regs.items()},
        count=count, action=action,
    )


# --- running ---------------------------------------------------------------------------------------
def build_sandbox(sc: Scenario) -> Any:
    """The sandbox of a scenario: guest assembled and loaded, intercepts and [vmcs] applied."""
    from pyvmx.guest.sandbox import Mode, VmxSandbox

    sb = VmxSandbox(cast("Mode", sc.mode), sc.source, instruction_budget=sc.instruction_budget, origin=sc.origin)
    apply_to_sandbox(sc.plan, sb)
    for fld, value in sc.vmcs.items():
        sb.write(fld, value)
    return sb


def reinject(sb: Any, rec: ExitRecord) -> None:
    """Deliver the exiting event to the guest at the next VM entry (SDM 27.6): the exit's
    interruption information and error code become the entry's; software exceptions carry the
    instruction length.  (CR2 of a #PF is left as the guest had it.)"""
    info = rec.exit.intr_info & ~INTR_INFO_UNBLOCK_NMI
    sb.write(F.VM_ENTRY_INTR_INFO_FIELD, info)
    sb.write(F.VM_ENTRY_EXCEPTION_ERROR_CODE, rec.exit.intr_error_code)
    kind = (info >> 8) & 7
    if kind in (InterruptionType.SOFT_INTR, InterruptionType.SOFT_EXCEPTION, InterruptionType.PRIV_SW_EXCEPTION):
        sb.write(F.VM_ENTRY_INSTRUCTION_LEN, rec.exit.instruction_length)


@dataclass
class ScenarioResult:
    scenario: Scenario
    failures: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)  # "IO_INSTRUCTION at 0x10005"
    output: str = ""
    run: RunResult | None = None

    @property
    def passed(self) -> bool:
        return not self.failures


class ScenarioChecker:
    """The scenario's exit handler: compares each exit with the next expectation, then acts."""

    def __init__(self, sc: Scenario, symbol: Callable[[str], int]) -> None:
        self.sc = sc
        self.symbol = symbol
        self.emulator = SeedHypervisor()
        self.pending = [(e, e.count) for e in sc.expectations]
        self.failures: list[str] = []
        self.exits: list[str] = []
        self.done = 0  # expectations fully met

    def __call__(self, rec: ExitRecord) -> Outcome:
        self.exits.append(f"{rec.reason_name} at {rec.rip:#x}")
        if not self.pending:
            if not self.sc.exhaustive:  # cannot happen: the run stops after the last match
                return Outcome.stop("all expectations met")
            self.failures.append(f"unexpected exit #{rec.index + 1} after the last expectation: {rec.reason_name} at {rec.rip:#x}")
            return Outcome.stop("unexpected exit")
        exp, left = self.pending[0]
        try:
            why = exp.mismatch(rec, self.symbol)
        except KeyError as exc:
            self.failures.append(str(exc.args[0]) if exc.args else str(exc))
            return Outcome.stop("bad label")
        if why is not None and rec.exit.failed_vmentry:
            why += f" ({entry_failure_text(rec)})"
        elif why is not None and rec.reason_name == "TRIPLE_FAULT":
            chain = getattr(rec.target.cpu.executor, "last_triple_fault", ())
            why += f" ({shutdown_chain_text(chain)})" if chain else ""
        if why is not None:
            done = exp.count - left
            which = f"expectation {self.done + 1} ({exp.describe()}{f', exit {done + 1} of {exp.count}' if exp.count > 1 else ''})"
            self.failures.append(f"exit #{rec.index + 1}: {which}: {why}")
            return Outcome.stop("mismatch")
        if left > 1:
            self.pending[0] = (exp, left - 1)
        else:
            self.pending.pop(0)
            self.done += 1
        if not self.pending and not self.sc.exhaustive:
            note = self.emulator.emulate(rec.target, rec) if exp.reason in INSTRUCTION_EXITS else ""
            return Outcome.stop(note or "all expectations met")
        return self._act(exp.action or exp.default_action(), rec)

    def _act(self, action: str, rec: ExitRecord) -> Outcome:
        sb = rec.target
        if action == "skip":
            note = self.emulator.emulate(sb, rec)
            sb.skip_instruction()
            return Outcome.resume(note)
        if action == "reinject":
            reinject(sb, rec)
            return Outcome.resume("event reinjected")
        if action == "resume":
            return Outcome.resume()
        return Outcome.stop("stop requested by the scenario")


def run_scenario(
    sc: Scenario,
    *,
    wrap: Callable[[ExitHandler], ExitHandler] | None = None,
    before_entry: Callable[[Any, int], None] | None = None,
    sandbox: Any = None,
    timeout: float | None = None,
) -> ScenarioResult:
    """Run ``sc`` on the VT-x machine.  ``wrap`` composes tracers/statistics/recorders around the
    checker; ``before_entry(sandbox, exit_index)`` runs before each VM entry (host inputs);
    ``timeout``: wall-clock seconds the run may take (a failure when it passes)."""
    from pyvmx.engine.deadline import HostDeadline

    result = ScenarioResult(sc)
    try:
        sb = sandbox if sandbox is not None else build_sandbox(sc)
    except (ValueError, RuntimeError, InterceptError) as exc:  # AssemblyError is a ValueError
        text = str(exc).strip()
        result.failures.append(f"cannot set up the guest: {text.splitlines()[0] if text else type(exc).__name__}")
        return result
    checker = ScenarioChecker(sc, sb.symbol)
    handler: ExitHandler = wrap(checker) if wrap is not None else checker

    def scenario_inputs(sandbox_: Any, index: int) -> None:
        if index == 0:
            start = sandbox_.cpu.read_tsc()
            for vector, at in sc.interrupts:
                sandbox_.cpu.raise_interrupt(vector, at_tsc=start + at)
        if sc.plan.preemption_timer is not None and sandbox_.read(F.VMX_PREEMPTION_TIMER_VALUE) == 0 and index > 0:
            sandbox_.write(F.VMX_PREEMPTION_TIMER_VALUE, sc.plan.preemption_timer)  # a new time slice
        if before_entry is not None:
            before_entry(sandbox_, index)

    wall = HostDeadline(timeout) if timeout else None
    run = run_sandbox(sb, handler, max_exits=sc.max_exits, before_entry=scenario_inputs, wall_deadline=wall)
    result.run = run
    if run.timed_out is not None:
        result.failures.append(f"timed out after {run.timed_out:g}s (wall clock; the run ended after {run.exits} exit(s))")
    result.failures.extend(checker.failures)
    result.exits = checker.exits
    result.output = checker.emulator.output
    if not checker.failures and checker.pending:
        exp, left = checker.pending[0]
        result.failures.append(
            f"expectation {checker.done + 1} ({exp.describe()}) not met: the run ended ({run.ended_by}) after {run.exits} exit(s)"
        )
    if sc.output is not None and result.output != sc.output:
        result.failures.append(f"guest output {result.output!r}, expected {sc.output!r}")
    return result


def summarize(result: ScenarioResult) -> str:
    """One report line (plus indented failure lines)."""
    sc = result.scenario
    n = len(result.exits)
    head = f"{'PASS' if result.passed else 'FAIL'}  {sc.label}: {sc.name} ({n} exit{'s' if n != 1 else ''})"
    return "\n".join([head] + [f"      {f}" for f in result.failures])

