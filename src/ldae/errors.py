"""User-facing errors: the CLI prints them as one line on stderr and exits with code 2."""

from __future__ import annotations


class LDAEError(Exception):
    """A mistake in the user's input (file, CSV row/column, config key, checkpoint) with a clear message."""

    exit_code = 2


class ConfigError(LDAEError):
    """An invalid configuration: unknown key, bad value, missing preset."""


class CohortError(LDAEError):
    """An invalid cohort CSV or a volume it points to."""


class CheckpointError(LDAEError):
    """A checkpoint that is missing, corrupt, or from another stage/preset."""
