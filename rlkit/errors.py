"""The two kinds of failure a user can meet, mapped onto the exit codes of SPEC.md.

Anything raised as one of these ends the command with a single readable line on stderr and
no traceback: the message must say what is wrong and what to do about it.
"""


class RlkitError(Exception):
    """Base class; `exit_code` is what the process returns."""

    exit_code = 1


class InputError(RlkitError):
    """Bad usage or bad input (a file, a column, an option): exit 2, nothing written."""

    exit_code = 2


class RunError(RlkitError):
    """A failure while running (NaN loss, interrupted run): exit 1."""

    exit_code = 1
