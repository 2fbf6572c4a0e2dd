"""Scenario, record and guest-source files are untrusted (people send them to each other): a
file may neither write nor read host files it was not given (issue 11.1, 11.2), and every way
one can be wrong ends in one line naming the file (11.6, 14.9, 14.10, 14.12, 14.13).

The attacks: a record whose ``image_name`` is an absolute or ``../`` path (replay wrote the
image there); a scenario ``source_file`` outside the scenario's directory; ``.incbin`` /
``.include`` of host files -- by absolute path, ``..``, a symbolic link, or a name built by a
macro (GNU as reads any file these directives name: binutils gas/read.c s_incbin, s_include).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from tests.tools.cli_helpers import run_cli

pytestmark = pytest.mark.machine

SECRET = "host-secret-3d1f"  # the contents of a host file no guest may read

ENDS_ON_DEBUG_EXIT = """\
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


def _one_error_line(r: object, *, status: int = 2) -> str:
    stderr = getattr(r, "stderr")
    assert getattr(r, "returncode") == status and "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmx: error: "), stderr
    return str(lines[0])


@pytest.fixture()
def secret_file(tmp_path: Path) -> Path:
    """A host file outside every scenario's directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "secret.txt"
    path.write_text(SECRET)
    return path


# --- 11.1: replay writes nothing where a record says -------------------------------------------------
@pytest.fixture()
def run_record(tmp_path: Path) -> dict[str, object]:
    guest = tmp_path / "guest.S"
    guest.write_text(ENDS_ON_DEBUG_EXIT)
    rec = tmp_path / "run.rec"
    r = run_cli("run", str(guest), "--record", str(rec), "--max-tsc", "100000")
    assert r.returncode == 0, r.stderr
    data: dict[str, object] = json.loads(rec.read_text())
    return data


def test_replay_never_uses_the_records_image_name_as_a_path(tmp_path: Path, run_record: dict[str, object]) -> None:
    """An absolute or ``../`` image_name used to be joined onto replay's temporary directory and
    written with the record's bytes; the name is now only shown, and the replay is identical."""
    absolute = tmp_path / "written-by-absolute.S"
    relative = tmp_path / "written-by-dotdot.S"
    for name in (str(absolute), "../" * 32 + str(relative).lstrip("/")):
        data = json.loads(json.dumps(run_record))
        data["config"]["image_name"] = name
        rec = tmp_path / "evil.rec"
        rec.write_text(json.dumps(data))
        r = run_cli("replay", str(rec))
        assert r.returncode == 0 and r.stdout.strip() == "identical: 3 exits replayed as recorded", r.stderr
    assert not absolute.exists() and not relative.exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["config"].update(memory_mib="16"), "memory_mib must be an integer, not a string"),
        (lambda c: c["config"].update(memory_mib=1 << 40), "memory_mib must be in 1..0x400"),
        (lambda c: c["config"].update(vcpus=True), "vcpus must be an integer, not a boolean"),
        (lambda c: c["config"].update(image="not base64!"), "image is not base64"),
        (lambda c: c["config"].update(image_name=["x"]), "image_name must be a string"),
        (lambda c: c["config"].update(intercepts="hlt"), "intercepts and swap_out must be lists"),
        (lambda c: c["config"].pop("mode"), 'missing "mode"'),
        (lambda c: c["exits"][0].update(reason=-1), "exit #1: reason must be in 0..0xffffffff, not -1"),
        (lambda c: c["exits"][0].update(rip="0x10000"), "exit #1: rip must be an integer, not a string"),
        (lambda c: c.update(inputs=[{"kind": "interrupt", "tsc": 1, "after_exit": 0, "vector": 300}]), "input #1: vector must be in 0..0xff"),
        (lambda c: c.update(exits={}), '"exits" must be a list'),
    ],
)
def test_every_record_field_is_checked_before_use(tmp_path: Path, run_record: dict[str, object], edit: object, message: str) -> None:
    data = json.loads(json.dumps(run_record))
    edit(data)  # type: ignore[operator]
    rec = tmp_path / "bad.rec"
    rec.write_text(json.dumps(data))
    line = _one_error_line(run_cli("replay", str(rec)))
    assert line.startswith(f"pyvmx: error: {rec}: ") and message in line, line


