"""The project's error classes.

Every problem a user can fix (an option, the data, the model, a directory)
raises a :class:`LoRAPruneError` whose message names the fix. It subclasses
``ValueError`` so existing ``except ValueError`` code keeps working, while the
CLI catches only ``LoRAPruneError`` and lets real bugs show their traceback.
"""
from __future__ import annotations


class LoRAPruneError(ValueError):
    """A user-fixable problem; the message says what to change."""


class ConfigError(LoRAPruneError):
    """An option of :class:`~loraprune.config.PruneConfig` is out of range or contradicts another."""


class DataError(LoRAPruneError):
    """The data given to prune/eval cannot be used; the message says why and what to pass."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A file, folder or dataset could not be found; also a ``FileNotFoundError``."""


class NonFiniteLossError(LoRAPruneError, RuntimeError):
    """Training produced NaN/inf too many steps in a row."""


class OutputPathError(LoRAPruneError, OSError):
    """A file or directory loraprune is asked to write cannot be written there (a file
    in the way, a read-only or full disk, ...); the message names the path and the cause."""


class OutputExistsError(OutputPathError, FileExistsError):
    """The output path is taken (a file, or a directory holding other files); the message names the fix."""
