"""Which host files a guest source may pull in with ``.include``/``.incbin``, and nothing else.

A guest source from a scenario or a record is untrusted: ``.incbin "/etc/passwd"`` would copy a
host file into guest memory, where the guest can print it.  GNU as reads files for exactly two
directives, ``.include`` and ``.incbin``; it opens absolute names as given and relative names
from its working directory and its ``-I`` directories.  So a source is assembled under three
independent rules (:mod:`pyvmx.guest.assemble` applies them):

1. This scan (before anything runs): every ``.include``/``.incbin`` in the text -- comments
   included, case-insensitive, in included files too -- must name a file by a plain string
   literal: relative, without ``..``, inside the source's include directory once symbolic links
   are resolved, and a regular file.  A source without an include directory may name none.
2. ``as`` runs with its working directory in an empty temporary directory holding copies of
   exactly those files (no ``-I``, stdin closed), so a relative name finds nothing else.
3. ``as --MD`` lists every file it actually read, macro-built names included
   (``.macro m d; .\\d "/etc/passwd"; .endm; m incbin``); a file outside that set fails the
   build and its object is discarded, and diagnostics that point into such a file are dropped,
   as they could quote it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MAX_INCLUDED_BYTES = 64 << 20  # all included files of one source together
MAX_INCLUDE_DEPTH = 16

_DIRECTIVE = re.compile(r"\.(incbin|include)\b", re.IGNORECASE)
_OPERAND = re.compile(r'[ \t]+"([^"\\\n]*)"')
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.+\-/]+")


class IncludeError(ValueError):
    """A ``.include``/``.incbin`` the guest source may not use (the message says which and why)."""


@dataclass(frozen=True)
class IncludedFile:
    name: str  # as written in the directive (relative, normalised by the scan)
    data: bytes


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def scan_includes(text: str, include_dir: Path | None, where: str, first_line: int = 1) -> list[IncludedFile]:
    """The files ``text`` may include (see the module docstring, rule 1); ``where`` names the
    source in messages ("guest.S", "scenario.toml"), whose line ``first_line`` is the text's
    first line.  Raises :class:`IncludeError`."""
    found: dict[str, IncludedFile] = {}
    _scan(text, include_dir, where, found, depth=0, first_line=first_line)
    if sum(len(f.data) for f in found.values()) > MAX_INCLUDED_BYTES:
        raise IncludeError(f"{where}: the included files are larger than {MAX_INCLUDED_BYTES >> 20} MiB")
    return list(found.values())


def _scan(text: str, include_dir: Path | None, where: str, found: dict[str, IncludedFile], depth: int, first_line: int = 1) -> None:
    if depth > MAX_INCLUDE_DEPTH:
        raise IncludeError(f"{where}: .include nested more than {MAX_INCLUDE_DEPTH} deep")
    for match in _DIRECTIVE.finditer(text):
        directive = "." + match.group(1).lower()
        at = f"{where}:{_line_of(text, match.start()) + first_line - 1}"
        operand = _OPERAND.match(text, match.end())
        if operand is None:
            raise IncludeError(f'{at}: {directive} must name its file as a plain string, e.g. {directive} "data.bin"')
        name = operand.group(1)
        if include_dir is None:
            raise IncludeError(f"{at}: {directive} {name!r}: this guest source may not read host files")
        key = _checked_name(name, directive, at)
        if key in found:
            continue
        data = _read_inside(include_dir, key, directive, at)
        found[key] = IncludedFile(key, data)
        if directive == ".include":
            try:
                included = data.decode("utf-8")
            except UnicodeDecodeError:
                raise IncludeError(f"{at}: .include {name!r} is not UTF-8 text (use .incbin for binary data)") from None
            _scan(included, include_dir, str(include_dir / key), found, depth + 1)


def _checked_name(name: str, directive: str, at: str) -> str:
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or not _SAFE_NAME.fullmatch(name):
        raise IncludeError(
            f"{at}: {directive} {name!r}: only a relative name inside the source's directory is allowed "
            "(letters, digits, _ . + - /, no '..')"
        )
    return str(pure)


def _read_inside(include_dir: Path, name: str, directive: str, at: str) -> bytes:
    root = include_dir.resolve()
    try:
        target = (root / name).resolve(strict=True)
    except (OSError, RuntimeError):
        raise IncludeError(f"{at}: {directive} {name!r}: no such file in {include_dir}") from None
    if not target.is_relative_to(root):
        raise IncludeError(f"{at}: {directive} {name!r}: leads outside {include_dir} (through a symbolic link)")
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise IncludeError(f"{at}: {directive} {name!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IncludeError(f"{at}: {directive} {name!r} is not a regular file")
        if st.st_size > MAX_INCLUDED_BYTES:
            raise IncludeError(f"{at}: {directive} {name!r} is larger than {MAX_INCLUDED_BYTES >> 20} MiB")
        return f.read(MAX_INCLUDED_BYTES + 1)


def content_key(files: list[IncludedFile]) -> str:
    """What the included files add to an assembly cache key (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.data).digest())
    return h.hexdigest()


def place_copies(files: list[IncludedFile], workdir: Path) -> None:
    """Rule 2: regular-file copies under ``workdir``, at the names the directives use."""
    for f in files:
        path = workdir / f.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f.data)


def dependencies(depfile_text: str) -> list[str]:
    """The prerequisites of a make rule written by ``as --MD`` ("obj: a b \\\\\\n c")."""
    text = depfile_text.replace("\\\n", " ")
    _, _, prerequisites = text.partition(": ")
    return prerequisites.split()
