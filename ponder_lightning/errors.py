"""One exception type for mistakes a user can fix (bad config, bad data, bad paths).

The CLI prints these as a single line and exits with status 2 instead of a traceback, so every
message must name the culprit and say what to do.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem in the user's input, described in one actionable sentence."""


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError behind an exception, if any (jsonargparse wraps errors raised while it
    instantiates the model or data module)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when empty): the detail a one-line
    UserError quotes from a library's multi-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
