"""The one exception type a user is meant to see: a bad input or a run that cannot go on.

The CLI prints `error: <message>` on one line and exits non-zero; nothing else is caught,
so genuine bugs still show their traceback.
"""


class RlxError(Exception):
    """A problem with the user's input or environment, stated in one line."""
