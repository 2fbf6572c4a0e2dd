"""``pyvmx unittests``: kvm-unit-tests' unittests.cfg and run_tests.sh semantics (scripts/common.bash
for_each_unittest, scripts/runtime.bash run / extract_summary), with small Multiboot kernels
standing in for the .flat images."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmx.guest.assemble import assemble
from pyvmx.tools.cli import main
from pyvmx.tools.unittests import Entry, Result, UnittestsError, parse_config, run_unittests, select, unsupported

CFG = """\
# a comment
[ok]
file = ok.flat
test_args = 'alpha beta'
groups = g1

[bad]
file = bad.flat
qemu_params = -m 8

[skipper]
file = skip.flat
timeout = 2m

[nested]
file = vmx.flat
qemu_params = -cpu max,+vmx

[manual]
file = ok.flat
groups = nodefault

[i386]
file = ok.flat
arch = i386
"""

KERNEL = """
    .code32
    .long 0x1BADB002, 0x10000, -(0x1BADB002 + 0x10000)
    .long 0x100000, 0x100000, 0, 0x101000, start
start:
    mov $msg, %esi
    mov $len, %ecx
    mov $0x3f8, %dx
    rep outsb
    mov ${code}, %eax
    out %eax, $0xf4
    hlt
msg: .ascii "{text}"
    len = . - msg
"""


def _kernel(path: Path, code: int, text: str) -> None:
    path.write_bytes(assemble(KERNEL.replace("{code}", str(code)).replace("{text}", text), 0x100000).code)


@pytest.fixture()
def build(tmp_path: Path) -> Path:
    (tmp_path / "unittests.cfg").write_text(CFG)
    _kernel(tmp_path / "ok.flat", 0, "PASS: a\\nSUMMARY: 2 tests\\n")
    _kernel(tmp_path / "bad.flat", 1, "FAIL: a\\nSUMMARY: 2 tests, 1 unexpected failures\\n")
    _kernel(tmp_path / "skip.flat", 0x26, "SUMMARY: 0 tests\\n")
    return tmp_path


def test_parse_config_sections_and_keys_common_bash() -> None:
    entries = parse_config(CFG)
    assert [e.name for e in entries] == ["ok", "bad", "skipper", "nested", "manual", "i386"]
    assert entries[0].test_args == "'alpha beta'" and entries[0].groups == ("g1",)
    assert entries[2].timeout == 120.0


def test_malformed_config_line_is_a_clear_error() -> None:
    with pytest.raises(UnittestsError, match="line 1"):
        parse_config("file = x.flat\n")


def test_skip_reasons_runtime_bash_and_absent_hardware() -> None:
    assert unsupported(Entry("a", "a.flat", arch="i386"), chosen=False) == "i386 only"
    assert unsupported(Entry("m", "m.flat", groups=("nodefault",)), chosen=False) == "test marked as manual run only"
    assert unsupported(Entry("m", "m.flat", groups=("nodefault",)), chosen=True) is None
    assert "nested VMX" in (unsupported(Entry("v", "v.flat", qemu_params="-cpu max,+vmx"), chosen=False) or "")
    assert "PMU" in (unsupported(Entry("p", "pmu.flat", groups=("pmu",)), chosen=False) or "")


def test_select_by_name_and_group() -> None:
    entries = parse_config(CFG)
    assert [e.name for e, _ in select(entries, (), "g1")] == ["ok"]
    with pytest.raises(UnittestsError, match="no test nope"):
        select(entries, ("nope",), None)


def test_results_follow_qemu_exit_status_runtime_bash(build: Path, tmp_path: Path) -> None:
    """Status 1 (exit(0)) PASS, 77 SKIP, 3 FAIL; the summary is the last SUMMARY: line."""
    report = run_unittests(build, timeout=60, logs=tmp_path / "logs")
    lines = [o.line() for o in report.outcomes]
    assert lines == [
        "PASS ok (2 tests)",
        "FAIL bad (2 tests, 1 unexpected failures)",
        "SKIP skipper (0 tests)",
        "SKIP nested (nested VMX (a CPU model with +vmx) is not provided)",
        "SKIP manual (test marked as manual run only)",
        "SKIP i386 (i386 only)",
    ]
    assert report.summary() == "6 tests: 1 passed, 1 failed, 4 skipped"
    assert "SUMMARY: 2 tests" in (tmp_path / "logs" / "ok.log").read_text()
    assert report.count(Result.FAIL) == 1


def test_cli_exit_status_is_nonzero_on_failure(build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["unittests", str(build), "ok", "bad"])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "PASS ok (2 tests)" in out and "2 tests: 1 passed, 1 failed, 0 skipped" in out
    with pytest.raises(SystemExit) as exc:
        main(["unittests", str(build), "ok"])
    assert exc.value.code == 0


def test_missing_build_directory_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["unittests", str(tmp_path / "none")])
    assert exc.value.code == 2
    assert "unittests.cfg" in capsys.readouterr().err
