"""The one error type for bad input anywhere in the house: the CLI turns it into one line and exit 2."""


class BadInput(ValueError):
    """Bad config, argument, data or URL. The message names the field or file and fits on one line."""
