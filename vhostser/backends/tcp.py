"""The `tcp` backend: host peers over TCP, optionally inside a network namespace.

    backend = { type = "tcp", port = 4555 }                         # 127.0.0.1:4555
    backend = { type = "tcp", host = "10.0.0.1", port = 4555, netns = "tenant7" }

Options: `port` (required; 0 picks a free one, server only), `host` (default 127.0.0.1; an IP
literal, or a name resolved in the daemon's own namespace), `netns` (a name under
/var/run/netns: the socket is made inside that network namespace and stays there), and the
same `role`, `mode`, `max_peers`, `slow_peer`, `peer_queue` as the `unix` backend (`peers`).

The namespace switch happens on a short-lived thread of its own: it enters the namespace with
setns(2), creates the socket, switches back and ends, so no thread the rest of the daemon uses
is ever left in another namespace. Needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import threading
from collections.abc import Mapping
from typing import Any, Self

import trio

from ..options import Options
from ..sockets import BACKLOG
from .peers import PEER_OPTION_KEYS, PeerBackend, PeerOptions

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.@:+-]{1,255}")


def _setns(fd: int, nstype: int) -> None:
    native = getattr(os, "setns", None)  # Python ≥ 3.12
    if native is not None:
        native(fd, nstype)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _make_socket_in_netns(path: str, family: int, type_: int) -> socket.socket:
    """On the calling thread: enter the namespace at `path`, make a socket, come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, CLONE_NEWNET)
        finally:
            os.close(target)
        try:
            return socket.socket(family, type_)
        finally:
            _setns(own, CLONE_NEWNET)
    finally:
        os.close(own)


async def socket_in_netns(
    name: str, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM,
    *, netns_dir: str = NETNS_DIR,
) -> socket.socket:
    """A socket that lives in the network namespace `name` (a file under `netns_dir`)."""
    path = os.path.join(netns_dir, name)
    result: list[socket.socket] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            result.append(_make_socket_in_netns(path, family, type_))
        except BaseException as e:  # handed to the trio side
            error.append(e)

    # A thread of its own, not trio's thread cache: if switching back ever failed, the thread
    # that is left in the wrong namespace ends here.
    thread = threading.Thread(target=work, name=f"netns-{name}", daemon=True)
    thread.start()
    await trio.to_thread.run_sync(thread.join)
    if error:
        for s in result:
            s.close()
        raise error[0]
    return result[0]


class TcpEndpoint:
    """Listen on or connect to host:port, in a network namespace if asked."""

    def __init__(self, host: str, port: int, netns: str | None = None) -> None:
        self.host = host
        self.port = port
        self.netns = netns

    def describe(self) -> str:
        where = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{where}:{self.port}" + (f" (netns {self.netns})" if self.netns else "")

    def info(self, address: Any = None) -> dict[str, object]:
        # The bound port once listening (`port = 0` picks one).
        port = address[1] if address else self.port
        return {"kind": "tcp", "host": self.host, "port": port, "netns": self.netns}

    async def _resolve(self, passive: bool) -> tuple[int, Any]:
        flags = socket.AI_PASSIVE if passive else 0
        infos = await trio.socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=flags
        )
        if not infos:
            raise OSError(f"{self.host}: no address")
        family, _, _, _, addr = infos[0]
        return family, addr

    async def _socket(self, family: int) -> trio.socket.SocketType:
        if self.netns is None:
            return trio.socket.socket(family, socket.SOCK_STREAM)
        raw = await socket_in_netns(self.netns, family, socket.SOCK_STREAM)
        return trio.socket.from_stdlib_socket(raw)

    async def listen(self) -> trio.socket.SocketType:
        family, addr = await self._resolve(passive=True)
        sock = await self._socket(family)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind(addr)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    async def connect(self) -> trio.socket.SocketType:
        family, addr = await self._resolve(passive=False)
        sock = await self._socket(family)
        try:
            await sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    def cleanup(self) -> None:
        pass


class TcpBackend(PeerBackend):
    """Host peers over TCP (see the module doc)."""

    endpoint: TcpEndpoint

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str) -> Self:
        o = Options(options, where, {"host", "port", "netns", *PEER_OPTION_KEYS})
        peer = PeerOptions.read(o)
        host = o.string("host", "127.0.0.1")
        lo = 0 if peer.role == "server" else 1
        port = o.required_integer("port", lo=lo, hi=65535)
        netns = o.string("netns")
        if netns is not None and (not _NETNS_NAME.fullmatch(netns) or netns in (".", "..")):
            o.fail("netns", f"the name of a network namespace (a file in {NETNS_DIR})", netns)
        return cls(TcpEndpoint(host, port, netns), peer)

    @classmethod
    def listen_hosts(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
        if options.get("role", "server") != "server":
            return ()
        return (options.get("host", "127.0.0.1"),)
