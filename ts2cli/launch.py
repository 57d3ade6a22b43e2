"""The ``ts2`` console script. Loading the command's modules takes a few tenths of a second, before ``cli.main``
puts its signal handlers in place: a Ctrl-C then stops it the same tidy way, without a traceback."""

import sys


def main() -> None:
    try:
        from ts2cli.cli import main as run_command
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        raise SystemExit(130) from None
    run_command()
