"""`vhostser run | check | ctl | bench`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import trio

from . import admin
from .config import ConfigError, VMConfig, default, load
from .daemon import qemu_command_line
from .service import run_daemon


class JournalFormatter(logging.Formatter):
    """One line per record. Under systemd (JOURNAL_STREAM set) with the kernel's <N> priority
    prefix, so journald keeps the level; on a terminal with the level spelled out."""

    PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        if self.journal:
            return f"<{self.PRIORITY.get(record.levelname, 6)}>{record.name}: {msg}"
        return f"{record.levelname} {record.name}: {msg}"


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(bool(os.environ.get("JOURNAL_STREAM"))))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _load(path: str | None) -> VMConfig:
    return load(path) if path else default()


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _human(cmd: str, result: Any) -> str:
    if cmd == "metrics":
        return str(result).rstrip("\n")
    if cmd == "ports":
        return _table(result, ["id", "name", "console", "backend", "state", "session"])
    if cmd == "sessions":
        if not result:
            return "no open sessions"
        return _table(result, ["port", "name", "session", "state"])
    if cmd == "stats":
        rows = []
        for pid, c in result["ports"].items():
            rows.append({"port": pid, "to_guest": c["bytes_to_guest"],
                         "from_guest": c["bytes_from_guest"],
                         "discarded": sum(c["discarded"].values()),
                         "sessions": c["sessions_opened"], "resets": c["resets_seen"]})
        dev = result["device"]
        return (_table(rows, ["port", "to_guest", "from_guest", "discarded", "sessions", "resets"])
                + f"\ncontrol messages: {dev['control_from_guest']} from guest, "
                f"{dev['control_to_guest']} to guest, {dev['bad_control']} bad")
    if isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in result.items())
    return json.dumps(result)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostser", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve one VM's virtio-console over vhost-user")
    run.add_argument("--config", "-c", help="per-VM config file (default: the embedded one)")
    run.add_argument("--socket", help="override [vm] socket")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    check = sub.add_parser("check", help="validate config files")
    check.add_argument("files", nargs="+")
    ctl = sub.add_parser("ctl", help="talk to a running daemon's admin socket")
    where = ctl.add_mutually_exclusive_group()
    where.add_argument("--admin", help="admin socket path")
    where.add_argument("--config", "-c", help="take the admin socket from this config file")
    ctl.add_argument("--json", action="store_true", help="print JSON for scripts")
    cmds = ctl.add_subparsers(dest="cmd", required=True)
    for name in ("status", "ports", "sessions", "stats", "metrics", "reload"):
        cmds.add_parser(name)
    add = cmds.add_parser("add-port", help="hot-plug a port")
    add.add_argument("--id", type=int, required=True)
    add.add_argument("--name", default="")
    add.add_argument("--console", action="store_true")
    add.add_argument("--backend", required=True, help="backend type (null, echo, unix, ...)")
    add.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                     help="backend option; VALUE is read as JSON when it parses, else a string")
    rm = cmds.add_parser("remove-port", help="hot-unplug a port")
    rm.add_argument("id", type=int)
    close = cmds.add_parser("close-session", help="end a port's session from the host side")
    close.add_argument("port", type=int)
    bench = sub.add_parser("bench", help="throughput and latency (see vhostser/bench.py)")
    bench.add_argument("where", choices=["qemu", "local"],
                       help="qemu: against QEMU's in-process virtio-serial in the same run "
                       "(needs the e2e rig); local: no QEMU, the testing front end")
    bench.add_argument("--which", default="g2h,h2g,rtt", help="g2h, h2g, rtt (comma-separated)")
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--bs", type=int, default=65536, help="qemu: guest dd block size")
    bench.add_argument("--count", type=int, default=2048, help="qemu: blocks per run")
    bench.add_argument("--mib", type=int, default=64, help="local: MiB per run")
    bench.add_argument("--rtt-n", type=int, default=1000, help="round trips")
    bench.add_argument("--rig", help="the e2e rig directory (default ../shared/e2e)")
    bench.add_argument("--json", help="also write the results here")
    return p


def _ctl(args: argparse.Namespace) -> int:
    path = args.admin or _load(args.config).admin_socket
    if not path:
        print("vhostser ctl: the config has no [vm] admin_socket", file=sys.stderr)
        return 2
    req: dict[str, Any] = {"cmd": args.cmd}
    if args.cmd == "add-port":
        backend: dict[str, Any] = {"type": args.backend}
        for opt in args.option:
            key, sep, value = opt.partition("=")
            if not sep:
                print(f"vhostser ctl: --option {opt!r}: expected KEY=VALUE", file=sys.stderr)
                return 2
            try:
                backend[key] = json.loads(value)
            except ValueError:
                backend[key] = value
        req["port"] = {"id": args.id, "name": args.name, "console": args.console,
                       "backend": backend}
    elif args.cmd == "remove-port":
        req["id"] = args.id
    elif args.cmd == "close-session":
        req["port"] = args.port
    try:
        resp = admin.request(path, req)
    except OSError as e:
        print(f"vhostser ctl: {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(resp.get("result") if resp["ok"] else resp, indent=1))
    elif resp["ok"]:
        print(_human(args.cmd, resp["result"]))
    if not resp["ok"]:
        if not args.json:
            print(f"vhostser ctl {args.cmd}: {resp['error']}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        bad = 0
        for f in args.files:
            try:
                cfg = load(f)
            except ConfigError as e:
                print(e, file=sys.stderr)
                bad += 1
            else:
                print(f"{f}: ok: vm {cfg.name}, {len(cfg.ports)} ports, socket {cfg.socket}")
                # Warnings, not errors: a log directory may appear by the time the daemon runs
                # (and systemd runs check before every start).
                for spec in cfg.ports:
                    for problem in spec.make_backend().problems():
                        print(f"{f}: warning: port {spec.config.id}: {problem}", file=sys.stderr)
        return 1 if bad else 0
    if args.command == "ctl":
        return _ctl(args)
    if args.command == "bench":
        from . import bench as bench_mod

        return bench_mod.main(args)
    _setup_logging(args.log_level)
    try:
        cfg = _load(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.socket:
        cfg = replace(cfg, socket=args.socket)
    print(f"vhostser: VM {cfg.name!r} from {cfg.source}. Connect QEMU (>= 10.2) with:\n    "
          + qemu_command_line(cfg), file=sys.stderr)
    return trio.run(partial(run_daemon, cfg))


if __name__ == "__main__":
    sys.exit(main())
