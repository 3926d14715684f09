"""The command line's shape (vhostser.cli's parser): help text on every command and option,
`--json` anywhere on a ctl line, options unknown to a command reported with that command's
usage; and the small pure parts: the derived admin socket, escape keys, the endpoint words
and the status text."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from vhostser import attach, cli


def parsers(p: argparse.ArgumentParser, path: str = "vhostser") -> Iterator[
        tuple[str, argparse.ArgumentParser, argparse._SubParsersAction[argparse.ArgumentParser]
              | None]]:
    yield path, p, None
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"{path} {name}: no help line in the command list"
                yield from parsers(sub, f"{path} {name}")


def test_every_command_and_option_has_help() -> None:
    seen = []
    for path, p, _ in parsers(cli.parser()):
        seen.append(path)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, \
                f"{path} {'/'.join(action.option_strings) or action.dest}: no help"
    assert {"vhostser run", "vhostser ctl status", "vhostser ctl add-port",
            "vhostser console", "vhostser attach", "vhostser bench"} <= set(seen)


@pytest.mark.parametrize("argv", [
    ["ctl", "--json", "ports"], ["ctl", "ports", "--json"],
    ["ctl", "--admin", "x", "remove-port", "3", "--json"],
])
def test_json_anywhere_on_a_ctl_line(argv: list[str]) -> None:
    assert cli.parser().parse_args(argv).json is True


def test_json_off_by_default() -> None:
    assert cli.parser().parse_args(["ctl", "status"]).json is False


@pytest.mark.parametrize(("argv", "usage"), [
    (["ctl", "status", "--bogus"], "usage: vhostser ctl status"),
    (["ctl", "remove-port", "3", "4"], "usage: vhostser ctl remove-port"),
    (["ctl", "--bogus", "status"], "usage: vhostser ctl "),
    (["run", "--socket"], "usage: vhostser run"),
    (["console"], "usage: vhostser console"),
    (["--bogus"], "usage: vhostser "),
])
def test_a_wrong_option_shows_its_commands_usage(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(usage)


def test_socket_path_is_the_conventions_name() -> None:
    p = cli.parser()
    for flag in ("--socket-path", "--socket", "-s"):
        assert p.parse_args(["run", flag, "/x.sock"]).socket_path == "/x.sock"
    assert p.parse_args(["run", "--socket-path=/y.sock"]).socket_path == "/y.sock"
    assert p.parse_args(["run", "--fd=5"]).fd == 5


@pytest.mark.parametrize(("socket", "admin"), [
    ("/run/vhostser/web1.sock", "/run/vhostser/web1.ctl"),
    ("/tmp/vhostser/default.sock", "/tmp/vhostser/default.ctl"),
    ("/srv/vm/vhost-user", "/srv/vm/vhost-user.ctl"),
])
def test_derived_admin_socket(socket: str, admin: str) -> None:
    assert cli.derived_admin_socket(socket) == admin


def test_admin_socket_of() -> None:
    from dataclasses import replace

    from vhostser.config import default

    cfg = default()
    assert cli.admin_socket_of(cfg) == cfg.socket.removesuffix(".sock") + ".ctl"
    assert cli.admin_socket_of(replace(cfg, socket="/a/b.sock")) == "/a/b.ctl"
    assert cli.admin_socket_of(cfg, "/passed.sock") == "/passed.ctl"
    assert cli.admin_socket_of(cfg, "") is None  # a passed socket without a name
    assert cli.admin_socket_of(replace(cfg, admin_socket="/x.ctl"), "/p.sock") == "/x.ctl"
    assert cli.admin_socket_of(replace(cfg, admin_socket="")) is None  # turned off


@pytest.mark.parametrize(("text", "byte"), [
    ("^]", 0x1D), ("^a", 0x01), ("^A", 0x01), ("^?", 0x7F), ("^@", 0x00), ("q", ord("q")),
    ("none", None), ("NONE", None),
])
def test_escape_keys(text: str, byte: int | None) -> None:
    assert attach.parse_escape(text) == byte
    if byte is not None and byte < 0x20:
        assert attach.escape_name(byte) == text.upper()


@pytest.mark.parametrize("text", ["", "^1", "ab", "é", "^é"])
def test_bad_escape_keys(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        attach.parse_escape(text)


@pytest.mark.parametrize(("endpoint", "word"), [
    (None, "-"),
    ({"kind": "unix", "path": "/r/a.sock", "role": "server", "mode": "stream"},
     "unix:/r/a.sock"),
    ({"kind": "unix", "path": "/r/a.sock", "role": "client", "mode": "framed"},
     "unix:/r/a.sock (client) (framed)"),
    ({"kind": "tcp", "host": "::1", "port": 5, "netns": None, "role": "server",
      "mode": "session"}, "tcp:[::1]:5 (session)"),
    ({"kind": "tcp", "host": "10.0.0.1", "port": 5, "netns": "t7"}, "tcp:10.0.0.1:5@netns:t7"),
    ({"kind": "console", "path": "/r/c.sock", "log": "/l"}, "console:/r/c.sock"),
    ({"kind": "console", "path": None, "log": "/l"}, "log:/l"),
    ({"kind": "pty", "path": "/dev/pts/3", "link": None}, "pty:/dev/pts/3"),
])
def test_endpoint_words(endpoint: dict[str, object] | None, word: str) -> None:
    assert attach.describe(endpoint) == word


@pytest.mark.parametrize(("port", "why"), [
    ({"backend": "echo", "endpoint": None}, "nothing on the host to attach to"),
    ({"backend": "unix", "endpoint": {"kind": "unix", "path": "/p", "role": "client",
                                      "mode": "stream"}}, "connects out to /p"),
    ({"backend": "unix", "endpoint": {"kind": "unix", "path": "/p", "role": "server",
                                      "mode": "framed"}}, "framed protocol"),
    ({"backend": "pty", "endpoint": {"kind": "pty", "path": "/dev/pts/9", "link": None}},
     "open /dev/pts/9 with a terminal program"),
    ({"backend": "file", "endpoint": {"kind": "file", "path": "/l"}}, "tail -f"),
    ({"backend": "console", "endpoint": {"kind": "console", "path": None, "log": "/l"}},
     "give the backend a `socket`"),
    ({"backend": "tcp", "endpoint": {"kind": "tcp", "host": "127.0.0.1", "port": 1,
                                     "netns": "surely-not-ours", "role": "server",
                                     "mode": "stream"}}, "ip netns exec surely-not-ours"),
    ({"backend": "tcp", "endpoint": {"kind": "tcp", "host": "127.0.0.1", "port": 1,
                                     "netns": "/proc/1/ns/nope", "role": "server",
                                     "mode": "stream"}}, "nsenter --net=/proc/1/ns/nope"),
])
def test_what_cannot_be_attached_says_what_to_do(port: dict[str, object], why: str) -> None:
    with pytest.raises(attach.AttachError, match=why.replace("(", r"\(")):
        attach.address(port)


def test_attach_addresses() -> None:
    import socket

    unix = {"kind": "unix", "path": "/p", "role": "server", "mode": "session"}
    assert attach.address({"endpoint": unix}) == (socket.AF_UNIX, "/p")
    tcp = {"kind": "tcp", "host": "0.0.0.0", "port": 7, "netns": None, "role": "server",
           "mode": "stream"}
    assert attach.address({"endpoint": tcp}) == (socket.AF_INET, ("127.0.0.1", 7))
    console = {"kind": "console", "path": "/c", "log": None}
    assert attach.address({"endpoint": console}) == (socket.AF_UNIX, "/c")


def test_status_text_says_what_is_live() -> None:
    base = {"vm": "v", "pid": 1, "config": "c", "socket": "s", "uptime": 1.0,
            "multiport": True, "status": 0x0F, "driver_ready": True, "ports": 2,
            "max_ports": 4, "sessions_open": 1, "sessions_restored": 0,
            "status_bits": ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"]}
    live = cli._human("status", {**base, "frontend_connected": True, "connections": 1,
                                 "frontend_left": None})
    assert "front end      connected (connection 1)" in live
    assert "0x0f ACKNOWLEDGE DRIVER FEATURES_OK DRIVER_OK\n" in live
    assert "last front end" not in live
    gone = cli._human("status", {**base, "frontend_connected": False, "connections": 1,
                                 "frontend_left": 3.5})
    assert "not connected: the last one left 3.5 s ago" in gone
    assert "DRIVER_OK (last front end)" in gone
    assert "driver_ready   yes (last front end)" in gone
