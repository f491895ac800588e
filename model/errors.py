"""Errors a user can act on: the CLI prints them as one line and exits with code 2."""


class SageError(Exception):
    """Bad input or an unusable model/file; the message is the whole user-facing line."""
