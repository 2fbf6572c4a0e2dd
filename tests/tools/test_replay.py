"""Record and replay on the VT-x sandbox: a run with external interrupts raised by the host at
different exit boundaries is stored (configuration + asynchronous inputs + exits) and replays to
the identical exit sequence -- guest time is retired instructions, and an interrupt exits at the
first instruction boundary where it is pending (SDM 26.2), so the inputs fix the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyvmx.tools.replay import Recorder, RecordError, first_difference, load_record, record_from_json, replay
from pyvmx.tools.scenario import run_scenario, scenario_from_dict
from tests.tools.cli_helpers import run_cli

SCENARIO = {
    "name": "interrupts and time slices",
    "mode": "long",
    "source": "cli\nspin: inc %rax\n    jmp spin\n",
    "intercept": ["external-interrupt", "preemption-timer:40"],
    "expect": [{"reason": "PREEMPTION_TIMER"}, {"reason": "PREEMPTION_TIMER"}, {"reason": "EXTERNAL_INTERRUPT", "vector": 0x40},
               {"reason": "PREEMPTION_TIMER"}, {"reason": "EXTERNAL_INTERRUPT", "vector": 0x41}, {"reason": "EXTERNAL_INTERRUPT", "vector": 0x43},
               {"reason": "EXTERNAL_INTERRUPT", "vector": 0x42}, {"reason": "PREEMPTION_TIMER"}],
}


def _record() -> Recorder:
    sc = scenario_from_dict(SCENARIO)
    recorder = Recorder(sc.record_config())

    def host_inputs(sb, index: int) -> None:  # type: ignore[no-untyped-def]
        now = sb.cpu.read_tsc()
        if index == 2:
            recorder.raise_interrupt(sb, 0x40, now + 300)  # within the next 40*32-tick slice
        if index == 4:
            recorder.raise_interrupt(sb, 0x41)  # pending at once
            recorder.raise_interrupt(sb, 0x42, now + 10)  # pending 10 ticks later
        if index == 5:
            recorder.raise_interrupt(sb, 0x43, now - 5000)  # in the past: pending now, before 0x42

    result = run_scenario(sc, wrap=recorder.wrap, before_entry=host_inputs)
    assert result.passed, result.failures
    return recorder


def test_record_and_replay_identical(tmp_path: Path) -> None:
    recorder = _record()
    path = tmp_path / "run.record.json"
    recorder.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "pyvmx-record" and data["version"] == 1
    assert data["config"]["kind"] == "scenario" and data["config"]["scenario"]["source"] == SCENARIO["source"]
    assert [(i["vector"], i["after_exit"]) for i in data["inputs"]] == [(0x40, 2), (0x41, 4), (0x42, 4), (0x43, 5)]
    assert len(data["exits"]) == 8 and data["ended_by"] == "stop: all expectations met"
    past = data["inputs"][3]
    assert past["tsc"] >= data["exits"][4]["tsc"]  # an interrupt raised "in the past" is pending from now
    result = replay(load_record(path))
    assert result.identical, result.difference
    assert result.exits == recorder.record.exits


def test_replay_detects_a_changed_input() -> None:
    """Move one interrupt later by one preemption-timer tick (32 TSC ticks): the exit it causes
    moves, and the comparison names the first exit that differs."""
    data = _record().record.to_json()
    data["inputs"][0]["tsc"] += 32
    result = replay(record_from_json(data))
    assert not result.identical
    assert result.difference is not None and result.difference.startswith("exit #3 differs: recorded EXTERNAL_INTERRUPT")


def test_replay_detects_a_missing_input() -> None:
    data = _record().record.to_json()
    del data["inputs"][0]
    result = replay(record_from_json(data))
    assert result.difference is not None and "exit #3 differs" in result.difference and "replayed PREEMPTION_TIMER" in result.difference


def test_first_difference_on_lengths() -> None:
    exits = _record().record.exits
    assert first_difference(exits, exits) is None
    assert "the recorded run has more exits: #7" in (first_difference(exits, exits[:6]) or "")
    assert "exit #2 differs" in (first_difference(exits, exits[:1] + exits[2:]) or "")
    assert "the replayed run has more exits" in (first_difference(exits[:6], exits) or "")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"format": "nope"}, "not a pyvmx record"),
        ({"format": "pyvmx-record", "version": 2, "config": {}}, "unsupported record version"),
        ({"format": "pyvmx-record", "version": 1}, "missing \"config\""),
        ({"format": "pyvmx-record", "version": 1, "config": {}, "inputs": [{"kind": "nmi", "tsc": 1, "after_exit": 0}]}, "unknown input kind 'nmi'"),
        ({"format": "pyvmx-record", "version": 1, "config": {}, "exits": [{"reason": 1}]}, "malformed"),
    ],
)
def test_bad_records(data: object, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        record_from_json(data)


def test_hypervisor_inputs_are_refused_by_the_sandbox() -> None:
    data = _record().record.to_json()
    data["inputs"].append({"kind": "async-pf-ready", "token": 7, "tsc": 1, "after_exit": 1})
    with pytest.raises(RecordError, match="needs the hypervisor"):
        replay(record_from_json(data))
    data["config"]["kind"] = "vm"
    with pytest.raises(RecordError, match="kind 'vm'"):
        replay(record_from_json(data))


def test_cli_record_and_replay(tmp_path: Path) -> None:
    scenario = Path(__file__).resolve().parents[2] / "examples/scenarios/external_interrupt.toml"
    record = tmp_path / "r.json"
    r = run_cli("check", str(scenario), "--record", str(record))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("replay", str(record))
    assert r.returncode == 0 and r.stdout.strip() == "identical: 1 exit replayed as recorded"
    data = json.loads(record.read_text())
    data["exits"][0]["tsc"] += 1
    record.write_text(json.dumps(data))
    r = run_cli("replay", str(record))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "exit #1 differs" in r.stderr
    r = run_cli("replay", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and r.stderr.startswith("pyvmx: error: cannot read")
    r = run_cli("check", str(scenario), str(scenario), "--record", str(record))
    assert r.returncode == 2 and "exactly one file" in r.stderr
