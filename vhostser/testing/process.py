"""A vhostser daemon as a child process (`python -m vhostser run --config FILE`), and what
/proc says of a process: CPU, context switches, memory, open fds.

`vhostser bench` and `vhostser soak` run the daemon this way: a real process on a config file
in a directory of its own, its stderr kept in a file there, ready once its sockets exist."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of process `pid`, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command may hold spaces and ')'
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches summed over the threads of `pid`: each one
    is a time the thread went to sleep or was put off the CPU, so an idle process's count
    grows by its wakeups."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        total += sum(int(n) for n in re.findall(r"^\w*voluntary_ctxt_switches:\s+(\d+)",
                                                status, re.M))
    return total


def memory_mb(pid: int, keys: tuple[str, ...] = ("VmRSS", "VmHWM")) -> tuple[float, ...]:
    """`keys` of /proc/PID/status (VmRSS, VmHWM, RssAnon, RssShmem...) in MB."""
    status = Path(f"/proc/{pid}/status").read_text()

    def kib(key: str) -> float:
        m = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
        return int(m.group(1)) * 1024 / 1e6 if m else math.nan

    return tuple(kib(k) for k in keys)


def open_fds(pid: int) -> int:
    """How many fds process `pid` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class DaemonChild:
    """A running daemon: its directory (config, sockets, stderr) and its process."""

    dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return (self.dir / "daemon.log").read_text(errors="replace")


@contextmanager
def daemon_child(config: Callable[[Path], str], sockets: Sequence[str], *, prefix: str,
                 log_level: str = "warning", timeout: float = 30) -> Iterator[DaemonChild]:
    """`vhostser run` on the config `config(directory)` returns, in a fresh directory; yields
    once every one of `sockets` (names in that directory) exists; stops it (SIGTERM, then
    SIGKILL) and removes the directory at the end."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    (tmp / "daemon.toml").write_text(config(tmp))
    with open(tmp / "daemon.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhostser", "run", "--config", str(tmp / "daemon.toml"),
             "--log-level", log_level], stdout=subprocess.DEVNULL, stderr=log,
        )
    d = DaemonChild(tmp, proc)
    try:
        deadline = time.monotonic() + timeout
        while not all((tmp / s).exists() for s in sockets):
            if not d.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: {d.log()}")
            time.sleep(0.02)
        yield d
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
