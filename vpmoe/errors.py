"""The one error type that means "the user gave us bad input" (CLI exit code 2)."""


class UserError(Exception):
    """Bad input or configuration. The message says what is wrong and where."""
