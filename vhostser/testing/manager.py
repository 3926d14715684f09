"""A service manager in a box: what systemd does for `vhostser@VM.service`, for tests that
kill and restart the daemon many times faster than a real systemd (the real one is the
systemd tier's).

It listens on a NOTIFY_SOCKET and keeps an fd store as systemd 252 does — FDSTORE=1 with
FDNAME= adds the datagram's fds unless the same open file is stored already (systemd
dedups), FDSTOREREMOVE=1 drops every fd of that name, BARRIER=1 is answered by closing its
fd once everything before it is handled — and starts the service the way
systemd does: the socket unit's fds first, then the store's, on fds 3.. with LISTEN_FDS,
LISTEN_FDNAMES and LISTEN_PID set to the service's own pid.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..custody import same_file


class ServiceManager:
    def __init__(self, workdir: Path, socket_fds: Mapping[str, int]) -> None:
        """`socket_fds`: the socket units' fds by FileDescriptorName= (kept open here)."""
        self.workdir = workdir
        self.socket_fds = dict(socket_fds)
        self.store: list[tuple[str, int]] = []
        self.messages: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.notify_path = workdir / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.notify_path))
        self._sock.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the notify socket

    def _serve(self) -> None:
        space = socket.CMSG_SPACE(253 * 4)
        while not self._stop:
            try:
                data, anc, _, _ = self._sock.recvmsg(65536, space)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            fds = array.array("i")
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
            self._message(data.decode(errors="replace"), list(fds))

    def _message(self, text: str, fds: list[int]) -> None:
        fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
        with self._lock:
            self.messages.append(text)
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    if any(same_file(fd, kept) for _, kept in self.store):
                        os.close(fd)
                    else:
                        self.store.append((name, fd))
                fds = []
            if fields.get("FDSTOREREMOVE") == "1":
                for gone in [fd for n, fd in self.store if n == name]:
                    os.close(gone)
                self.store = [(n, fd) for n, fd in self.store if n != name]
            if fields.get("READY") == "1":
                self._ready.set()
            # BARRIER=1 (sd_notify_barrier): every message before it is handled once its fd
            # is closed, which happens below with any other fd the message carried.
        for fd in fds:
            os.close(fd)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, _ in self.store)

    # ------------------------------------------------------------------ the service

    def start(self, argv: Sequence[str], env: Mapping[str, str], stderr: Path) -> None:
        """Start the service (fds: socket units first, then the store), as systemd does."""
        with self._lock:
            passed = [*self.socket_fds.items(), *self.store]
        self._ready.clear()
        n = len(passed)
        # Parked above every number in use, then moved onto 3..: any original number works.
        park = max([fd for _, fd in passed] + [10]) + 10
        script = " ".join(
            [f"exec {park + i}<&{fd};" for i, (_, fd) in enumerate(passed)]
            + [f"exec {3 + i}<&{park + i} {park + i}<&-;" for i in range(n)]
            + ['LISTEN_PID=$$ exec "$@"']
        )
        full_env = dict(env, NOTIFY_SOCKET=str(self.notify_path), VHOSTSER_FDSTORE="1",
                        LISTEN_FDS=str(n), LISTEN_FDNAMES=":".join(name for name, _ in passed))
        with open(stderr, "ab") as err:
            self.proc = subprocess.Popen(
                ["bash", "-c", script, "service", *argv], env=full_env,
                pass_fds=[fd for _, fd in passed], stdout=subprocess.DEVNULL, stderr=err,
            )
        self.starts += 1

    def wait_ready(self, timeout: float = 20) -> float:
        """Seconds until READY=1 (AssertionError if the service died or never said it)."""
        t0 = time.monotonic()
        while not self._ready.wait(0.01):
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the service exited with {self.proc.returncode}")
            if time.monotonic() - t0 > timeout:
                raise AssertionError("no READY=1 from the service")
        return time.monotonic() - t0

    def kill(self) -> None:
        """`kill -9` of the main pid."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float = 20) -> int:
        """What `systemctl stop` (or the first half of a restart) does: SIGTERM, wait."""
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stop = True
        self._thread.join()
        self._sock.close()
        with self._lock:
            for _, fd in self.store:
                os.close(fd)
            self.store = []
