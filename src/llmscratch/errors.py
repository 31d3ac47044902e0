"""The one exception type for mistakes a user can make (bad path, bad config, bad data).

The CLI catches `UserError` and prints its message on one line with a non-zero exit, so
raising it anywhere in the library is how a problem reaches the user without a traceback.
"""


class UserError(Exception):
    """A problem with the user's input: a path, a file's contents, a config value."""
