"""Reading untrusted input files: scenarios, records, traces, saved VMCSs.

People send each other these files, so nothing in one is trusted: the file must be a regular
file of bounded size (never a FIFO, a device or a directory, which could block or never end),
its text must be UTF-8, its JSON/TOML must parse, and every value must have the type and range
its reader expects.  Every way a file can be wrong ends in one :class:`InputError` whose message
names the file and says what is wrong; the CLI prints it as one line and exits with status 2.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from typing import Any

# Bounds on what is read into memory.  A record holds its guest image (base64) and every exit,
# a trace every event; both stay far below these for any run pyvmx can make in reasonable time.
MAX_FILE_BYTES = 256 << 20
MAX_SCENARIO_BYTES = 16 << 20


class InputError(ValueError):
    """An input file that cannot be used: the message names the file and the reason."""


def read_bytes(path: str | os.PathLike[str], *, what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The contents of the regular file ``path`` (at most ``limit`` bytes)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"cannot read {path}: it is a directory, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"cannot read {path}: not a regular file")
    if st.st_size > limit:
        raise InputError(f"{path}: {st.st_size} bytes is too large for a {what} (limit {limit >> 20} MiB)")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InputError(f"{path}: too large for a {what} (limit {limit >> 20} MiB)")
    return data


def decode_text(data: bytes, path: str | os.PathLike[str], *, what: str) -> str:
    """``data`` as UTF-8 text, or an :class:`InputError` naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a {what}: byte {data[exc.start]:#04x} at offset {exc.start} is not UTF-8 text") from None


def read_text(path: str | os.PathLike[str], *, what: str, limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of the regular file ``path``."""
    return decode_text(read_bytes(path, what=what, limit=limit), path, what=what)


def parse_json(text: str, path: str | os.PathLike[str], *, what: str) -> Any:
    """``text`` parsed as JSON; bad syntax, absurd nesting and absurd numbers are InputErrors."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not a {what}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise InputError(f"{path}: not a {what}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than int() accepts
        raise InputError(f"{path}: not a {what}: {exc}") from None


def parse_toml(text: str, path: str | os.PathLike[str], *, what: str) -> dict[str, Any]:
    """``text`` parsed as TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: bad TOML: {exc}") from None
    except RecursionError:
        raise InputError(f"{path}: not a {what}: TOML nested too deeply") from None
    except ValueError as exc:
        raise InputError(f"{path}: not a {what}: {exc}") from None


def read_json(path: str | os.PathLike[str], *, what: str, limit: int = MAX_FILE_BYTES) -> Any:
    return parse_json(read_text(path, what=what, limit=limit), path, what=what)


# --- typed values ---------------------------------------------------------------------------------
def is_int(value: object) -> bool:
    """A JSON/TOML integer (``bool`` is an ``int`` in Python but not in the file)."""
    return isinstance(value, int) and not isinstance(value, bool)


def int_in(value: object, low: int, high: int) -> bool:
    return is_int(value) and low <= value <= high  # type: ignore[operator]


def check_int(value: object, low: int, high: int, what: str, source: str) -> int:
    """``value`` if it is an integer in [low, high], else an InputError naming ``what``."""
    if not is_int(value):
        raise InputError(f"{source}: {what} must be an integer, not {_kind(value)}")
    assert isinstance(value, int)
    if not low <= value <= high:
        raise InputError(f"{source}: {what} must be in {low}..{high:#x}, not {value}")
    return value


def check_str(value: object, what: str, source: str, *, limit: int = 4096) -> str:
    if not isinstance(value, str):
        raise InputError(f"{source}: {what} must be a string, not {_kind(value)}")
    if len(value) > limit:
        raise InputError(f"{source}: {what} is longer than {limit} characters")
    return value


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
