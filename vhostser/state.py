"""The per-VM state file: what must survive a daemon restart.

Per port: the next session id (ids are never reused, also across restarts), whether the
guest has the port open, and the open session's id, so a restarted daemon can tell its
backends "this session is still open" (seeds/001: replay guest_open) instead of pretending
the guest closed nothing or everything. Written atomically (temp file + rename + fsync).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("vhostser.state")

VERSION = 1


@dataclass
class PortState:
    next_session_id: int = 1
    guest_open: bool = False
    session_id: int | None = None


@dataclass
class VMState:
    ports: dict[int, PortState] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"version": VERSION, "ports": {str(k): asdict(v) for k, v in self.ports.items()}},
            indent=1, sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> VMState:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            found = doc.get("version") if isinstance(doc, dict) else doc
            raise ValueError(f"unknown state file version {found!r}")
        ports: dict[int, PortState] = {}
        table = doc.get("ports", {})
        if not isinstance(table, dict):
            raise ValueError(f"ports: expected an object, got {table!r}")
        for key, value in table.items():
            if not isinstance(value, dict):
                raise ValueError(f"port {key}: expected an object, got {value!r}")
            nxt, gopen, sid = value["next_session_id"], value["guest_open"], value["session_id"]
            if not (isinstance(nxt, int) and nxt >= 1 and isinstance(gopen, bool)
                    and (sid is None or isinstance(sid, int))):
                raise ValueError(f"port {key}: bad entry {value!r}")
            ports[int(key)] = PortState(nxt, gopen, sid)
        return cls(ports)


def load(path: Path) -> VMState:
    """The saved state, or a fresh one (with a log line) if there is none or it is unreadable:
    a bad state file must not keep a VM's console from coming up."""
    try:
        return VMState.from_json(path.read_text())
    except FileNotFoundError:
        return VMState()
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.error("state file %s unusable, starting fresh: %s", path, e)
        return VMState()


def save(path: Path, state: VMState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(state.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
