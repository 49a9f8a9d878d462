"""The weights error, in a module free of JAX (the command line catches it before any device
work)."""


class WeightsError(ValueError):
    """Weights do not fit the model; the message names every offending key."""
