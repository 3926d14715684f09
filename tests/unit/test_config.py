"""The per-VM config file (vhostser.config): every error names the file, the key path and what
was expected; valid files (the embedded default, a realistic one) load into the right objects."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostser import config
from vhostser.backends.registry import BACKENDS
from vhostser.config import ConfigError, PortSpec, VMConfig, parse
from vhostser.console import DEFAULT_STAGING, PortBackend, PortConfig
from vhostser.sockets import PeerPolicy

ROOT = Path(__file__).resolve().parents[2]
SRC = "web1.toml"
NULL = 'backend = { type = "null" }'


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, SRC)
    assert str(info.value) == info.value.errors[0]
    return info.value.errors


def error_of(text: str) -> str:
    """The first error, its line number left out (tests of lines: `errors_of`)."""
    msg = errors_of(text)[0]
    assert re.match(rf"{re.escape(SRC)}(:\d+)?: ", msg), msg
    return re.sub(rf"^{re.escape(SRC)}:\d+: ", f"{SRC}: ", msg)


def port_doc(body: str, *, vm: str = "") -> str:
    return f"[vm]\n{vm}\n[[port]]\n{body}\n"


# ------------------------------------------------------------------------ valid documents


def test_empty_document_defaults() -> None:
    cfg = parse("", SRC, default_name="web1")
    assert cfg == VMConfig(name="web1", socket="/run/vhostser/web1.sock", source=SRC)
    assert (cfg.max_ports, cfg.frontend_grace, cfg.cols, cfg.rows) == (4, 30.0, 80, 25)
    assert cfg.state_dir is None and cfg.admin_socket is None
    assert not cfg.resize_rows_first
    assert cfg.ports == ()


def test_embedded_default_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    cfg = config.default()
    assert cfg.name == "default"
    assert cfg.source == "<embedded default>"
    # A directory of this user's own, never one any user could have made first.
    assert cfg.socket == f"/tmp/vhostser-{os.geteuid()}/default.sock"
    # Not configured: `run` and `ctl` derive it from the socket (default.ctl beside it).
    assert cfg.admin_socket is None
    assert [(p.config.id, p.config.name, p.config.console, p.backend_type) for p in cfg.ports] == [
        (0, "", True, "stdout"),
        (1, "org.vhostser.echo", False, "echo"),
    ]
    for spec in cfg.ports:
        backend = spec.make_backend()
        assert isinstance(backend, PortBackend)
        assert isinstance(backend, BACKENDS[spec.backend_type])


def test_embedded_default_sockets_go_in_the_users_runtime_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", '/run/user/1000 "x"')
    cfg = config.default()
    assert cfg.socket == '/run/user/1000 "x"/vhostser/default.sock'
    assert cfg.admin_socket is None  # derived from the socket: default.ctl beside it
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")  # not a usable runtime dir
    assert config.default().socket == f"/tmp/vhostser-{os.geteuid()}/default.sock"


REALISTIC = """\
# web1: a guest agent, a serial console with a log, a TCP debug port
[vm]
name = "web1"
socket = "/run/vhostser/web1.sock"
max_ports = 8
state_dir = "/var/lib/vhostser/web1"
admin_socket = "/run/vhostser/web1.ctl"
frontend_grace = 45
cols = 132
rows = 43
resize_order = "rows-cols"

[[port]]
id = 0
console = true
backend = { type = "file", path = "@DIR@/web1.console.log", append = true }

[[port]]
id = 1
name = "org.qemu.guest_agent.0"
guest_writes_without_host = "hold"
staging = 131072
backend = { type = "unix", path = "@DIR@/web1.qga.sock" }

[[port]]
id = 5
name = "org.example.debug"
guest_writes_without_host = "discard"
[port.backend]
type = "tcp"
host = "127.0.0.1"
port = 7001

