"""The `tcp` backend: host peers over TCP, optionally inside a network namespace.

    backend = { type = "tcp", port = 4555 }                         # 127.0.0.1:4555
    backend = { type = "tcp", host = "10.0.0.1", port = 4555, netns = "tenant7" }
    backend = { type = "tcp", host = "::1", port = 4555, netns = "/proc/4242/ns/net" }

Options: `port` (required; 0 picks a free one, server only), `host` (default 127.0.0.1; an IP
literal, or a name resolved inside the namespace the socket lives in), `netns` (a network
namespace: a name, for /var/run/netns/NAME as `ip netns add` makes, or the absolute path of a
namespace file, such as /proc/PID/ns/net; the socket is made inside it and stays there), and
the same `role`, `mode`, `max_peers`, `slow_peer`, `peer_queue` as the `unix` backend
(`peers`).

The namespace switch happens on a short-lived thread of its own (pyroute2's setns): it enters
the namespace, resolves the host there (its DNS traffic goes out through that namespace's
interfaces; /etc/resolv.conf is the daemon's), creates the socket, switches back and ends, so
no thread the rest of the daemon uses is ever in another namespace. Needs CAP_SYS_ADMIN.
`vhostser check` warns when the namespace is missing or the address to listen on is not
configured inside it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any, Self, TypeVar

import trio
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from ..options import Options
from ..sockets import BACKLOG, PeerPolicy
from .options import ANYONE
from .peers import PEER_OPTION_KEYS, PeerBackend, PeerOptions

NETNS_DIR = "/var/run/netns"
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.@:+-]{1,255}")
T = TypeVar("T")


def netns_path(netns: str) -> str:
    """The namespace file a `netns` option names: a name is one of `ip netns`'s."""
    return netns if netns.startswith("/") else os.path.join(NETNS_DIR, netns)


def _valid_netns(netns: str) -> bool:
    if netns.startswith("/"):
        return True  # any namespace file; setns refuses what is not one, with a clear error
    return bool(_NETNS_NAME.fullmatch(netns)) and netns not in (".", "..")


def _inside(path: str, work: Callable[[], T]) -> T:
    """On the calling thread: enter the namespace at `path`, run `work`, come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # flags=0: never create the namespace (pyroute2 would, by default).
        pyroute2_netns.setns(path, flags=0)
        try:
            return work()
        finally:
            pyroute2_netns.setns(own, flags=0)
    finally:
        os.close(own)


def run_in_netns_sync(netns: str, work: Callable[[], T]) -> T:
    """`work()` inside network namespace `netns` (a name or a path), on a thread of its own
    (not trio's thread cache: if switching back ever failed, the thread left in the wrong
    namespace ends here)."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(_inside(netns_path(netns), work))
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    thread = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def run_in_netns(netns: str, work: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(run_in_netns_sync, netns, work)


async def socket_in_netns(
    netns: str, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM,
) -> socket.socket:
    """A socket that lives in the network namespace `netns` (a name or a path)."""
    return await run_in_netns(netns, lambda: socket.socket(family, type_))


def _resolve(host: str, port: int, passive: bool) -> tuple[int, Any]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE if passive else 0)
    if not infos:
        raise OSError(f"{host}: no address")
    family, _, _, _, addr = infos[0]
    return family, addr


def _resolved_socket(host: str, port: int, passive: bool) -> tuple[socket.socket, Any]:
    family, addr = _resolve(host, port, passive)
    return socket.socket(family, socket.SOCK_STREAM), addr


def _local_addresses() -> set[str]:
    """The addresses configured on this namespace's interfaces (netlink, via pyroute2)."""
    with IPRoute() as ipr:
        return {a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}


def _listen_problems(host: str, port: int) -> list[str]:
    """Run inside the namespace: why listening on host:port there would fail."""
    try:
        _, addr = _resolve(host, port, passive=True)
    except OSError as e:
        return [f"host {host!r} does not resolve: {e.strerror or e}"]
    ip = ipaddress.ip_address(addr[0].split("%")[0])
    if ip.is_unspecified:
        return []
    if str(ip) not in _local_addresses():
        return [f"address {ip} is not configured on any interface: listening will fail"]
    return []


class TcpEndpoint:
    """Listen on or connect to host:port, in a network namespace if asked."""

    policy: PeerPolicy | None = None  # SO_PEERCRED tells nothing of a TCP peer

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

    async def _socket(self, passive: bool) -> tuple[trio.socket.SocketType, Any]:
        """A socket for host:port and the address to use, both from inside the namespace."""
        if self.netns is None:
            infos = await trio.socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE if passive else 0)
            if not infos:
                raise OSError(f"{self.host}: no address")
            family, _, _, _, addr = infos[0]
            return trio.socket.socket(family, socket.SOCK_STREAM), addr
        raw, addr = await run_in_netns(
            self.netns, lambda: _resolved_socket(self.host, self.port, passive))
        return trio.socket.from_stdlib_socket(raw), addr

    def problems(self, listening: bool) -> list[str]:
        """For `vhostser check`: the namespace exists, and the address to listen on is
        configured inside it."""
        if self.netns is None:
            return []
        where = f"network namespace {self.netns}"
        try:
            found = run_in_netns_sync(
                self.netns, lambda: _listen_problems(self.host, self.port) if listening else [])
        except OSError as e:
            return [f"{where} ({netns_path(self.netns)}): {e.strerror or e}"]
        return [f"{where}: {p}" for p in found]

    async def listen(self) -> trio.socket.SocketType:
        sock, addr = await self._socket(passive=True)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind(addr)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    async def connect(self) -> trio.socket.SocketType:
        sock, addr = await self._socket(passive=False)
        try:
            await sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    def adopted(self, listener: trio.socket.SocketType) -> None:
        pass

    def cleanup(self) -> None:
        pass


class TcpBackend(PeerBackend):
    """Host peers over TCP (see the module doc)."""

    endpoint: TcpEndpoint

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str,
                     peers: PeerPolicy = ANYONE) -> Self:
        o = Options(options, where, {"host", "port", "netns", *PEER_OPTION_KEYS})
        peer = PeerOptions.read(o)
        host = o.string("host", "127.0.0.1")
        lo = 0 if peer.role == "server" else 1
        port = o.required_integer("port", lo=lo, hi=65535)
        netns = o.string("netns")
        if netns is not None and not _valid_netns(netns):
            o.fail("netns", f"the name of a network namespace (a file in {NETNS_DIR}) or "
                   "the absolute path of one", netns)
        return cls(TcpEndpoint(host, port, netns), peer)

    def problems(self) -> list[str]:
        return self.endpoint.problems(listening=self.opts.role == "server")

    @classmethod
    def listen_hosts(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
        if options.get("role", "server") != "server":
            return ()
        return (options.get("host", "127.0.0.1"),)
