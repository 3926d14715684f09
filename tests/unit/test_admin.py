"""The admin API (vhostser.admin): `dispatch` against a real Daemon built in a trio nursery
from a parsed config (null / echo backends, no front end), the Prometheus text, and the line
protocol over a real unix socket."""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from vhostser import admin, config
from vhostser.backends.options import ANYONE
from vhostser.backends.simple import RecordingBackend
from vhostser.config import PortSpec
from vhostser.console import PortConfig, control
from vhostser.console.session import State
from vhostser.daemon import Daemon
from vhostser.sockets import PeerPolicy

CONFIG = """\
[vm]
name = "t1"
socket = "/nonexistent/t1.sock"
max_ports = 4

[[port]]
id = 0
console = true
backend = { type = "null" }

[[port]]
id = 1
name = "org.test.echo"
backend = { type = "echo" }

[[port]]
id = 2
name = "org.test.null"
backend = { type = "null" }
"""


@asynccontextmanager
async def running(text: str = CONFIG, source: str = "t1.toml") -> AsyncIterator[Daemon]:
    cfg = config.parse(text, source)
    async with trio.open_nursery() as nursery:
        daemon = Daemon(cfg, nursery)
        await trio.testing.wait_all_tasks_blocked()  # backends started (echo attaches)
        yield daemon
        nursery.cancel_scope.cancel()


def from_guest(daemon: Daemon, msg: control.ControlMessage) -> None:
    """A control message from the guest, as the control queue hands it to the device."""
    daemon.device.core.control_from_guest(msg)
    daemon.device.settle()


def guest_opens(daemon: Daemon, pid: int) -> None:
    """The guest sets the port up (PORT_READY) and opens it."""
    from_guest(daemon, control.ControlMessage(pid, control.Event.PORT_READY, 1))
    from_guest(daemon, control.port_open(pid, True))


def guest_writes(daemon: Daemon, pid: int, data: bytes) -> bool:
    """One tx chain of the guest's: True if the device is done with it."""
    done = daemon.device.core.guest_bytes(pid, data)
    daemon.device.settle()
    return done


def guest_reads(daemon: Daemon, pid: int, n: int) -> None:
    """An rx buffer of n bytes takes what is staged."""
    daemon.device.core.consumed(pid, n)
    daemon.device.settle()


def ok(daemon: Daemon, request: Any) -> Any:
    response = admin.dispatch(daemon, request)
    json.dumps(response)  # what the socket sends
    assert response["ok"] is True, response
    assert set(response) == {"ok", "result"}
    return response["result"]


def err(daemon: Daemon, request: Any) -> str:
    response = admin.dispatch(daemon, request)
    json.dumps(response)
    assert response["ok"] is False, response
    assert set(response) == {"ok", "error"}
    assert isinstance(response["error"], str) and response["error"]
    return str(response["error"])


def recording_spec(pid: int, name: str = "") -> tuple[PortSpec, list[RecordingBackend]]:
    made: list[RecordingBackend] = []

    def make(peers: PeerPolicy = ANYONE) -> RecordingBackend:
        made.append(RecordingBackend())
        return made[-1]

    return PortSpec(PortConfig(pid, name), "recording", {}, make), made


# ------------------------------------------------------------------------ read-only commands


async def test_status() -> None:
    async with running() as daemon:
        guest_opens(daemon, 1)
        status = ok(daemon, {"cmd": "status"})
        assert status["vm"] == "t1"
        assert status["config"] == "t1.toml"
        assert status["socket"] == "/nonexistent/t1.sock"
        assert status["pid"] == os.getpid()
        assert status["frontend_connected"] is False
        assert status["connections"] == 0
        assert status["max_ports"] == 4
        assert status["ports"] == 3
        assert status["sessions_open"] == 1
        assert status["needs_reset"] is False
        assert status["uptime"] >= 0
        assert status["frontend_left"] is None  # never connected
        assert status["status"] == 0 and status["status_bits"] == []
        assert status["sessions_restored"] == 0
        # The status as GET_STATUS reports it, by name; NEEDS_RESET is the device's own.
        daemon.backend.status = 0x0F
        daemon.backend.needs_reset = True
        status = ok(daemon, {"cmd": "status"})
        assert status["status"] == 0x0F
        assert status["status_bits"] == ["ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK",
                                         "NEEDS_RESET"]