[[port]]
id = 7
name = "org.example.null"
backend = { type = "null" }
"""


def test_realistic_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "web1.toml"
    path.write_text(REALISTIC.replace("@DIR@", str(tmp_path)))
    cfg = config.load(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web1.toml"]  # validating made nothing
    assert cfg.source == str(path)
    assert (cfg.name, cfg.socket, cfg.max_ports) == ("web1", "/run/vhostser/web1.sock", 8)
    assert cfg.state_dir == "/var/lib/vhostser/web1"
    assert cfg.admin_socket == "/run/vhostser/web1.ctl"
    assert cfg.frontend_grace == 45.0 and isinstance(cfg.frontend_grace, float)
    assert (cfg.cols, cfg.rows, cfg.resize_rows_first) == (132, 43, True)
    assert [p.config for p in cfg.ports] == [
        PortConfig(0, "", True, "hold", DEFAULT_STAGING),
        PortConfig(1, "org.qemu.guest_agent.0", False, "hold", 131072),
        PortConfig(5, "org.example.debug", False, "discard", DEFAULT_STAGING),
        PortConfig(7, "org.example.null", False, "hold", DEFAULT_STAGING),
    ]
    assert [p.backend_type for p in cfg.ports] == ["file", "unix", "tcp", "null"]
    assert cfg.ports[1].backend_options == {"path": f"{tmp_path}/web1.qga.sock"}
    assert cfg.ports[2].backend_options == {"host": "127.0.0.1", "port": 7001}


def test_make_backend_gives_a_new_backend_each_time() -> None:
    cfg = parse(REALISTIC.replace("@DIR@", "/nonexistent"), SRC)
    spec = cfg.ports[1]
    a, b = spec.make_backend(), spec.make_backend()
    assert a is not b
    assert type(a) is BACKENDS["unix"]


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "db7.toml"
    path.write_text("[vm]\nmax_ports = 2\n")
    cfg = config.load(path)
    assert cfg.name == "db7"
    assert cfg.socket == "/run/vhostser/db7.sock"


def test_bounds_are_inclusive() -> None:
    cfg = parse(
        "[vm]\nmax_ports = 31\ncols = 65535\nrows = 1\nfrontend_grace = 0\n"
        "[[port]]\nid = 30\nstaging = 4096\n" + NULL + "\n"
        "[[port]]\nid = 0\nstaging = 67108864\n" + NULL + "\n"
        f'[[port]]\nid = 1\nname = "{"n" * 255}"\n' + NULL + "\n",
        SRC,
    )
    assert cfg.max_ports == 31
    assert [p.config.staging_limit for p in cfg.ports] == [4096, 64 << 20, DEFAULT_STAGING]
    assert cfg.frontend_grace == 0.0
    assert parse("[vm]\nmax_ports = 1\n[[port]]\nid = 0\n" + NULL, SRC).ports[0].config.id == 0


def test_port_spec_type() -> None:
    spec = parse(port_doc("id = 1\n" + NULL), SRC).ports[0]
    assert isinstance(spec, PortSpec)
    assert spec.backend_type == "null" and spec.backend_options == {}


# ------------------------------------------------------------------------ errors


def test_invalid_toml() -> None:
    msg = error_of("[vm\nname = 1")
    assert re.match(rf"{SRC}: not valid TOML: .*line 1", msg), msg


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(missing))}: cannot read: "
                                          "No such file or directory$"):
        config.load(missing)


@pytest.mark.parametrize(
    ("text", "path", "expected"),
    [
        ("colour = 1\n", "<top>.colour", "unknown key (expected one of port, vm)"),
        ("[vm]\nmax_port = 4\n", "vm.max_port", "unknown key (did you mean max_ports?)"),
        (port_doc("id = 1\nbakend = 1\n" + NULL), "port 1.bakend",
         "unknown key (did you mean backend?)"),
        (port_doc('id = 1\nbackend = { type = "null", path = "/x" }'),
         "port 1.backend.path", "unknown key (expected no options)"),
        (port_doc('id = 1\nbackend = { type = "unix", path = "/x", mdoe = "framed" }'),
         "port 1.backend.mdoe", "unknown key (did you mean mode?)"),
    ],
    ids=["top", "vm", "port", "null-backend", "unix-backend"],
)
def test_unknown_keys_at_every_level(text: str, path: str, expected: str) -> None:
    # The key was typed wrong, not its value: no "got".
    assert error_of(text) == f"{SRC}: {path}: {expected}"


def test_unknown_key_in_the_second_port_names_it() -> None:
    msg = error_of(
        "[[port]]\nid = 0\n" + NULL + "\n[[port]]\nid = 1\nconsol = true\n" + NULL + "\n"
    )
    assert msg == f"{SRC}: port 1.consol: unknown key (did you mean console?)"


@pytest.mark.parametrize(
    ("text", "path", "expected", "got"),
    [
        ("[vm]\nmax_ports = true\n", "vm.max_ports", "int", "True"),
        ("[vm]\nmax_ports = 4.0\n", "vm.max_ports", "int", "4.0"),
        ('[vm]\nmax_ports = "4"\n', "vm.max_ports", "int", "'4'"),
        ("[vm]\nname = 7\n", "vm.name", "str", "7"),
        ("[vm]\nsocket = false\n", "vm.socket", "str", "False"),
        ("[vm]\ncols = true\n", "vm.cols", "int", "True"),
        ("[vm]\nfrontend_grace = true\n", "vm.frontend_grace", "float", "True"),
        ('[vm]\nfrontend_grace = "30s"\n', "vm.frontend_grace", "float", "'30s'"),
        ("[vm]\nresize_order = 1\n", "vm.resize_order", "str", "1"),
        ("vm = 3\n", "<top>.vm", "dict", "3"),
        ("[port]\nid = 1\n", "<top>.port", "list", "{'id': 1}"),
        (port_doc("id = true\n" + NULL), "port #1 (bad id).id", "int", "True"),
        (port_doc('id = "1"\n' + NULL), "port #1 (bad id).id", "int", "'1'"),
        (port_doc("id = 1\nconsole = 1\n" + NULL), "port 1.console", "bool", "1"),
        (port_doc("id = 1\nname = 5\n" + NULL), "port 1.name", "str", "5"),
        (port_doc("id = 1\nstaging = false\n" + NULL), "port 1.staging", "int", "False"),
        (port_doc('id = 1\nbackend = "null"'), "port 1.backend", "dict", "'null'"),
        (port_doc('id = 1\nbackend = { type = "unix", path = "/x", max_peers = true }'),
         "port 1.backend.max_peers", "an integer in 1..1024", "True"),
        (port_doc('id = 1\nbackend = { type = "tcp", port = true }'),
         "port 1.backend.port", "an integer in", "True"),
    ],
)
def test_wrong_types(text: str, path: str, expected: str, got: str) -> None:
    msg = error_of(text)
    assert msg.startswith(f"{SRC}: {path}: expected {expected}"), msg
    assert msg.endswith(f"got {got}"), msg


@pytest.mark.parametrize(
    ("text", "path", "expected", "got"),
    [
        ("[vm]\nmax_ports = 0\n", "vm.max_ports", "an integer in 1..31", "0"),
        ("[vm]\nmax_ports = 32\n", "vm.max_ports", "an integer in 1..31", "32"),
        ("[vm]\ncols = 0\n", "vm.cols", "an integer in 1..65535", "0"),
        ("[vm]\nrows = 65536\n", "vm.rows", "an integer in 1..65535", "65536"),
        ("[vm]\nfrontend_grace = -1\n", "vm.frontend_grace", "a number of seconds ≥ 0", "-1.0"),
        ('[vm]\nresize_order = "rows"\n', "vm.resize_order", "one of cols-rows, rows-cols",
         "'rows'"),
        (port_doc("id = 4\n" + NULL), "port #1 (bad id).id", "an integer in 0..3", "4"),
        (port_doc("id = 2\n" + NULL, vm="max_ports = 2"), "port #1 (bad id).id",
         "an integer in 0..1", "2"),
        (port_doc("id = -1\n" + NULL), "port #1 (bad id).id", "an integer in 0..3", "-1"),
        (port_doc("id = 1\nstaging = 4095\n" + NULL), "port 1.staging",
         "an integer in 4096..67108864", "4095"),
        (port_doc('id = 1\nguest_writes_without_host = "block"\n' + NULL),
         "port 1.guest_writes_without_host", "one of hold, discard", "'block'"),
        (port_doc('id = 1\nname = "a/b"\n' + NULL), "port 1.name",
         "a port name without '/' or NUL, of at most 255 bytes", "'a/b'"),
        (port_doc('id = 1\nname = "' + "\u00e9" * 128 + '"\n' + NULL), "port 1.name",
         "a port name without '/' or NUL, of at most 255 bytes", "'"),
        (port_doc('id = 1\nbackend = { type = "unix", path = "/x", mode = "raw" }'),
         "port 1.backend.mode", 'one of "stream", "session", "framed"', "'raw'"),
    ],
)
def test_out_of_range(text: str, path: str, expected: str, got: str) -> None:
    msg = error_of(text)
    assert msg.startswith(f"{SRC}: {path}: expected {expected}, got "), msg
    assert got in msg


def test_port_id_checked_against_max_ports_of_the_same_file() -> None:
    # vm comes after the ports in the file: max_ports still applies to them
    text = "[[port]]\nid = 5\n" + NULL + "\n[vm]\nmax_ports = 8\n"
    assert parse(text, SRC).ports[0].config.id == 5


def test_missing_port_id() -> None:
    assert error_of(port_doc(NULL)) == f"{SRC}: port #1 (no id).id: required key missing"


def test_missing_backend() -> None:
    assert error_of(port_doc("id = 1")) == f"{SRC}: port 1.backend: required key missing"


@pytest.mark.parametrize(("backend", "got"), [
    ('{ type = "serial" }', "'serial'"),
    ('{ path = "/x" }', "None"),
    ("{ type = 3 }", "3"),
])
def test_unknown_backend_type(backend: str, got: str) -> None:
    msg = error_of("[[port]]\nid = 0\n" + NULL + f"\n[[port]]\nid = 1\nbackend = {backend}\n")
    types = ", ".join(sorted(BACKENDS))
    assert msg == f"{SRC}: port 1.backend.type: expected one of {types}, got {got}"


def test_backend_option_errors_carry_the_path() -> None:
    msg = error_of(port_doc('id = 2\nbackend = { type = "unix" }'))
    assert msg.startswith(f"{SRC}: port 2.backend.path: expected a non-empty string")


def test_port_not_a_table() -> None:
    assert error_of("port = [1]\n") == f"{SRC}: port #1 (no id): expected a table, got 1"


def test_duplicate_ids() -> None:
    msg = error_of("[[port]]\nid = 1\n" + NULL + "\n[[port]]\nid = 1\n" + NULL + "\n")
    assert msg.endswith("port 1.id: expected a unique port id, got 1 (also port #1, line 2)")


def test_duplicate_names() -> None:
    msg = error_of(
        '[[port]]\nid = 1\nname = "a"\n' + NULL + '\n[[port]]\nid = 2\nname = "a"\n' + NULL
    )
    assert msg.endswith("port 2 (a).name: expected a unique name, got 'a' (also port #1, line 3)")


def test_several_unnamed_ports_are_fine() -> None:
    cfg = parse("[[port]]\nid = 1\n" + NULL + "\n[[port]]\nid = 2\n" + NULL + "\n", SRC)
    assert [p.config.name for p in cfg.ports] == ["", ""]


@pytest.mark.parametrize("key", ["id", "name"])
def test_duplicates_name_the_key_path(key: str) -> None:
    msg = error_of(
        '[[port]]\nid = 1\nname = "a"\n' + NULL + "\n"
        + ('[[port]]\nid = 1\nname = "b"\n' if key == "id" else '[[port]]\nid = 2\nname = "a"\n')
        + NULL + "\n"
    )
    assert f"{SRC}: port {1 if key == 'id' else 2} ({'b' if key == 'id' else 'a'}).{key}: " in msg


def test_frontend_grace_nan_rejected() -> None:
    msg = error_of("[vm]\nfrontend_grace = nan\n")
    assert "vm.frontend_grace: expected a number of seconds" in msg


def test_port_name_with_nul_rejected() -> None:
    msg = error_of(port_doc('id = 1\nname = "qga\\u0000x"\n' + NULL))
    assert f"{SRC}: port 1.name: expected " in msg


@pytest.mark.parametrize("value", ["9464", "localhost", "127.0.0.1:", "127.0.0.1:99999", ":80"])
def test_metrics_listen_must_be_host_port(value: str) -> None:
    msg = error_of(f'[vm]\nmetrics_listen = "{value}"\n')
    assert msg.endswith(f"vm.metrics_listen: expected \"HOST:PORT\", e.g. \"127.0.0.1:9464\", "
                        f"got {value!r}")


def test_metrics_listen_parses() -> None:
    assert parse('[vm]\nmetrics_listen = "[::1]:9464"\n', SRC).metrics_listen == ("::1", 9464)


@pytest.mark.parametrize("key", ["name", "socket", "state_dir", "admin_socket"])
def test_no_vm_string_holds_nul(key: str) -> None:
    # The same reader as the backends': every string it hands out becomes a path or a name.
    msg = error_of(f'[vm]\n{key} = "a\\u0000b"\n')
    assert msg == f"{SRC}: vm.{key}: expected a string without NUL bytes, got 'a\\x00b'"


# ------------------------------------------------------------------------ hostile files


@pytest.mark.parametrize("nested", [
    "x = " + "[" * 5000 + "]" * 5000,
    "x = " + "{ a = " * 3000 + "1" + " }" * 3000,
])
def test_nesting_too_deep_is_an_error_not_a_crash(nested: str) -> None:
    assert error_of(nested) == f"{SRC}: arrays or tables nested too deeply"


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[vm]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not UTF-8 \(as TOML must "
                                          r"be\): byte 0xe9 at offset 16$"):
        config.load(path)


# ------------------------------------------------------------------------ socket security


def test_socket_mode_group_and_peer_allow_lists() -> None:
    cfg = parse('[vm]\nsocket_mode = 0o660\nsocket_group = "nogroup"\n'
                'allow_uids = [0, "nobody", 4242]\nallow_gids = ["nogroup", 36]\n', SRC)
    assert (cfg.socket_mode, cfg.socket_group) == (0o660, 65534)
    assert (cfg.allow_uids, cfg.allow_gids) == ((0, 65534, 4242), (65534, 36))
    assert parse('[vm]\nsocket_mode = "0640"\nsocket_group = 36\n', SRC).socket_mode == 0o640
    defaults = parse("", SRC)
    assert (defaults.socket_mode, defaults.socket_group) == (0o600, None)
    assert (defaults.allow_uids, defaults.allow_gids) == ((), ())


@pytest.mark.parametrize(("line", "error"), [
    ("socket_mode = 0o666", "vm.socket_mode: expected a file mode with read and write for the "
     "owner and no bits for others, like 0o600 or 0o660, got 438"),
    ("socket_mode = 0o400", "vm.socket_mode: expected a file mode"),
    ("socket_mode = \"rw\"", "vm.socket_mode: expected a file mode"),
    ("socket_group = \"no-such-group-here\"", "vm.socket_group: expected a number or the name "
     "of an existing user/group, got 'no-such-group-here'"),
    ("allow_uids = [\"no-such-user-here\"]", "vm.allow_uids: expected a number or the name"),
    ("allow_uids = 0", "vm.allow_uids: expected list, got 0"),
    ("allow_gids = [-1]", "vm.allow_gids: expected a number or the name"),
    ("allowed_dirs = [\"relative\"]", "vm.allowed_dirs: expected a list of absolute directory"),
    ("allow_remote_bind = 1", "vm.allow_remote_bind: expected bool, got 1"),
])
def test_socket_security_errors(line: str, error: str) -> None:
    assert error_of(f"[vm]\n{line}\n").startswith(f"{SRC}: {error}")


def test_backend_socket_errors_name_the_file_line_and_key() -> None:
    text = ('[vm]\nallow_uids = [4242]\n\n[[port]]\nid = 1\nname = "a"\n'
            'backend = { type = "unix", path = "/a", socket_mode = 0o666 }\n\n'
            '[[port]]\nid = 2\n[port.backend]\ntype = "console"\nsocket = "/c"\n'
            'socket_group = "no-such-group-here"\n')
    assert errors_of(text) == [
        f"{SRC}:7: port 1 (a).backend.socket_mode: expected a file mode with read and write "
        "for the owner and no bits for others, like 0o600 or 0o660, got 438",
        f"{SRC}:14: port 2.backend.socket_group: expected a number or the name of an "
        "existing user/group, got 'no-such-group-here'",
    ]


def test_a_ports_backend_gets_the_peers_it_is_made_with() -> None:
    spec = parse('[[port]]\nid = 1\nbackend = { type = "unix", path = "/a" }\n', SRC).ports[0]
    peers = PeerPolicy(frozenset({4242}), frozenset())
    assert spec.make_backend(peers).endpoint.policy == peers  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ what admin may name


def admin_spec(cfg: config.VMConfig, backend: str) -> PortSpec:
    return config.parse_port("admin request", "port", {"id": 1, "backend": tomllib.loads(
        f"b = {backend}")["b"]}, cfg.max_ports)


def test_admin_dirs_default_to_the_daemons_own_directories() -> None:
    cfg = parse('[vm]\nsocket = "/run/v/a.sock"\nadmin_socket = "/run/v/a.ctl"\n'
                'state_dir = "/var/lib/v"\n', SRC)
    assert cfg.admin_dirs == ("/var/lib/v", "/run/v")
    explicit = parse('[vm]\nallowed_dirs = ["/srv/logs/", "/srv/run"]\n', SRC)
    assert explicit.admin_dirs == ("/srv/logs", "/srv/run")
    assert parse("[vm]\nallowed_dirs = []\n", SRC).admin_dirs == ()


def test_admin_paths_must_be_inside_the_admin_dirs(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "out").symlink_to("/etc")
    cfg = parse(f'[vm]\nallowed_dirs = ["{tmp_path}/logs"]\n', SRC)
    ok = [f'{{ type = "file", path = "{tmp_path}/logs/a.log" }}',
          f'{{ type = "file", path = "{tmp_path}/logs/new/deeper.log" }}',
          f'{{ type = "console", path = "{tmp_path}/logs/c.log", '
          f'socket = "{tmp_path}/logs/c.sock" }}',
          '{ type = "pty" }', '{ type = "null" }', '{ type = "echo" }']
    for backend in ok:
        config.check_admin_port(cfg, admin_spec(cfg, backend))
    bad = [('{ type = "file", path = "/etc/passwd", append = false }', "path", "/etc/passwd"),
           (f'{{ type = "file", path = "{tmp_path}/logs/out/passwd" }}', "path",
            f"{tmp_path}/logs/out/passwd"),
           (f'{{ type = "file", path = "{tmp_path}/logs2/a" }}', "path", f"{tmp_path}/logs2/a"),
           (f'{{ type = "console", socket = "{tmp_path}/c.sock" }}', "socket",
            f"{tmp_path}/c.sock"),
           ('{ type = "pty", link = "/dev/console-link" }', "link", "/dev/console-link")]
    for backend, key, path in bad:
        with pytest.raises(ConfigError, match=(
            rf"^admin request: port\.backend\.{key}: {re.escape(repr(path))} is not inside a "
            rf"directory admin requests may name \({re.escape(str(tmp_path))}/logs; \[vm\] "
            r"allowed_dirs\)$"
        )):
            config.check_admin_port(cfg, admin_spec(cfg, backend))


def test_admin_tcp_listeners_on_loopback_unless_remote_binds_are_allowed() -> None:
    cfg = parse("", SRC)
    for host in ("127.0.0.1", "127.9.9.9", "::1", "localhost"):
        config.check_admin_port(cfg, admin_spec(cfg, f'{{ type = "tcp", host = "{host}", '
                                                     'port = 1 }'))
    config.check_admin_port(cfg, admin_spec(cfg, '{ type = "tcp", port = 1 }'))
    for host in ("0.0.0.0", "::", "192.168.1.1", "host.example"):
        with pytest.raises(ConfigError, match=rf"^admin request: port\.backend\.host: "
                                              rf"'{re.escape(host)}': admin requests may listen"):
            config.check_admin_port(cfg, admin_spec(cfg, f'{{ type = "tcp", host = "{host}", '
                                                         'port = 1 }'))
    # A client connects out: no listener.
    config.check_admin_port(cfg, admin_spec(cfg, '{ type = "tcp", host = "0.0.0.0", '
                                                 'port = 1, role = "client" }'))
    remote = parse("[vm]\nallow_remote_bind = true\n", SRC)
    config.check_admin_port(remote, admin_spec(remote, '{ type = "tcp", host = "0.0.0.0", '
                                                       'port = 1 }'))


def test_every_backend_type_says_what_it_touches() -> None:
    # A new backend type with a path option must list it in PATH_OPTIONS: this is the list
    # admin add-port checks; review it when adding a type.
    assert {name: cls.PATH_OPTIONS for name, cls in BACKENDS.items()} == {
        "null": (), "echo": (), "stdout": (), "unix": ("path",), "tcp": (), "pty": ("link",),
        "file": ("path",), "console": ("path", "socket"),
    }


# ------------------------------------------------------------------------ every error, placed

MANY = """\
[vm]
name = "web1"
max_port = 4
cols = 0
metrics_listen = "9464"

