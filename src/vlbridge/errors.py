"""Errors a user can cause and fix. The CLI prints these as one line, without a traceback."""


class VlbridgeError(Exception):
    """Base class for every error caused by user input (bad files, bad arguments, bad configs)."""


class ImageError(VlbridgeError, ValueError):
    """An image could not be read or is unusable (missing, corrupt, too small, too large)."""


class CheckpointError(VlbridgeError, ValueError):
    """A checkpoint is missing, of an unknown kind, or does not match the model it is loaded into."""


class ConfigError(VlbridgeError, ValueError):
    """A config file or override is invalid (unknown key, wrong type)."""


class InputError(VlbridgeError, ValueError):
    """Arguments that do not fit together (empty prompt, mismatched list lengths)."""


class TrainingError(VlbridgeError, RuntimeError):
    """Training cannot go on as configured (diverging losses, an epoch without usable samples)."""


class StorageError(VlbridgeError, OSError):
    """A file or folder could not be written (full disk, read-only folder, a file where a folder should be)."""
