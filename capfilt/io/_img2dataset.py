"""Lazy access to the part of img2dataset that capfilt reuses as a library: ``resizer.Resizer``.

capfilt uses img2dataset's ``resizer.Resizer`` (resize + encode) unchanged. Importing it the usual
way runs ``img2dataset/__init__.py``, which imports its whole CLI (writers -> webdataset -> torch):
about 3.4 s and 400 MB of resident memory in every download worker (measured: ``ru_maxrss`` 399 MB
vs 142 MB). So the module is loaded from the installed img2dataset's own files under a private
package name (``_capfilt_img2dataset``) whose ``__init__`` is empty: the same code, without the
CLI. If the real ``img2dataset`` package is already imported in the process, it is used directly.
(img2dataset's ``X-Robots-Tag`` rule is re-stated in :func:`capfilt.io.fetch.robots_tag_forbids`,
which says why.)

albumentations checks the network for a newer version unless ``NO_ALBUMENTATIONS_UPDATE=1`` is
set before its import; it is set here (``setdefault``: a user's own value wins).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import types
from typing import Any

_ALIAS = "_capfilt_img2dataset"
_LOCK = threading.Lock()
_LOADED: dict[str, Any] = {}  # name -> module, so the per-request calls skip importlib


def _module(name: str):
    """``img2dataset.<name>`` loaded without running img2dataset's package ``__init__``."""
    mod = _LOADED.get(name)
    if mod is None:
        mod = _LOADED[name] = _load(name)
    return mod


def _load(name: str):
    if "img2dataset" in sys.modules:
        return importlib.import_module(f"img2dataset.{name}")
    with _LOCK:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        if _ALIAS not in sys.modules:
            spec = importlib.util.find_spec("img2dataset")
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("img2dataset is not installed: pip install img2dataset")
            pkg = types.ModuleType(_ALIAS, "img2dataset's modules without its CLI (see capfilt.io._img2dataset)")
            pkg.__path__ = list(spec.submodule_search_locations)
            pkg.__package__ = _ALIAS
            sys.modules[_ALIAS] = pkg
        return importlib.import_module(f"{_ALIAS}.{name}")


def resizer_class():
    """img2dataset's ``resizer.Resizer`` class (cv2 + albumentations resize and encode)."""
    return _module("resizer").Resizer
