"""The backends the config file can name, and their side of the option contract.

Every built-in backend has `from_options(options, where, peers)`: it validates the table (a
TOML inline table with `type` already removed) with `vhostser.options.Options` and returns an
unstarted backend; `peers` is who may connect to a unix socket it listens on unless its own
`allow_uids`/`allow_gids` say (the VM's lists, which the daemon passes). It makes no sockets
and opens no files: that happens in `run()`, so `vhostser check` can validate a config file
without side effects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from ..console.port import PortBackend
from ..sockets import PeerPolicy

ANYONE = PeerPolicy()  # no allow lists: whoever the socket file's mode lets in


class ConfigurableBackend(PortBackend):
    """A backend the config file can name: `from_options` validates and builds it.

    What its options let it touch is declared, for the admin socket's add-port to check
    (`config.check_admin_port`): `PATH_OPTIONS`, the options naming a path it creates, writes,
    truncates, links or connects to; `listen_hosts`, the addresses it would listen on."""

    PATH_OPTIONS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str,
                     peers: PeerPolicy = ANYONE) -> Self:
        raise NotImplementedError

    @classmethod
    def listen_hosts(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The hosts a backend built from (valid) `options` listens on."""
        return ()
