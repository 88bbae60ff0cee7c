"""The one exception type for mistakes a user can fix: a bad file, option, value or environment.

Every command of ``perta`` prints such an error as one line, ``perta <command>: error: <message>``, and exits
with status 2; any other exception is a bug and keeps its traceback. ``PERTA_DEBUG=1`` shows the traceback
of user errors too. The message names the file, key or value at fault, so that it reads on its own.

Subclasses mix in the built-in type that callers would naturally catch (``ValueError`` for bad values,
``FileNotFoundError`` for missing inputs), so library users can keep catching those.
"""

from __future__ import annotations


class PertaError(Exception):
    """A user error: the message names the file, key or value at fault."""


class PertaValueError(PertaError, ValueError):
    """A bad value: an option out of range, a malformed file, a key that is missing or extra."""


class PertaFileNotFoundError(PertaError, FileNotFoundError):
    """An input file or folder that does not exist."""


class PertaFileExistsError(PertaError, FileExistsError):
    """An output that exists already and is not to be replaced without ``overwrite``."""
