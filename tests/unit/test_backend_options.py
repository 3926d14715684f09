"""Backend options: the registry, and errors that name the key and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vhostser.backends.console_log import ConsoleBackend
from vhostser.backends.file import FileBackend
from vhostser.backends.options import ANYONE
from vhostser.backends.peers import PeerOptions
from vhostser.backends.pty import PtyBackend
from vhostser.backends.registry import BACKENDS, create
from vhostser.backends.simple import EchoBackend, NullBackend
from vhostser.backends.tcp import TcpBackend
from vhostser.backends.unix import UnixBackend, UnixEndpoint
from vhostser.options import OptionError
from vhostser.sockets import PeerPolicy

W = "vm.toml: port[1].backend"


def test_every_type_the_config_names() -> None:
    assert set(BACKENDS) >= {"null", "echo", "unix", "tcp", "pty", "file", "console"}
    assert isinstance(create("null", {}, W), NullBackend)
    assert isinstance(create("echo", {}, W), EchoBackend)
    assert isinstance(create("unix", {"path": "/x"}, W), UnixBackend)
    assert isinstance(create("tcp", {"port": 1}, W), TcpBackend)
    assert isinstance(create("pty", {}, W), PtyBackend)
    assert isinstance(create("file", {"path": "/x"}, W), FileBackend)
    assert isinstance(create("console", {"socket": "/x"}, W), ConsoleBackend)


def test_defaults() -> None:
    b = UnixBackend.from_options({"path": "/run/a.sock"}, W)
    assert b.opts == PeerOptions("server", "stream", 1, "block", 256 * 1024)
    t = TcpBackend.from_options({"port": 4555}, W)
    assert (t.endpoint.host, t.endpoint.port, t.endpoint.netns) == ("127.0.0.1", 4555, None)
    f = FileBackend.from_options({"path": "/l"}, W)
    assert f.attach == "auto" and f.sink.stamper is None
    c = ConsoleBackend.from_options({"socket": "/s"}, W)
    assert c.scrollback_limit == 64 * 1024 and c.sink is None


VM_PEERS = PeerPolicy(frozenset({4242}), frozenset({36}))


def test_unix_sockets_are_private_by_default_and_take_the_vms_allow_lists() -> None:
    for endpoint in (create("unix", {"path": "/a"}, W).endpoint,
                     ConsoleBackend.from_options({"socket": "/s"}, W).endpoint):
        assert isinstance(endpoint, UnixEndpoint)
        assert (endpoint.mode, endpoint.group, endpoint.policy) == (0o600, None, ANYONE)
    for endpoint in (create("unix", {"path": "/a"}, W, VM_PEERS).endpoint,
                     ConsoleBackend.from_options({"socket": "/s"}, W, VM_PEERS).endpoint):
        assert isinstance(endpoint, UnixEndpoint)
        assert endpoint.policy == VM_PEERS
    assert create("tcp", {"port": 1}, W, VM_PEERS).endpoint.policy is None  # no SO_PEERCRED


@pytest.mark.parametrize("btype", ["unix", "console"])
def test_a_backends_own_socket_options(btype: str) -> None:
    key = "path" if btype == "unix" else "socket"
    options = {key: "/a", "socket_mode": "0640", "socket_group": "nogroup"}
    endpoint = create(btype, options, W, VM_PEERS).endpoint
    assert isinstance(endpoint, UnixEndpoint)
    assert (endpoint.mode, endpoint.group, endpoint.policy) == (0o640, 65534, VM_PEERS)
    # Either list replaces both of the VM's; an empty one lets in whoever the mode lets in.
    for lists, policy in [
        ({"allow_gids": ["nogroup"]}, PeerPolicy(frozenset(), frozenset({65534}))),
        ({"allow_uids": [0, "nobody"]}, PeerPolicy(frozenset({0, 65534}), frozenset())),
        ({"allow_uids": []}, ANYONE),
    ]:
        endpoint = create(btype, {key: "/a", **lists}, W, VM_PEERS).endpoint
        assert isinstance(endpoint, UnixEndpoint) and endpoint.policy == policy, lists


def test_from_options_makes_no_sockets_or_files(tmp_path: Path) -> None:
    for btype, opts in [
        ("unix", {"path": str(tmp_path / "u.sock")}),
        ("file", {"path": str(tmp_path / "f.log")}),
        ("console", {"path": str(tmp_path / "c.log"), "socket": str(tmp_path / "c.sock")}),
        ("pty", {"link": str(tmp_path / "tty")}),
    ]:
        create(btype, opts, W)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("btype", "options", "message"),
    [
        ("unix", {}, f"{W}.path: expected a non-empty string, got nothing"),
        ("unix", {"path": ""}, f"{W}.path: expected a non-empty string, got ''"),
        ("unix", {"path": 5}, f"{W}.path: expected a non-empty string, got 5"),
        ("unix", {"path": "/a", "pth": 1}, f"{W}.pth: unknown key (did you mean path?)"),
        ("unix", {"path": "/a", "colour": 1}, f"{W}.colour: unknown key (expected one of "
                                              "allow_gids, allow_uids, max_peers, mode, path, "
                                              "peer_queue, role, slow_peer, socket_group, "
                                              "socket_mode)"),
        ("unix", {"path": "/a", "role": "listen"},
         f'{W}.role: expected one of "server", "client", got \'listen\''),
        ("unix", {"path": "/a", "mode": "packet"},
         f'{W}.mode: expected one of "stream", "session", "framed", got \'packet\''),
        ("unix", {"path": "/a", "max_peers": 0}, f"{W}.max_peers: expected an integer in 1..1024"),
        ("unix", {"path": "/a", "max_peers": True}, f"{W}.max_peers: expected an integer"),
        ("unix", {"path": "/a", "role": "client", "max_peers": 2},
         f'{W}.max_peers: expected no max_peers with role = "client"'),
        ("unix", {"path": "/a", "mode": "session", "max_peers": 3},
         f'{W}.max_peers: expected 1 with mode = "session"'),
        ("unix", {"path": "/a", "slow_peer": "drop"},
         f'{W}.slow_peer: expected one of "block", "drop-peer", got \'drop\''),
        ("unix", {"path": "/a", "peer_queue": "lots"}, f"{W}.peer_queue: expected a size in bytes"),
        ("unix", {"path": "/a", "peer_queue": 0}, f"{W}.peer_queue: expected a size in bytes"),
        ("tcp", {}, f"{W}.port: expected an integer in 0..65535, got nothing"),
        ("tcp", {"port": 70000}, f"{W}.port: expected an integer in 0..65535, got 70000"),
        ("tcp", {"port": "80"}, f"{W}.port: expected an integer in 0..65535, got '80'"),
        ("tcp", {"port": 0, "role": "client"}, f"{W}.port: expected an integer in 1..65535"),
        ("tcp", {"port": 1, "host": ""}, f"{W}.host: expected a non-empty string"),
        ("tcp", {"port": 1, "netns": "../etc"}, f"{W}.netns: expected the name of a network"),
        ("tcp", {"port": 1, "path": "/a"},
         f"{W}.path: unknown key (expected one of host, max_peers"),
        ("pty", {"link": 3}, f"{W}.link: expected a non-empty string, got 3"),
        ("pty", {"path": "/dev/pts/3"}, f"{W}.path: unknown key (expected one of link, queue)"),
        ("file", {}, f"{W}.path: expected a non-empty string, got nothing"),
        ("file", {"path": "/l", "append": "yes"}, f"{W}.append: expected true or false, got 'yes'"),
        ("file", {"path": "/l", "timestamps": 1}, f"{W}.timestamps: expected true or false"),
        ("file", {"path": "/l", "attach": "always"},
         f"{W}.attach: expected true, false or \"auto\", got 'always'"),
        ("console", {}, f"{W}.socket: expected a unix socket path for readers and/or a log"),
        ("console", {"socket": "/s", "scrollback": -1},
         f"{W}.scrollback: expected an integer in 0..16384, got -1"),
        ("console", {"socket": "/s", "reader_queue": 10}, f"{W}.reader_queue: expected a size"),
        ("unix", {"path": "/a", "socket_mode": 0o644},
         f"{W}.socket_mode: expected a file mode with read and write for the owner and no "
         "bits for others, like 0o600 or 0o660, got 420"),
        ("unix", {"path": "/a", "socket_group": "no-such-group-here"},
         f"{W}.socket_group: expected a number or the name of an existing user/group, got "
         "'no-such-group-here'"),
        ("unix", {"path": "/a", "allow_uids": ["no-such-user-here"]},
         f"{W}.allow_uids: expected a number or the name of an existing user/group"),
        ("unix", {"path": "/a", "allow_gids": "nogroup"},
         f"{W}.allow_gids: expected list, got 'nogroup'"),
        ("unix", {"path": "/a", "role": "client", "socket_mode": 0o660},
         f'{W}.socket_mode: expected no socket_mode with role = "client" (it listens on no '
         "socket), got 432"),
        ("unix", {"path": "/a", "role": "client", "allow_uids": []},
         f'{W}.allow_uids: expected no allow_uids with role = "client"'),
        ("console", {"path": "/l", "socket_group": 0},
         f"{W}.socket_group: expected no socket_group without a readers' `socket`, got 0"),
        ("console", {"socket": "/s", "socket_mode": "0606"},
         f"{W}.socket_mode: expected a file mode with read and write for the owner and no "
         "bits for others, like 0o600 or 0o660, got '0606'"),
        ("console", {"socket": "/s", "allow_gids": [-1]},
         f"{W}.allow_gids: expected a number or the name of an existing user/group, got -1"),
        ("tcp", {"port": 1, "socket_mode": 0o600}, f"{W}.socket_mode: unknown key"),
        ("null", {"x": 1}, f"{W}.x: unknown key (expected no options)"),
        ("echo", {"path": "/a"}, f"{W}.path: unknown key (expected no options)"),
    ],
)
def test_option_errors_name_the_key(btype: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionError) as info:
        create(btype, options, W)
    assert str(info.value).startswith(message), str(info.value)


def test_an_unknown_type_is_named() -> None:
    with pytest.raises(OptionError, match=r"\.type: expected one of .*unix.*, got 'unixx'"):
        create("unixx", {}, W)


@pytest.mark.parametrize(
    ("value", "size"),
    [(4096, 4096), ("64K", 65536), ("256KiB", 262144), ("1M", 1 << 20), ("2 MiB", 2 << 20)],
)
def test_sizes_read_as_people_write_them(value: object, size: int) -> None:
    b = UnixBackend.from_options({"path": "/a", "peer_queue": value}, W)
    assert b.opts.peer_queue == size


def test_option_errors_are_value_errors() -> None:
    assert issubclass(OptionError, ValueError)
