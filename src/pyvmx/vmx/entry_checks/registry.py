"""How a VM-entry rule is named and registered.

A rule is a function of the entry being checked (:class:`EntryContext`) that returns None when it
holds, or the rule in words when it is broken.  The decorator that registers it (``@control``,
``@host``, ``@guest``) wraps it into an :class:`EntryCheck` carrying its area and SDM section,
which turns a broken rule into an :class:`EntryCheckFailure` naming both -- as Linux wraps each
nested VM-entry check in ``CC()`` so the failing one is named.  Rules register in source order,
which is SDM order (a test checks it).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vm_instruction_errors import VmInstructionError

if TYPE_CHECKING:
    from pyvmx.vmx.entry_checks.context import EntryContext


class CheckArea(enum.Enum):
    CONTROLS = "VMX controls"  # VMfailValid(7)
    HOST_STATE = "host-state area"  # VMfailValid(8)
    GUEST_STATE = "guest-state area"  # VM-entry failure, exit reason 33
    MSR_LOADING = "VM-entry MSR-load area"  # VM-entry failure, exit reason 34


@dataclass(frozen=True)
class EntryCheckFailure:
    """The first VM-entry check that failed."""

    area: CheckArea
    rule: str  # e.g. "SDM 27.2.1.1: reserved bits in the pin-based VM-execution controls"
    qualification: int = 0  # exit qualification for guest-state/MSR-load failures
    check: str = ""  # the rule's name: "pin_based_reserved_bits", or "msr_load_entry" for 27.4

    @property
    def error(self) -> VmInstructionError:
        if self.area is CheckArea.HOST_STATE:
            return VmInstructionError.ENTRY_INVALID_HOST_STATE_FIELD
        return VmInstructionError.ENTRY_INVALID_CONTROL_FIELD

    @property
    def exit_reason(self) -> ExitReason:
        if self.area is CheckArea.MSR_LOADING:
            return ExitReason.MSR_LOAD_FAIL
        return ExitReason.INVALID_STATE

    def __str__(self) -> str:
        return f"{self.area.value}: {self.rule}"


Rule = Callable[["EntryContext"], "str | None"]


@dataclass(frozen=True)
class EntryCheck:
    """One registered VM-entry rule: where the SDM states it and what a failure reports."""

    area: CheckArea
    section: str  # "27.2.1.1"
    rule: Rule
    qualification: int = 0

    @property
    def name(self) -> str:
        return self.rule.__name__

    def __call__(self, entry: EntryContext) -> EntryCheckFailure | None:
        broken = self.rule(entry)
        if broken is None:
            return None
        return EntryCheckFailure(self.area, f"SDM {self.section}: {broken}", self.qualification, self.name)


CONTROL_CHECKS: list[EntryCheck] = []  # SDM 27.2.1, in SDM order
HOST_STATE_CHECKS: list[EntryCheck] = []  # SDM 27.2.2-27.2.4
GUEST_STATE_CHECKS: list[EntryCheck] = []  # SDM 27.3.1


@dataclass(frozen=True)
class _Registrar:
    """``@guest("27.3.1.2")`` registers the rule below it, in source (= SDM) order."""

    checks: list[EntryCheck]
    area: CheckArea

    def __call__(self, section: str, qualification: int = 0) -> Callable[[Rule], Rule]:
        def register(rule: Rule) -> Rule:
            self.checks.append(EntryCheck(self.area, section, rule, qualification))
            return rule

        return register


control = _Registrar(CONTROL_CHECKS, CheckArea.CONTROLS)
host = _Registrar(HOST_STATE_CHECKS, CheckArea.HOST_STATE)
guest = _Registrar(GUEST_STATE_CHECKS, CheckArea.GUEST_STATE)


def first_failure(checks: list[EntryCheck], entry: EntryContext) -> EntryCheckFailure | None:
    for check in checks:
        failure = check(entry)
        if failure is not None:
            return failure
    return None
