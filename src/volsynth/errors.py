"""User-facing errors: one base class, so the command line can tell a user's mistake from a bug.

Every error a user can fix (a bad option, a missing or corrupt file, a run folder that would be overwritten) is a
:class:`VolsynthError`; the CLI prints its message on one line and exits with status 2. Anything else is a bug and
keeps its traceback. The subclasses also derive from the builtin type callers would expect (``ValueError``,
``FileNotFoundError`` …), so ``except ValueError`` in library code keeps working.
"""

from __future__ import annotations


class VolsynthError(Exception):
    """Base of every error caused by the user's input; ``str()`` names the file or option and the problem."""


class ConfigError(VolsynthError, ValueError):
    """A configuration value or key is invalid; the message names the dotted path and, if any, the file."""


class ManifestError(VolsynthError, ValueError):
    """A manifest is missing, malformed, or lacks a requested modality; the message names the file."""


class DataError(VolsynthError, ValueError):
    """Input data cannot be used (empty, constant, mismatched grids, no subjects); names the file or subject."""


class InputNotFoundError(DataError, FileNotFoundError):
    """An input file or folder (prediction, target, mask, manifest, run folder) does not exist; names the path."""


class CheckpointError(VolsynthError, ValueError):
    """A checkpoint is missing, corrupt or incompatible; the message names the file."""


class OutputError(VolsynthError, FileExistsError):
    """An output would overwrite an input, another run's file or an existing result, or leave its folder."""


class DeviceError(VolsynthError, RuntimeError):
    """A requested device (``cuda``, ``cuda:1`` …) is not available on this machine."""


class TrainingDivergedError(VolsynthError, FloatingPointError):
    """A loss became NaN/Inf; the message names the iteration and the last good checkpoint."""


class DistributedError(VolsynthError, RuntimeError):
    """A distributed job could not start or a rank stopped answering (names the rank and the timeout)."""
