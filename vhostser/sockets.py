"""Listening sockets, made the same way for the vhost-user socket, the admin socket and the
backends' peers: a stale socket file is replaced, nothing else is (a second daemon for the
same VM must fail, not steal the first one's socket).

This module imports nothing else from vhostser, so every layer may use it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

import trio

SOCKET_MODE = 0o660  # the VM's group (QEMU, a peer) may connect
BACKLOG = 16


def prepare_socket_path(path: str) -> None:
    """Make room for a listening socket at `path`: create the directory, remove a stale socket
    file (nobody accepts on it). A live socket or a non-socket file there is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: left by a process that is gone
        return
    except BlockingIOError:
        pass  # alive, its backlog is full
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path}: another process is listening on it")


async def listen_unix(path: str, mode: int = SOCKET_MODE) -> trio.socket.SocketType:
    """A unix stream socket listening at `path`, its file given `mode`."""
    prepare_socket_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def inherited_unix(fd: int) -> trio.socket.SocketType:
    """The listening unix socket a service manager passed as `fd` (socket activation); the
    returned socket owns it, `fd` itself is closed."""
    sock = trio.socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
    os.close(fd)
    return sock



def passed_unix(fd: int) -> socket.socket:
    """The unix stream socket a parent passed as `fd` (`run --fd`, the vhost-user back-end
    convention), listening or already connected: libvirt passes virtiofsd a listening socket,
    its vhost-user-gpu and crosvm a connected one (SO_ACCEPTCONN tells them apart). The
    returned socket owns `fd`; OSError/ValueError say what `fd` is instead."""
    try:
        sock = socket.socket(fileno=fd)  # the family and type are read from the fd itself
    except OSError as e:
        raise OSError(e.errno, f"--fd {fd}: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        kind = f"{sock.family.name} {sock.type.name}"
        sock.detach()  # not ours to close: the caller passed it
        raise ValueError(f"--fd {fd}: a {kind} socket, not a unix stream socket")
    sock.set_inheritable(False)
    return sock


def is_listening(sock: socket.socket | trio.socket.SocketType) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
