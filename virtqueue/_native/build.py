"""cffi build script for virtqueue._native._ring, run by setup.py (cffi_modules).

In a checkout, `python virtqueue/_native/build.py` rebuilds the module in place.
"""

# mypy: disable-error-code="import-untyped"

from __future__ import annotations

import os
import shutil
import tempfile

from cffi import FFI

_ABS = os.path.dirname(os.path.abspath(__file__))
# walk.c is the chain walker; pump.c, the data-plane thread, walks chains with it.
_PARTS = ("walk", "pump")


def _builder(here: str) -> FFI:
    ffi = FFI()
    for part in _PARTS:
        with open(os.path.join(_ABS, f"{part}.h"), encoding="utf-8") as f:
            ffi.cdef(f.read())
    ffi.set_source(
        "virtqueue._native._ring",
        "#include <stdint.h>\n" + "".join(f'#include "{part}.h"\n' for part in _PARTS),
        sources=[os.path.join(here, f"{part}.c") for part in _PARTS],
        include_dirs=[here],
        extra_compile_args=["-O2", "-Wall", "-Wextra"],
        libraries=["pthread"],
    )
    return ffi


# setuptools compiles from the project root, and wants sources named relative to it.
ffibuilder = _builder(os.path.relpath(_ABS))

if __name__ == "__main__":
    # Away from the project root, whose pyproject.toml distutils would read, with absolute
    # paths; then in place, under the name an install gives the module.
    with tempfile.TemporaryDirectory() as tmp:
        built = _builder(_ABS).compile(tmpdir=tmp, target="_ring.abi3.so", verbose=True)
        dest = os.path.join(_ABS, "_ring.abi3.so")
        # Renamed into place: a process that has the old module loaded keeps its own copy.
        shutil.copy(built, dest + ".new")
        os.replace(dest + ".new", dest)
