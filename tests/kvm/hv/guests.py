"""Test guests: assembly sources in ``guests/``, assembled once per run (cached by content) and
loaded at CODE_BASE; the 64-bit ones get the macros of ``guests/common64.inc``."""

from __future__ import annotations

from pathlib import Path

from pyvmx.guest.assemble import GuestImage, assemble
from pyvmx.kvm.boot import setup_long_mode, setup_protected_mode, setup_real_mode
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.loader import load_flat
from pyvmx.kvm.vcpu import Vcpu
from pyvmx.kvm.vm import Vm

GUEST_DIR = Path(__file__).parent / "guests"
CODE_BASE = 0x10000
DEFAULT_LIMIT = 50_000_000  # guest TSC ticks: every run() in these tests is bounded


def image(name: str, base: int = CODE_BASE) -> GuestImage:
    text = (GUEST_DIR / "common64.inc").read_text() + "\n" + (GUEST_DIR / name).read_text()
    return assemble(text, base, name=Path(name).stem)


def source_image(source: str, base: int = CODE_BASE, *, bits: int = 64) -> GuestImage:
    prologue = {16: ".code16\n", 32: ".code32\n", 64: (GUEST_DIR / "common64.inc").read_text() + "\n"}[bits]
    return assemble(prologue + source, base)


def boot(vm: Vm, img: GuestImage, *, mode: str = "long", vcpu: Vcpu | None = None, stack: int = 0xA000) -> Vcpu:
    """Load ``img`` and start a (new) vCPU at its first byte in ``mode``."""
    load_flat(vm, img.code, img.base)
    v = vcpu or vm.create_vcpu()
    {"long": setup_long_mode, "protected": setup_protected_mode, "real": setup_real_mode}[mode](v, img.base, stack=stack)
    return v


def new_guest(name: str, *, mode: str = "long", memory: int = 8 << 20, kvm: Kvm | None = None, platform: bool = True) -> tuple[Vm, Vcpu, GuestImage]:
    k = kvm or Kvm()
    vm = k.create_vm(memory_size=memory, platform=platform)
    img = image(name)
    return vm, boot(vm, img, mode=mode), img


def u32(vm: Vm, gpa: int) -> int:
    return int.from_bytes(vm.read_guest(gpa, 4), "little")


def u64(vm: Vm, gpa: int) -> int:
    return int.from_bytes(vm.read_guest(gpa, 8), "little")
