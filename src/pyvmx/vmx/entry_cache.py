"""Re-running only the VM-entry checks whose inputs changed -- exactly.

Every VMLAUNCH/VMRESUME must fail exactly as a first entry with the same VMCS, memory and
processor state would (SDM 27.2-27.3 and the VMLAUNCH/VMRESUME pseudocode).  Running all ~120
rules in Python on every VMRESUME costs more than the rest of an exit round trip, so the
processor remembers, per VMCS, what each rule read the last time it passed
(:class:`~pyvmx.vmx.entry_checks.CheckInputs`: VMCS fields, physical memory with its values,
the processor's IA32_EFER.LMA) and, at the next entry, runs again exactly the rules one of whose
inputs changed:

- VMCS fields: the bytes of every field slot are compared with those of the last entry, so a
  field written by VMWRITE, by a VM exit or by anything writing the VMCS region is seen;
- memory: each recorded read (the VMCS-link-pointer target's header, the virtual-APIC page's
  VTPR, PAE PDPTEs loaded from guest CR3) is read again and compared;
- processor state and the CPU profile: compared with the recorded values.

A rule is a deterministic function of what it reads through its :class:`EntryContext`, and what
it reads next depends only on what it has read so far; so a rule whose recorded inputs are all
unchanged takes the same path and passes again.  Rules that did not run or did not pass last
time are always run.  The first failure in SDM order is therefore the one a full run finds.
The VM-entry MSR-load area (SDM 27.4) is processed on every entry, never cached.

Debug switch: ``PYVMX_RECHECK=1`` in the environment, or ``recheck=True``, also runs every rule
from scratch at every entry and raises :class:`EntryCacheMismatch` if the answers differ.
"""

from __future__ import annotations

import os

from pyvmx.arch.vmcs_fields import VmcsField
from pyvmx.vmx import entry_checks
from pyvmx.vmx.caps import CpuProfile
from pyvmx.vmx.entry_checks import CheckInputs, EntryCheckFailure, EntryContext, ProcessorInput
from pyvmx.vmx.entry_checks.context import physical_value
from pyvmx.vmx.memory import PhysicalMemory
from pyvmx.vmx.vmcs import SLOT_FIELDS, VmcsRegion

RECHECK_ENV = "PYVMX_RECHECK"
_CHECKS = entry_checks.ALL_CHECKS
# At most this many VMCSs are remembered (a guest hypervisor may use many); the oldest goes first.
_MAX_VMCS = 256


class EntryCacheMismatch(AssertionError):
    """The cached VM-entry check answer differs from a full run (a bug in the cache)."""


def recheck_requested() -> bool:
    """Whether ``PYVMX_RECHECK=1`` asks for a full re-check at every VM entry."""
    return os.environ.get(RECHECK_ENV, "") not in ("", "0")


def changed_fields(old: bytes, new: bytes) -> list[VmcsField]:
    """The fields whose 8-byte slots differ between two :meth:`VmcsRegion.data_bytes`."""
    diff = int.from_bytes(old, "little") ^ int.from_bytes(new, "little")
    changed = []
    while diff:
        slot = ((diff & -diff).bit_length() - 1) // 64
        changed.append(SLOT_FIELDS[slot])
        diff &= ~((1 << ((slot + 1) * 64)) - 1)
    return changed


class VmcsChecks:
    """What passed the VM-entry checks for one VMCS, rule by rule, with each rule's inputs."""

    __slots__ = ("_profile", "_snapshot", "_records", "_pending", "_readers", "_watched")

    def __init__(self) -> None:
        self._profile: CpuProfile | None = None
        self._snapshot: bytes | None = None  # the field slots at the last entry
        self._records: list[CheckInputs | None] = [None] * len(_CHECKS)  # None: must run
        self._pending: set[int] = set(range(len(_CHECKS)))
        self._readers: dict[VmcsField, set[int]] = {}  # field -> rules that read it
        self._watched: dict[int, CheckInputs] = {}  # rules that read memory or processor state

    def _forget(self, index: int) -> None:
        record = self._records[index]
        if record is None:
            return
        self._records[index] = None
        self._pending.add(index)
        for field in record.fields:
            self._readers[field].discard(index)
        self._watched.pop(index, None)

    def _remember(self, index: int, inputs: CheckInputs) -> None:
        self._records[index] = inputs
        self._pending.discard(index)
        for field in inputs.fields:
            self._readers.setdefault(field, set()).add(index)
        if inputs.memory or inputs.processor:
            self._watched[index] = inputs

    def _invalidate(self, vmcs: VmcsRegion, profile: CpuProfile, memory: PhysicalMemory, host_ia32e_mode: bool) -> None:
        if profile is not self._profile:
            for index in range(len(_CHECKS)):
                self._forget(index)
            self._profile = profile
        data = vmcs.data_bytes()
        if self._snapshot is not None and self._snapshot != data:
            for field in changed_fields(self._snapshot, data):
                for index in tuple(self._readers.get(field, ())):
                    self._forget(index)
        self._snapshot = data
        processor_state = {ProcessorInput.HOST_IA32E_MODE: host_ia32e_mode}
        for index, inputs in tuple(self._watched.items()):
            if any(physical_value(memory, address, size) != value for (address, size), value in inputs.memory) or any(
                processor_state[what] != value for what, value in inputs.processor
            ):
                self._forget(index)

    def check(
        self, vmcs: VmcsRegion, profile: CpuProfile, memory: PhysicalMemory, host_ia32e_mode: bool
    ) -> EntryCheckFailure | None:
        """The first failing rule of SDM 27.2-27.3 in order, or None: what a full run returns."""
        self._invalidate(vmcs, profile, memory, host_ia32e_mode)
        if not self._pending:
            return None
        context = EntryContext(vmcs, profile, memory, host_ia32e_mode=host_ia32e_mode)
        for index in sorted(self._pending):
            failure = _CHECKS[index](context)
            inputs = context.take_inputs()
            if failure is not None:
                return failure
            self._remember(index, inputs)
        return None


class EntryCheckCache:
    """The processor's per-VMCS memory of passed VM-entry checks (see the module docstring)."""

    def __init__(self, recheck: bool | None = None) -> None:
        self.recheck = recheck_requested() if recheck is None else recheck
        self._vmcs: dict[int, VmcsChecks] = {}

    def check(
        self, vmcs: VmcsRegion, profile: CpuProfile, memory: PhysicalMemory, *, host_ia32e_mode: bool
    ) -> EntryCheckFailure | None:
        checks = self._vmcs.pop(vmcs.address, None)
        if checks is None:
            checks = VmcsChecks()
            if len(self._vmcs) >= _MAX_VMCS:
                del self._vmcs[next(iter(self._vmcs))]
        self._vmcs[vmcs.address] = checks  # most recently used last
        failure = checks.check(vmcs, profile, memory, host_ia32e_mode)
        if self.recheck:
            full = entry_checks.check_all(vmcs, profile, memory, host_ia32e_mode=host_ia32e_mode)
            if full != failure:
                raise EntryCacheMismatch(
                    f"VMCS {vmcs.address:#x}: the entry-check cache answered {failure} but a full run gives {full}"
                )
        return failure
