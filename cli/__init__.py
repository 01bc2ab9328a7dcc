"""The ``fs`` command line (Typer); :func:`main` is the console script."""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Console-script entry point: Ctrl-C or ``kill`` while the modules load exit with one line.

    Loading the CLI imports numpy, SQLAlchemy and h5py (about a second); an
    interrupt meanwhile would otherwise print the traceback of whatever import
    it hit.
    """

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        from featurestore.cli.main import main as run
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted while starting; nothing was done.\n")
        sys.exit(130)
    run()
