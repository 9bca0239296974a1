"""The project's error type: a problem with the user's input or environment.

The command line prints a :class:`DDPMError` as one line and exits non-zero; anything else is
a bug and keeps its traceback.
"""

__all__ = ["DDPMError", "StoppedEarly", "first_line"]


class DDPMError(Exception):
    """A one-line, user-facing error: it names what was wrong and what was expected."""


class StoppedEarly(Exception):
    """A command stopped before its work was done, on request (SIGTERM, ``--time-limit``), after
    saving what it must; running it again continues. Not an error: the command line exits with
    its own code (3) so that a script or a scheduler can tell it from a finished run."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message, at most ``limit`` characters, or its type's name
    when it has no message: how a one-line error quotes the exception behind it."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]
