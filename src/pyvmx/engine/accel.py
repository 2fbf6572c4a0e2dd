"""The accelerated engine: Unicorn built from its pinned source with pyvmx's patch.

``python -m pyvmx.engine.accel build`` (``make accel``) downloads Unicorn's source distribution
from PyPI (the version the stock wheel pins, checked by SHA-256), applies
``unicorn-2.1.4-pyvmx.patch`` (what it changes and why is at the top of the patch), builds the x86
target only, and caches ``libunicorn.so.2`` under the pyvmx cache directory, keyed by the patch's
hash.  It needs cmake, make, patch and a C compiler.

The engine is chosen once per process, before Unicorn is imported, by ``PYVMX_ENGINE``:

- ``stock`` (the default): the PyPI wheel, with pyvmx's C block hook counting instructions;
- ``accel``: the patched library; an error if it has not been built;
- ``auto``: the patched library when it has been built, else the stock wheel.

Both engines give the same guest-visible results, bit for bit (the test suite runs on both).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pyvmx.engine.native import cache_dir

UNICORN_VERSION = "2.1.4"
SDIST_SHA256 = "00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff"
PATCH = Path(__file__).with_name(f"unicorn-{UNICORN_VERSION}-pyvmx.patch")
LIBRARY_NAME = "libunicorn.so.2"
ENGINES = ("stock", "accel", "auto")


class AccelError(RuntimeError):
    """The accelerated engine was asked for and cannot be had, or cannot be built."""


def library_dir() -> Path:
    """Where the patched library of this patch lives (it need not exist)."""
    digest = hashlib.sha256(PATCH.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"unicorn-{UNICORN_VERSION}-pyvmx-{digest}"


def is_built() -> bool:
    return (library_dir() / LIBRARY_NAME).is_file()


def requested_engine() -> str:
    value = os.environ.get("PYVMX_ENGINE", "stock").strip().lower() or "stock"
    if value not in ENGINES:
        raise AccelError(f"PYVMX_ENGINE={value!r}: expected one of {', '.join(ENGINES)}")
    return value


def select_library() -> str:
    """Point Unicorn's binding at the library PYVMX_ENGINE asks for; returns "stock" or
    "accel".  Must run before ``unicorn`` is imported (pyvmx.engine.unicorn_cpu does it)."""
    engine = requested_engine()
    if engine == "stock":
        return "stock"
    if not is_built():
        if engine == "auto":
            return "stock"
        raise AccelError("PYVMX_ENGINE=accel, but the accelerated engine is not built: run `make accel`")
    if "unicorn" in sys.modules:
        raise AccelError("PYVMX_ENGINE=accel: Unicorn was imported before pyvmx's engine chose its library")
    os.environ["LIBUNICORN_PATH"] = str(library_dir())
    return "accel"


# --- building -----------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path, log: list[str]) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    log.append(f"$ {' '.join(cmd)}\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    if result.returncode != 0:
        raise AccelError(f"{' '.join(cmd[:3])} failed (exit {result.returncode}):\n{result.stderr[-2000:] or result.stdout[-2000:]}")


def _fetch_sdist(work: Path, log: list[str]) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
          f"unicorn=={UNICORN_VERSION}", "-d", str(work)], work, log)
    sdist = work / f"unicorn-{UNICORN_VERSION}.tar.gz"
    if not sdist.is_file():
        raise AccelError(f"pip did not download {sdist.name}")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise AccelError(f"{sdist.name}: SHA-256 {digest}, expected {SDIST_SHA256}")
    return sdist


def build(jobs: int = 2) -> Path:
    """Build the patched library if it is not cached; returns its directory."""
    target = library_dir()
    if (target / LIBRARY_NAME).is_file():
        return target
    for tool in ("cmake", "make", "patch"):
        if shutil.which(tool) is None:
            raise AccelError(f"building the accelerated engine needs {tool}")
    log: list[str] = []
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        sdist = _fetch_sdist(work, log)
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        root = work / f"unicorn-{UNICORN_VERSION}"
        with open(PATCH, "rb") as patch:
            result = subprocess.run(["patch", "-p1", "--forward", "--batch"], cwd=root, stdin=patch, capture_output=True, text=True)
        if result.returncode != 0:
            raise AccelError(f"the patch does not apply:\n{result.stdout[-2000:]}")
        build_dir = root / "src" / "build"
        build_dir.mkdir()
        _run(["cmake", "..", "-DCMAKE_BUILD_TYPE=Release", "-DUNICORN_ARCH=x86", "-DUNICORN_BUILD_TESTS=off"], build_dir, log)
        _run(["make", f"-j{max(1, jobs)}", "unicorn"], build_dir, log)
        built = build_dir / LIBRARY_NAME
        if not built.is_file():
            raise AccelError(f"the build did not produce {LIBRARY_NAME}")
        staging = work / "out"
        staging.mkdir()
        shutil.copy2(built, staging / LIBRARY_NAME)
        try:
            staging.rename(target)  # atomic: a concurrent build of the same patch may win
        except OSError:
            if not (target / LIBRARY_NAME).is_file():
                raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvmx.engine.accel", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "path", "status"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build(args.jobs))
        elif args.command == "path":
            print(library_dir())
        else:
            print("built" if is_built() else "not built", library_dir())
    except AccelError as exc:
        print(f"pyvmx accel: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
