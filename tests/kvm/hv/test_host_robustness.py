"""Guest behaviour and out-of-band writes that used to crash or hang the host process (issue 11):
each ends architecturally or as a typed exit value, never as a Python exception out of
``vcpu.run()`` and never as a run that does not end. Every run here is bounded in guest time."""

from __future__ import annotations

import pytest

from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.vmcs_fields import VmcsWidth
from pyvmx.kvm.exits import HltExit
from pyvmx.kvm.kvm import Kvm
from pyvmx.vmx.vmcs import FIELD_SLOTS

from tests.kvm.hv.guests import boot, source_image

_NARROW_GUEST_FIELDS = [
    f for f in F if f.width in (VmcsWidth.BITS16, VmcsWidth.BITS32) and f.name.startswith("GUEST_")
]


@pytest.mark.parametrize("field", _NARROW_GUEST_FIELDS, ids=lambda f: f.name)
def test_vmcs_memory_written_behind_the_processor_reads_masked_to_the_field_width(field: F) -> None:
    """SDM 25.11.1: software must not touch the VMCS region except with VMREAD/VMWRITE, and the
    data format is the processor's. A 16/32-bit field whose slot's high bytes were overwritten
    reads as its width holds, so the guest runs exactly as before (to its HLT) instead of the
    VM entry raising struct.error."""
    kvm = Kvm()
    vm = kvm.create_vm(memory_size=1 << 20)
    vcpu = boot(vm, source_image("hlt\n"))
    before = vcpu.vmcs_read(field)
    offset, _ = FIELD_SLOTS[int(field)]
    address = vcpu.loaded_vmcs.address + offset
    width = 2 if field.width is VmcsWidth.BITS16 else 4
    kvm.memory.write(address + width, b"\xa5" * (8 - width))
    assert vcpu.vmcs_read(field) == before
    assert isinstance(vcpu.run(time_limit=10_000), HltExit)