async def test_ports() -> None:
    async with running() as daemon:
        guest_opens(daemon, 1)
        guest_opens(daemon, 2)
        assert ok(daemon, {"cmd": "ports"}) == [
            {"id": 0, "name": "", "console": True, "backend": "null", "endpoint": None,
             "state": "B", "state_name": "closed", "guest_open": False, "host_open": False,
             "guest_ready": False, "session": None, "restored": False},
            {"id": 1, "name": "org.test.echo", "console": False, "backend": "echo",
             "endpoint": None, "state": "A", "state_name": "open (guest+host)",
             "guest_open": True, "host_open": True, "guest_ready": True, "session": 1,
             "restored": False},
            {"id": 2, "name": "org.test.null", "console": False, "backend": "null",
             "endpoint": None, "state": "D", "state_name": "guest open, no host",
             "guest_open": True, "host_open": False, "guest_ready": True, "session": 1,
             "restored": False},
        ]


async def test_sessions() -> None:
    async with running() as daemon:
        assert ok(daemon, {"cmd": "sessions"}) == []
        guest_opens(daemon, 2)
        from_guest(daemon, control.port_open(2, False))
        guest_opens(daemon, 2)
        guest_opens(daemon, 1)
        assert ok(daemon, {"cmd": "sessions"}) == [
            {"port": 1, "name": "org.test.echo", "session": 1, "state": "A",
             "state_name": "open (guest+host)", "restored": False},
            {"port": 2, "name": "org.test.null", "session": 2, "state": "D",
             "state_name": "guest open, no host", "restored": False},
        ]


async def test_stats() -> None:
    async with running() as daemon:
        guest_opens(daemon, 1)
        assert guest_writes(daemon, 1, b"hello")
        guest_reads(daemon, 1, 5)
        daemon.device.ports[2].send(b"nobody")
        stats = ok(daemon, {"cmd": "stats"})
        assert set(stats) == {"device", "ports", "vhost_user", "listeners"}
        assert stats["vhost_user"] == {"rejected": {}, "bad_fds": {}, "eventfd_failures": {}}
        assert stats["listeners"] == {"vhost-user": {
            "accepted": 0, "refused_busy": 0, "refused_peer": 0, "accept_errors": 0}}
        assert set(stats["ports"]) == {"0", "1", "2"}
        p1 = stats["ports"]["1"]
        assert p1["bytes_from_guest"] == 5 and p1["buffers_from_guest"] == 1
        assert p1["bytes_to_guest"] == 5 and p1["buffers_to_guest"] == 1
        assert p1["sessions_opened"] == 1
        assert stats["ports"]["2"]["discarded"] == {"guest-closed": 6}
        assert stats["device"]["control_from_guest"] == 0
        assert stats["device"]["bad_chains"] == {}


# ------------------------------------------------------------------------ changing commands


async def test_add_port() -> None:
    async with running() as daemon:
        result = ok(daemon, {"cmd": "add-port",
                             "port": {"id": 3, "name": "x", "backend": {"type": "null"}}})
        assert result == {"id": 3, "name": "x"}
        assert 3 in daemon.device.ports
        assert ok(daemon, {"cmd": "ports"})[-1]["backend"] == "null"
        assert ok(daemon, {"cmd": "status"})["ports"] == 4


