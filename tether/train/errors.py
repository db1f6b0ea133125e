"""The error a run raises when it cannot go on."""


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. several non-finite steps in a row)."""
