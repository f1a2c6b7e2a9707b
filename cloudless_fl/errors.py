"""The one exception family users see: every bad input raises a subclass of it.

Each message names the problem and the fix, so callers can print it as is.
"""


class CloudlessError(ValueError):
    """Base class for every input error cloudless-fl reports to a user."""


class ConfigError(CloudlessError):
    """A configuration value (Hydra key, topology YAML, run-config) is invalid."""


class DataError(CloudlessError):
    """Resident data is missing, malformed or inconsistent with the model."""
