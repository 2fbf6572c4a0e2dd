"""Every command that reads a file, fed damaged and hostile files: each ends in a result or in one
clear line on stderr with exit status 2 -- never a Python traceback (issue 11.6 / 14.9: scenario,
record, trace and saved-VMCS files are untrusted input; people send them to each other).

The files are valid ones (written by pyvmx itself) mutated deterministically (fixed seeds, see
``file_mutations``): byte-level damage (bit flips, non-UTF-8 bytes, truncation, random bytes)
and structure-level edits (a value of the wrong type or out of range, a key removed or added),
plus each kind of file given to every other command.  The commands run in-process through the
CLI's ``main()`` (what ``pyvmx`` runs), with a few subprocess runs to check the real process.

Size: ``PYVMX_FUZZ_SCALE`` (default 1, a CI budget of well under a minute) multiplies the number
of mutations (capped at 20x); the outcome counts go to the fuzz summary (tests/fuzz/ledger.py)
and are printed after each test (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import traceback
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvmx.tools.cli import main
from tests.fuzz.file_mutations import mutate
from tests.fuzz.ledger import record_counts, scale
from tests.tools.cli_helpers import run_cli

pytestmark = pytest.mark.machine

ROOT = Path(__file__).resolve().parents[2]
# Mutations per (command, seed file): 550 files in all at scale 1 (~10 s of CPU).  Under
# ``make fuzz`` the count grows with PYVMX_FUZZ_SCALE up to 20x (11,000 files, ~10 min): past
# that, more byte flips of the same eleven files find nothing the first 11,000 did not.
MUTATIONS = max(1, round(50 * min(scale(), 20)))

GUEST = """\
.globl _start
_start:
    mov $0x3f8, %dx
    mov $'A', %al
    out %al, %dx
    mov $0xf4, %dx
    mov $0, %al
    out %al, %dx
    hlt
