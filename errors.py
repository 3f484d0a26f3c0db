"""The one exception type for mistakes a user can make (paths, flags, dims, checkpoints).

Entry scripts catch it, print its message on one line and exit non-zero; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, with a message that names the flag or file."""
