"""The errors that mean "the user's input is wrong", as opposed to a bug.

A job turns a :class:`UserError` (and an ``OSError`` that names a file) into one line on stderr and
exit status 2 (``covid_spark.cli``); every other exception is a bug and keeps its traceback. Raise
these only for what the user can fix: a config key, a dataset, an input file or a job argument.
Each also derives from ``ValueError``, the type such checks raised before, so ``except ValueError``
around a check still catches it.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix; reported as one line, exit status 2."""


class ConfigError(UserError):
    """A config key or value (defaults.yaml, --config, --set, a job flag) is wrong."""


class InputError(UserError):
    """An input (image folder, manifest, model dir, metrics file, job argument) is wrong."""


class DatasetError(UserError, FileNotFoundError):
    """A dataset is missing, incomplete or not one this package wrote (also a ``FileNotFoundError``);
    ``dataset`` names it where known."""

    def __init__(self, message: str, *, dataset: str | None = None):
        super().__init__(message)
        self.dataset = dataset

    def __str__(self) -> str:
        return self.args[0]
