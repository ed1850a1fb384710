"""Errors the user can fix by changing input or configuration: the CLI prints `error: <message>` and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's data or settings; its message is one line that says what to fix."""


class ConfigError(ValueError):
    """params.yaml is missing or not valid YAML, or one of its keys is unknown, missing or of the wrong type."""


class DataSourceError(UserError):
    """A data source cannot be read at all (a missing folder or annotations file)."""


class DataQualityError(UserError, ValueError):
    """More input records failed validation than `data.max_bad_fraction` allows."""
