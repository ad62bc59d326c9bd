"""The one error type that means "the user gave us bad input" (CLI exit code 2)."""


class UserError(Exception):
    """Bad input or configuration. The message says what is wrong and where."""


class RunError(Exception):
    """A job that cannot go on (a non-finite loss, a collapsed router). The message says what to do (exit code 1)."""
