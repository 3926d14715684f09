"""vhostser.sockets: where sockets may go (directories made 0700 or checked), their modes,
who may connect (SO_PEERCRED), and the accept loop's connection cap. Real directories,
owners and unix sockets (the tests run as root: chown to another uid works)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from vhostser.sockets import (
    ListenerCounters,
    PeerPolicy,
    SocketPathError,
    listen_unix,
    peer_credentials,
    serve_connections,
    socket_directory,
)

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_missing_directories_are_made_private(tmp_path: Path) -> None:
    old = os.umask(0)  # whatever the umask: the daemon's directories are 0700
    try:
        assert socket_directory(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700
    socket_directory(str(tmp_path / "g" / "h"), group=NOBODY)
    for d in (tmp_path / "g", tmp_path / "g" / "h"):
        assert (mode(d), d.stat().st_gid) == (0o710, NOBODY)


@pytest.mark.parametrize("dir_mode", [0o700, 0o750, 0o755, 0o711])
def test_an_existing_directory_of_ours_not_writable_by_others_is_fine(
    tmp_path: Path, dir_mode: int
) -> None:
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(dir_mode)
    assert socket_directory(str(d)) == str(d)
    assert mode(d) == dir_mode  # checked, not changed


@pytest.mark.parametrize("dir_mode", [0o777, 0o770, 0o1777, 0o722])
def test_a_directory_others_may_write_is_refused(tmp_path: Path, dir_mode: int) -> None:
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(dir_mode)
    with pytest.raises(SocketPathError, match=(
        rf"^{d}: writable by others \(mode {dir_mode:04o}\): another user could swap the "
        r"socket; use a directory of its own, mode 0700 or 0750$"
    )):
        socket_directory(str(d))


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(0o755)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(SocketPathError, match=rf"^{d}: owned by uid {NOBODY}, not by this user"):
        socket_directory(str(d))
    os.chown(d, 0, 0)  # root's is fine: root could do anything anyway
    socket_directory(str(d))


def test_below_a_sticky_directory_only_our_entries_count(tmp_path: Path) -> None:
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp
    ours = sticky / "ours"
    ours.mkdir(0o700)
    socket_directory(str(ours / "made"))
    assert mode(ours / "made") == 0o700
    theirs = sticky / "theirs"
    theirs.mkdir(0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(SocketPathError, match=(
        rf"^{theirs}: a directory owned by uid {NOBODY} \(not this user, uid {os.geteuid()}, "
        rf"nor root\) in {sticky}, which others can write: it may be theirs$"
    )):
        socket_directory(str(theirs / "sub"))


def test_below_a_directory_others_may_write_without_sticky_bit_nothing_is_safe(
    tmp_path: Path,
) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    (open_dir / "ours").mkdir(0o700)
    with pytest.raises(SocketPathError, match=(
        rf"^{open_dir}/ours: its directory {open_dir} is writable by others \(mode 0777, not "
        r"sticky\): anyone could replace it$"
    )):
        socket_directory(str(open_dir / "ours"))


def test_symlinks_are_followed_only_where_nobody_else_could_have_made_them(
    tmp_path: Path,
) -> None:
    real = tmp_path / "real"
    real.mkdir(0o700)
    (tmp_path / "link").symlink_to("real")  # relative, in our own directory
    assert socket_directory(str(tmp_path / "link")) == str(real)
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "mine").symlink_to(real)
    assert socket_directory(str(sticky / "mine")) == str(real)
    (sticky / "planted").symlink_to(real)
    os.lchown(sticky / "planted", NOBODY, NOBODY)
    with pytest.raises(SocketPathError, match=rf"^{sticky}/planted: a symlink owned by uid"):
        socket_directory(str(sticky / "planted"))
    # A link to somewhere others control leads there, and is refused there.
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    (tmp_path / "to-open").symlink_to(open_dir)
    with pytest.raises(SocketPathError, match=rf"^{open_dir}: writable by others"):
        socket_directory(str(tmp_path / "to-open"))
    # .. is taken after symlinks, as the kernel does.
    assert socket_directory(str(tmp_path / "link" / ".." / "real")) == str(real)


def test_what_is_not_a_directory_and_symlink_loops(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SocketPathError, match=rf"^{tmp_path}/file: not a directory$"):
        socket_directory(str(tmp_path / "file" / "sub"))
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(SocketPathError, match="more than 40 symlinks"):
        socket_directory(str(tmp_path / "loop"))


async def test_sockets_are_0600_unless_told(tmp_path: Path) -> None:
    with await listen_unix(str(tmp_path / "run" / "a.sock")):
        assert mode(tmp_path / "run" / "a.sock") == 0o600
    with await listen_unix(str(tmp_path / "grp" / "b.sock"), 0o660, group=NOBODY):
        sock = tmp_path / "grp" / "b.sock"
        assert (mode(sock), sock.stat().st_gid) == (0o660, NOBODY)
        assert (mode(tmp_path / "grp"), (tmp_path / "grp").stat().st_gid) == (0o710, NOBODY)


def test_peer_policy() -> None:
    me = os.geteuid()
    anyone = PeerPolicy()
    assert anyone.permits(NOBODY, NOBODY)
    listed = PeerPolicy(frozenset({1000}), frozenset({36}))
    assert listed.permits(me, 12345)  # the daemon's own user, always
    assert listed.permits(1000, 12345) and listed.permits(2000, 36)
    assert not listed.permits(NOBODY, NOBODY)


def test_peer_credentials_are_the_kernels() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_credentials(trio.socket.from_stdlib_socket(a)) == (
            os.getpid(), os.geteuid(), os.getegid())


async def test_connections_over_the_cap_are_closed_at_once_and_counted(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "capped.sock")
    counters = ListenerCounters()
    release = trio.Event()
    served: list[int] = []

    async def handler(conn: trio.socket.SocketType) -> None:
        with conn:
            served.append(1)
            await release.wait()

    async def connect() -> trio.socket.SocketType:
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(path)
        return s

    async with trio.open_nursery() as nursery:
        listener = await listen_unix(path)
        nursery.start_soon(lambda: serve_connections(
            listener, handler, label="capped", max_connections=2, counters=counters))
        clients = [await connect() for _ in range(4)]
        with trio.fail_after(5):
            for c in clients[2:]:
                assert await c.recv(1) == b""  # closed without a word
        assert (len(served), counters.refused_busy, counters.accepted) == (2, 2, 4)
        release.set()
        for c in clients[:2]:
            assert await c.recv(1) == b""
        release = trio.Event()
        late = await connect()  # room again
        with trio.fail_after(5):
            while len(served) < 3:
                await trio.sleep(0.01)
        assert counters.refused_busy == 2
        for c in [*clients, late]:
            c.close()
        release.set()
        nursery.cancel_scope.cancel()
