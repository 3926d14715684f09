"""`vhostser console` and `vhostser attach`: a terminal or a pipe joined to one port's host
socket, as `virsh console` joins a terminal to a domain's console.

The daemon's admin socket says where a port's backend can be reached (`ports` → "endpoint");
`address` turns that into a socket address, or says why there is nothing to connect to and
what to do instead. `relay` moves bytes both ways until the escape key, the daemon closing the
connection, or (without an escape key) the end of both directions: stdin's EOF only
half-closes the connection, so a script's last words still get their answer. `raw_terminal`
puts a tty in raw mode, as virsh does, and restores it on every way out: the escape key, an
error, SIGTERM, SIGHUP (the terminal went away).

Standard library only: it runs in the user's shell, not in the daemon.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

READ_CHUNK = 64 * 1024
DEFAULT_ESCAPE = "^]"  # Ctrl-], as virsh console


class AttachError(Exception):
    """Why a port cannot be attached to, in one line that says what to do instead."""


def parse_escape(text: str) -> int | None:
    """"^]" (caret notation), a single character, or "none" → the byte that ends a terminal
    session (None: no escape key)."""
    if text.lower() == "none":
        return None
    if len(text) == 2 and text[0] == "^" and 0x3F <= ord(text[1].upper()) <= 0x5F:
        return ord(text[1].upper()) ^ 0x40  # ^? is DEL, ^@ NUL, ^] 0x1d
    if len(text) == 1 and ord(text) < 0x80:
        return ord(text)
    raise ValueError(f"escape {text!r}: expected ^X (e.g. ^]), one ASCII character, or none")


def escape_name(byte: int) -> str:
    if byte < 0x20 or byte == 0x7F:
        return f"^{chr(byte ^ 0x40)}"
    return chr(byte)


def describe(endpoint: dict[str, Any] | None) -> str:
    """An endpoint as one short word for tables: unix:/path, tcp:host:port, pty:/dev/pts/3."""
    if not endpoint:
        return "-"
    kind = endpoint.get("kind")
    if kind == "tcp":
        host = str(endpoint.get("host"))
        text = f"tcp:{f'[{host}]' if ':' in host else host}:{endpoint.get('port')}"
        if endpoint.get("netns"):
            text += f"@netns:{endpoint['netns']}"
    elif kind == "console":
        text = (f"console:{endpoint['path']}" if endpoint.get("path")
                else f"log:{endpoint.get('log')}")
    else:
        text = f"{kind}:{endpoint.get('path')}"
    if endpoint.get("role") == "client":
        text += " (client)"
    if endpoint.get("mode") not in (None, "stream"):
        text += f" ({endpoint['mode']})"
    return text


def _own_netns_is(name: str) -> bool:
    try:
        own, there = os.stat("/proc/self/ns/net"), os.stat(os.path.join("/var/run/netns", name))
    except OSError:
        return False
    return (own.st_dev, own.st_ino) == (there.st_dev, there.st_ino)


def address(port: dict[str, Any]) -> tuple[socket.AddressFamily, Any]:
    """The address to connect to for a port of `ctl ports`, or AttachError saying why there
    is none."""
    backend = port.get("backend")
    endpoint = port.get("endpoint")
    if not endpoint:
        raise AttachError(f"its backend is `{backend}`: nothing on the host to attach to")
    kind = endpoint.get("kind")
    if kind == "console":
        if not endpoint.get("path"):
            raise AttachError(f"its console only logs to {endpoint.get('log')}: give the "
                              "backend a `socket` for live readers, or `tail -f` the log")
        return socket.AF_UNIX, endpoint["path"]
    if kind == "file":
        raise AttachError(f"it logs to {endpoint.get('path')}: `tail -f` it")
    if kind == "pty":
        raise AttachError(f"it is a pty: open {endpoint.get('link') or endpoint.get('path')} "
                          "with a terminal program (screen, minicom, picocom)")
    if kind not in ("unix", "tcp"):
        raise AttachError(f"its backend `{backend}` has no socket to attach to")
    if endpoint.get("role") == "client":
        where = endpoint.get("path") or f"{endpoint.get('host')}:{endpoint.get('port')}"
        raise AttachError(f"its backend connects out to {where}: listen there instead "
                          f"(e.g. socat - UNIX-LISTEN:{where})")
    if endpoint.get("mode") == "framed":
        raise AttachError("it speaks the framed protocol (README: The framed protocol): raw "
                          "bytes from a terminal would be taken as frames")
    if kind == "unix":
        return socket.AF_UNIX, endpoint["path"]
    netns = endpoint.get("netns")
    if netns and not _own_netns_is(netns):
        # `ip netns exec` takes names only; nsenter any namespace file.
        enter = f"nsenter --net={netns}" if netns.startswith("/") else f"ip netns exec {netns}"
        raise AttachError(f"it listens in network namespace {netns}: run "
                          f"`{enter} vhostser attach ...`")
    host = str(endpoint.get("host"))
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(endpoint["port"]))


def connect(port: dict[str, Any], timeout: float = 10.0) -> socket.socket:
    family, addr = address(port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
    except OSError as e:
        sock.close()
        where = addr if isinstance(addr, str) else f"{addr[0]}:{addr[1]}"
        raise AttachError(f"cannot connect to {where}: {e.strerror or e}") from None
    sock.settimeout(None)
    return sock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay(sock: socket.socket, stdin: int, stdout: int, escape: int | None) -> str:
    """Move bytes until one side is done; returns why: "escape" (the escape key was typed;
    what came before it is sent), "closed" (the daemon closed the connection), "stdout"
    (nobody reads our output any more), "terminal" (the terminal went away)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(stdin, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == stdin:
                try:
                    data = os.read(stdin, READ_CHUNK)
                except OSError:  # EIO: the terminal hung up
                    return "terminal"
                if not data:
                    # EOF: no more input, but the answer to what was sent may still come.
                    poller.unregister(stdin)
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        return "closed"
                    continue
                cut = data.find(escape) if escape is not None else -1
                try:
                    sock.sendall(data if cut < 0 else data[:cut])
                except OSError:
                    return "closed"
                if cut >= 0:
                    return "escape"
            else:
                try:
                    data = sock.recv(READ_CHUNK)
                except OSError:
                    return "closed"
                if not data:
                    return "closed"
                try:
                    _write_all(stdout, data)
                except OSError:  # EPIPE: our reader left
                    return "stdout"


class _Leave(Exception):
    """A signal asked us to go: unwinds through `raw_terminal`, which restores the tty."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The tty at `fd` in raw mode (bytes pass as typed: Ctrl-C goes to the guest), its
    previous mode restored however the block ends. SIGTERM, SIGHUP and SIGQUIT raise `_Leave`
    inside the block, so they unwind through here instead of killing us mid-raw."""
    saved = termios.tcgetattr(fd)

    def leave(signum: int, frame: object) -> None:
        raise _Leave(signum)

    previous = {s: signal.signal(s, leave) for s in (signal.SIGTERM, signal.SIGHUP,
                                                    signal.SIGQUIT)}
    try:
        tty.setraw(fd, termios.TCSADRAIN)
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except termios.error:
            pass  # the terminal is gone: nothing left to restore
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(sock: socket.socket, *, escape: int | None, label: str) -> int:
    """Join stdin/stdout to `sock` until done; the exit status. On a terminal: raw mode, a
    banner naming the escape key, and a line saying why it ended."""
    stdin, stdout = 0, 1
    terminal = os.isatty(stdin)
    with sock:
        if not terminal:
            try:
                relay(sock, stdin, stdout, None)
            except KeyboardInterrupt:
                return 130
            return 0
        key = escape_name(escape) if escape is not None else None
        try:
            with raw_terminal(stdin):
                # Written once in raw mode (hence the \r): it tells the terminal is ours.
                os.write(2, (f"Connected to {label}.\r\n"
                             + (f"Escape character is {key}\r\n" if key else
                                "No escape key: the session ends with the connection.\r\n"))
                         .encode())
                why = relay(sock, stdin, stdout, escape)
        except _Leave as e:
            os.write(2, f"\r\nvhostser: {e}: detached.\r\n".encode())
            return 128 + e.signum
        except KeyboardInterrupt:  # SIGINT from outside: ISIG is off in raw mode
            os.write(2, b"\r\nvhostser: SIGINT: detached.\r\n")
            return 130
    if why == "closed":
        os.write(2, b"\r\nvhostser: the daemon closed the connection.\r\n")
    else:
        os.write(2, b"\r\n")
    return 0
