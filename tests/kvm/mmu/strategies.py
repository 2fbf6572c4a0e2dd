"""Hypothesis strategies shared by the MMU tests (one file, as STYLE.md asks)."""

from __future__ import annotations

from hypothesis import strategies as st

KIB4 = 1 << 12
MIB2 = 1 << 21

ALU_OPS = ("ADD", "ADC", "SUB", "SBB", "CMP", "AND", "OR", "XOR", "TEST")


@st.composite
def alu_operands(draw: st.DrawFn) -> tuple[str, int, int, int, bool]:
    """(mnemonic, size in bytes, a, b, carry in) with edge values over-represented."""
    op = draw(st.sampled_from(ALU_OPS))
    size = draw(st.sampled_from((1, 2, 4, 8)))
    top = (1 << (8 * size)) - 1
    edges = st.sampled_from((0, 1, top, top >> 1, (top >> 1) + 1))
    a = draw(st.one_of(edges, st.integers(0, top)))
    b = draw(st.one_of(edges, st.integers(0, top)))
    return op, size, a, b, draw(st.booleans())


# --- memslot layouts --------------------------------------------------------------------------------
SLOT_GFN_SPACE = 4096  # 16 MiB of guest-physical space, in pages
"""Guest-physical pages the generated slots live in (small, so slots meet and collide)."""


@st.composite
def slot_geometry(draw: st.DrawFn) -> tuple[int, int, int]:
    """(base gfn, pages, hva offset in pages) of a slot: 2M-aligned and whole-2M slots often
    (huge pages possible), odd ones sometimes (edges, misaligned hva)."""
    aligned = draw(st.sampled_from((True, True, False)))
    if aligned:
        base = draw(st.integers(0, SLOT_GFN_SPACE // 512 - 1)) * 512
        npages = draw(st.integers(1, 3)) * 512
        offset = 0
    else:
        base = draw(st.integers(0, SLOT_GFN_SPACE - 2))
        npages = draw(st.integers(1, 1100))
        offset = draw(st.sampled_from((0, 1, 7, 256)))
    npages = min(npages, SLOT_GFN_SPACE - base)
    return base, npages, offset


def gfns() -> st.SearchStrategy[int]:
    """A guest frame somewhere in the slot space (or just past it)."""
    return st.integers(0, SLOT_GFN_SPACE + 16)


def fault_kinds() -> st.SearchStrategy[str]:
    return st.sampled_from(("read", "write", "fetch"))
