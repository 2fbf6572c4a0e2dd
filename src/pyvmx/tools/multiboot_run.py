"""``pyvmx run`` of a Multiboot kernel, as ``qemu-system-x86_64 -kernel IMAGE -append ARGS`` runs
it: the image is loaded by :mod:`pyvmx.kvm.multiboot`, the PC gains the devices QEMU's firmware
path provides (fw_cfg, CMOS/RTC, port 0x92), and the debug-exit port has QEMU's isa-debug-exit
meaning: the process exit status is ``(code << 1) | 1`` (hw/misc/debugexit.c), so 1 is a
kvm-unit-tests PASS, 3 a FAIL and 77 a SKIP.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pyvmx.kvm.devices.lapic import APIC_DEFAULT_BASE, APIC_PAGE, ApicMsiPage
from pyvmx.kvm.multiboot import MultibootBoot, MultibootError, find_header, load_multiboot, setup_multiboot_vcpu
from pyvmx.tools.inputs import InputError, read_bytes

if TYPE_CHECKING:
    from pyvmx.kvm.vcpu import Vcpu
    from pyvmx.kvm.vm import Vm

MAX_IMAGE = 64 << 20


class MultibootRunError(ValueError):
    """A Multiboot image that cannot be booted (one line for the CLI)."""


def boot_multiboot(vm: Vm, image: Path, append: str, vcpus: int, ram_size: int) -> MultibootBoot | None:
    """Load ``image`` if it is a Multiboot kernel (else None, and nothing is touched)."""
    if image.suffix in (".S", ".s", ".asm"):
        return None
    try:
        data = read_bytes(image, what="guest image", limit=MAX_IMAGE)
        header = find_header(data)
    except (InputError, MultibootError) as exc:
        if append:
            raise MultibootRunError(f"{image}: {exc}") from None
        return None
    if header is None:
        if append:
            raise MultibootRunError(f"{image}: --append needs a Multiboot kernel (no Multiboot header found)")
        return None
    try:
        boot = load_multiboot(vm, data, f"{image} {append}".rstrip() if append else str(image), ram_size)
    except MultibootError as exc:
        raise MultibootRunError(f"{image}: {exc}") from None
    if vm.platform is not None:
        vm.platform.add_firmware(ram_size=ram_size, cpus=vcpus)
    vm.mmio_bus.register(APIC_DEFAULT_BASE, APIC_PAGE, ApicMsiPage(), "apic-msi")
    return boot


def setup_vcpu(vcpu: Vcpu, boot: MultibootBoot) -> None:
    """The BSP (vCPU 0) starts the kernel; the others wait for a SIPI, as a PC's APs do."""
    from pyvmx.kvm.vcpu import MpState

    setup_multiboot_vcpu(vcpu, boot)
    if vcpu.id != 0:
        vcpu.lapic.init()
        vcpu.mp_state = MpState.HALTED


def qemu_exit_status(vm: Vm) -> int:
    """isa-debug-exit: QEMU exits with ``(code << 1) | 1``, of which the shell sees the low byte."""
    code = vm.platform.debug_exit.code if vm.platform is not None else None
    return (((code or 0) << 1) | 1) & 0xFF
