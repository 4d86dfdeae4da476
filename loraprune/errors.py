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


class AdapterError(LoRAPruneError):
    """The model carries an adapter loraprune cannot continue (a PEFT adapter other than one plain LoRA,
    ``modules_to_save``, or a :class:`~loraprune.run.engine.LoRAPruner` already attached); refused before
    the model is touched, the message names the fix (e.g. ``merge_and_unload()``)."""


class UnsupportedArchitectureError(LoRAPruneError):
    """The model's architecture has no group definition in :data:`loraprune.structure.archs.ARCHS`."""


class ModuleLayoutError(LoRAPruneError):
    """The model does not have the modules its architecture row promises."""


class CheckpointError(LoRAPruneError):
    """A checkpoint cannot be used to resume this run; the message says why."""


class PrunedModelError(LoRAPruneError):
    """A directory does not hold a loadable loraprune model; the message says why."""


class GGUFError(LoRAPruneError):
    """A GGUF file cannot be read or used as given; the message says what to do."""


class GGUFExportError(GGUFError):
    """The model cannot be written as a GGUF llama.cpp runs correctly; the message says what to do instead."""


class TokenizerExportError(GGUFError):
    """The tokenizer cannot be written so that llama.cpp tokenizes like transformers; the message says what to do."""


class MissingExtraError(LoRAPruneError, ImportError):
    """An optional dependency is not installed; the message names the pip command."""


class CLIError(LoRAPruneError):
    """A user-fixable problem with the command line; the message names the fix."""


class UsageError(CLIError):
    """The command line itself is malformed (unknown option, missing value, bad type)."""


class ModelLoadError(LoRAPruneError):
    """A model or tokenizer cannot be loaded from what was given; the message names the fix.

    ``field`` (``"model"``, ``"tokenizer"``, ``"device"``), ``value`` and ``detail`` let the
    command line say the same under its flag (``--model x does not exist; ...``)."""

    def __init__(self, field: str, value, detail: str):
        self.field, self.value, self.detail = field, value, detail
        super().__init__(f"{field}={value!r} {detail}")
