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
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


class AssemblyError(ValueError):
    """The assembler or linker rejected the source (the message carries its diagnostics)."""


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


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip()
        raise AssemblyError(f"{what} failed:\n{message}")


def assemble(source: str, base: int = 0, *, name: str = "guest") -> GuestImage:
    """Assemble ``source`` and link it at ``base``; returns the flat image and its symbols."""
    key = hashlib.sha256(f"{base:#x}\0{source}".encode()).hexdigest()[:24]
    cache = _cache_dir() / key
    bin_path, sym_path = cache.with_suffix(".bin"), cache.with_suffix(".json")
    if bin_path.exists() and sym_path.exists():
        return GuestImage(bin_path.read_bytes(), base, json.loads(sym_path.read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        src, obj, elf, flat = t / f"{name}.S", t / f"{name}.o", t / f"{name}.elf", t / f"{name}.bin"
        src.write_text(source if source.endswith("\n") else source + "\n")
        _run([_tool("as"), "--64", "-o", str(obj), str(src)], "assembling")
        _run([_tool("ld"), "-m", "elf_x86_64", "-nostdlib", "-N", "-e", "0", f"-Ttext={base:#x}", "-o", str(elf), str(obj)], "linking")
        _run([_tool("objcopy"), "-O", "binary", str(elf), str(flat)], "objcopy")
        nm = subprocess.run([_tool("nm"), str(elf)], capture_output=True, text=True, check=True)
        symbols: dict[str, int] = {}
        for line in nm.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].lower() in "tdbar":
                symbols[parts[2]] = int(parts[0], 16)
        code = flat.read_bytes()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp_bin = bin_path.with_suffix(f".{os.getpid()}.tmp")
        tmp_bin.write_bytes(code)
        os.replace(tmp_bin, bin_path)
        tmp_sym = sym_path.with_suffix(f".{os.getpid()}.tmp")
        tmp_sym.write_text(json.dumps(symbols))
        os.replace(tmp_sym, sym_path)
    return GuestImage(code, base, symbols)


def assemble_file(path: str | os.PathLike[str], base: int = 0) -> GuestImage:
    p = Path(path)
    try:
        source = p.read_text()
    except OSError as exc:
        raise AssemblyError(f"cannot read {p}: {exc.strerror}") from None
    return assemble(source, base, name=p.stem)
