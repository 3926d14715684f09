"""`python -m vhostser` and the `vhostser` command.

`vhostser run` blocks SIGHUP first, before anything is imported: its default action kills
the process, and importing the daemon takes a while. The daemon unblocks it once it is ready
(`service`), so a SIGHUP during start-up is applied then instead of killing it.
"""

import signal
import sys


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from .cli import main as cli_main  # only now: see the module doc

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
