"""The one exception for user mistakes: the CLI prints its message on one line, no traceback."""


class ChargptError(Exception):
    """A problem the user can fix (bad path, bad setting, bad file); the message names the fix."""
