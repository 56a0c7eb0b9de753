"""The one exception type of the data layer."""

from __future__ import annotations


class MetaloraDataError(ValueError):
    """Bad data or a bad data config: the message names the file, line, field or task at fault."""
