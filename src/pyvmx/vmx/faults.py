"""Faults raised while the machine itself walks page tables or delivers events.

These are control flow inside the VT-x machine (a page walk deep in event delivery must unwind
to the place that decides between #DF, a VM exit and a triple fault); they never leave it:
at the boundary they become values -- an exception to inject, or a VM exit.
"""

from __future__ import annotations

from dataclasses import dataclass


class TranslationFault(Exception):
    """Base for faults met while translating an address."""


@dataclass
class X86Fault(TranslationFault):
    """An x86 exception (#PF, #GP, #SS, #NP, #TS, #DF ...) with its error code, if it has one."""

    vector: int
    error_code: int | None = None
    cr2: int | None = None  # the faulting linear address, for #PF

    def __str__(self) -> str:
        code = "" if self.error_code is None else f"({self.error_code:#x})"
        return f"exception {self.vector}{code}"


class NonCanonicalAccess(X86Fault):
    """An access to a non-canonical linear address in IA-32e mode (SDM 3.3.7.1): #GP(0), or
    #SS(0) when it is a stack reference -- which only the instruction tells (SDM 6.15)."""

    def __init__(self, linear: int) -> None:
        super().__init__(13, 0)
        self.linear = linear


def page_fault(linear: int, error_code: int) -> X86Fault:
    return X86Fault(14, error_code, cr2=linear)


@dataclass
class EptViolation(TranslationFault):
    """An EPT violation (SDM 29.3.3.2): becomes VM exit 48."""

    guest_physical: int
    qualification: int
    guest_linear: int | None = None

    def __str__(self) -> str:
        return f"EPT violation at GPA {self.guest_physical:#x} (qualification {self.qualification:#x})"


@dataclass
class EptMisconfig(TranslationFault):
    """An EPT misconfiguration (SDM 29.3.3.1): becomes VM exit 49."""

    guest_physical: int
    paging_structure: bool = False  # met by an access to a guest paging-structure entry

    def __str__(self) -> str:
        return f"EPT misconfiguration at GPA {self.guest_physical:#x}"
