"""Errors that end a run with one readable message (the CLI prints them without a traceback)."""


class CapfiltError(Exception):
    """Base class: a problem the user can fix (bad input file, bad config, missing model).

    The message is complete on its own: it names the file/row/column or model and what to do.
    """


class InputError(CapfiltError):
    """An input file is missing, unreadable, or lacks a required column (raised before any work)."""


class ModelLoadError(CapfiltError):
    """A model's weights cannot be found or loaded (raised before any download starts)."""


class OutputError(CapfiltError):
    """The output folder cannot be used: overlaps the input, or holds a run of another recipe."""


class LabelError(CapfiltError):
    """``capfilt report --label-col``: the label column is missing, unusable, or has no value meaning
    "the web caption matches its image" (raised before or right after reading the shards)."""
