"""Guest registers that neither the VMCS nor the processor's public interface holds: CR2, XCR0
and the MSRs the CPU keeps in its register file (KERNEL_GS_BASE, STAR, LSTAR, ...).

On hardware KVM reads and writes them directly while the guest's context is loaded (CR2 in
vmx_vcpu_run(), the "user return" MSRs with rdmsrl/wrmsrl). The VT-x model's
:class:`~pyvmx.vmx.processor.GuestExecutor` protocol has no such operations yet, so this module
reaches into the CPU engine when one is attached -- the only place in the hypervisor that does.
Without an engine (tests of handlers with made-up exits) the values live in a per-processor
dictionary. Writes of MSRs go through the VM-entry MSR-load area instead (SDM 27.4), which is
architectural; only reads and CR2 need this module.
"""

from __future__ import annotations

from typing import Any

from pyvmx.vmx.processor import Processor

_FALLBACK: dict[tuple[int, str], int] = {}


def _core(processor: Processor) -> Any | None:
    executor = processor.executor
    return getattr(executor, "cpu", None) if executor is not None else None


def read_cr2(processor: Processor) -> int:
    core = _core(processor)
    if core is None:
        return _FALLBACK.get((id(processor), "cr2"), 0)
    from pyvmx.engine.unicorn_cpu import REG_CR2

    return int(core.read(REG_CR2))


def write_cr2(processor: Processor, value: int) -> None:
    """CR2 before injecting a #PF (the processor does not load it on VM entry: SDM 26.2 says a
    #PF that exits leaves CR2 alone, so the hypervisor sets it when it reflects the fault)."""
    core = _core(processor)
    if core is None:
        _FALLBACK[(id(processor), "cr2")] = value
        return
    from pyvmx.engine.unicorn_cpu import REG_CR2

    core.write(REG_CR2, value)


def read_xcr0(processor: Processor) -> int:
    core = _core(processor)
    if core is None:
        return _FALLBACK.get((id(processor), "xcr0"), 1)
    return int(core.read_xcr0())


def write_xcr0(processor: Processor, value: int) -> None:
    """The guest's XCR0 into the CPU before VM entry (kvm_load_guest_xsave_state(): the VMCS does
    not hold XCR0, XSETBV always exits, XGETBV does not)."""
    core = _core(processor)
    if core is None:
        _FALLBACK[(id(processor), "xcr0")] = value
        return
    core.write_xcr0(value)


def read_msr(processor: Processor, index: int) -> int | None:
    """The value of an MSR in the CPU's register file, or None if it cannot be read."""
    core = _core(processor)
    if core is None:
        return _FALLBACK.get((id(processor), f"msr{index:#x}"))
    try:
        return int(core.read_msr(index))
    except Exception:  # an MSR the engine does not model
        return None


def note_msr(processor: Processor, index: int, value: int) -> None:
    """Record an MSR value loaded through the MSR-load area (engine-less processors only)."""
    if _core(processor) is None:
        _FALLBACK[(id(processor), f"msr{index:#x}")] = value
