"""The one small error hierarchy distray raises.

`DistrayError` is the root; the CLI maps `ConfigError` and `UsageError` to exit code 2 and every
other `DistrayError` to exit code 1.
"""

from __future__ import annotations

__all__ = ["DistrayError", "ConfigError", "DataError", "LeaseLostError", "StageError", "UsageError"]


class DistrayError(Exception):
    """Base class of every error distray raises on purpose."""


class ConfigError(DistrayError):
    """A setting is unknown, has the wrong type or range, or contradicts another setting."""


class UsageError(DistrayError):
    """The command line or API was called wrongly (missing file, bad argument)."""


class DataError(DistrayError):
    """Input or intermediate data does not follow the data contract."""


class StageError(DistrayError):
    """A stage failed while running (engine failure, too many failed requests, ...)."""


class LeaseLostError(StageError):
    """This run no longer holds its run folder's lease (another run took it over): nothing more
    may be published, and retrying cannot help."""
