"""The one exception type for mistakes a user can make (paths, flags, dims, checkpoints).

Entry scripts catch it, print its message on one line and exit non-zero; anything else
is a bug and keeps its traceback.
"""


class Stopped(Exception):
    """A run stopped on request (Ctrl-C, SIGTERM) after saving what --resume needs."""


class UserError(ValueError):
    """A problem with the user's input, with a message that names the field or file.

    The library (models/, pruning/) names fields, not flags: `field` says which one, and the
    entry scripts name the flag that sets it (flags.FLAG_OF_FIELD).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