@pytest.mark.parametrize(
    ("port", "error"),
    [
        (None, "port: expected a port table like the config file's [[port]]"),
        ([1], "port: expected a port table like the config file's [[port]]"),
        ({"id": 1, "backend": {"type": "null"}}, "port 1 exists"),
        ({"id": 3, "name": "org.test.echo", "backend": {"type": "null"}},
         "a port is already named 'org.test.echo"),  # (closing quote: see the xfail below)
        ({"id": 9, "backend": {"type": "null"}},
         "admin request: port.id: expected an integer in 0..3, got 9"),
        ({"id": 3}, "admin request: port.backend: required key missing"),
        ({"id": 3, "backend": {"type": "nope"}}, "admin request: port.backend.type: expected one"),
        ({"id": 3, "colour": 1, "backend": {"type": "null"}}, "admin request: port.colour: "),
        ({"id": 3, "backend": {"type": "null", "x": 1}}, "admin request: port.backend.x: "),
    ],
)
async def test_add_port_errors(port: Any, error: str) -> None:
    async with running() as daemon:
        request = {"cmd": "add-port"} if port is None else {"cmd": "add-port", "port": port}
        assert err(daemon, request).startswith(error)
        assert sorted(daemon.device.ports) == [0, 1, 2]


async def test_remove_port_closes_its_session() -> None:
    async with running() as daemon:
        spec, made = recording_spec(3, "rec")
        daemon.add_port(spec)
        guest_opens(daemon, 3)
        assert ok(daemon, {"cmd": "remove-port", "id": 3}) == {"id": 3}
        assert made[0].events == [("open", 1, ""), ("close", 1, "port-removed")]
        assert 3 not in daemon.device.ports
        assert [p["id"] for p in ok(daemon, {"cmd": "ports"})] == [0, 1, 2]
        assert err(daemon, {"cmd": "remove-port", "id": 3}) == "no port 3"


@pytest.mark.parametrize("value", [None, "1", 1.0, True, [1]])
async def test_remove_port_needs_an_int(value: Any) -> None:
    async with running() as daemon:
        request: dict[str, Any] = {"cmd": "remove-port"}
        if value is not None:
            request["id"] = value
        assert err(daemon, request).startswith("id: expected an integer port id, got ")
        assert sorted(daemon.device.ports) == [0, 1, 2]


async def test_error_messages_not_mangled() -> None:
    async with running() as daemon:
        assert err(daemon, {"cmd": "remove-port", "id": "1"}) == (
            "id: expected an integer port id, got '1'"
        )


async def test_close_session() -> None:
    async with running() as daemon:
        spec, made = recording_spec(3)
        daemon.add_port(spec)
        port = daemon.device.ports[3]
        port.host_attach()
        guest_opens(daemon, 3)
        assert ok(daemon, {"cmd": "close-session", "port": 3}) == {"port": 3, "session": 1}
        assert made[0].events == [("open", 1, ""), ("close", 1, "host-close")]
        assert port.state is State.E
        assert err(daemon, {"cmd": "close-session", "port": 3}) == "port 3 has no open session"
        assert ok(daemon, {"cmd": "sessions"}) == []
        port.host_attach()  # a peer comes back: a new session
        assert ok(daemon, {"cmd": "sessions"}) == [
            {"port": 3, "name": "", "session": 2, "state": "A",
             "state_name": "open (guest+host)", "restored": False}
        ]


async def test_close_session_errors() -> None:
    async with running() as daemon:
        assert err(daemon, {"cmd": "close-session", "port": 2}) == "port 2 has no open session"
        assert err(daemon, {"cmd": "close-session", "port": 7}) == "no port 7"
        assert err(daemon, {"cmd": "close-session"}).startswith("port: expected an integer")


async def test_reload(tmp_path: Path) -> None:
    path = tmp_path / "t1.toml"
    path.write_text(CONFIG)
    async with running(CONFIG, str(path)) as daemon:
        new = CONFIG.replace('name = "org.test.null"', 'name = "org.test.renamed"')
        new = new.replace("[[port]]\nid = 0\nconsole = true\nbackend = { type = \"null\" }\n",
                          "")
        new += '\n[[port]]\nid = 3\nname = "new"\nbackend = { type = "null" }\n'
        path.write_text(new)
        assert ok(daemon, {"cmd": "reload"}) == {"added": [3], "removed": [0], "changed": [2]}
        assert [(p["id"], p["name"]) for p in ok(daemon, {"cmd": "ports"})] == [
            (1, "org.test.echo"), (2, "org.test.renamed"), (3, "new"),
        ]
        path.write_text("[vm\n")
        assert err(daemon, {"cmd": "reload"}).startswith(f"{path}: not valid TOML")
        assert len(daemon.device.ports) == 3


