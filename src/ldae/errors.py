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


_ANSI = None


def one_line(text: object) -> str:
    """``text`` as one printable line: ANSI escape sequences (colours from rich, torch or a terminal) and
    other control characters removed, runs of whitespace (newlines too) collapsed to one space."""
    import re

    global _ANSI
    if _ANSI is None:
        _ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
    cleaned = _ANSI.sub("", str(text))
    cleaned = "".join(ch if ch.isprintable() or ch.isspace() else " " for ch in cleaned)
    return " ".join(cleaned.split())


def describe(exc: BaseException) -> str:
    """A short reason for a wrapped low-level exception: its message's first non-empty line (ANSI codes
    stripped), or the exception's type name when the message is empty (``EOFError()`` from a zero-byte
    file has no text, so ``str(exc).splitlines()[0]`` would itself fail)."""
    for line in str(exc).splitlines():
        line = one_line(line)
        if line:
            return line
    return type(exc).__name__