"""


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str


def invoke(*argv: str) -> Result:
    """``pyvmx ARGV`` in this process, as the console script runs it."""
    out, err = io.StringIO(), io.StringIO()
    status: int = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Result(status, out.getvalue(), err.getvalue())


@dataclass(frozen=True)
class Seed:
    kind: str  # scenario | record | trace | vmcs | source | elf
    path: Path
    structure: str  # how it is mutated: toml | json | jsonl | bytes


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Seed]]:
    """Valid files of every kind, written by pyvmx itself."""
    d = tmp_path_factory.mktemp("seeds")
    out: dict[str, list[Seed]] = {}

    def add(kind: str, path: Path, structure: str) -> None:
        assert path.stat().st_size > 0
        out.setdefault(kind, []).append(Seed(kind, path, structure))

    for name in ("hlt.toml", "io_serial_only.toml", "external_interrupt.toml"):
        shutil.copy(ROOT / "examples/scenarios" / name, d / name)
        add("scenario", d / name, "toml")
    (d / "guest.S").write_text(GUEST)
    add("source", d / "guest.S", "bytes")
    assert invoke("check", str(d / "external_interrupt.toml"), "--record", str(d / "scenario.rec")).status == 0
    add("record", d / "scenario.rec", "json")
    r = invoke("run", str(d / "guest.S"), "--record", str(d / "run.rec"), "--trace", str(d / "run.jsonl"), "--max-tsc", "100000")
    assert r.status == 0, r.stderr
    add("record", d / "run.rec", "json")
    add("trace", d / "run.jsonl", "jsonl")
    assert invoke("vmcs", "dump", "--save", str(d / "vmcs.json")).status == 0
    add("vmcs", d / "vmcs.json", "json")
    subprocess.run(["as", "--64", "-o", str(d / "guest.o"), str(d / "guest.S")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-nostdlib", "-N", "-e", "_start", "-Ttext=0x10000", "-o", str(d / "guest.elf"), str(d / "guest.o")], check=True)
    add("elf", d / "guest.elf", "bytes")
    return out


# Each command that reads a file: the argv around FILE, and the kinds of file it takes.
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "check": (("check", "--timeout", "5", "FILE"), "scenario"),
    "replay": (("replay", "FILE"), "record"),
    "trace show": (("trace", "show", "FILE", "--entries"), "trace"),
    "trace stats": (("trace", "stats", "FILE"), "trace"),
    "vmcs dump --from": (("vmcs", "dump", "--from", "FILE"), "vmcs"),
    "run source": (("run", "FILE", "--max-tsc", "200000"), "source"),
    "run elf": (("run", "FILE", "--max-tsc", "200000"), "elf"),
}


def _argv(command: str, file: Path) -> list[str]:
    return [str(file) if a == "FILE" else a for a in COMMANDS[command][0]]


def _judge(command: str, r: Result) -> str | None:
    """What is wrong with the way ``r`` ended, or None."""
    if "Traceback" in r.stdout + r.stderr:
        return "printed a traceback"
    if r.status == 2:
        lines = r.stderr.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("pyvmx: error: "):
            return f"exit status 2 without exactly one 'pyvmx: error:' line: {r.stderr[:300]!r}"
    return None


def _cases(command: str, seeds: dict[str, list[Seed]], tmp: Path) -> Iterator[tuple[str, Path]]:
    for seed in seeds[COMMANDS[command][1]]:
        data = seed.path.read_bytes()
        for n in range(MUTATIONS):
            name, mutated = mutate(zlib.crc32(f"{command}/{seed.path.name}/{n}".encode()), data, seed.structure)
            path = tmp / f"{n}{seed.path.suffix}"
            path.write_bytes(mutated)
            yield f"{seed.path.name} #{n} {name}", path


@pytest.mark.parametrize("command", list(COMMANDS))
def test_mutated_files_end_in_a_result_or_one_line(command: str, seeds: dict[str, list[Seed]], tmp_path: Path) -> None:
    """A mutated file of the kind ``command`` reads: a result, or exit 2 with one error line."""
    outcomes: Counter[str] = Counter()
    failures = []
    for case, path in _cases(command, seeds, tmp_path):
        try:
            r = invoke(*_argv(command, path))
        except Exception:  # noqa: BLE001 - any exception out of main() is the bug being searched
            failures.append(f"{case}: raised\n{traceback.format_exc(limit=-3)}\n  file: {path.read_bytes()[:300]!r}")
            outcomes["exception"] += 1
            continue
        problem = _judge(command, r)
        if problem is not None:
            failures.append(f"{case}: {problem}\n  file: {path.read_bytes()[:300]!r}")
        outcomes["error (exit 2)" if r.status == 2 else f"ran (exit {r.status})"] += 1
    print(f"\n{command}: {sum(outcomes.values())} mutated files: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    record_counts(f"files: {command}", outcomes)
    assert not failures, f"{len(failures)} bad endings, first ones:\n" + "\n".join(failures[:5])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_other_kind_of_file_is_one_line(command: str, seeds: dict[str, list[Seed]]) -> None:
    """A file of the wrong kind (a trace given to ``replay``, a scenario to ``vmcs dump``, ...)
    is named as not what the command reads, in one line with exit 2 (or, for ``run``, which
    takes any bytes as a flat image, runs)."""
    wanted = COMMANDS[command][1]
    for kind, files in seeds.items():
        if kind == wanted or (command.startswith("run") and kind != "source"):
            continue
        for seed in files:
            path = seed.path
            if command == "run source":  # a source of the wrong kind: keep the .S name
                path = seed.path.with_name(seed.path.stem + "_as_source.S")
                path.write_bytes(seed.path.read_bytes())
            r = invoke(*_argv(command, path))
            assert _judge(command, r) is None, (seed.path.name, r)
            if not command.startswith("run"):
                assert r.status == 2 and r.stderr.startswith(f"pyvmx: error: {path}"), (seed.path.name, r)


def test_gdbserver_given_any_other_kind_of_file_is_one_line(seeds: dict[str, list[Seed]]) -> None:
    """``gdbserver`` serves a scenario: a record, trace, saved VMCS, guest source or ELF file is
    one line (for a guest image, pointing to ``run --gdb``), exit 2, and no server starts."""
    for kind, files in seeds.items():
        if kind == "scenario":
            continue
        for seed in files:
            r = invoke("gdbserver", str(seed.path), "--port", "0")
            assert r.status == 2 and r.stderr.startswith(f"pyvmx: error: {seed.path}") and len(r.stderr.splitlines()) == 1, r


@pytest.mark.parametrize("argv", [("check", "FILE"), ("replay", "FILE"), ("trace", "show", "FILE"), ("trace", "stats", "FILE"),
                                  ("vmcs", "dump", "--from", "FILE"), ("gdbserver", "FILE")])
def test_random_bytes_in_a_real_process(argv: tuple[str, ...], tmp_path: Path) -> None:
    """The installed command on 2 KiB of random (non-UTF-8) bytes: one line naming the file and
    the first byte that is not text, exit 2."""
    path = tmp_path / "random.dat"
    path.write_bytes(b"\xaa" + os.urandom(2047))
    r = run_cli(*[str(path) if a == "FILE" else a for a in argv])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pyvmx: error: {path}: not a ") and "byte 0xaa at offset 0 is not UTF-8 text" in lines[0], r.stderr


@pytest.mark.parametrize("argv", [("check", "FILE"), ("replay", "FILE"), ("trace", "show", "FILE"), ("vmcs", "dump", "--from", "FILE")])
def test_directories_and_fifos_are_refused_without_blocking(argv: tuple[str, ...], tmp_path: Path) -> None:
    """A directory or a FIFO named as an input file is refused before it is opened (reading a
    FIFO would block for ever)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, reason in ((tmp_path, "it is a directory"), (fifo, "not a regular file")):
        r = invoke(*[str(path) if a == "FILE" else a for a in argv])
        assert r.status == 2 and r.stderr.startswith(f"pyvmx: error: cannot read {path}: {reason}"), r
