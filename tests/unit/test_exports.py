"""Every public name of a package's modules is re-exported from the package, and every name
in __all__ exists (trio's test_exports habit): the public API is what __init__ says."""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = {
    "virtqueue": ["virtqueue.errors", "virtqueue.memory", "virtqueue.split", "virtqueue.driver"],
    "vhostser.vhost_user": ["vhostser.vhost_user.errors", "vhostser.vhost_user.backend",
                            "vhostser.vhost_user.connection", "vhostser.vhost_user.vring"],
    "vhostser.testing": ["vhostser.testing.frontend"],
}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_all_names_exist(package: str) -> None:
    mod = importlib.import_module(package)
    assert sorted(set(mod.__all__)) == sorted(mod.__all__), "duplicates in __all__"
    for name in mod.__all__:
        assert hasattr(mod, name), f"{package}.__all__ names {name}, which is missing"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_public_classes_and_functions_are_exported(package: str) -> None:
    mod = importlib.import_module(package)
    for sub in PACKAGES[package]:
        submod = importlib.import_module(sub)
        for name, obj in vars(submod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != sub:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert name in mod.__all__, f"{sub}.{name} is public but not in {package}"
