"""Issue 14.6: one language for intercepts.  ``pyvmx run --intercept X`` and a scenario's
``intercept = [X]`` go through the same parser (:func:`pyvmx.tools.intercepts.parse_intercept`)
into the same :class:`InterceptPlan`; each stack applies the plan with its one function
(``run.apply_intercepts`` on the KVM-style hypervisor, ``intercepts.apply_to_sandbox`` on the
bare VT-x machine).  For every name the parser accepts, the same text must make the same guest
action exit on both stacks (SDM 25.6, 26.1), and no accepted name may end a run with an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmx.tools import run as runner
from pyvmx.tools.intercepts import KNOWN_KINDS, plan_intercepts
from pyvmx.tools.scenario import run_scenario, scenario_from_dict
from tests.tools.cli_helpers import run_cli

pytestmark = pytest.mark.machine

END = "\n    mov $0xf4, %dx\n    mov $3, %al\n    out %al, %dx\n"
# intercept text -> (guest instructions, the exit reason the SDM says they cause)
BEHAVIOUR: dict[str, tuple[str, str]] = {
    "hlt": ("cli; hlt", "HLT"),
    "pause": ("pause", "PAUSE_INSTRUCTION"),
    "rdtsc": ("rdtsc", "RDTSC"),
    "io": ("mov $0x80, %dx; out %al, %dx", "IO_INSTRUCTION"),
    "io:all": ("mov $0x80, %dx; out %al, %dx", "IO_INSTRUCTION"),
    "io:0x80": ("mov $0x80, %dx; out %al, %dx", "IO_INSTRUCTION"),
    "msr": ("mov $0xc0000080, %ecx; rdmsr", "MSR_READ"),
    "msr:all": ("mov $0xc0000080, %ecx; rdmsr", "MSR_READ"),
    "msr-read:IA32_EFER": ("mov $0xc0000080, %ecx; rdmsr", "MSR_READ"),
    "msr-write:IA32_EFER": ("mov $0xc0000080, %ecx; rdmsr; wrmsr", "MSR_WRITE"),
    "cr0:TS": ("mov %cr0, %rax; xor $8, %rax; mov %rax, %cr0", "CR_ACCESS"),
    "cr0": ("mov %cr0, %rax; xor $8, %rax; mov %rax, %cr0", "CR_ACCESS"),
    "cr4:PGE": ("mov %cr4, %rax; xor $0x80, %rax; mov %rax, %cr4", "CR_ACCESS"),
    "cr4": ("mov %cr4, %rax; xor $0x80, %rax; mov %rax, %cr4", "CR_ACCESS"),
    "cr3-store": ("mov %cr3, %rax", "CR_ACCESS"),
    "cr3-load": ("mov %cr3, %rax; mov %rax, %cr3", "CR_ACCESS"),
    "cr8-store": ("mov %cr8, %rax", "CR_ACCESS"),
    "cr8-load": ("xor %eax, %eax; mov %rax, %cr8", "CR_ACCESS"),
    "mov-dr": ("mov %dr7, %rax", "DR_ACCESS"),
    "exception:UD": ("ud2", "EXCEPTION_NMI"),
    "interrupt-window": ("sti; nop; nop", "INTERRUPT_WINDOW"),
    "preemption-timer:10": ("mov $100000, %ecx; 1: dec %ecx; jnz 1b", "PREEMPTION_TIMER"),
    "mtf": ("nop", "MONITOR_TRAP_FLAG"),
    "nmi-window": ("nop", "NMI_WINDOW"),
    "monitor-trap-flag": ("nop", "MONITOR_TRAP_FLAG"),
    "descriptor-table": ("sidt -16(%rsp)", "GDTR_IDTR"),
    "dr": ("mov %dr7, %rax", "DR_ACCESS"),
    "monitor": ("mov %rsp, %rax; xor %ecx, %ecx; xor %edx, %edx; monitor", "MONITOR_INSTRUCTION"),
    "mwait": ("xor %eax, %eax; xor %ecx, %ecx; mwait", "MWAIT_INSTRUCTION"),
    "desc": ("sgdt -16(%rsp)", "GDTR_IDTR"),
    "invlpg": ("invlpg (%rsp)", "INVLPG"),
    "rdpmc": ("xor %ecx, %ecx; rdpmc", "RDPMC"),
    "wbinvd": ("wbinvd", "WBINVD"),
    "rdrand": ("rdrand %eax", "RDRAND"),
    "rdseed": ("rdseed %eax", "RDSEED"),
    "cpuid": ("xor %eax, %eax; cpuid", "CPUID"),
    "vmcall": ("vmcall", "VMCALL"),
    "control:HLT_EXITING": ("cli; hlt", "HLT"),
}


def _hypervisor_exits(tmp_path: Path, spec: str, body: str) -> tuple[str, dict[str, int]]:
    guest = tmp_path / "g.S"
    guest.write_text(".code64\n_start:\n    " + body.replace("; ", "\n    ") + END)
    result = runner.run(runner.RunOptions(guest, intercepts=(spec,), max_tsc=5_000_000))
    return result.ending, dict(result.vcpu_stats[0].exits)


def _sandbox_result(spec: str, body: str, reason: str) -> list[str]:
    sc = scenario_from_dict({
        "mode": "long", "source": body.replace("; ", "\n") + END, "intercept": [spec],
        "expect": [{"reason": reason}],
    })
    return run_scenario(sc, timeout=60).failures


@pytest.mark.parametrize("spec", sorted(BEHAVIOUR))
def test_same_text_same_exit_on_both_stacks(tmp_path: Path, spec: str) -> None:
    body, reason = BEHAVIOUR[spec]
    assert _sandbox_result(spec, body, reason) == []
    ending, exits = _hypervisor_exits(tmp_path, spec, body)
    assert ending != "error"
    assert exits.get(reason, 0) >= 1, exits


def test_every_accepted_name_has_a_behaviour_or_runs_cleanly(tmp_path: Path) -> None:
    """Names without a guest action of their own here (VMX instructions, INIT/SIPI, triple fault,
    ...) always exit (SDM 26.1.2): accepted, and a run with them ends normally on both stacks."""
    targets = {"exception": "exception:UD", "external-interrupt": "external-interrupt", "preemption-timer": "preemption-timer:10",
               "control": "control:HLT_EXITING", "msr-read": "msr-read", "msr-write": "msr-write", "cr0": "cr0", "cr4": "cr4"}
    covered = {spec.split(":")[0] for spec in BEHAVIOUR}
    for kind in KNOWN_KINDS:
        spec = targets.get(kind, kind)
        plan_intercepts([spec])  # parses
        if kind in covered:
            continue
        ending, _ = _hypervisor_exits(tmp_path, spec, "nop")
        assert ending == "debug-exit", (spec, ending)
        sc = scenario_from_dict({"mode": "long", "source": "nop" + END, "intercept": [spec, "io:0xf4"], "expect": [{"reason": "IO_INSTRUCTION"}]})
        assert run_scenario(sc, timeout=60).failures == [], spec


def test_preemption_timer_value_is_the_vmcs_field_on_both_stacks() -> None:
    """preemption-timer:V means the VMCS VMX-preemption timer value V on both stacks: V timer
    ticks of TSC >> IA32_VMX_MISC[4:0] (SDM 25.5.1), so the hypervisor's slice is V << rate."""
    from pyvmx.kvm import Kvm

    vm = Kvm(cpus=1).create_vm(memory_size=2 << 20)
    vcpu = vm.create_vcpu()
    runner.apply_intercepts(plan_intercepts(["preemption-timer:100"]), vcpu)
    assert vcpu.preemption_slice == 100 << vcpu.config.preemption_timer_rate


def test_run_help_says_the_defaults_and_that_io_port_narrows() -> None:
    r = run_cli("run", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    assert "By default KVM's policy applies: every I/O instruction" in text
    assert "io:PORT narrows the I/O class to those ports" in text


@pytest.mark.parametrize("spec", ["io:all", "msr:all", "interrupt-window", "mtf", "desc"])
def test_run_cli_accepts_the_names_the_readme_uses(tmp_path: Path, spec: str) -> None:
    guest = tmp_path / "g.S"
    guest.write_text(".code64\n_start:\n    sti\n    nop\n    sgdt -16(%rsp)" + END)
    r = run_cli("run", str(guest), "--intercept", spec)
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "pyvmx: the guest wrote 0x3 to the debug-exit port (exit status 3)"
