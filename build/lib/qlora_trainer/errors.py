"""The one exception type for user mistakes; `cli.py` turns it into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a config value, a path, a data file. Printed as one line, exit 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config key that is unknown, of the wrong type or out of range."""


class OutOfMemoryAbort(UserError):
    """The GPU ran out of memory; the message carries the planner's advice. Exit 3."""

    exit_code = 3
