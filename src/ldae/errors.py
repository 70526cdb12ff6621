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


def find_user_error(exc: BaseException | None) -> LDAEError | None:
    """The LDAEError behind ``exc`` (MONAI and DataLoader wrap errors raised inside transforms)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LDAEError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
