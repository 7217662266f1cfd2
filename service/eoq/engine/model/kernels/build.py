"""Building ``csrc/`` into one library for this machine, once, into a cache.

The sources are compiled by the machine's C++ compiler (``$CXX``, else ``g++``) the first time an engine needs
them — 3 to 7 seconds on two cores: they include no torch headers — with ``-march=native``, into
``<cache>/kernels/`` under a name that hashes the sources, the compiler's version, the flags and the CPU, so a
cache shared between machines never loads a build for another CPU. It links ``libgomp.so.1``, the OpenMP runtime
torch has already loaded, so its threads are torch's threads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-Wno-psabi", "-shared", "-fPIC", "-std=c++17"]
HEADER = "eoq_kernels.h"  # the library's C interface: every entry point, declared once (csrc/eoq_kernels.h)


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(lines))  # the first of each kind (every core repeats them)


def sources() -> dict[str, bytes]:
    """``csrc/``'s files by name: the ``.cpp`` sources and the headers they include."""
    folder = resources.files("eoq.engine.model").joinpath("csrc")
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith((".cpp", ".h"))}


def build(cache_dir: Path, march: str = "native") -> Path:
    """Compile ``csrc/*.cpp`` into one library (once per source, compiler, CPU and ``march``) and return its path.

    ``march``: the instruction set to build for (``-march=``): this machine's by default; tests also build older
    ones (``x86-64-v3``: AVX2, ``x86-64``: none of the wide vectors) to run each of ``csrc/simd.h``'s branches.
    Raises ``RuntimeError`` with the compiler's message when there is no compiler or the build fails."""
    flags = [*FLAGS, f"-march={march}"]
    files = sources()
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH; set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for part in [*(n.encode() + b"\0" + b for n, b in files.items()), cxx.encode(), version.encode(),
                 " ".join(flags).encode(), _cpu_id().encode()]:
        digest.update(part + b"\0")
    out = cache_dir / f"eoq_cpu-{digest.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_bytes(text)
        lib = Path(tmp) / "eoq_cpu.so"
        cpp = [str(Path(tmp) / n) for n in files if n.endswith(".cpp")]
        done = subprocess.run([cxx, *flags, "-o", str(lib), *cpp], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build eoq's CPU kernels: {done.stderr.strip()[-2000:]}")
        os.replace(lib, out)  # atomic: engines starting together never load a half-written file
    log.info("built eoq's CPU kernels for this CPU (-march=%s): %s", march, out)
    return out
