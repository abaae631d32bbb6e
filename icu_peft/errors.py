"""Errors that icu-peft reports to a user as one line and exit code 2."""


class ICUError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2


class InputError(ICUError):
    """Unreadable, empty or malformed input data."""


class ModelLoadError(ICUError):
    """The base model (or an adapter) could not be loaded."""


class IntegrityError(ICUError):
    """An adapter file does not match its manifest, or an adapter does not belong to this base."""


class OutputExistsError(ICUError):
    """The output directory exists and is not empty, and --overwrite was not given."""
