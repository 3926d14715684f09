"""The `unix` backend: host peers on a unix stream socket, as server or client.

    backend = { type = "unix", path = "/run/vhostser/web1.qga.sock" }
    backend = { type = "unix", path = "/run/agent.sock", role = "client", mode = "framed" }

Options: `path` (required); `role` "server" (default: listens; a stale socket file is replaced,
anything else at the path is an error; the socket file gets mode 0660 and is removed on exit)
or "client" (connects, reconnecting with exponential backoff 0.1 s → 5 s); `mode` "stream"
(default) | "session" | "framed"; `max_peers` (server, default 1; connections beyond it are
closed at once and counted); `slow_peer` "block" (default) | "drop-peer"; `peer_queue` (bytes
queued per peer, default 256 KiB). The modes are described in `peers`, the framed wire format
in `framing`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any, Self

import trio

from ..options import Options
from ..sockets import listen_unix
from .peers import PEER_OPTION_KEYS, PeerBackend, PeerOptions

log = logging.getLogger("vhostser.backends")

PEER_SOCKET_MODE = 0o660  # host peers of the daemon's group may connect (README: `unix`)


class UnixEndpoint:
    """Listen on or connect to a unix socket path."""

    def __init__(self, path: str, mode: int = PEER_SOCKET_MODE) -> None:
        self.path = path
        self.mode = mode
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file

    def describe(self) -> str:
        return f"unix:{self.path}"

    def info(self, address: object = None) -> dict[str, object]:
        return {"kind": "unix", "path": self.path}

    async def listen(self) -> trio.socket.SocketType:
        sock = await listen_unix(self.path, self.mode)
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
    def from_options(cls, options: Mapping[str, Any], where: str) -> Self:
        o = Options(options, where, {"path", *PEER_OPTION_KEYS})
        path = o.required_string("path")
        return cls(UnixEndpoint(path), PeerOptions.read(o))

    @property
    def path(self) -> str:
        return self.endpoint.path