def test_replayed_source_reads_no_host_file(tmp_path: Path, run_record: dict[str, object], secret_file: Path) -> None:
    """A record's guest source is assembled with no file access at all."""
    data = json.loads(json.dumps(run_record))
    source = ENDS_ON_DEBUG_EXIT + f'.incbin "{secret_file}"\n'
    data["config"]["image"] = base64.b64encode(source.encode()).decode()
    rec = tmp_path / "incbin.rec"
    rec.write_text(json.dumps(data))
    line = _one_error_line(run_cli("replay", str(rec)))
    assert "only a relative name inside the source's directory is allowed" in line and SECRET not in line


# --- 11.2: no host file read by a scenario or a guest source ----------------------------------------
def _scenario(directory: Path, body: str, name: str = "s.toml") -> Path:
    path = directory / name
    path.write_text('intercept = ["io:0x3f8", "hlt"]\n' + body)
    return path


PRINT_BLOB = """source = '''
    mov $0x3f8, %dx
    mov blob(%rip), %al
    out %al, %dx
    hlt
blob: .incbin "{name}"
'''
[[expect]]
reason = "IO_INSTRUCTION"
[[expect]]
reason = "HLT"
"""


def test_incbin_inside_the_scenarios_directory_works(tmp_path: Path) -> None:
    """The permitted case: a file of the scenario's own directory, copied for the assembler."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "blob.bin").write_bytes(b"Z")
    path = _scenario(tmp_path, 'output = "Z"\n' + PRINT_BLOB.format(name="data/blob.bin"))
    r = run_cli("check", str(path))
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "PASS  s.toml: s (2 exits)", r.stdout + r.stderr


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "symlinked-dir"])
def test_incbin_of_a_host_file_is_refused(tmp_path: Path, secret_file: Path, how: str) -> None:
    scen = tmp_path / "scen"
    scen.mkdir()
    name = {"absolute": str(secret_file), "dotdot": "../outside/secret.txt", "symlink": "link.txt", "symlinked-dir": "d/secret.txt"}[how]
    (scen / "link.txt").symlink_to(secret_file)
    (scen / "d").symlink_to(secret_file.parent)
    path = _scenario(scen, 'output = "h"\n' + PRINT_BLOB.format(name=name))
    r = run_cli("check", str(path))
    assert r.returncode == 1 and SECRET not in r.stdout + r.stderr
    why = (f"leads outside {scen} (through a symbolic link)" if how.startswith("symlink")
           else "only a relative name inside the source's directory is allowed (letters, digits, _ . + - /, no '..')")
    assert r.stdout.splitlines()[1] == f"      cannot set up the guest: {path}:8: .incbin {name!r}: {why}", r.stdout


@pytest.mark.parametrize(
    "source",
    [
        # A directive name built by a macro: no ".incbin" in the text to find.
        '.macro m d\n .\\\\d "{secret}"\n.endm\n m incbin\nhlt',
        '.macro n p\n .inc\\\\()\\\\p "{secret}"\n.endm\n n bin\nhlt',
        # .include of a host file would also quote it in the assembler's errors.
        '.macro m d\n .\\\\d "{secret}"\n.endm\n m include\nhlt',
    ],
)
def test_a_host_file_named_through_a_macro_is_refused(tmp_path: Path, secret_file: Path, source: str) -> None:
    """GNU as --MD lists every file the assembler opened, whatever built the name; any file but
    the source and its permitted copies fails the build, and errors located in such a file are
    not shown (they would quote it)."""
    path = tmp_path / "s.toml"
    path.write_text(f'output = "x"\nsource = """\n{source.format(secret=secret_file)}\n"""\n')
    r = run_cli("check", str(path))
    assert r.returncode == 1 and SECRET not in r.stdout + r.stderr, r.stdout
    assert r.stdout.splitlines()[1].startswith(f"      cannot set up the guest: {path}: ")
    assert "may not read" in r.stdout.splitlines()[1]


def test_source_file_must_stay_in_the_scenarios_directory(tmp_path: Path, secret_file: Path) -> None:
    scen = tmp_path / "scen"
    scen.mkdir()
    guest = tmp_path / "outside" / "guest.S"
    guest.write_text("nop\nstop: hlt\n")
    for name in ("../outside/guest.S", str(guest), "../../../../../../../../etc/passwd"):
        path = scen / "s.toml"
        path.write_text(f'source_file = "{name}"\nintercept = ["hlt"]\n[[expect]]\nreason = "HLT"\n')
        line = _one_error_line(run_cli("check", str(path)))
        assert line == (f"pyvmx: error: {path}: source_file {name!r} is outside the scenario's directory "
                        "(pass --allow-outside-sources to allow it)")
    path.write_text('source_file = "../outside/guest.S"\nintercept = ["hlt"]\n[[expect]]\nreason = "HLT"\nrip = "stop"\n')
    r = run_cli("check", "--allow-outside-sources", str(path))
    assert r.returncode == 0 and r.stdout.startswith("PASS  s.toml"), r.stdout + r.stderr


def test_a_scenario_inside_a_symlinked_directory_is_inside(tmp_path: Path) -> None:
    """``source_file`` is compared after resolving links on both sides."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "guest.S").write_text("stop: hlt\n")
    (real / "s.toml").write_text('source_file = "guest.S"\nintercept = ["hlt"]\n[[expect]]\nreason = "HLT"\nrip = "stop"\n')
    (tmp_path / "alias").symlink_to(real)
    r = run_cli("check", str(tmp_path / "alias" / "s.toml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_run_source_incbin_outside_its_directory_is_refused(tmp_path: Path, secret_file: Path) -> None:
    guest = tmp_path / "g.S"
    guest.write_text(ENDS_ON_DEBUG_EXIT + f'.incbin "{secret_file}"\n')
    line = _one_error_line(run_cli("run", str(guest)))
    assert line == (f"pyvmx: error: {guest}:10: .incbin {str(secret_file)!r}: only a relative name inside the source's "
                    "directory is allowed (letters, digits, _ . + - /, no '..')")


# --- 14.10: assembler errors name the user's file and line ------------------------------------------
BAD_INLINE = """# a scenario
mode = "long"
intercept = ["hlt"]
source = '''
    nop
    frobnicate %rax
    hlt
'''
[[expect]]
reason = "HLT"
"""


def test_check_names_the_scenario_file_and_line_of_an_assembler_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_INLINE)
    r = run_cli("check", str(path))
    assert r.returncode == 1
    assert r.stdout.splitlines()[1] == f"      cannot set up the guest: {path}:6: Error: no such instruction: `frobnicate %rax'"


def test_check_names_the_source_file_and_line_of_an_assembler_error(tmp_path: Path) -> None:
    (tmp_path / "guest.S").write_text("nop\nnop\nbogus\nhlt\n")
    path = tmp_path / "s.toml"
    path.write_text('source_file = "guest.S"\nintercept = ["hlt"]\n[[expect]]\nreason = "HLT"\n')
    r = run_cli("check", str(path))
    assert r.stdout.splitlines()[1] == f"      cannot set up the guest: {tmp_path / 'guest.S'}:3: Error: no such instruction: `bogus'"


def test_run_names_the_file_and_line_and_counts_the_other_errors(tmp_path: Path) -> None:
    guest = tmp_path / "g.S"
    guest.write_text("nop\nfoo\nbar\n")
    line = _one_error_line(run_cli("run", str(guest)))
    assert line == f"pyvmx: error: {guest}:2: Error: no such instruction: `foo' (and 1 more)"


def test_run_names_the_file_of_a_link_error_without_ld_warnings(tmp_path: Path) -> None:
    guest = tmp_path / "g.S"
    guest.write_text("jmp nowhere\n")
    line = _one_error_line(run_cli("run", str(guest)))
    assert line == f"pyvmx: error: {guest}: linking failed: {guest}:(.text+0x1): undefined reference to `nowhere'"


def test_gdbserver_names_the_file_and_line_of_an_assembler_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_INLINE)
    line = _one_error_line(run_cli("gdbserver", str(path), "--port", "0"))
    assert line == f"pyvmx: error: cannot set up the guest: {path}:6: Error: no such instruction: `frobnicate %rax'"


