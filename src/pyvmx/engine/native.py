"""Build (once, cached) and load the C instruction counter, ``_icount.c``.

The library is compiled with the machine's C compiler at first use and cached by source hash,
the same way guest sources are assembled at first use.  Without a compiler the engine falls
back to the same logic in Python (correct, but slower per translation block).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("_icount.c")
TB_TABLE_SIZE = 65536

STOP_NONE = 0
STOP_DEADLINE = 1
STOP_WINDOW = 2


class TbEntry(ctypes.Structure):
    _fields_ = [("pc", ctypes.c_uint64), ("size", ctypes.c_uint32), ("icount", ctypes.c_uint32)]


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
        ("emu_stop", ctypes.c_void_p),
        ("reg_read", ctypes.c_void_p),
        ("eflags_regid", ctypes.c_int),
        ("pad", ctypes.c_int),
        ("table", TbEntry * TB_TABLE_SIZE),
    ]


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


def build_library() -> Path | None:
    """Compile _icount.c (if not cached) and return the shared library's path, or None."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = cache_dir() / f"libpyvmx_icount-{digest}.so"
    if target.exists():
        return target
    cc = _compiler()
    if cc is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(SOURCE)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            return None
        os.replace(out, target)  # atomic: concurrent builders agree
    return target


_LIBRARY: ctypes.CDLL | None = None
_LOADED = False


def load_library() -> ctypes.CDLL | None:
    """The loaded counter library, or None if it cannot be built here."""
    global _LIBRARY, _LOADED
    if not _LOADED:
        _LOADED = True
        if os.environ.get("PYVMX_NO_NATIVE"):
            return None
        path = build_library()
        if path is not None:
            try:
                _LIBRARY = ctypes.CDLL(str(path))
            except OSError:
                _LIBRARY = None
    return _LIBRARY
