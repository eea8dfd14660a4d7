"""The house's expected failures: the CLI turns each into one line on stderr, never a traceback."""


class BadInput(ValueError):
    """Bad config, argument, data or URL (exit 2). The message names the field or file and fits on one line."""


class StorageFailure(RuntimeError):
    """Object storage stayed unreachable past the retry budget (exit 1; a rerun resumes). The message names
    the URL."""


class BankFailure(RuntimeError):
    """A worker's own pairing bank raised: a bug, never a reason to pair in-batch (exit 1). The message names
    the step and the error; `-v` shows the traceback."""
