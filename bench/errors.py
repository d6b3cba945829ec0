"""Errors that reach the user as one clear line and a non-zero exit, never a traceback."""


class UsageError(Exception):
    """Bad input: the message says what was wrong and what to do."""

    exit_code = 2
