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


def config_first(args: list[str]) -> list[str]:
    """Move the config path to the front: `distray run` takes it positionally, while the job
    scripts take `--config C`, `--config=C`, `-c C`, `-c=C` or `-cC` as the stage commands do.

    Raises:
        ValueError: `--config`/`-c` has no path after it.
    """
    for i, arg in enumerate(args):
        if arg in ("--config", "-c"):
            value = args[i + 1] if i + 1 < len(args) else ""
            if not value or value.startswith("-"):
                got = f"`{value}`" if value else "nothing"
                raise ValueError(
                    f"{arg} needs a path: got {got} after it; write {arg} jobs/configs/X.yaml"
                )
            return [value, *args[:i], *args[i + 2 :]]
        if arg.startswith("--config="):
            option, value = "--config", arg.removeprefix("--config=")
        elif arg.startswith("-c") and not arg.startswith("--"):
            option, value = "-c", arg[2:].removeprefix("=")  # -c=C and -cC, as argparse reads them
        else:
            continue
        if not value:
            raise ValueError(
                f"{option} needs a path: got `{arg}`; write {option}=jobs/configs/X.yaml"
            )
        return [value, *args[:i], *args[i + 1 :]]
    return args


def main(command: str, argv: list[str] | None = None) -> int:
    """Run `distray <command> --config C key=value ...` (`run` takes CONFIG positionally)."""
    from distray.cli import EXIT_USAGE
    from distray.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if command == "run":
        try:
            args = config_first(args)
        except ValueError as e:
            print(f"distray: error: {e}", file=sys.stderr, flush=True)
            return EXIT_USAGE
    return cli_main([command, *args])
