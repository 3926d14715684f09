# setup.py exists only because cffi_modules cannot be expressed in pyproject.toml: it compiles
# the small C helper in virtqueue/_native at install time. Everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["virtqueue/_native/build.py:ffibuilder"])
