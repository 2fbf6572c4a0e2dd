"""The VT-x machine: VMCS, VMX instructions, VM-entry checks, exit decisions, EPT.

This layer knows the SDM and nothing of Unicorn or KVM; the CPU engine plugs in below
VMLAUNCH/VMRESUME through :class:`pyvmx.vmx.processor.GuestExecutor`.
"""

from pyvmx.arch.vmcs_fields import VmcsField
from pyvmx.vmx.caps import CpuProfile, UnsupportedControlsError, adjust_vmx_controls
from pyvmx.vmx.memory import PhysicalMemory
from pyvmx.vmx.outcomes import VmExitInfo, VmxResult, VmxStatus
from pyvmx.vmx.processor import Processor

__all__ = [
    "CpuProfile",
    "PhysicalMemory",
    "Processor",
    "UnsupportedControlsError",
    "VmExitInfo",
    "VmcsField",
    "VmxResult",
    "VmxStatus",
    "adjust_vmx_controls",
]
