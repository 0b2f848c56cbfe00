"""The package's own error type.

Every user mistake (a bad file, a bad argument, an unknown config key) raises
:class:`AlignMambaError` with a one-line message that names the file or argument
and what is wrong. The CLI turns it into that line on stderr and exit code 2.
"""
from __future__ import annotations


class AlignMambaError(Exception):
    """A user-facing error: one line, names the culprit, exit code 2 in the CLI."""


class DataError(AlignMambaError):
    """A data file is missing, malformed, hostile or inconsistent."""


class ConfigError(AlignMambaError):
    """A config file or a ``key=value`` override is invalid."""


class CheckpointError(AlignMambaError):
    """A checkpoint directory is missing, malformed or does not fit the data."""
