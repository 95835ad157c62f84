"""The error of unusable data, in a leaf module: the readers and the dataset both raise it without
importing each other (``dinoscale.data.dataset`` re-exports it)."""

from __future__ import annotations

from dinoscale.errors import UserError


class DataError(UserError, RuntimeError):
    """Data that cannot be used: the message names the file or folder and what to do."""

    kind = "data"
