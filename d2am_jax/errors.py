"""Errors that mean the user's config, data or files are wrong, as opposed to a bug in the program.

The command-line programs print these as one line (no traceback); anything else keeps its traceback.
"""


class UserError(ValueError):
    """A problem with the user's config, data or files; the message names the field, file or line
    and what was expected. A ValueError, so callers that catch ValueError keep working."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or that a run needs) does not exist."""