async def test_backends_report_counters_and_reopen_on_reload(tmp_path: Path) -> None:
    path = tmp_path / "t1.toml"
    log_port = (f'[[port]]\nid = 3\nname = "log"\n'
                f'backend = {{ type = "file", path = "{tmp_path / "p3.log"}" }}\n')
    path.write_text(CONFIG + log_port)
    async with running(CONFIG + log_port, str(path)) as daemon:
        stats = ok(daemon, {"cmd": "stats"})
        assert "backend" not in stats["ports"]["2"]  # null counts nothing of its own
        assert stats["ports"]["3"]["backend"] == {
            "bytes_written": 0, "bytes_lost": 0, "write_errors": 0, "open_errors": 0,
            "reopens": 0,
        }
        assert ok(daemon, {"cmd": "reload"}) == {"added": [], "removed": [], "changed": []}
        assert ok(daemon, {"cmd": "stats"})["ports"]["3"]["backend"]["reopens"] == 1


async def test_reload_without_a_file() -> None:
    async with running() as daemon:
        assert err(daemon, {"cmd": "reload"}).startswith("t1.toml: cannot read: ")


async def test_readded_port_never_reuses_session_ids() -> None:
    async with running() as daemon:
        guest_opens(daemon, 2)
        ok(daemon, {"cmd": "remove-port", "id": 2})
        ok(daemon, {"cmd": "add-port",
                    "port": {"id": 2, "name": "org.test.null", "backend": {"type": "null"}}})
        guest_opens(daemon, 2)
        assert ok(daemon, {"cmd": "sessions"}) == [
            {"port": 2, "name": "org.test.null", "session": 2, "state": "D",
             "state_name": "guest open, no host", "restored": False}
        ]


@pytest.mark.parametrize(
    "request_",
    [None, [], "status", 1, {}, {"cmd": "stauts"}, {"cmd": None}, {"cmd": ["status"]}],
)
async def test_bad_requests(request_: Any) -> None:
    async with running() as daemon:
        msg = err(daemon, request_)
        assert msg == 'expected {"cmd": one of ' + ", ".join(admin.COMMANDS) + "}"


# ------------------------------------------------------------------------ Prometheus

HELP = re.compile(r"^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$")
TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|untyped)$")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_prometheus(text: str) -> dict[str, dict[str, Any]]:
    """Families by name: kind, help and samples [(labels, value)]; asserts the format."""
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        if m := HELP.match(line):
            assert m[1] not in families, f"family {m[1]} twice"
            current = m[1]
            families[current] = {"help": m[2], "kind": None, "samples": []}
        elif m := TYPE.match(line):
            assert m[1] == current and families[current]["kind"] is None
            families[current]["kind"] = m[2]
        elif m := SAMPLE.match(line):
            assert m[1] == current, line
            labels: dict[str, str] = {}
            if m[2]:
                pos = 0
                while pos < len(m[2]):
                    lm = LABEL.match(m[2], pos)
                    assert lm, line
                    assert lm[1] not in labels
                    labels[lm[1]] = re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e[1], e[1]),
                                           lm[2])
                    pos = lm.end()
                    if pos < len(m[2]):
                        assert m[2][pos] == ",", line
                        pos += 1
            families[current]["samples"].append((labels, float(m[3])))
        else:
            raise AssertionError(f"not a Prometheus line: {line!r}")
    for name, fam in families.items():
        assert fam["kind"] is not None
        if fam["kind"] == "counter":
            assert name.endswith("_total"), name
    return families


