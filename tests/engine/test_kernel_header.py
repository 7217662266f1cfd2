"""Each C signature of eoq's CPU kernels is declared once, in ``csrc/eoq_kernels.h``: every kernel source includes
it (so its definitions must agree with it, or the build fails), the library exports exactly its entry points, and
the ctypes bindings declare the same argument and result types (read here from the header itself)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest

from eoq.engine.model.kernels.bindings import SIGNATURES, Int4Projection, LlamaLayerWeights, LlamaShape
from eoq.engine.model.kernels.build import HEADER, sources

SCALARS = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}
STRUCTS = {"EoqLlamaShape": LlamaShape, "EoqLlamaLayer": LlamaLayerWeights, "EoqInt4Projection": Int4Projection}


def _header() -> str:
    text = sources()[HEADER].decode()
    text = re.sub(r"//[^\n]*", "", text)  # comments
    return re.sub(r"^\s*#[^\n]*", "", text, flags=re.MULTILINE)  # preprocessor lines


def _ctype(decl: str) -> type:
    """The ctypes type a C declaration (a parameter, a field or a result, name included or not) passes as: every
    pointer a void* (the bindings pass tensors' addresses) but a string result, a struct by value as its
    Structure, a scalar as its own type."""
    words = decl.replace("*", " * ").split()
    if "*" in words:
        return ctypes.c_char_p if words[:2] == ["const", "char"] else ctypes.c_void_p
    kind = next(w for w in words if w != "const")
    return SCALARS.get(kind) or STRUCTS[kind]


def header_functions() -> dict[str, tuple[type, list[type]]]:
    found = {}
    for result, name, params in re.findall(r"([\w\s\*]+?)\b(eoq_\w+)\s*\(([^)]*)\)\s*;", _header()):
        args = [p for p in (s.strip() for s in params.split(",")) if p and p != "void"]
        found[name] = (_ctype(result), [_ctype(a) for a in args])
    return found


def header_structs() -> dict[str, list[tuple[str, type]]]:
    structs = {}
    for body, name in re.findall(r"typedef\s+struct\s+\w*\s*\{([^}]*)\}\s*(\w+)\s*;", _header()):
        fields = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            head, *more = decl.split(",")  # "const float* input_norm", or "int64_t hidden, num_heads, ..."
            *kind, first = head.replace("*", "* ").split()
            fields += [(n, _ctype(" ".join(kind))) for n in [first, *(m.strip() for m in more)]]
        structs[name] = fields
    return structs


def test_the_header_declares_what_the_bindings_declare() -> None:
    declared = header_functions()
    assert set(declared) == set(SIGNATURES)
    for name, (restype, argtypes) in SIGNATURES.items():
        assert declared[name] == (restype, argtypes), name


def test_the_structs_the_one_call_takes_match_the_header() -> None:
    structs = header_structs()
    for c_name, struct in STRUCTS.items():
        assert structs[c_name] == list(struct._fields_), c_name


def test_every_kernel_source_includes_the_header() -> None:
    for name, text in sources().items():
        if name.endswith(".cpp") and b'extern "C"' in text:
            assert f'#include "{HEADER}"'.encode() in text, name


def test_the_library_binds_and_exports_exactly_the_header_s_entry_points(cpu_kernels_lib) -> None:
    declared = header_functions()
    for name, fn in cpu_kernels_lib.functions.items():
        assert (fn.restype, list(fn.argtypes)) == declared[name], name
    if shutil.which("nm") is None:
        pytest.skip("no nm to list the library's symbols")
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(cpu_kernels_lib.path)], capture_output=True,
                             text=True, check=True).stdout
    assert set(re.findall(r"\bT (eoq_\w+)", symbols)) == set(declared)
