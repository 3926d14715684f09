"""`vhostser run | ...`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from collections.abc import Sequence

import trio

from .daemon import DEFAULT_SOCKET, DaemonConfig, qemu_command_line, run_daemon


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostser", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve one VM's virtio-console over vhost-user")
    run.add_argument("--socket", default=DEFAULT_SOCKET, help="vhost-user socket to listen on")
    run.add_argument("--max-ports", type=int, default=4, help="ports of the device (1..31)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "run":
        if not 1 <= args.max_ports <= 31:
            print(f"vhostser: --max-ports {args.max_ports}: expected 1..31", file=sys.stderr)
            return 2
        cfg = DaemonConfig(socket_path=args.socket, max_ports=args.max_ports)
        print("Connect QEMU (>= 10.2) with:\n    " + qemu_command_line(cfg), file=sys.stderr)
        return trio.run(partial(run_daemon, cfg))
    return 2


if __name__ == "__main__":
    sys.exit(main())
