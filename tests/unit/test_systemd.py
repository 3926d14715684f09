"""systemd's service protocol (vhostser.systemd): socket activation, sd_notify, the watchdog.

Socket activation runs in a child process set up exactly as systemd does it: the sockets sit on
fds 3 and 4 and LISTEN_PID is the pid of the process that reads them (a shell sets it to its
own pid, `$$`, then execs Python, as systemd sets it before exec). The test process's own fds
3.. are never touched.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostser import systemd

ENV_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys
    from vhostser import systemd
    seen = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
    fds = systemd.listen_fds(unset=sys.argv[1] == "unset")
    info = {}
    for name, nums in fds.items():
        for fd in nums:
            s = socket.socket(fileno=os.dup(fd))
            info[str(fd)] = {
                "name": name,
                "family": int(s.family),
                "type": int(s.type),
                "sockname": s.getsockname() if s.family == socket.AF_UNIX
                            else list(s.getsockname()),
                "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
                "inheritable": os.get_inheritable(fd),
            }
            s.close()
    print(json.dumps({
        "pid": os.getpid(),
        "seen": seen,
        "fds": fds,
        "info": info,
        "after": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
    }))
    """
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for var in (*ENV_VARS, "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    yield monkeypatch


def activated_child(
    socks: list[socket.socket],
    *,
    names: str | None,
    listen_pid: str = "$$",
    unset: bool = True,
) -> dict[str, object]:
    """Run CHILD with `socks` on fds 3, 4, ... and the LISTEN_* variables systemd would set."""
    # Each socket is passed at its own number; the shell parks them above every passed number,
    # closes the originals, then moves them onto 3.. (so any original number, 3 and 4 included,
    # works): the child sees exactly fds 0-2 plus the activated ones. bash, because dash only
    # redirects fds 0-9.
    nums = [s.fileno() for s in socks]
    park = max(nums) + 10
    moves = " ".join(
        [f"{park + i}<&{n} {n}<&-" for i, n in enumerate(nums)]
        + [f"{3 + i}<&{park + i} {park + i}<&-" for i in range(len(nums))]
    )
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get(
        "PYTHONPATH", "")
    names_part = f"LISTEN_FDNAMES='{names}' " if names is not None else ""
    script = (
        f"exec {moves}; "
        f'LISTEN_PID={listen_pid} LISTEN_FDS={len(socks)} {names_part}'
        f'exec "$PY" -c "$CHILD" {"unset" if unset else "keep"}'
    )
    env["PY"], env["CHILD"] = sys.executable, CHILD
    out = subprocess.run(
        ["bash", "-c", script],
        pass_fds=[s.fileno() for s in socks],
        env=env, capture_output=True, text=True, timeout=20, check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.fixture
def two_sockets(tmp_path: Path) -> Iterator[list[socket.socket]]:
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "vhost.sock"))
    unix.listen(1)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    yield [unix, tcp]
    unix.close()
    tcp.close()


# ------------------------------------------------------------------------ LISTEN_FDS


def test_listen_fds_named(two_sockets: list[socket.socket], tmp_path: Path) -> None:
    r = activated_child(two_sockets, names="vhost-user:admin")
    assert r["seen"] == {"LISTEN_PID": str(r["pid"]), "LISTEN_FDS": "2",
                         "LISTEN_FDNAMES": "vhost-user:admin"}
    assert r["fds"] == {"vhost-user": [3], "admin": [4]}
    info = r["info"]
    assert isinstance(info, dict)
    assert info["3"]["family"] == socket.AF_UNIX
    assert info["3"]["sockname"] == str(tmp_path / "vhost.sock")
    assert info["4"]["family"] == socket.AF_INET
    assert info["4"]["sockname"] == list(two_sockets[1].getsockname())
    for fd in ("3", "4"):
        assert info[fd]["cloexec"] and not info[fd]["inheritable"]
    assert r["after"] == dict.fromkeys(ENV_VARS)


def test_listen_fds_unnamed_are_unknown(two_sockets: list[socket.socket]) -> None:
    r = activated_child(two_sockets, names=None)
    assert r["fds"] == {"unknown": [3, 4]}
    assert r["after"] == dict.fromkeys(ENV_VARS)


def test_listen_fds_empty_and_missing_names(two_sockets: list[socket.socket]) -> None:
    r = activated_child(two_sockets, names=":admin")
    assert r["fds"] == {"unknown": [3], "admin": [4]}
    r = activated_child(two_sockets, names="only-one")
    assert r["fds"] == {"only-one": [3], "unknown": [4]}


