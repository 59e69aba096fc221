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


def shorten(text: str, limit: int, ellipsis: str = "…") -> str:
    """``text`` cut to at most ``limit`` characters, ending in ``ellipsis`` when it was cut.

    The one way capfilt shortens a message (error messages in rows, load errors, URLs quoted in
    messages); each caller passes its own ``limit`` and marker (``""`` cuts without one).

    Args:
        text: the message.
        limit: the longest result, in characters (``ellipsis`` included); at least ``len(ellipsis)``.
        ellipsis: appended to a cut text.
    """
    return text if len(text) <= limit else text[: limit - len(ellipsis)] + ellipsis


def one_line(err: BaseException | str) -> str:
    """``str(err)`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(err).split())


#: Longest ``error_message`` any stage writes into a row (characters, after :func:`row_message`).
ROW_MESSAGE_CHARS = 300


def row_message(text: str | None) -> str | None:
    """A row's ``error_message``: one line, at most :data:`ROW_MESSAGE_CHARS` characters (``None`` stays ``None``).

    Every stage passes its per-row messages through this, so no input value (a 5 MB URL, a huge
    host name, a server's error text) is ever echoed whole into the output.
    """
    if text is None:
        return None
    return shorten(one_line(text), ROW_MESSAGE_CHARS, "...")
