"""The KVM-style hypervisor: VM, vCPU, memslots, MMU, exit handlers, devices.

    from pyvmx.kvm import Kvm, load_flat, setup_long_mode

    kvm = Kvm()                                   # VMXON on every physical CPU
    vm = kvm.create_vm(memory_size=16 << 20)      # RAM at 0, PIC + PIT + COM1 + debug-exit
    vcpu = vm.create_vcpu()
    load_flat(vm, code, 0x10000)
    setup_long_mode(vcpu, 0x10000)                # GDT + identity page tables in guest memory
    vcpu.intercept_io(0x3F8, only=True)           # seed 002: only the serial port exits
    exit = vcpu.run(time_limit=10_000_000)        # one value: IoExit, HltExit, DebugExit, ...

The names below are imported on first use (PEP 562), so that importing a submodule such as
``pyvmx.kvm.devices`` does not pull in the whole hypervisor.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Kvm": "pyvmx.kvm.kvm",
    "KvmError": "pyvmx.kvm.kvm",
    "PhysicalCpu": "pyvmx.kvm.kvm",
    "Vm": "pyvmx.kvm.vm",
    "Vcpu": "pyvmx.kvm.vcpu",
    "MpState": "pyvmx.kvm.vcpu",
    "VcpuStateError": "pyvmx.kvm.vcpu",
    "Scheduler": "pyvmx.kvm.scheduler",
    "ScheduleReport": "pyvmx.kvm.scheduler",
    "Regs": "pyvmx.kvm.regs",
    "Sregs": "pyvmx.kvm.regs",
    "Segment": "pyvmx.kvm.regs",
    "DTable": "pyvmx.kvm.regs",
    "CpuidEntry": "pyvmx.kvm.cpuid",
    "CpuidError": "pyvmx.kvm.cpuid",
    "CpuidTable": "pyvmx.kvm.cpuid",
    "default_cpuid": "pyvmx.kvm.cpuid",
    "load_flat": "pyvmx.kvm.loader",
    "load_elf": "pyvmx.kvm.loader",
    "ElfLoadError": "pyvmx.kvm.loader",
    "ImageLoadError": "pyvmx.kvm.loader",
    "setup_real_mode": "pyvmx.kvm.boot",
    "setup_protected_mode": "pyvmx.kvm.boot",
    "setup_long_mode": "pyvmx.kvm.boot",
    "VcpuExit": "pyvmx.kvm.exits",
    "IoExit": "pyvmx.kvm.exits",
    "IoDirection": "pyvmx.kvm.exits",
    "MmioExit": "pyvmx.kvm.exits",
    "HltExit": "pyvmx.kvm.exits",
    "ShutdownExit": "pyvmx.kvm.exits",
    "InternalError": "pyvmx.kvm.exits",
    "DebugExit": "pyvmx.kvm.exits",
    "GuestDebugExit": "pyvmx.kvm.exits",
    "PageTrackExit": "pyvmx.kvm.exits",
    "FailEntry": "pyvmx.kvm.exits",
    "TimeLimitExit": "pyvmx.kvm.exits",
    "ExitStats": "pyvmx.kvm.exits",
    "TraceRecord": "pyvmx.kvm.exits",
    "EXIT_HANDLERS": "pyvmx.kvm.exit_handlers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyvmx.kvm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
