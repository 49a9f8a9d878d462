"""The one error type of the data package."""


class DataError(ValueError):
    """A dataset, video or pipeline setting that cannot be used.

    The message is one line, "what was wrong; expected ...", so the CLI can print it as is and
    exit with status 2.
    """
