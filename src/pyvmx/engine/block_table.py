"""The addresses of the instructions of translated blocks, kept in bounded memory.

The executor uses them to make the instruction count exact when a block stops midway and to find
where an INT n started; a block it no longer holds is decoded again (``VmxExecutor._block_insns``),
so this is a cache and may forget.  Stored naively -- a list of Python ints per block -- they
cost ~40 bytes per guest instruction, and a guest running through fresh code (a wild jump into
zeroed RAM executes ``add %al,(%rax)`` for millions of instructions, every block new) grew them
by gigabytes.  Here a block whose instructions are evenly spaced (zeroed memory, NOP sleds) is
kept as a ``range`` (constant size), any other as an ``array`` of 8-byte addresses, and the table
starts over once it holds :data:`BLOCK_TABLE_BUDGET` units (~8 MiB).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

BLOCK_TABLE_BUDGET = 1 << 20  # units of 8 bytes: one per stored address, BLOCK_COST per block
BLOCK_COST = 16  # a block's own share (its range or array object and dict slot), in units


def compact(addresses: Sequence[int]) -> Sequence[int]:
    """``addresses`` (ascending) as a range when evenly spaced, else as an array of uint64."""
    if isinstance(addresses, range):
        return addresses
    n = len(addresses)
    if n >= 2:
        first, step = addresses[0], addresses[1] - addresses[0]
        if step > 0 and addresses[-1] - first == step * (n - 1) and all(
            b - a == step for a, b in zip(addresses, addresses[1:])
        ):
            return range(first, addresses[-1] + step, step)
    return array("Q", addresses)


def _cost(stored: Sequence[int]) -> int:
    return BLOCK_COST if isinstance(stored, range) else BLOCK_COST + len(stored)


class BlockTable:
    """Block start (linear) -> the linear addresses of its instructions, in bounded memory."""

    def __init__(self, budget: int = BLOCK_TABLE_BUDGET) -> None:
        self.budget = budget
        self._blocks: dict[int, Sequence[int]] = {}
        self.units = 0  # what the table holds, in budget units
        self.restarts = 0  # times it started over

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, pc: int) -> Sequence[int] | None:
        return self._blocks.get(pc)

    def put(self, pc: int, addresses: Sequence[int]) -> Sequence[int]:
        """Keep a block's addresses (compacted); returns what is kept."""
        stored = compact(addresses)
        old = self._blocks.pop(pc, None)
        if old is not None:
            self.units -= _cost(old)
        cost = _cost(stored)
        if self.units + cost > self.budget:
            self._blocks.clear()
            self.units = 0
            self.restarts += 1
        self._blocks[pc] = stored
        self.units += cost
        return stored
