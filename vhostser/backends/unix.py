"""The `unix` backend: host peers on a unix stream socket, as server or client.

    backend = { type = "unix", path = "/run/vhostser/web1.qga.sock" }
    backend = { type = "unix", path = "/run/agent.sock", role = "client", mode = "framed" }

Options: `path` (required); `role` "server" (default: listens; a stale socket file is replaced,
anything else at the path is an error; the socket file is removed on exit) or "client"
(connects, reconnecting with exponential backoff 0.1 s → 5 s); `mode` "stream" (default) |
"session" | "framed"; `max_peers` (server, default 1; connections beyond it are closed at once
and counted); `slow_peer` "block" (default) | "drop-peer"; `peer_queue` (bytes queued per
peer, default 256 KiB). The modes are described in `peers`, the framed wire format in
`framing`.

Who may connect (server; the `console` backend's readers' socket takes the same options):
`socket_mode` (default 0o600: the daemon's user only; e.g. 0o660 with `socket_group`, a group
name or gid, for a peer running as another user) and `allow_uids`/`allow_gids` (SO_PEERCRED,
as in [vm]: given here, they replace the VM's lists for this socket; the daemon's own user
is always let in). A peer they refuse is closed at once, counted (`peers_not_allowed`),
logged (rate-limited), and never becomes a peer.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Mapping
from typing import Any, Self

import trio

from ..options import Options
from ..sockets import SOCKET_MODE, PeerPolicy, listen_unix
from .options import ANYONE
from .peers import PEER_OPTION_KEYS, PeerBackend, PeerOptions

log = logging.getLogger("vhostser.backends")

# Who may connect to a listening unix socket (see the module doc).
SOCKET_KEYS = frozenset({"socket_mode", "socket_group", "allow_uids", "allow_gids"})


class UnixEndpoint:
    """Listen on or connect to a unix socket path; a listening socket's file gets `mode` and
    `group`, and only the peers `policy` permits are let in."""

    def __init__(self, path: str, mode: int = SOCKET_MODE, group: int | None = None,
                 policy: PeerPolicy = ANYONE) -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self.policy = policy
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file

    @classmethod
    def read(cls, o: Options, path: str, peers: PeerPolicy) -> Self:
        """A listening socket at `path` with the SOCKET_KEYS of `o`: allow lists there
        replace `peers`."""
        if "allow_uids" in o.table or "allow_gids" in o.table:
            peers = PeerPolicy(frozenset(o.users("allow_uids")), frozenset(o.groups("allow_gids")))
        return cls(path, o.socket_mode("socket_mode", SOCKET_MODE), o.group("socket_group"),
                   peers)

    @staticmethod
    def not_with(o: Options, why: str) -> None:
        """None of the SOCKET_KEYS in `o`: there is no socket to listen on."""
        for key in sorted(SOCKET_KEYS):
            o.not_with(key, why)

    def describe(self) -> str:
        return f"unix:{self.path}"

    def info(self, address: object = None) -> dict[str, object]:
        return {"kind": "unix", "path": self.path}

    async def listen(self) -> trio.socket.SocketType:
        sock = await listen_unix(self.path, self.mode, group=self.group)
        try:
            st = os.lstat(self.path)
        except BaseException:
            sock.close()
            raise
        self._bound = (st.st_dev, st.st_ino)
        return sock

    async def connect(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def adopted(self, listener: trio.socket.SocketType) -> None:
        # The predecessor's socket file is ours to remove at the end, if it is still there.
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if stat.S_ISSOCK(st.st_mode) and listener.getsockname() == self.path:
            self._bound = (st.st_dev, st.st_ino)

    def cleanup(self) -> None:
        """Remove our socket file (only ours: not one a successor bound since)."""
        if self._bound is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:
                os.unlink(self.path)
        except OSError:
            pass
        self._bound = None


class UnixBackend(PeerBackend):
    """Host peers on a unix stream socket (see the module doc)."""

    endpoint: UnixEndpoint
    PATH_OPTIONS = ("path",)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str,
                     peers: PeerPolicy = ANYONE) -> Self:
        o = Options(options, where, {"path", *PEER_OPTION_KEYS, *SOCKET_KEYS})
        path = o.required_string("path")
        opts = PeerOptions.read(o)
        if opts.role == "client":
            UnixEndpoint.not_with(o, 'with role = "client" (it listens on no socket)')
            return cls(UnixEndpoint(path), opts)
        return cls(UnixEndpoint.read(o, path, peers), opts)

    @property
    def path(self) -> str:
        return self.endpoint.path
