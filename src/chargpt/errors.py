"""The one exception for user mistakes: the CLI prints its message on one line, no traceback."""


class ChargptError(Exception):
    """A problem the user can fix (bad path, bad setting, bad file); the message names the fix."""


class OptionError(ChargptError):
    """An option's value outside what it allows; `option` names it, for callers that point at it
    in their own terms (the server's error names the request field)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option
