"""Errors that reach the user as one clear line and a non-zero exit, never a traceback."""


import sys

_WARNED: set[str] = set()


def warn(message: str) -> None:
    """A ``warning:`` line on stderr, once per process (a run reads its records many times), shown
    even with --quiet: it says something about the results."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, with what was kept and what to do next (a KeyboardInterrupt would lose the
    message on its way through typer)."""


class UsageError(Exception):
    """Bad input: the message says what was wrong and what to do."""

    exit_code = 2
