"""The project's error type and its one-line message format (every CLI prints `error: <one line>`, exit 2)."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line and exit code 2."""


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first non-blank line of an exception's message (or its type name when it has none), cut to `limit`.

    Library errors often span many lines (tracebacks of unpickling, hub responses); this never fails, also on
    an empty message."""
    text = exc if isinstance(exc, str) else str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first:
        first = type(exc).__name__ if not isinstance(exc, str) else "(no message)"
    elif not isinstance(exc, (str, UserError)):
        first = f"{type(exc).__name__}: {first}"
    return first if len(first) <= limit else first[: limit - 3] + "..."