[[port]]
id = 1
name = "org.qemu.guest_agent.0"
backend = { type = "unix", path = "", mdoe = "framed" }

[[port]]
name = "org.example.debug"
staging = 1
backend = { type = "tcp", port = 7001 }

[[port]]
backend = { type = "nul" }

[[port]]
id = 1
consol = true
[port.backend]
type = "file"
path = 5
"""


def test_every_error_is_reported_with_its_line() -> None:
    assert errors_of(MANY) == [
        f"{SRC}:3: vm.max_port: unknown key (did you mean max_ports?)",
        f"{SRC}:4: vm.cols: expected an integer in 1..65535, got 0",
        f'{SRC}:5: vm.metrics_listen: expected "HOST:PORT", e.g. "127.0.0.1:9464", got \'9464\'',
        f"{SRC}:10: port 1 (org.qemu.guest_agent.0).backend.mdoe: unknown key "
        "(did you mean mode?)",
        f"{SRC}:10: port 1 (org.qemu.guest_agent.0).backend.path: expected a non-empty "
        "string, got ''",
        f"{SRC}:12: port #2 (org.example.debug).id: required key missing",
        f"{SRC}:14: port #2 (org.example.debug).staging: expected an integer in "
        "4096..67108864, got 1",
        f"{SRC}:17: port #3 (no id).id: required key missing",
        f"{SRC}:18: port #3 (no id).backend.type: expected one of "
        f"{', '.join(sorted(BACKENDS))}, got 'nul'",
        f"{SRC}:22: port 1.consol: unknown key (did you mean console?)",
        f"{SRC}:25: port 1.backend.path: expected a non-empty string, got 5",
    ]


def test_duplicates_are_found_among_good_ports_with_both_lines() -> None:
    text = ('[[port]]\nid = 1\nname = "a"\n' + NULL + "\n\n"
            '[[port]]\nid = 2\nname = "a"\n' + NULL + "\n\n"
            '[[port]]\nid = 1\nname = "b"\n' + NULL + "\n")
    assert errors_of(text) == [
        f"{SRC}:8: port 2 (a).name: expected a unique name, got 'a' (also port #1, line 3)",
        f"{SRC}:12: port 1 (b).id: expected a unique port id, got 1 (also port #1, line 2)",
    ]


def test_a_port_with_a_bad_id_is_named_by_position_and_name() -> None:
    errors = errors_of(port_doc('id = 9\nname = "org.x"\n' + NULL))
    assert errors == [f"{SRC}:4: port #1 (org.x).id: expected an integer in 0..3, got 9"]
    # A name that would garble the line is left out of the label.
    assert errors_of(port_doc('id = 9\nname = "a\\nb"\n' + NULL))[0].startswith(
        f"{SRC}:4: port #1 (bad id).id: ")


def test_a_bad_max_ports_does_not_make_every_port_id_wrong_too() -> None:
    assert errors_of("[vm]\nmax_ports = 99\n[[port]]\nid = 20\n" + NULL) == [
        f"{SRC}:2: vm.max_ports: expected an integer in 1..31, got 99"]


def test_lines_are_found_past_strings_arrays_and_comments() -> None:
    text = '''\
# [[port]] in a comment
[vm]
name = """
[[port]]
id = 3
"""
allow_uids = [
  0,  # max_ports = 1
  1,
]
"quoted.key" = 1
socket = 'x' # trailing
  [ "other" ]
  id = 1
[[port]]
backend.type = "null"
'''
    tomllib.loads(text)  # (the scanner's premise: a valid document)
    lines = config._Lines(text)
    assert lines.line_of(("vm", "name")) == 3
    assert lines.line_of(("vm", "allow_uids")) == 7
    assert lines.line_of(("vm", "quoted.key")) == 11
    assert lines.line_of(("vm", "socket")) == 12
    assert lines.line_of(("other", "id")) == 14
    assert lines.line_of(("port", 0, "backend", "type")) == 16
    assert lines.line_of(("port", 0, "backend", "path")) == 16
    assert lines.line_of(("port", 5)) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["id", "name", "staging", "console"]),
                          st.sampled_from(['1', '"x"', '"""a\n[[port]]\nid = 2\n"""',
                                           '[\n1,\n2]', "{ a = 1 }", "'''\nb = 1'''"]),
                          st.booleans()),
                max_size=12))
def test_every_key_is_found_at_its_line(keys: list[tuple[str, str, bool]]) -> None:
    # Each entry: a key (made unique by its position), its value, and whether a new
    # [[port]] comes before it.
    text, where, port, line = "", {}, -1, 1
    for n, (key, value, new_port) in enumerate(keys):
        if new_port or port < 0:
            port += 1
            text += "[[port]]\n"
            line += 1
        text += f"{key}{n} = {value}\n"
        where[("port", port, f"{key}{n}")] = line
        line += value.count("\n") + 1
    tomllib.loads(text)  # (the scanner's premise: a valid document)
    lines = config._Lines(text)
    assert {path: lines.line_of(path) for path in where} == where


# ------------------------------------------------------------------------ sockets `check` sees


def test_socket_paths_too_long_for_sun_path(tmp_path: Path) -> None:
    long = str(tmp_path / ("s" * (107 - len(str(tmp_path)))))  # 108 bytes: one too many
    ok = str(tmp_path / ("s" * (106 - len(str(tmp_path)))))  # 107: fits
    path = tmp_path / "vm.toml"
    path.write_text(f'[vm]\nsocket = "{ok}"\nadmin_socket = "{long}"\n\n[[port]]\nid = 1\n'
                    f'backend = {{ type = "unix", path = "{long}", role = "client" }}\n'
                    f'[[port]]\nid = 2\nname = "c"\nbackend = {{ type = "console", '
                    f'socket = "{ok}" }}\n')
    with pytest.raises(ConfigError) as info:
        config.check(path)
    problem = f"expected a socket path of at most 107 bytes (sun_path), got {long!r} (108 bytes)"
    assert info.value.errors == [f"{path}:3: vm.admin_socket: {problem}",
                                 f"{path}:7: port 1.backend.path: {problem}"]
    assert len(ok.encode()) == 107
    # Nothing made: check looks, never touches.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.toml"]


def test_socket_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    path = tmp_path / "vm.toml"
    path.write_text(f'[vm]\nsocket = "{tmp_path}/plain/sub/vm.sock"\nadmin_socket = ""\n')
    with pytest.raises(ConfigError) as info:
        config.check(path)
    assert info.value.errors == [f"{path}:2: vm.socket: expected a directory for the socket, "
                                 f"got {tmp_path}/plain, which is not one"]
    # A missing directory is fine (the daemon makes it), a derived admin socket is checked.
    path.write_text(f'[vm]\nsocket = "{tmp_path}/new/{"x" * 100}.sock"\n')
    with pytest.raises(ConfigError) as info:
        config.check(path)
    assert [e.split(": expected")[0] for e in info.value.errors] == [
        f"{path}:2: vm.socket", f"{path}:2: vm.socket (its admin socket, admin_socket unset)"]


def test_check_prints_every_error_and_a_socket_directory_it_may_not_write(
    tmp_path: Path,
) -> None:
    """`vhostser check` as a user who may not write in a socket's directory: root made
    unprivileged by dropping the capabilities that let it write anywhere (setpriv)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    good = tmp_path / "good.toml"
    good.write_text(f'[vm]\nsocket = "{tmp_path}/vm.sock"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[vm]\nsocket = "{tmp_path}/vm.sock"\nmax_port = 4\n\n[[port]]\nid = 1\n'
                   f'backend = {{ type = "unix", path = "{locked}/sub/p.sock" }}\n'
                   '[[port]]\nid = 1\nbackend = { type = "echo", x = 1 }\n')
    command = [sys.executable, "-m", "vhostser", "check", str(good), str(bad)]
    r = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1
    assert r.stdout == f"{good}: ok: vm good, 0 ports, socket {tmp_path}/vm.sock\n"
    assert r.stderr.splitlines() == [
        f"{bad}:3: vm.max_port: unknown key (did you mean max_ports?)",
        f"{bad}:10: port 1.backend.x: unknown key (expected no options)",
    ]
    bad.write_text(bad.read_text().replace("max_port = 4\n", "").replace(", x = 1", "")
                   .replace("id = 1\nbackend = { type = \"echo\"", "id = 2\nbackend = "
                            "{ type = \"echo\""))
    setpriv = shutil.which("setpriv")
    if os.getuid() != 0 or setpriv is None:
        os.chmod(locked, 0o555)
        prefix = []
    else:
        os.chown(locked, 65534, 65534)
        os.chmod(locked, 0o555)
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner",
                  "--inh-caps=-all"]
    r = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 1, r
    assert r.stderr.splitlines() == [
        f"{bad}:6: port 1.backend.path: expected a socket directory this user "
        f"(uid {os.geteuid()}) may write in, got {locked}"]


def test_a_backend_that_is_not_a_table_is_one_error() -> None:
    assert errors_of(port_doc('id = 1\nbackend = "null"')) == [
        f"{SRC}:5: port 1.backend: expected dict, got 'null'"]
