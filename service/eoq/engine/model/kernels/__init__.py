"""eoq's C++ kernels for the CPU (``csrc/``), built for this machine and called through ctypes.

- ``build``: the compiler and the cache (``build(cache_dir, march)`` -> the library's path);
- ``bindings``: ``CpuKernels``, the library's entry points as methods taking tensors (``SIGNATURES``: their C
  signatures as ctypes passes them, the same as ``csrc/eoq_kernels.h`` declares them);
- ``formats``: the weight layouts the matmul kernels read (low-bit rows, panels of 16 outputs), packed at load;
- ``load_cpu_kernels`` (here): build and bind, or None when this machine cannot (no compiler, a failed build):
  the engine then runs torch's ops instead (said once in the log).

The engine chooses once at load between these kernels and torch's ops (``eoq.engine.model.ops``); nothing past
that choice asks whether the kernels are there.

A new kernel: its ``.cpp`` in ``csrc/`` (it is compiled with the others: no list to edit), its C signature in
``csrc/eoq_kernels.h`` (which the ``.cpp`` includes, defining the function in an ``extern "C"`` block), the same
signature in ``bindings.SIGNATURES`` and a method on ``CpuKernels`` (``tests/engine/test_kernel_header.py`` checks
the two declarations agree), and, where torch has an equivalent the engine should fall back to, a method on both
``ops.TorchOps`` and ``ops.CpuKernelOps``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from eoq.engine.model.kernels.bindings import CpuKernels
from eoq.engine.model.kernels.build import build

log = logging.getLogger(__name__)


def load_cpu_kernels(cache_dir: Path, march: str = "native") -> CpuKernels | None:
    """The kernels (built for ``march``, see ``build``), or None (logged) when they cannot be built here. A cache
    that cannot be written (a baked image on a read-only root filesystem) is replaced by a folder under the
    temporary directory."""
    try:
        try:
            return CpuKernels(build(cache_dir, march))
        except OSError as e:
            scratch = Path(tempfile.gettempdir()) / f"eoq-kernels-{os.getuid()}"
            log.info("cannot keep CPU kernels in %s (%s): building them in %s", cache_dir, e, scratch)
            return CpuKernels(build(scratch, march))
    except (RuntimeError, OSError) as e:
        log.warning("eoq's CPU kernels are not available, torch's ops run instead (decode attention by SDPA over "
                    "gathered blocks): %s", e)
        return None
