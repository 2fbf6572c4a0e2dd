"""The accelerated engine's instruction counter, seen through the interface of
:class:`pyvmx.engine.native.IcountState` (what the executor reads and writes).

The patched Unicorn (see ``unicorn-2.1.4-pyvmx.patch``) counts each translated block in the
exit-request check that starts it, in a ``uc_pyvmx_icount`` struct inside the engine; this module
mirrors that struct with ctypes and keeps its ``fast_deadline`` equal to
``deadline if enabled and not want_window else 0``, the invariant the patch relies on.
"""

from __future__ import annotations

import ctypes
from typing import Any


class UcPyvmxIcount(ctypes.Structure):
    """Mirror of ``uc_pyvmx_icount`` in the patched ``unicorn.h``."""

    _fields_ = [
        ("icount", ctypes.c_uint64),
        ("fast_deadline", ctypes.c_uint64),
        ("last_pc", ctypes.c_uint64),
        ("last_tbinfo", ctypes.c_uint32),
        ("stop_reason", ctypes.c_uint32),
        ("deadline", ctypes.c_uint64),
        ("want_window", ctypes.c_uint32),
        ("enabled", ctypes.c_uint32),
    ]


def bind(uclib: Any, handle: Any) -> UcPyvmxIcount:
    """The counter of the engine ``handle`` (a ``uc_engine *``)."""
    fn = uclib.uc_pyvmx_icount_state
    fn.restype = ctypes.POINTER(UcPyvmxIcount)
    fn.argtypes = [ctypes.c_void_p]
    return fn(handle).contents  # type: ignore[no-any-return]


class AccelIcountState:
    """The accelerated counter with the attributes of ``IcountState``."""

    miss_pc = 0  # the patched engine knows every block's count: never STOP_UNKNOWN_TB
    miss_size = 0
    # The patched engine has no block hook to clear RFLAGS.RF before a run's second block
    # (resume_flag.py): the executor's request is kept but only its end-of-run check acts on it.
    rf_watch = 0

    def __init__(self, raw: UcPyvmxIcount) -> None:
        self._raw = raw
        self.reset()

    def reset(self) -> None:
        """Counting on, from zero, no deadline, no window wanted."""
        raw = self._raw
        raw.icount = raw.last_pc = raw.last_tbinfo = raw.stop_reason = raw.want_window = 0
        raw.deadline = 2**64 - 1
        raw.enabled = 1
        self._sync()

    def _sync(self) -> None:
        raw = self._raw
        raw.fast_deadline = raw.deadline if raw.enabled and not raw.want_window else 0

    @property
    def icount(self) -> int:
        return int(self._raw.icount)

    @icount.setter
    def icount(self, value: int) -> None:
        self._raw.icount = value

    @property
    def deadline(self) -> int:
        return int(self._raw.deadline)

    @deadline.setter
    def deadline(self, value: int) -> None:
        self._raw.deadline = value
        self._sync()

    @property
    def want_window(self) -> int:
        return int(self._raw.want_window)

    @want_window.setter
    def want_window(self, value: int) -> None:
        self._raw.want_window = value
        self._sync()

    @property
    def stop_reason(self) -> int:
        return int(self._raw.stop_reason)

    @stop_reason.setter
    def stop_reason(self, value: int) -> None:
        self._raw.stop_reason = value

    @property
    def last_pc(self) -> int:
        return int(self._raw.last_pc)

    @last_pc.setter
    def last_pc(self, value: int) -> None:
        self._raw.last_pc = value

    @property
    def last_size(self) -> int:
        return int(self._raw.last_tbinfo) >> 16

    @last_size.setter
    def last_size(self, value: int) -> None:
        self._raw.last_tbinfo = (value & 0xFFFF) << 16 | (self._raw.last_tbinfo & 0xFFFF)

    @property
    def last_icount(self) -> int:
        return int(self._raw.last_tbinfo) & 0xFFFF

    @last_icount.setter
    def last_icount(self, value: int) -> None:
        self._raw.last_tbinfo = (self._raw.last_tbinfo & 0xFFFF0000) | (value & 0xFFFF)
