"""The project's error type: a problem with the user's input or environment.

The command line prints a :class:`DDPMError` as one line and exits non-zero; anything else is
a bug and keeps its traceback.
"""

__all__ = ["DDPMError"]


class DDPMError(Exception):
    """A one-line, user-facing error: it names what was wrong and what was expected."""
