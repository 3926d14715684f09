"""fd custody (vhostser.custody) against a real notify socket: what systemd receives for each
keep and release — the names, FDPOLL=0, the fds themselves over SCM_RIGHTS — and how a
successor finds the store again."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostser.custody import CustodyError, FdStore, same_file


class Manager:
    """The service manager's end of NOTIFY_SOCKET: each datagram with its fds."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def messages(self) -> list[tuple[list[str], list[int]]]:
        out = []
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except BlockingIOError:
                return out
            fds = array.array("i")
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
            out.append((data.decode().split("\n"), list(fds)))


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield m
    m.sock.close()


def test_keep_sends_the_fd_with_its_name(manager: Manager) -> None:
    store = FdStore(enabled=True)
    a, b = socket.socketpair()
    store.keep("vu.conn", a.fileno())
    ((lines, fds),) = manager.messages()
    assert lines == ["FDSTORE=1", "FDNAME=vu.conn", "FDPOLL=0"]
    assert len(fds) == 1 and same_file(fds[0], a.fileno())
    os.close(fds[0])
    assert store.fd("vu.conn") == a.fileno() and store.stored == 1
    a.close(), b.close()


def test_release_removes_it(manager: Manager) -> None:
    store = FdStore(enabled=True)
    r, w = os.pipe()
    store.keep("vu.kick.3", r)
    manager.messages()
    store.release("vu.kick.3")
    assert manager.messages() == [(["FDSTOREREMOVE=1", "FDNAME=vu.kick.3"], [])]
    assert store.names() == [] and store.stored == 0
    store.release("vu.kick.3")  # twice: nothing more
    assert manager.messages() == []
    os.close(r), os.close(w)


def test_keeping_a_name_again_replaces_it(manager: Manager) -> None:
    store = FdStore(enabled=True)
    first, second = os.eventfd(0), os.eventfd(0)
    store.keep("vu.call.0", first)
    store.keep("vu.call.0", second)
    msgs = manager.messages()
    assert [m[0][0] for m in msgs] == ["FDSTORE=1", "FDSTOREREMOVE=1", "FDSTORE=1"]
    assert same_file(msgs[2][1][0], second) and not same_file(msgs[2][1][0], first)
    for _, fds in msgs:
        for fd in fds:
            os.close(fd)
    os.close(first), os.close(second)


def test_the_same_open_file_is_stored_once_under_its_first_name(manager: Manager) -> None:
    # QEMU sends one memfd for every RAM region; systemd would keep only one of them.
    store = FdStore(enabled=True)
    mem = os.memfd_create("ram")
    again = os.dup(mem)
    store.keep("vu.mem.0", mem)
    store.keep("vu.mem.1", again)
    assert [m[0][1] for m in manager.messages()] == ["FDNAME=vu.mem.0"]
    assert store.aliases == {"vu.mem.1": "vu.mem.0"} and store.stored == 1
    # The stored name goes: the alias is stored in its place (removed first, or systemd
    # would take the same file for the one it holds).
    store.release("vu.mem.0")
    msgs = manager.messages()
    assert [m[0][:2] for m in msgs] == [["FDSTOREREMOVE=1", "FDNAME=vu.mem.0"],
                                        ["FDSTORE=1", "FDNAME=vu.mem.1"]]
    assert same_file(msgs[1][1][0], again)
    os.close(msgs[1][1][0])
    assert store.aliases == {} and store.names() == ["vu.mem.1"]
    os.close(mem), os.close(again)


def test_different_eventfds_are_different_files() -> None:
    a, b = os.eventfd(0), os.eventfd(0)
    assert not same_file(a, b) and same_file(a, a)
    os.close(a), os.close(b)


@pytest.mark.parametrize("name", ["", "a:b", "x" * 256, "sp ace", "nl\n"])
def test_names_systemd_would_refuse(name: str) -> None:
    with pytest.raises(CustodyError):
        FdStore(enabled=False).keep(name, 0)


def test_without_a_manager_nothing_is_sent(manager: Manager) -> None:
    store = FdStore(enabled=False)
    r, w = os.pipe()
    store.keep("vu.req", r)
    store.release("vu.req")
    assert manager.messages() == []
    os.close(r), os.close(w)


def test_a_successor_finds_names_and_aliases() -> None:
    mem = os.memfd_create("ram")
    conn = os.eventfd(0)
    store = FdStore.recovered({"vu.mem.0": [mem], "vu.conn": [conn], "bad:name": [7]},
                              {"vu.mem.1": "vu.mem.0", "vu.gone": "vu.missing"})
    assert store.names() == ["vu.conn", "vu.mem.0", "vu.mem.1"]
    alias = store.fd("vu.mem.1")
    assert alias is not None and alias != mem and same_file(alias, mem)  # its own dup
    assert store.stored == 2
    for fd in (mem, conn, alias):
        os.close(fd)
