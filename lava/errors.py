"""The one exception family lava raises for bad input, and how an error reads in one line.

Every message names what was wrong and what was expected; the CLI (and the explorer) turn these,
and operating-system errors in plain words (``error_message``), into a one-line reason.
"""

from __future__ import annotations

import errno


class LavaError(ValueError):
    """Bad input to lava: a message that says what was wrong and what was expected."""


class ImageError(LavaError):
    """An image that cannot be read or used."""


class ClassNameError(LavaError):
    """An unusable list of class names."""


class ModelError(LavaError):
    """An unknown model name or an unusable model option."""


class OutputError(LavaError, OSError):
    """A result that cannot be written where it was asked to go (also an ``OSError``)."""


_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EISDIR: "a folder of that name is in the way",
    errno.ENOTDIR: "a file is in the way where a folder should be",
    errno.EEXIST: "a file of that name is in the way",
    errno.ENAMETOOLONG: "the file name is too long",
}


def describe_os_error(err: OSError) -> str:
    """Why ``err`` happened, in words (``"the file system is read-only"``), without ``[Errno N]``."""
    if err.errno in _REASONS:
        return _REASONS[err.errno]
    return (err.strerror or str(err) or type(err).__name__).lower()


def error_message(err: BaseException) -> str:
    """The one line ``lava: error: ...`` shows for ``err``: lava's own message, or an OS error in
    plain words (no ``[Errno N]`` codes)."""
    if isinstance(err, OSError) and err.errno is not None:
        reason = describe_os_error(err)
        return f"{reason}: {err.filename}" if err.filename else reason
    return str(err)
