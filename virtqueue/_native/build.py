"""cffi build script for virtqueue._native._ring, run by setup.py (cffi_modules)."""

# mypy: disable-error-code="import-untyped"

from __future__ import annotations

import os

from cffi import FFI

# setuptools compiles from the project root, and wants sources named relative to it.
_HERE = os.path.relpath(os.path.dirname(os.path.abspath(__file__)))

ffibuilder = FFI()
with open(os.path.join(_HERE, "walk.h"), encoding="utf-8") as f:
    ffibuilder.cdef(f.read())
ffibuilder.set_source(
    "virtqueue._native._ring",
    '#include <stdint.h>\n#include "walk.h"\n',
    sources=[os.path.join(_HERE, "walk.c")],
    include_dirs=[_HERE],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)
