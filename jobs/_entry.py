"""Shared by the `ray job submit` entrypoints in this folder: make the working dir importable,
then hand the arguments to the `distray` command line."""

from __future__ import annotations

import os
import sys

# Under `ray job submit --working-dir .` the repo is the cwd, but `python jobs/x.py` puts only
# jobs/ on sys.path; this lets a cluster without distray installed import it from the upload.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def main(command: str, argv: list[str] | None = None) -> int:
    """Run `distray <command> --config C key=value ...` (`run` takes CONFIG positionally)."""
    from distray.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if command == "run" and "--config" in args:
        i = args.index("--config")
        args = [args[i + 1], *args[:i], *args[i + 2 :]]
    return cli_main([command, *args])
