"""The `tcp` backend on 127.0.0.1 (and inside a network namespace when we may make one)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from test_backend_harness import Guest, receive_exactly, running, wait_until

from vhostser.backends.framing import Data, FrameDecoder, Open, encode
from vhostser.backends.peers import PeerBackend
from vhostser.backends.tcp import TcpBackend, run_in_netns_sync, socket_in_netns
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
    assert own == {"from_options", "listen_hosts", "problems"}


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


def ns_inode(path: str) -> int:
    return os.stat(path).st_ino


def lo_up() -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Fresh network namespaces (pyroute2), loopback up; removed after the test."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_SYS_ADMIN); running as uid "
                    f"{os.geteuid()}")
    made: list[str] = []

    def make() -> str:
        name = f"vhs-test-{uuid.uuid4().hex[:8]}"
        try:
            pyroute2_netns.create(name)
        except OSError as e:
            pytest.skip(f"cannot create a network namespace here: {e}")
        made.append(name)
        run_in_netns_sync(name, lo_up)
        return name

    try:
        yield make
    finally:
        for name in made:
            pyroute2_netns.remove(name)


@pytest.fixture
def netns(make_netns: Callable[[], str]) -> str:
    return make_netns()


@pytest.fixture
def veth(make_netns: Callable[[], str]) -> tuple[str, str]:
    """Two namespaces joined by a veth pair: 192.0.2.1/24 in the first, .2 in the second
    (TEST-NET-1: on no real network)."""
    a, b = make_netns(), make_netns()

    def wire_a() -> None:
        with IPRoute() as ipr:
            ipr.link("add", ifname="vhs-a", kind="veth", peer="vhs-b")
            ipr.link("set", index=ipr.link_lookup(ifname="vhs-b")[0], net_ns_fd=b)
            (index,) = ipr.link_lookup(ifname="vhs-a")
            ipr.addr("add", index=index, address="192.0.2.1", prefixlen=24)
            ipr.link("set", index=index, state="up")

    def wire_b() -> None:
        with IPRoute() as ipr:
            (index,) = ipr.link_lookup(ifname="vhs-b")
            ipr.addr("add", index=index, address="192.0.2.2", prefixlen=24)
            ipr.link("set", index=index, state="up")

    run_in_netns_sync(a, wire_a)
    run_in_netns_sync(b, wire_b)
    return a, b


@pytest.fixture
def process_in(netns: str) -> Iterator[str]:
    """/proc/PID/ns/net of a process that lives in `netns` (a path, not a name)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pyroute2 import netns; "
         f"netns.setns({netns!r}, flags=0); print('in', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "in\n"
        yield f"/proc/{child.pid}/ns/net"
    finally:
        child.kill()
        child.wait()


async def connect_from(netns: str, host: str, port: int) -> trio.SocketStream:
    inside = trio.socket.from_stdlib_socket(await socket_in_netns(netns))
    await inside.connect((host, port))
    return trio.SocketStream(inside)


async def guest_hears(backend: TcpBackend, netns: str, host: str) -> None:
    """Bind `backend`, connect to it from inside `netns`, pass bytes to the guest."""
    home = os.readlink("/proc/thread-self/ns/net")
    guest = Guest(backend)
    async with running(backend) as (_, port):
        # Not reachable from the daemon's own namespace...
        outside = socket.socket()
        with pytest.raises(OSError):
            outside.connect((host, port))
        outside.close()
        # ...but from inside the namespace.
        peer = await connect_from(netns, host, port)
        await wait_until(lambda: guest.host_open)
        guest.open()
        await peer.send_all(b"from the namespace")
        assert await guest.read_exactly(18) == b"from the namespace"
        await peer.aclose()
    # The switches happened on throwaway threads: this thread never left home.
    assert os.readlink("/proc/thread-self/ns/net") == home


@pytest.mark.parametrize("form", ["name", "run-path"])
async def test_tcp_listener_lives_in_the_network_namespace(netns: str, form: str) -> None:
    where = netns if form == "name" else f"/var/run/netns/{netns}"
    backend = TcpBackend.from_options({"port": 0, "netns": where}, "test")
    await guest_hears(backend, netns, "127.0.0.1")


