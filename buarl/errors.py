"""User-error types. The CLIs turn each into one line on stderr and exit code 2.

Anything that is not one of these is a bug and may show a traceback.
"""


class BuarlError(Exception):
    """Base of every error caused by user input (config, data, checkpoint, space)."""


class ConfigError(BuarlError):
    pass


class DataError(BuarlError):
    pass


class CheckpointError(BuarlError):
    pass


class TrainingDiverged(BuarlError):
    """The loss became NaN/inf; the run stops early with this reason."""
