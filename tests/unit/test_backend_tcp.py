"""The `tcp` backend on 127.0.0.1 (and inside a network namespace when we may make one)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import trio
from test_backend_harness import Guest, receive_exactly, running, wait_until

from vhostser.backends.framing import Data, FrameDecoder, Open, encode
from vhostser.backends.peers import PeerBackend
from vhostser.backends.tcp import TcpBackend, socket_in_netns
from vhostser.backends.unix import UnixBackend
from vhostser.console import PortConfig
from vhostser.console.session import State


async def tcp_connect(port: int, host: str = "127.0.0.1") -> trio.SocketStream:
    return await trio.open_tcp_stream(host, port)


def test_one_implementation_two_socket_factories() -> None:
    assert TcpBackend.__mro__[1] is PeerBackend and UnixBackend.__mro__[1] is PeerBackend
    # Everything but option parsing (and what the options let it touch) is shared: no twin
    # implementations.
    own = set(vars(TcpBackend)) - {"__doc__", "__module__", "__annotations__"}
    assert own == {"from_options", "listen_hosts"}


async def test_tcp_stream_both_ways() -> None:
    backend = TcpBackend.from_options({"port": 0}, "test")
    guest = Guest(backend)
    async with running(backend) as address:
        host, port = address
        assert host == "127.0.0.1" and port > 0
        peer = await tcp_connect(port)
        await wait_until(lambda: guest.state is State.C)
        guest.open()
        up, down = os.urandom(100_000), os.urandom(100_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send_all, down)
            guest.write(up)
            await guest.drain()
            assert await receive_exactly(peer, len(up)) == up
            assert await guest.read_exactly(len(down)) == down
        assert backend.peers[0].label.startswith("#1 127.0.0.1:")
        await peer.aclose()
        await wait_until(lambda: guest.state is State.D)


async def test_tcp_framed_client() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    backend = TcpBackend.from_options(
        {"port": port, "role": "client", "mode": "framed"}, "test"
    )
    guest = Guest(backend, PortConfig(2, name="org.test.tcp"))
    with listener:
        async with running(backend):
            conn, _ = await listener.accept()
            server = trio.SocketStream(conn)
            await wait_until(lambda: guest.host_open)
            guest.open()
            decoder = FrameDecoder(accept_open=True)
            guest.write(b"hello")
            await guest.drain()
            wire = encode(Open(1, "org.test.tcp")) + encode(Data(1, b"hello"))
            decoder.feed(await receive_exactly(server, len(wire)))
            assert list(decoder) == [Open(1, "org.test.tcp"), Data(1, b"hello")]
            await server.send_all(encode(Data(1, b"world")))
            assert await guest.read_exactly(5) == b"world"


# ---------------------------------------------------------------------- network namespace


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_SYS_ADMIN); running as uid "
                    f"{os.geteuid()}")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    name = f"vhs-test-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` failed here: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


async def test_tcp_listener_lives_in_the_network_namespace(netns: str) -> None:
    home = os.readlink("/proc/thread-self/ns/net")
    backend = TcpBackend.from_options({"port": 0, "netns": netns}, "test")
    guest = Guest(backend)
    async with running(backend) as (_, port):
        # Not reachable from the daemon's own namespace...
        outside = socket.socket()
        with pytest.raises(ConnectionRefusedError):
            outside.connect(("127.0.0.1", port))
        outside.close()
        # ...but from inside the namespace.
        inside = trio.socket.from_stdlib_socket(await socket_in_netns(netns))
        await inside.connect(("127.0.0.1", port))
        peer = trio.SocketStream(inside)
        await wait_until(lambda: guest.host_open)
        guest.open()
        await peer.send_all(b"from the namespace")
        assert await guest.read_exactly(18) == b"from the namespace"
    # The switch happened on a throwaway thread: this thread never left home.
    assert os.readlink("/proc/thread-self/ns/net") == home


async def test_a_missing_namespace_is_an_error_not_a_crash() -> None:
    with pytest.raises(FileNotFoundError):
        await socket_in_netns(f"vhs-missing-{uuid.uuid4().hex[:8]}")
