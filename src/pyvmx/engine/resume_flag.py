"""RFLAGS.RF, the resume flag, on the Unicorn core (SDM Vol. 3B 18.3.1.1; IRET pseudocode).

RF = 1 makes the processor ignore instruction breakpoints for one instruction; it is cleared
once an instruction completes (other than an IRET that loads it).  It is set by VM entry from
the guest-state area (a hypervisor re-running a faulting instruction, or KVM injecting a
fault-class exception, which pushes RF = 1), and by IRET from the RFLAGS image it pops -- in
real mode only with a 32-bit operand size (IRETD loads EFLAGS bits 257FD5H).

QEMU clears RF only at a translated block's end that leaves through gen_eob(), not after a
direct jump, so RF would stay set and PUSHF would push it.  The executor arms the block
counter's ``rf_watch`` when RF may be set -- at the start of a run, and at an IRET whose image
holds RF -- and the counter clears RF before the second block runs (``_icount.c``).  So RF
lasts for the first block after it is set, not one instruction: a PUSHF inside that block
still pushes it (QEMU 5's PUSHF does not clear RF in the image as the SDM says).
"""

from __future__ import annotations

from collections.abc import Callable

RFLAGS_RF = 1 << 16


def iret_image_address(operand_size: int, bitness: int, rsp: int, ss_base: int, ss_big: bool) -> int | None:
    """The linear address of the RFLAGS image an IRET of ``operand_size`` bits pops (after RIP
    and CS), or None when the image is 16 bits wide (no RF in it)."""
    if operand_size == 16:
        return None
    offset = 2 * (operand_size // 8)
    if bitness == 64:
        return (rsp + offset) & 0xFFFFFFFFFFFFFFFF
    mask = 0xFFFFFFFF if ss_big else 0xFFFF
    return (ss_base + ((rsp + offset) & mask)) & 0xFFFFFFFF


def iret_loads_rf(image_address: int | None, read_byte: Callable[[int], int | None]) -> bool:
    """Whether the IRET's RFLAGS image has RF set (``read_byte``: None when unreadable -- the
    IRET itself will fault)."""
    if image_address is None:
        return False
    byte = read_byte(image_address + 2)  # bits 23:16 of the image
    return byte is not None and bool(byte & (RFLAGS_RF >> 16))