async def test_netns_may_be_any_namespace_file(netns: str, process_in: str) -> None:
    backend = TcpBackend.from_options({"port": 0, "netns": process_in}, "test")
    assert backend.problems() == []
    await guest_hears(backend, netns, "127.0.0.1")


async def test_listens_on_a_veth_address_inside_the_namespace(veth: tuple[str, str]) -> None:
    inside, other = veth
    backend = TcpBackend.from_options({"host": "192.0.2.1", "port": 0, "netns": inside}, "t")
    assert backend.problems() == []
    # From the other end of the veth pair: across the link, in neither our namespace nor the
    # listener's.
    await guest_hears(backend, other, "192.0.2.1")


async def test_a_client_connects_from_inside_the_namespace(veth: tuple[str, str]) -> None:
    inside, other = veth
    server = trio.socket.from_stdlib_socket(await socket_in_netns(other))
    await server.bind(("192.0.2.2", 0))
    server.listen(1)
    port = server.getsockname()[1]
    backend = TcpBackend.from_options(
        {"host": "192.0.2.2", "port": port, "netns": inside, "role": "client"}, "t")
    guest = Guest(backend)
    async with running(backend):
        guest.open()
        conn, _ = await server.accept()
        peer = trio.SocketStream(conn)
        guest.write(b"to the other side")
        assert await receive_exactly(peer, 17) == b"to the other side"
        await peer.aclose()
    server.close()


async def test_host_names_are_resolved_inside_the_namespace(
    netns: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolved_in: list[int] = []
    real = socket.getaddrinfo

    def spy(*args: Any, **kwargs: Any) -> Any:
        resolved_in.append(ns_inode("/proc/thread-self/ns/net"))
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    backend = TcpBackend.from_options({"host": "localhost", "port": 0, "netns": netns}, "t")
    Guest(backend)
    async with running(backend):
        pass
    assert resolved_in and set(resolved_in) == {ns_inode(f"/var/run/netns/{netns}")}


def test_check_reports_a_missing_namespace() -> None:
    name = f"vhs-missing-{uuid.uuid4().hex[:8]}"
    backend = TcpBackend.from_options({"port": 4555, "netns": name}, "t")
    (problem,) = backend.problems()
    assert problem == (f"network namespace {name} (/var/run/netns/{name}): "
                       "No such file or directory")


def test_check_reports_a_namespace_path_that_is_not_one(tmp_path: Path) -> None:
    backend = TcpBackend.from_options({"port": 4555, "netns": str(tmp_path)}, "t")
    (problem,) = backend.problems()
    assert problem.startswith(f"network namespace {tmp_path} ({tmp_path}): ")


def test_check_reports_an_address_not_configured_inside(veth: tuple[str, str]) -> None:
    inside, _ = veth
    # .2 is the other namespace's: configured on the host's side of nothing here.
    backend = TcpBackend.from_options({"host": "192.0.2.2", "port": 4555, "netns": inside}, "t")
    assert backend.problems() == [
        f"network namespace {inside}: address 192.0.2.2 is not configured on any interface: "
        "listening will fail"]
    # A client connects out: any address may be the remote one.
    client = TcpBackend.from_options(
        {"host": "192.0.2.2", "port": 4555, "netns": inside, "role": "client"}, "t")
    assert client.problems() == []
    # Any address (0.0.0.0) is always there.
    assert TcpBackend.from_options(
        {"host": "0.0.0.0", "port": 4555, "netns": inside}, "t").problems() == []


def test_vhostser_check_warns(tmp_path: Path, netns: str) -> None:
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f"""
[vm]
name = "t"
socket = "{tmp_path}/vu.sock"
state_dir = "{tmp_path}/state"

[[port]]
id = 1
name = "a"
backend = {{ type = "tcp", host = "10.9.9.9", port = 4555, netns = "{netns}" }}
""")
    r = subprocess.run([sys.executable, "-m", "vhostser", "check", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"{cfg}: warning: port 1 (a): network namespace {netns}: address 10.9.9.9 "
                        "is not configured on any interface: listening will fail\n")


async def test_a_missing_namespace_is_an_error_not_a_crash() -> None:
    with pytest.raises(FileNotFoundError):
        await socket_in_netns(f"vhs-missing-{uuid.uuid4().hex[:8]}")
