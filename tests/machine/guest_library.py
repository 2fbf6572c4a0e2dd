"""Reusable test guests (tests/machine/guests/*.S): mode-switching code and IDT/IVT set-ups
whose handlers record what the processor delivered.  A test appends its own ``main``."""

from __future__ import annotations

from pathlib import Path

GUESTS = Path(__file__).with_name("guests")

# Where the recording handlers of long_idt.S / real_ivt.S leave what they saw.
FRAME = 0x9000


def guest_source(name: str, main: str = "") -> str:
    """The library guest ``name`` followed by the test's own code (usually ``main: ...``)."""
    return (GUESTS / f"{name}.S").read_text() + "\n" + main + "\n"