def test_gdbserver_given_a_guest_source_points_to_run_gdb(tmp_path: Path) -> None:
    guest = tmp_path / "guest.S"
    guest.write_text(ENDS_ON_DEBUG_EXIT)
    line = _one_error_line(run_cli("gdbserver", str(guest)))
    assert line == f"pyvmx: error: {guest}: gdbserver serves a scenario file (.toml); to debug a guest image run: pyvmx run {guest} --gdb 1234"


# --- 14.12: no wrapping in a pipe; one bad scenario among several ------------------------------------
def test_output_to_a_pipe_is_not_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps at the terminal width; in a pipe or a file a title stays on one line (the
    caps table's title is 87 characters, it was cut at 80)."""
    monkeypatch.setenv("COLUMNS", "80")
    r = run_cli("caps")
    assert r.returncode == 0
    lines = [line.strip() for line in r.stdout.splitlines()]
    assert "Pin-based VM-execution controls  (IA32_VMX_TRUE_PINBASED_CTLS = 0x0000007f00000016)" in lines


def test_one_bad_scenario_among_several_is_reported_and_the_others_run(tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples" / "scenarios"
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"mode = \xff\n")
    r = run_cli("check", str(examples / "hlt.toml"), str(bad), str(examples / "cpuid.toml"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"pyvmx: error: {bad}: not a scenario (TOML): byte 0xff at offset 7 is not UTF-8 text"
    assert r.stdout.splitlines() == [
        "PASS  hlt.toml: Intercept guest HLT (1 exit)",
        "PASS  cpuid.toml: CPUID always exits (2 exits)",
        "2 passed, 0 failed, 1 not readable",
    ]


# --- 14.13: trace show with nothing matching ---------------------------------------------------------
def test_trace_show_with_no_match_prints_an_empty_table(tmp_path: Path) -> None:
    guest = tmp_path / "g.S"
    guest.write_text(ENDS_ON_DEBUG_EXIT)
    trace = tmp_path / "t.jsonl"
    assert run_cli("run", str(guest), "--trace", str(trace)).returncode == 0
    r = run_cli("trace", "show", str(trace), "--reason", "CPUID")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.split() == ["TSC", "VM", "VCPU", "EVENT", "REASON", "RIP", "INSTRUCTION", "QUALIFICATION", "DETAILS", "OUTCOME"]


def test_run_refuses_a_fifo_as_its_image_without_blocking(tmp_path: Path) -> None:
    """Reading a FIFO would wait for a writer for ever (and /dev/zero would never end)."""
    fifo = tmp_path / "image.bin"
    os.mkfifo(fifo)
    line = _one_error_line(run_cli("run", str(fifo), timeout=60))
    assert line == f"pyvmx: error: cannot read {fifo}: not a regular file"


def test_a_trace_cannot_smuggle_rich_markup(tmp_path: Path) -> None:
    """An exit reason from a trace file was printed as rich markup: '[/x]' raised MarkupError
    out of ``trace stats``.  A reason must be a name as reason_name() writes it; and the stats
    table prints its event names as plain text whatever they are."""
    from rich.console import Console

    from pyvmx.tools.stats import ExitStats

    guest = tmp_path / "g.S"
    guest.write_text(ENDS_ON_DEBUG_EXIT)
    trace = tmp_path / "t.jsonl"
    assert run_cli("run", str(guest), "--trace", str(trace)).returncode == 0
    lines = trace.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    n = next(i for i, e in enumerate(events) if e.get("kind") == "exit")
    events[n]["reason"] = "[/x]"
    trace.write_text("".join(json.dumps(e) + "\n" for e in events))
    line = _one_error_line(run_cli("trace", "stats", str(trace)))
    assert line == f"pyvmx: error: {trace}:{n + 1}: \"reason\" '[/x]' is not an exit-reason name"
    stats = ExitStats("guest")
    stats.add("[/x]", 5)
    console = Console(record=True, width=200, color_system=None)
    console.print(stats.table())
    assert "[/x]" in console.export_text()


def test_a_scenario_records_source_reads_no_host_file(tmp_path: Path, secret_file: Path) -> None:
    """A ``check --record`` record inlines its scenario: replaying it may neither name a
    source_file (it has no directory of its own) nor .incbin anything."""
    scen = tmp_path / "s.toml"
    scen.write_text('intercept = ["hlt"]\nsource = "nop\\nhlt\\n"\n[[expect]]\nreason = "HLT"\n')
    rec = tmp_path / "s.rec"
    assert run_cli("check", str(scen), "--record", str(rec)).returncode == 0
    data = json.loads(rec.read_text())
    data["config"]["scenario"]["source"] = f'.incbin "{secret_file}"\nhlt\n'
    rec.write_text(json.dumps(data))
    line = _one_error_line(run_cli("replay", str(rec)))
    assert line == (f"pyvmx: error: the record's scenario: cannot set up the guest: the scenario's source:1: .incbin "
                    f"{str(secret_file)!r}: this guest source may not read host files")
    del data["config"]["scenario"]["source"]
    data["config"]["scenario"]["source_file"] = str(secret_file)
    rec.write_text(json.dumps(data))
    line = _one_error_line(run_cli("replay", str(rec)))
    assert line == ("pyvmx: error: the record's scenario is not valid: scenario: 'source_file' is not allowed here: "
                    "the source must be inlined as 'source'")
