"""Assemble guest programs with GNU binutils (as, ld, objcopy, nm) into flat binary images.

Sources use GNU as syntax (Intel syntax via ``.intel_syntax noprefix`` if you like) and may switch
modes with ``.code16``/``.code32``/``.code64``.  The image is linked at ``base`` (the guest-physical
address it is loaded at), so labels resolve to the addresses the guest sees; every global or
local label is returned in ``symbols``.  Results are cached by content hash, so a test suite
assembles each guest once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyvmx.guest.includes import IncludeError, content_key, dependencies, place_copies, scan_includes


class AssemblyError(ValueError):
    """The assembler or linker rejected the source.  The message is the first diagnostic, naming
    the user's file and line; ``diagnostics`` holds them all."""

    def __init__(self, message: str, diagnostics: list[str] | None = None) -> None:
        super().__init__(message)
        self.diagnostics = diagnostics if diagnostics is not None else [message]


@dataclass(frozen=True)
class GuestImage:
    """A flat guest image: the bytes to load at ``base`` and the address of each label."""

    code: bytes
    base: int
    symbols: dict[str, int] = field(default_factory=dict)

    def symbol(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise KeyError(f"no label {name!r} in the guest image") from None

    @property
    def end(self) -> int:
        return self.base + len(self.code)


def _cache_dir() -> Path:
    base = os.environ.get("PYVMX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyvmx"
    )
    return Path(base) / "guests"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssemblyError(f"GNU binutils '{name}' not found: install binutils to build guests from source")
    return path


@dataclass(frozen=True)
class SourceOrigin:
    """Where a guest source comes from, for its diagnostics and its file access.

    ``name`` is what errors call the source (the user's file, never a temporary path);
    ``first_line`` the line of that file where the source text starts (a scenario's inline
    ``source`` starts some lines into the TOML); ``include_dir`` the only directory whose files
    ``.include``/``.incbin`` may read (None: no host file at all, see :mod:`pyvmx.guest.includes`)."""

    name: str = "guest"
    first_line: int = 1
    include_dir: Path | None = None


# GNU binutils are given a bounded time: a source cannot keep them running for ever.
TOOL_TIMEOUT = 120.0


def _run(argv: list[str], what: str, cwd: Path, diagnostics: Callable[[str], list[str]], source_name: str) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, errors="replace", cwd=cwd, stdin=subprocess.DEVNULL, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssemblyError(f"{source_name}: {what} took longer than {TOOL_TIMEOUT:g} s") from None
    if result.returncode != 0:
        lines = diagnostics(result.stderr + result.stdout)
        raise AssemblyError(lines[0] + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""), lines)


class _Diagnostics:
    """GNU as/ld messages rewritten to name the user's file and line.  Only messages about the
    source itself or an allowed included file are kept: a message located in any other file
    could quote that file's contents."""

    def __init__(self, src: str, origin: SourceOrigin, prologue_lines: int, included: list[str]) -> None:
        self.src = src
        self.origin = origin
        self.shift = origin.first_line - 1 - prologue_lines
        self.included = set(included)

    def _show_included(self, name: str) -> str:
        return str(self.origin.include_dir / name) if self.origin.include_dir is not None else name

    def assembler(self, text: str) -> list[str]:
        out = []
        foreign = False  # a message located in a file the source may not read
        for line in text.splitlines():
            file, sep, rest = line.partition(":")
            number, sep2, message = rest.partition(":")
            if not (sep and sep2 and number.isdigit()):
                continue
            if file == self.src:
                out.append(f"{self.origin.name}:{max(1, int(number) + self.shift)}:{message}")
            elif file in self.included:
                out.append(f"{self._show_included(file)}:{number}:{message}")
            else:
                foreign = True
        if foreign or not out:
            return [f"{self.origin.name}: the assembler failed in a file the guest source may not read (through a macro?)"]
        return out

    def linker(self, text: str) -> list[str]:
        """ld's errors (its warnings left out), without its own path, naming the user's file."""
        lines = []
        for line in text.splitlines():
            line = re.sub(r"^\S*\bld: ", "", re.sub(r"\.\./build/guest\.(o|elf)", self.origin.name, line.strip()))
            if line and "warning:" not in line:
                lines.append(f"{self.origin.name}: linking failed: {line}")
        return lines or [f"{self.origin.name}: linking failed"]