def test_listen_fds_same_name_twice(two_sockets: list[socket.socket]) -> None:
    r = activated_child(two_sockets, names="vhost-user:vhost-user")
    assert r["fds"] == {"vhost-user": [3, 4]}


def test_listen_fds_keep_environment(two_sockets: list[socket.socket]) -> None:
    r = activated_child(two_sockets, names="a:b", unset=False)
    assert r["fds"] == {"a": [3], "b": [4]}
    assert r["after"] == r["seen"]


def test_listen_fds_for_another_process_ignored(two_sockets: list[socket.socket]) -> None:
    # LISTEN_PID=1: systemd meant another process; the fds are not ours to take.
    r = activated_child(two_sockets, names="vhost-user:admin", listen_pid="1")
    assert r["fds"] == {}
    assert r["info"] == {}
    assert r["after"] == dict.fromkeys(ENV_VARS)


def test_wrong_pid_in_process_touches_nothing(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getppid()))
    clean_env.setenv("LISTEN_FDS", "2")
    clean_env.setenv("LISTEN_FDNAMES", "a:b")
    assert systemd.listen_fds() == {}
    assert all(v not in os.environ for v in ENV_VARS)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "2"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "-1"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "two"},
        {"LISTEN_PID": "self"},
    ],
    ids=["none", "no-pid", "zero", "negative", "garbage", "no-count"],
)
def test_not_activated(clean_env: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for k, v in env.items():
        clean_env.setenv(k, str(os.getpid()) if v == "self" else v)
    assert systemd.listen_fds() == {}


@pytest.mark.parametrize(
    "env",
    [{"LISTEN_PID": "self"}, {"LISTEN_PID": "self", "LISTEN_FDS": "two"},
     {"LISTEN_PID": "", "LISTEN_FDS": "1"}],
    ids=["no-count", "garbage-count", "empty-pid"],
)
def test_malformed_environment_is_unset_too(
    clean_env: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    for k, v in env.items():
        clean_env.setenv(k, str(os.getpid()) if v == "self" else v)
    assert systemd.listen_fds() == {}
    assert [v for v in ENV_VARS if v in os.environ] == []


# ------------------------------------------------------------------------ sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield s, path
    s.close()


def test_notify_exact_bytes(
    clean_env: pytest.MonkeyPatch, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    clean_env.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify("READY=1", "STATUS=serving 2 ports on /run/x.sock")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 ports on /run/x.sock"
    assert systemd.notify("WATCHDOG=1")
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert systemd.notify("STATUS=gr\u00fc\u00df")
    assert sock.recv(4096) == "STATUS=gr\u00fc\u00df".encode()


def test_notify_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"vhostser-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STOPPING=1")
        data = sock.recv(4096)
    assert data == b"STOPPING=1"


def test_notify_reloading_monotonic(
    clean_env: pytest.MonkeyPatch, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    clean_env.setenv("NOTIFY_SOCKET", path)
    before = systemd.monotonic_usec()
    systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
    after = systemd.monotonic_usec()
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_monotonic_usec_is_clock_monotonic() -> None:
    import time

    a = time.clock_gettime(time.CLOCK_MONOTONIC)
    b = systemd.monotonic_usec()
    c = time.clock_gettime(time.CLOCK_MONOTONIC)
    assert a * 1e6 - 1 <= b <= c * 1e6 + 1


def test_notify_without_socket_is_a_quiet_no(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="vhostser.systemd"):
        assert systemd.notify("READY=1") is False
        clean_env.setenv("NOTIFY_SOCKET", "")
        assert systemd.notify("READY=1") is False
    assert caplog.records == []


def test_notify_to_a_missing_socket_warns(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "gone")
    clean_env.setenv("NOTIFY_SOCKET", missing)
    with caplog.at_level(logging.WARNING, logger="vhostser.systemd"):
        assert systemd.notify("READY=1") is False
    assert f"sd_notify to {missing} failed" in caplog.text


# ------------------------------------------------------------------------ watchdog


@pytest.mark.parametrize(
    ("usec", "pid", "expect"),
    [
        ("3000000", None, 1.5),
        ("3000000", "self", 1.5),
        ("20000000", "self", 10.0),
        ("1", None, 0.5e-6),
        ("3000000", "1", None),
        ("3000000", "", 1.5),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        (None, "self", None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    clean_env: pytest.MonkeyPatch, usec: str | None, pid: str | None, expect: float | None
) -> None:
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        clean_env.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert systemd.watchdog_interval() == expect
