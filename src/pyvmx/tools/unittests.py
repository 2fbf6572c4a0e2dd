"""``pyvmx unittests BUILD/x86 [TEST ...]``: run kvm-unit-tests the way its run_tests.sh does
(scripts/runtime.bash, scripts/common.bash), each test on pyvmx's hypervisor instead of QEMU+KVM.

``unittests.cfg`` lists the tests: ``[name]`` sections with ``file``, ``smp``, ``test_args``,
``qemu_params``, ``arch``, ``groups``, ``timeout``, ``check`` and ``accel``. Each test boots its
``.flat`` image as a Multiboot kernel with the command line ``test_args`` (QEMU's ``-append``),
with ``-m`` from ``qemu_params`` (QEMU's default 128 MiB otherwise). QEMU's exit status decides
the result as run_tests.sh's does: 1 (code 0) PASS, 77 SKIP, anything else FAIL, and the wall
clock running out FAIL "timeout". The summary in parentheses is the test's last ``SUMMARY:``
line. Tests are skipped, with the reason, when run_tests.sh would skip them (another ``arch``;
group ``nodefault`` unless named or its group chosen; a ``check`` on the host's KVM module
parameters, which pyvmx has not) or when they need what this machine lacks: nested VMX (a CPU
model with ``+vmx``), SVM, Hyper-V enlightenments, a PMU. ``smp N`` runs N vCPUs on one
physical CPU; the application processors wait for INIT-SIPI-SIPI.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pyvmx.tools.run import MAX_VCPUS, RunOptions, host_backable_mib, run

DEFAULT_TIMEOUT = 90.0  # scripts/runtime.bash: ${TIMEOUT:-${timeout:-90s}}
DEFAULT_MEMORY_MIB = 128  # QEMU's default -m for the pc machine
ARCH = "x86_64"
STATUS_PASS, STATUS_SKIP = 1, 77  # QEMU's isa-debug-exit statuses for exit(0) and the skip code
NO_TSC_LIMIT = 1 << 62  # a test ends on its own or by the wall clock, as under QEMU


class UnittestsError(ValueError):
    """A missing or malformed build directory / unittests.cfg (one line for the CLI)."""


class Result(Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass
class Entry:
    """One ``[name]`` section of unittests.cfg."""

    name: str
    file: str = ""
    smp: int = 1
    test_args: str = ""
    qemu_params: str = ""
    arch: str = ""
    groups: tuple[str, ...] = ()
    timeout: float | None = None
    check: str = ""
    accel: str = ""


@dataclass
class Outcome:
    name: str
    result: Result
    summary: str = ""  # what goes in parentheses
    seconds: float = 0.0
    serial: str = ""
    detail: str = ""

    def line(self) -> str:
        return f"{self.result.value} {self.name}" + (f" ({self.summary})" if self.summary else "")


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, result: Result) -> int:
        return sum(1 for o in self.outcomes if o.result is result)

    def summary(self) -> str:
        return (f"{len(self.outcomes)} tests: {self.count(Result.PASS)} passed, {self.count(Result.FAIL)} failed, "
                f"{self.count(Result.SKIP)} skipped")


def _timeout(text: str) -> float:
    """runtime.bash timeouts: a number with an optional s/m/h suffix (GNU timeout's syntax)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if m is None:
        raise UnittestsError(f"unittests.cfg: bad timeout {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_config(text: str) -> list[Entry]:
    """The sections of unittests.cfg, in order (comments are lines starting with '#')."""
    entries: list[Entry] = []
    current: Entry | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        section = re.fullmatch(r"\[([^\]]+)\]", line)
        if section:
            current = Entry(section.group(1).strip())
            entries.append(current)
            continue
        key_value = re.fullmatch(r"([a-z_]+)\s*=\s*(.*)", line)
        if current is None or key_value is None:
            raise UnittestsError(f"unittests.cfg line {number}: expected '[name]' or 'key = value', got {line!r}")
        key, value = key_value.group(1), key_value.group(2).strip()
        if key == "file":
            current.file = value
        elif key == "smp":
            try:
                current.smp = int(value)
            except ValueError:
                current.smp = 1  # `getconf _NPROCESSORS_ONLN`-style expressions: one CPU
        elif key == "test_args":
            current.test_args = value
        elif key in ("qemu_params", "extra_params"):
            current.qemu_params = value
        elif key == "arch":
            current.arch = value
        elif key == "groups":
            current.groups = tuple(value.split())
        elif key == "timeout":
            current.timeout = _timeout(value)
        elif key == "check":
            current.check = value
        elif key == "accel":
            current.accel = value
    return entries


def _qemu_memory(params: list[str]) -> int | None:
    for i, word in enumerate(params[:-1]):
        if word == "-m":
            m = re.fullmatch(r"(\d+)([MG]?)", params[i + 1])
            if m:
                return int(m.group(1)) * (1024 if m.group(2) == "G" else 1)
    return None


def unsupported(entry: Entry, *, chosen: bool) -> str | None:
    """Why this entry is skipped here, or None (see the module docstring)."""
    if entry.arch and entry.arch != ARCH:
        return f"{entry.arch} only"
    if "nodefault" in entry.groups and not chosen:
        return "test marked as manual run only"
    if entry.accel and entry.accel not in ("kvm",):
        return f"{entry.accel} only"
    if entry.check:
        return f"needs host KVM parameters: {entry.check}"
    params = entry.qemu_params
    if re.search(r"\+vmx\b", params) or entry.file.startswith("vmx"):
        return "nested VMX (a CPU model with +vmx) is not provided"
    if re.search(r"\+svm\b", params) or entry.file.startswith("svm"):
        return "SVM is AMD's: not on this Intel machine"
    if "hv_" in params or entry.file.startswith("hyperv"):
        return "Hyper-V enlightenments are not provided"
    if "pmu" in entry.groups or entry.file.startswith("pmu"):
        return "no PMU"
    if entry.smp > MAX_VCPUS:
        return f"smp {entry.smp}: at most {MAX_VCPUS} vCPUs"
    return None


def _summary(serial: str) -> str:
    """run_tests.sh's extract_summary: the text after the last 'SUMMARY: '."""
    lines = [line for line in serial.splitlines() if line.startswith("SUMMARY: ")]
    return lines[-1][len("SUMMARY: "):].strip() if lines else ""


def run_entry(build: Path, entry: Entry, *, timeout: float | None, chosen: bool) -> Outcome:
    reason = unsupported(entry, chosen=chosen)
    if reason is not None:
        return Outcome(entry.name, Result.SKIP, reason)
    image = build / entry.file
    if not image.is_file():
        return Outcome(entry.name, Result.SKIP, f"Test file '{image}' not found")
    try:
        params = shlex.split(entry.qemu_params)
        args = " ".join(shlex.split(entry.test_args))
    except ValueError as exc:
        return Outcome(entry.name, Result.FAIL, f"bad unittests.cfg quoting: {exc}")
    memory = min(_qemu_memory(params) or DEFAULT_MEMORY_MIB, host_backable_mib())
    limit = timeout if timeout is not None else entry.timeout or DEFAULT_TIMEOUT
    options = RunOptions(image, memory_mib=max(memory, 1), vcpus=entry.smp, max_tsc=NO_TSC_LIMIT, timeout=limit,
                         append=args)
    start = time.monotonic()
    try:
        result = run(options)
    except ValueError as exc:
        return Outcome(entry.name, Result.FAIL, str(exc), time.monotonic() - start)
    seconds = time.monotonic() - start
    serial = result.serial.decode("latin-1")
    summary = _summary(serial)
    if result.ending == "timeout":
        return Outcome(entry.name, Result.FAIL, f"timeout; duration={limit:g}s", seconds, serial, result.detail)
    if result.ending == "debug-exit" and result.status == STATUS_PASS:
        return Outcome(entry.name, Result.PASS, summary, seconds, serial, result.detail)
    if result.ending == "debug-exit" and result.status == STATUS_SKIP:
        return Outcome(entry.name, Result.SKIP, summary, seconds, serial, result.detail)
    return Outcome(entry.name, Result.FAIL, summary or result.detail, seconds, serial, result.detail)


def select(entries: Iterable[Entry], names: tuple[str, ...], group: str | None) -> list[tuple[Entry, bool]]:
    """The entries to run and whether each was chosen explicitly (by name or group)."""
    entries = list(entries)
    known = {e.name for e in entries}
    missing = [n for n in names if n not in known]
    if missing:
        raise UnittestsError(f"no test {', '.join(missing)} in unittests.cfg")
    chosen = []
    for e in entries:
        if names and e.name not in names:
            continue
        if group is not None and group not in e.groups:
            continue
        chosen.append((e, bool(names) or group is not None))
    return chosen


def run_unittests(build: Path, names: tuple[str, ...] = (), *, group: str | None = None, timeout: float | None = None,
                  logs: Path | None = None, on_outcome: Callable[[Outcome], None] | None = None) -> Report:
    cfg = build / "unittests.cfg"
    try:
        text = cfg.read_text()
    except OSError as exc:
        raise UnittestsError(f"cannot read {cfg}: {exc.strerror}") from None
    if logs is not None:
        try:
            logs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UnittestsError(f"cannot create the log directory {logs}: {exc.strerror}") from None
    report = Report()
    for entry, chosen in select(parse_config(text), names, group):
        outcome = run_entry(build, entry, timeout=timeout, chosen=chosen)
        report.outcomes.append(outcome)
        if logs is not None and (outcome.serial or outcome.detail):
            (logs / f"{entry.name}.log").write_text(outcome.serial + (f"\npyvmx: {outcome.detail}\n" if outcome.detail else ""))
        if on_outcome is not None:
            on_outcome(outcome)
    return report


def to_json(report: Report) -> dict[str, dict[str, object]]:
    return {o.name: {"result": o.result.value, "summary": o.summary, "seconds": round(o.seconds, 1)} for o in report.outcomes}


def write_json(report: Report, path: Path) -> None:
    import json

    try:
        path.write_text(json.dumps(to_json(report), indent=1) + "\n")
    except OSError as exc:
        raise UnittestsError(f"cannot write {path}: {exc.strerror}") from None
