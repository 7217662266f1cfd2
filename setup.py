"""Generates the gRPC stubs from proto/ whenever the package is built (regular and editable installs alike).

The stubs land in the git-ignored package ``eoq._proto``; nobody edits them by hand. Everything else about
the package lives in pyproject.toml.
"""

from __future__ import annotations

import os
import pathlib
import sys

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).resolve().parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "service"
PACKAGE = "eoq/_proto"  # the virtual import path the stubs are generated under


def generate_stubs() -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT)) for p in PROTO_DIR.rglob("*.proto"))
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "protoc",
        f"-I{PACKAGE}={PROTO_DIR.relative_to(ROOT)}",
        f"-I{well_known}",
        f"--python_out={OUT_DIR.relative_to(ROOT)}",
        f"--grpc_python_out={OUT_DIR.relative_to(ROOT)}",
        f"--pyi_out={OUT_DIR.relative_to(ROOT)}",
        *protos,
    ]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if protoc.main(args) != 0:
            sys.exit("protoc failed on " + " ".join(protos))
    finally:
        os.chdir(cwd)
    # Regular packages, so that setuptools' package discovery and type checkers see them.
    for d in (OUT_DIR / PACKAGE).rglob("*"):
        if d.is_dir():
            (d / "__init__.py").touch()
    (OUT_DIR / PACKAGE / "__init__.py").write_text('"""Generated from proto/ at install; do not edit."""\n')


# Every build (wheel, editable, sdist) regenerates the stubs first: setuptools checks package folders early.
generate_stubs()
STUB_PACKAGES = ["eoq._proto", "eoq._proto.chat", "eoq._proto.chat.v1"]
packages = sorted(set(find_packages(str(OUT_DIR), include=["eoq", "eoq.*"])) | set(STUB_PACKAGES))
packages += ["eoq_clients"] + ["eoq_clients." + p for p in find_packages(str(ROOT / "clients"))]  # bench, ...

setup(packages=packages)
