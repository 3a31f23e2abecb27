"""The project's one exception for user mistakes, below every module that raises it."""


class UserError(Exception):
    """A mistake the user can fix; its message is one line naming the thing and the fix."""
