"""Lazy access to the parts of img2dataset that capfilt reuses as a library.

Importing ``img2dataset`` pulls in albumentations, which checks the network for a newer version
unless ``NO_ALBUMENTATIONS_UPDATE=1`` is set *before* the import, and costs ~3 s (its package
``__init__`` imports the whole CLI). So the import happens here, on first use, with the variable set.
"""

from __future__ import annotations

import os
from typing import Any


def _import():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import downloader, resizer

    return downloader, resizer


def preload() -> None:
    """Import img2dataset now (about 3 s the first time in a process, free afterwards)."""
    _import()


def is_disallowed(headers: Any, user_agent_token: str | None, disallowed_header_directives: set[str]) -> bool:
    """img2dataset's ``downloader.is_disallowed`` (the ``X-Robots-Tag`` opt-out rule).

    Args:
        headers: an object with ``get_all(name, default)`` (``email.message.Message`` API).
        user_agent_token: lower-cased token, or ``None``.
        disallowed_header_directives: lower-cased directives such as ``{"noai", "noimageai"}``.
    """
    downloader, _ = _import()
    return downloader.is_disallowed(headers, user_agent_token, disallowed_header_directives)


def resizer_class():
    """img2dataset's ``resizer.Resizer`` class (cv2 + albumentations resize and encode)."""
    _, resizer = _import()
    return resizer.Resizer