async def test_metrics_parse_line_by_line() -> None:
    async with running() as daemon:
        daemon.device.ports[2].send(b"xy")
        daemon.device.reset()  # the front end resets the device: every port sees it
        guest_opens(daemon, 1)
        guest_writes(daemon, 1, b"abc")
        guest_reads(daemon, 1, 3)
        text = ok(daemon, {"cmd": "metrics"})
        assert text == admin.prometheus(daemon)
        fams = parse_prometheus(text)
        assert set(fams) == {
            "vhostser_frontend_connected", "vhostser_port_session_open",
            "vhostser_port_bytes_total", "vhostser_port_buffers_total",
            "vhostser_port_discarded_bytes_total", "vhostser_port_sessions_opened_total",
            "vhostser_port_resets_total", "vhostser_port_backend_failures_total",
            "vhostser_port_ledger_bytes", "vhostser_port_ledger_balanced",
            "vhostser_control_messages_total", "vhostser_bad_control_messages_total",
            "vhostser_listener_connections_total", "vhostser_listener_accept_errors_total",
        }
        assert fams["vhostser_frontend_connected"]["samples"] == [({"vm": "t1"}, 0.0)]
        assert fams["vhostser_port_session_open"]["kind"] == "gauge"
        assert fams["vhostser_port_session_open"]["samples"] == [
            ({"vm": "t1", "port": "0", "name": ""}, 0.0),
            ({"vm": "t1", "port": "1", "name": "org.test.echo"}, 1.0),
            ({"vm": "t1", "port": "2", "name": "org.test.null"}, 0.0),
        ]
        by = {(s[0]["port"], s[0]["direction"]): s[1]
              for s in fams["vhostser_port_bytes_total"]["samples"]}
        assert by[("1", "from_guest")] == 3 and by[("1", "to_guest")] == 3
        assert by[("0", "to_guest")] == 0
        assert fams["vhostser_port_discarded_bytes_total"]["samples"] == [
            ({"vm": "t1", "port": "2", "name": "org.test.null", "reason": "guest-closed"}, 2.0)
        ]
        # Every byte of every port accounted, both ways.
        assert {s[1] for s in fams["vhostser_port_ledger_balanced"]["samples"]} == {1.0}
        ledger = {(s[0]["port"], s[0]["direction"], s[0]["entry"]): s[1]
                  for s in fams["vhostser_port_ledger_bytes"]["samples"]}
        assert ledger[("2", "to_guest", "accepted")] == ledger[("2", "to_guest", "dropped")] == 2
        assert ledger[("1", "from_guest", "accepted")] == 3
        resets = {s[0]["port"]: s[1] for s in fams["vhostser_port_resets_total"]["samples"]}
        assert resets == {"0": 1.0, "1": 1.0, "2": 1.0}
        assert fams["vhostser_bad_control_messages_total"]["samples"] == [({"vm": "t1"}, 0.0)]
        assert fams["vhostser_listener_connections_total"]["samples"] == [
            ({"vm": "t1", "listener": "vhost-user", "outcome": outcome}, 0.0)
            for outcome in ("accepted", "refused-busy", "refused-peer")
        ]


async def test_metrics_label_escaping() -> None:
    weird = 'we"ird\\name'
    text = CONFIG.replace('name = "t1"', 'name = "vm \\"q\\""').replace(
        '"org.test.null"', '"we\\"ird\\\\name"')
    async with running(text) as daemon:
        assert daemon.device.ports[2].name == weird
        fams = parse_prometheus(admin.prometheus(daemon))
        samples = fams["vhostser_port_session_open"]["samples"]
        assert samples[2][0] == {"vm": 'vm "q"', "port": "2", "name": weird}


async def test_metrics_with_no_ports() -> None:
    async with running("[vm]\nname = \"empty\"\n") as daemon:
        fams = parse_prometheus(admin.prometheus(daemon))
        assert fams["vhostser_port_session_open"]["samples"] == []
        assert fams["vhostser_frontend_connected"]["samples"] == [({"vm": "empty"}, 0.0)]


# ------------------------------------------------------------------------ over the socket


@pytest.fixture
def short_dir() -> Iterator[str]:
    # unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="vsadm") as d:
        yield d


