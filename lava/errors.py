"""The one exception family lava raises for bad input.

Every message names what was wrong and what was expected; the CLI turns these into a one-line
reason and a non-zero exit code.
"""

from __future__ import annotations


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
