"""Build (once, cached) and load the C instruction counter, ``_icount.c``.

The library is compiled with the machine's C compiler at first use and cached by source hash,
the same way guest sources are assembled at first use.  Without a compiler, or when the build
fails, the engine warns (:class:`NativeBuildWarning`, with the compiler's message) and falls back
to the same logic in Python (correct, but slower per translation block); with
``PYVMX_REQUIRE_NATIVE=1`` (CI) that is an error instead.  ``PYVMX_NO_NATIVE=1`` asks for the
Python fallback on purpose.

The ctypes mirror of ``icount_state_t`` is checked against the layout the C compiler chose
(``pyvmx_layout``) before the library is used; a mismatch is treated as a failed build.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("_icount.c")
TB_TABLE_BITS = 16
TB_TABLE_SIZE = 1 << TB_TABLE_BITS
TB_PROBES = 16

STOP_NONE = 0
STOP_DEADLINE = 1
STOP_WINDOW = 2
STOP_UNKNOWN_TB = 3
RF_WATCH_FIRST_TB = 1
RF_WATCH_CLEAR = 2

_MASK64 = (1 << 64) - 1


class NativeBuildWarning(RuntimeWarning):
    """The C instruction counter could not be built or loaded: the Python fallback runs."""


class NativeBuildError(RuntimeError):
    """PYVMX_REQUIRE_NATIVE is set and the C instruction counter could not be built or loaded."""


class TbEntry(ctypes.Structure):
    """Mirror of tb_entry_t in _icount.c."""

    _fields_ = [("pc", ctypes.c_uint64), ("size", ctypes.c_uint32), ("icount", ctypes.c_uint16), ("used", ctypes.c_uint16)]


class IcountState(ctypes.Structure):
    """Mirror of icount_state_t in _icount.c."""

    _fields_ = [
        ("icount", ctypes.c_uint64),
        ("deadline", ctypes.c_uint64),
        ("last_pc", ctypes.c_uint64),
        ("last_size", ctypes.c_uint32),
        ("last_icount", ctypes.c_uint32),
        ("want_window", ctypes.c_uint32),
        ("stop_reason", ctypes.c_uint32),
        ("miss_pc", ctypes.c_uint64),
        ("miss_size", ctypes.c_uint32),
        ("grant_icount", ctypes.c_uint32),
        ("grant_pc", ctypes.c_uint64),
        ("grant_size", ctypes.c_uint32),
        ("rf_watch", ctypes.c_uint32),
        ("emu_stop", ctypes.c_void_p),
        ("reg_read", ctypes.c_void_p),
        ("reg_write", ctypes.c_void_p),
        ("eflags_regid", ctypes.c_int),
        ("pad", ctypes.c_int),
        ("table", TbEntry * TB_TABLE_SIZE),
    ]


def python_layout() -> list[int]:
    """The ctypes mirror's layout, in the order of pyvmx_layout() in _icount.c."""
    s, e = IcountState, TbEntry
    return [
        ctypes.sizeof(s), s.icount.offset, s.deadline.offset, s.last_pc.offset, s.last_size.offset,
        s.last_icount.offset, s.want_window.offset, s.stop_reason.offset, s.miss_pc.offset,
        s.miss_size.offset, s.grant_icount.offset, s.grant_pc.offset, s.grant_size.offset, s.emu_stop.offset,
        s.reg_read.offset, s.rf_watch.offset, s.reg_write.offset, s.eflags_regid.offset,
        s.table.offset, ctypes.sizeof(e), e.size.offset, e.icount.offset, e.used.offset,
    ]


def native_layout(lib: ctypes.CDLL) -> list[int]:
    """The layout the C compiler chose (sizeof and offsetof exported by pyvmx_layout)."""
    out = (ctypes.c_uint64 * 64)()
    n = int(lib.pyvmx_layout(out, 64))
    return [int(v) for v in out[: min(n, 64)]]


# --- the TB table, in Python (the fallback; the same algorithm as _icount.c) -----------------------
def slot_of(pc: int, size: int) -> int:
    return (((pc ^ (size << 40)) * 0x9E3779B97F4A7C15) & _MASK64) >> (64 - TB_TABLE_BITS)


ENTRY_KNOWN = 1
ENTRY_AMBIGUOUS = 2


def tb_find(st: IcountState, pc: int, size: int) -> int | None:
    """The instruction count of the TB (pc, size), or None when the table does not hold it or
    holds it as ambiguous (two live TBs of that pc and size counted differently)."""
    slot = slot_of(pc, size)
    table = st.table
    for k in range(TB_PROBES):
        e = table[(slot + k) & (TB_TABLE_SIZE - 1)]
        if not e.used:
            return None
        if e.pc == pc and e.size == size:
            return int(e.icount) if e.used == ENTRY_KNOWN else None
    return None


def tb_insert(st: IcountState, pc: int, size: int, icount: int) -> None:
    slot = slot_of(pc, size)
    table = st.table
    target = table[slot]
    for k in range(TB_PROBES):
        e = table[(slot + k) & (TB_TABLE_SIZE - 1)]
        if e.used and e.pc == pc and e.size == size:
            if e.icount != icount:
                e.used = ENTRY_AMBIGUOUS
            return
        if not e.used:
            target = e
            break
    target.pc, target.size, target.icount, target.used = pc, size, icount, ENTRY_KNOWN


# --- building and loading -----------------------------------------------------------------------------
def cache_dir() -> Path:
    base = os.environ.get("PYVMX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyvmx"
    )
    return Path(base)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build_library() -> Path:
    """Compile _icount.c (if not cached) and return the shared library's path; raises
    NativeBuildError with the compiler's message when it cannot be built."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = cache_dir() / f"libpyvmx_icount-{digest}.so"
    if target.exists():
        return target
    cc = _compiler()
    if cc is None:
        raise NativeBuildError("no C compiler found (tried $CC, cc, gcc, clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        try:
            result = subprocess.run(
                [cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(SOURCE)], capture_output=True, text=True
            )
        except OSError as exc:
            raise NativeBuildError(f"{cc} could not run: {exc}") from exc
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip()
            raise NativeBuildError(f"{cc} failed on {SOURCE.name}: {message}")
        os.replace(out, target)  # atomic: concurrent builders agree
    return target


def _open(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeBuildError(f"cannot load {path}: {exc}") from exc
    c, py = native_layout(lib), python_layout()
    if c != py:
        raise NativeBuildError(f"icount_state_t layout differs between C {c} and ctypes {py}")
    return lib


_LIBRARY: ctypes.CDLL | None = None
_LOADED = False


def load_library() -> ctypes.CDLL | None:
    """The loaded counter library, or None (with a NativeBuildWarning) if it cannot be built
    here; NativeBuildError instead with PYVMX_REQUIRE_NATIVE=1."""
    global _LIBRARY, _LOADED
    if not _LOADED:
        _LOADED = True
        if os.environ.get("PYVMX_NO_NATIVE"):
            return None
        try:
            _LIBRARY = _open(build_library())
        except NativeBuildError as exc:
            if os.environ.get("PYVMX_REQUIRE_NATIVE"):
                _LOADED = False  # raise again at the next attempt
                raise
            warnings.warn(
                f"pyvmx: the C instruction counter is unavailable ({exc}); using the slower Python fallback",
                NativeBuildWarning,
                stacklevel=2,
            )
            _LIBRARY = None
    return _LIBRARY
