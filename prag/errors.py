"""User-facing errors.

Anything raised as ``PragError`` is a problem with the user's input or environment; the CLI
prints its message (which names the file, field or parameter) and exits with status 2 instead
of dumping a traceback.
"""


class PragError(Exception):
    """A clear, actionable error caused by bad input or configuration."""
