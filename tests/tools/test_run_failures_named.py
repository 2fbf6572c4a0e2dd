"""Issue 14.11: how a run failed, in words a person can act on.  A triple fault names the chain
of events whose delivery ended in the shutdown (SDM 6.15, Table 6-5: a #UD with no IDT raises #GP,
whose delivery raises #GP again, which makes #DF, whose delivery faults: shutdown), in ``run``
and in ``check``; a failed VM entry names the SDM rule exactly as the Python API's
``Processor.last_entry_failure`` does, in ``run`` and in ``check`` (with the exit qualification
for a failure after the guest-state checks, SDM 27.8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools.cli_helpers import run_cli

pytestmark = pytest.mark.machine

UD_WITHOUT_IDT = ".code64\n_start:\n    ud2\n"


def test_run_names_the_triple_fault_chain(tmp_path: Path) -> None:
    guest = tmp_path / "tf.S"
    guest.write_text(UD_WITHOUT_IDT)
    r = run_cli("run", str(guest))
    assert r.returncode == 129, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "pyvmx: shutdown (triple fault: #UD -> #GP -> #DF -> shutdown) at 0x10000 (exit status 129)"


def test_check_names_the_triple_fault_chain(tmp_path: Path) -> None:
    scenario = tmp_path / "tf.toml"
    scenario.write_text('source = "ud2\\n"\n[[expect]]\nreason = "HLT"\n')
    r = run_cli("check", str(scenario))
    assert r.returncode == 1
    assert "      exit #1: expectation 1 (HLT): got TRIPLE_FAULT at 0x10000 (#UD -> #GP -> #DF -> shutdown)" in r.stdout.splitlines()


def test_run_failed_entry_names_the_rule_the_python_api_names(tmp_path: Path) -> None:
    """An entry control this processor does not allow (load IA32_RTIT_CTL): VMfailValid 7 with
    the rule of SDM 27.2.1.3, the same text ``last_entry_failure`` gives through the API."""
    from pyvmx.kvm import Kvm, load_flat, setup_long_mode
    from pyvmx.kvm.exits import FailEntry
    from pyvmx.tools.intercepts import plan_intercepts
    from pyvmx.tools.run import apply_intercepts

    vm = Kvm(cpus=1).create_vm(memory_size=2 << 20)
    vcpu = vm.create_vcpu()
    load_flat(vm, b"\xf4", 0x10000)
    setup_long_mode(vcpu, 0x10000)
    apply_intercepts(plan_intercepts(["control:LOAD_IA32_RTIT_CTL"]), vcpu)
    assert isinstance(vcpu.run(time_limit=100_000), FailEntry)
    api = str(vcpu.pcpu.processor.last_entry_failure)
    assert "SDM 27.2.1.3" in api

    guest = tmp_path / "g.S"
    guest.write_text(".code64\n_start:\n    hlt\n")
    r = run_cli("run", str(guest), "--intercept", "control:LOAD_IA32_RTIT_CTL")
    assert r.returncode == 132
    assert r.stderr.strip().splitlines()[-1] == f"pyvmx: VM entry failed: VMfailValid(7: ENTRY_INVALID_CONTROL_FIELD): {api} (exit status 132)"


def test_check_failed_entry_names_the_rule_and_the_qualification(tmp_path: Path) -> None:
    """GUEST_RFLAGS bit 1 clear fails the guest-state checks (SDM 27.3.1.4): exit reason 33 with
    bit 31, qualification 0 (SDM 27.8); "virtual NMIs" without "NMI exiting" fails the controls
    checks (SDM 27.2.1.1): VMfailValid 7."""
    state = tmp_path / "state.toml"
    state.write_text('source = "hlt\\n"\nintercept = ["hlt"]\n[vmcs]\nGUEST_RFLAGS = 0\n[[expect]]\nreason = "HLT"\n')
    controls = tmp_path / "controls.toml"
    controls.write_text('source = "hlt\\n"\nintercept = ["control:VIRTUAL_NMIS"]\n[[expect]]\nreason = "HLT"\n')
    r = run_cli("check", str(state), str(controls))
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert ("      exit #1: expectation 1 (HLT): got INVALID_STATE (VM-entry failure) at 0x10000 (VM entry failed: INVALID_STATE "
            "(VM-entry failure), exit qualification 0x0: guest-state area: SDM 27.3.1.4: guest RFLAGS reserved bit 1 must be 1)") in lines
    assert ('      expectation 1 (HLT) not met: the run ended (VM entry failed: VMfailValid(7: ENTRY_INVALID_CONTROL_FIELD): VMX controls: '
            'SDM 27.2.1.1: "virtual NMIs" must be 0 when "NMI exiting" is 0) after 0 exit(s)') in lines
