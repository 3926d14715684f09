"""The backends the config file can name, and their side of the option contract.

Every built-in backend has `from_options(options, where)`: it validates the table (a TOML
inline table with `type` already removed) with `vhostser.options.Options` and returns an
unstarted backend. It makes no sockets and opens no files: that happens in `run()`, so
`vhostser check` can validate a config file without side effects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from ..console.port import PortBackend


class ConfigurableBackend(PortBackend):
    """A backend the config file can name: `from_options` validates and builds it."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str) -> Self:
        raise NotImplementedError