def assemble(source: str, base: int = 0, *, name: str = "guest", prologue: str = "", origin: SourceOrigin | None = None) -> GuestImage:
    """Assemble ``prologue + source`` and link it at ``base``; returns the flat image and its
    symbols.  ``origin`` says what diagnostics call the source and which directory its
    ``.include``/``.incbin`` may read (default: none).  Raises :class:`AssemblyError` whose
    message is the first diagnostic as ``file:line: Error: ...`` in the user's terms."""
    origin = origin or SourceOrigin(name)
    try:
        included = scan_includes(source, origin.include_dir, origin.name, origin.first_line)
    except IncludeError as exc:
        raise AssemblyError(str(exc), [str(exc)]) from None
    text = prologue + source
    key = hashlib.sha256(f"{base:#x}\0{text}\0{content_key(included)}".encode()).hexdigest()[:24]
    cache = _cache_dir() / key
    bin_path, sym_path = cache.with_suffix(".bin"), cache.with_suffix(".json")
    if bin_path.exists() and sym_path.exists():
        return GuestImage(bin_path.read_bytes(), base, json.loads(sym_path.read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        work, build = Path(tmp) / "work", Path(tmp) / "build"
        work.mkdir()
        build.mkdir()
        place_copies(included, work)
        # Paths relative to ``work`` (the tools' cwd), so as --MD reports exactly these names.
        src, obj, dep, elf, flat = (f"../build/guest{suffix}" for suffix in (".S", ".o", ".d", ".elf", ".bin"))
        (work / src).write_text(text if text.endswith("\n") else text + "\n")
        diagnostics = _Diagnostics(src, origin, prologue.count("\n"), [f.name for f in included])
        _run([_tool("as"), "--64", "--MD", dep, "-o", obj, src], "assembling", work, diagnostics.assembler, origin.name)
        allowed = {src} | {f.name for f in included}
        try:
            opened = dependencies((work / dep).read_text(errors="replace"))
        except OSError:
            raise AssemblyError(f"{origin.name}: the assembler did not list the files it read (as --MD)") from None
        outside = [d for d in opened if d not in allowed]
        if outside:
            raise AssemblyError(f"{origin.name}: the source reads a host file it may not read (through a macro?): {outside[0]}")
        _run([_tool("ld"), "-m", "elf_x86_64", "-nostdlib", "-N", "-e", "0", f"-Ttext={base:#x}", "-o", elf, obj], "linking", work, diagnostics.linker, origin.name)
        _run([_tool("objcopy"), "-O", "binary", elf, flat], "objcopy", work, diagnostics.linker, origin.name)
        nm = subprocess.run([_tool("nm"), elf], capture_output=True, text=True, check=True, cwd=work, stdin=subprocess.DEVNULL, timeout=TOOL_TIMEOUT)
        symbols: dict[str, int] = {}
        for line in nm.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].lower() in "tdbar":
                symbols[parts[2]] = int(parts[0], 16)
        code = (work / flat).read_bytes()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp_bin = bin_path.with_suffix(f".{os.getpid()}.tmp")
        tmp_bin.write_bytes(code)
        os.replace(tmp_bin, bin_path)
        tmp_sym = sym_path.with_suffix(f".{os.getpid()}.tmp")
        tmp_sym.write_text(json.dumps(symbols))
        os.replace(tmp_sym, sym_path)
    return GuestImage(code, base, symbols)


def assemble_file(path: str | os.PathLike[str], base: int = 0) -> GuestImage:
    """Assemble the source file ``path``; its ``.include``/``.incbin`` may read files of its own
    directory only."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise AssemblyError(f"cannot read {p}: {exc.strerror}") from None
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AssemblyError(f"{p}: not assembly source: byte {data[exc.start]:#04x} at offset {exc.start} is not UTF-8 text") from None
    return assemble(source, base, name=p.stem, origin=SourceOrigin(str(p), include_dir=p.parent))
