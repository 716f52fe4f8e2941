"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: a path, a value, a file. The message says what to do."""
