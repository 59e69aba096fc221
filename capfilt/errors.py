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


#: errno values that mean "the output location cannot take more writes" rather than a bug.
OUTPUT_ERRNOS = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is exceeded",
                 "EROFS": "the file system is read-only", "EACCES": "permission denied",
                 "EPERM": "operation not permitted", "EFBIG": "a file grew larger than allowed",
                 "EIO": "an input/output error"}
#: Substrings of object-store errors (pyarrow's S3/GCS messages) that mean the same.
STORE_DENIED = ("ACCESS_DENIED", "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId",
                "SignatureDoesNotMatch", "NoSuchBucket")


def _causes(err: BaseException):
    """``err`` and what it wraps (``__cause__``/``__context__``, Ray's ``.cause``), each once."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]


def storage_error(err: BaseException) -> str | None:
    """What went wrong writing to storage, if ``err`` (or what it wraps) is such an error.

    Looks through Ray's task-error wrappers for an :class:`OSError` whose ``errno`` is in
    :data:`OUTPUT_ERRNOS` or whose text names an object-store denial (:data:`STORE_DENIED`).

    Returns:
        e.g. ``"the disk is full ([Errno 28] No space left on device: '/out/_capfilt/tmp/...')"``,
        or ``None`` when ``err`` is something else (a bug, a model error).
    """
    import errno as errno_mod

    for e in _causes(err):
        if not isinstance(e, OSError):
            continue
        name = errno_mod.errorcode.get(e.errno or -1, "")
        if name in OUTPUT_ERRNOS:
            return f"{OUTPUT_ERRNOS[name]} ({shorten(one_line(e), 300)})"
        text = one_line(e)
        if any(s in text for s in STORE_DENIED):
            return f"the object store refused the write ({shorten(text, 300)})"
        if "No space left" in text or "Disk quota" in text:
            return f"the disk is full ({shorten(text, 300)})"
    for e in _causes(err):  # Ray may re-raise a worker's OSError as a plain RayTaskError text
        text = one_line(e)
        if "No space left on device" in text:
            return "the disk is full (No space left on device)"
        if "Errno 13" in text or "Permission denied" in text:
            return "permission denied"
    return None


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