async def test_serve_admin_over_a_unix_socket(short_dir: str) -> None:
    path = os.path.join(short_dir, "t1.ctl")
    async with running() as daemon:
        await daemon.nursery.start(admin.serve_admin, daemon, path)
        assert os.stat(path).st_mode & 0o777 == 0o600
        status = await trio.to_thread.run_sync(admin.request, path, {"cmd": "status"})
        assert status["ok"] and status["result"]["vm"] == "t1"
        bad = await trio.to_thread.run_sync(admin.request, path, {"cmd": "nope"})
        assert bad["ok"] is False

        def session() -> list[bytes]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(path)
                # two requests in one write, one split across writes, one not JSON
                s.sendall(b'{"cmd": "sessions"}\n{"cmd": "ports"}\n{"cmd": ')
                s.sendall(b'"status"}\nnot json\n')
                buf = b""
                while buf.count(b"\n") < 4:
                    chunk = s.recv(65536)
                    assert chunk
                    buf += chunk
            return buf.split(b"\n")[:4]

        lines = [json.loads(x) for x in await trio.to_thread.run_sync(session)]
        assert lines[0] == {"ok": True, "result": []}
        assert [p["id"] for p in lines[1]["result"]] == [0, 1, 2]
        assert lines[2]["result"]["vm"] == "t1"
        assert lines[3]["ok"] is False and lines[3]["error"].startswith("not JSON: ")


async def test_serve_admin_request_too_long(short_dir: str) -> None:
    path = os.path.join(short_dir, "t1.ctl")
    async with running() as daemon:
        await daemon.nursery.start(admin.serve_admin, daemon, path)

        def flood() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(path)
                try:
                    s.sendall(b"x" * (admin.MAX_REQUEST + 10))
                except OSError:
                    pass
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                return buf

        reply = await trio.to_thread.run_sync(flood)
        assert json.loads(reply) == {"ok": False, "error": "request too long"}


# ------------------------------------------------------------------------ hostile requests

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n\t\u00e9'),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(alphabet='[]{}"\\ab'), inner, max_size=4),
    max_leaves=30,
)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@given(_JSON)
def test_nesting_depth_is_the_depth_of_the_json(value: Any) -> None:
    assert admin.nesting_depth(json.dumps(value).encode()) == _depth(value)
    assert admin.nesting_depth(json.dumps(value, ensure_ascii=False).encode()) == _depth(value)


@given(st.binary(max_size=300))
def test_nesting_depth_takes_any_bytes(line: bytes) -> None:
    assert 0 <= admin.nesting_depth(line) <= line.count(b"[") + line.count(b"{")


@pytest.mark.parametrize("line", [
    b"[" * 60_000, b"{\"a\":" * 20_000, b'["' + b'\\"' * 20_000,  # unterminated: still linear
])
def test_requests_nested_too_deeply_are_refused_before_parsing(line: bytes) -> None:
    depth = admin.nesting_depth(line)
    if depth > admin.MAX_NESTING:
        with pytest.raises(ValueError, match=rf"^nested {depth} deep, more than 32$"):
            admin.parse_request(line)
    else:
        with pytest.raises(ValueError):
            admin.parse_request(line)
    assert admin.parse_request(b'{"cmd": "status", "x": ' + b"[" * 31 + b"]" * 31 + b"}") == {
        "cmd": "status", "x": json.loads(b"[" * 31 + b"]" * 31)}


async def test_add_port_paths_outside_the_daemons_directories_are_refused() -> None:
    async with running() as daemon:  # socket in /nonexistent, no state_dir, no admin socket
        error = err(daemon, {"cmd": "add-port", "port": {
            "id": 3, "backend": {"type": "file", "path": "/etc/shadow", "append": False}}})
        assert error == ("admin request: port.backend.path: '/etc/shadow' is not inside a "
                         "directory admin requests may name (/nonexistent; [vm] allowed_dirs)")
        assert sorted(daemon.device.ports) == [0, 1, 2]
