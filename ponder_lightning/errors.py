"""One exception type for mistakes a user can fix (bad config, bad data, bad paths).

The CLI prints these as a single line and exits with status 2 instead of a traceback, so every
message must name the culprit and say what to do.
"""


class UserError(ValueError):
    """A problem in the user's input, described in one actionable sentence."""
