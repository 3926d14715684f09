# The cffi-compiled module built from walk.h/walk.c by build.py.
from typing import Any

ffi: Any
lib: Any
