"""Errors a user can cause, kept apart from bugs.

The command line turns a :class:`UserError` into one line on standard error and exit status 2;
anything else is a bug and keeps its traceback. Errors raised inside a papermill-executed
notebook cross the kernel boundary only as a class name and a message, so the runner recognises
them by the names listed in :data:`USER_ERROR_NAMES`.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a bad path, a bad input file, a bad config value."""


class ConfigError(UserError):
    """A config key is unknown or its value is not allowed."""


class BadInputError(UserError):
    """An input file is missing, empty, not a video, or cannot be decoded."""


class StageError(UserError):
    """A stage cannot run because something it needs (an earlier stage's table) is missing."""


class ModelError(UserError):
    """A model a stage needs is not installed, cannot be loaded, or its device is unavailable."""


class ProviderError(UserError):
    """A caption provider cannot be used: its key is missing, its server is unreachable, or it
    refused every request."""


class EngineError(UserError):
    """The engine that runs many movies (a Ray cluster) cannot start or cannot be reached."""


USER_ERROR_NAMES = frozenset(
    cls.__name__
    for cls in (UserError, ConfigError, BadInputError, StageError, ModelError, ProviderError, EngineError)
)
