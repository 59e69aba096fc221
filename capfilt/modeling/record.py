"""``capfilt.json``: what capfilt's trainer records next to a saved model's ``config.json``.

A model folder written by ``capfilt train`` (``OUTPUT/final/<component>/``, every checkpoint's
component folders) holds this small JSON object beside the Hugging Face files, so that
``capfilt run`` uses the model the way it was trained:

- ``itm_text_prefix``: ``enc`` | ``cls``, the first text token the ITM objective used
  (:mod:`capfilt.modeling.itm_prefix`); the scorer's ``auto`` setting follows it.
- ``eos_token_id`` / ``eos_token``: the token the BLIP-2 stage-2 trainer appended to every caption
  (generation stops on it).
- ``text_encoder_from``: ``captioner`` when the filter's text encoder was taken over from the
  captioner's decoder (BLIP pre-training's weight sharing).
- ``recipe``: the training recipe's name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: File name, next to ``config.json``.
MODEL_RECORD_FILE = "capfilt.json"


def read_model_record(folder: str | Path | None) -> dict[str, Any]:
    """The ``capfilt.json`` of a model folder as a dict; ``{}`` when there is none (Hub models, other tools).

    Args:
        folder: a local model folder, or ``None`` / a Hub id (no record).

    Raises:
        ValueError: the file exists but is not a JSON object (the message names it).
    """
    if folder is None:
        return {}
    path = Path(folder) / MODEL_RECORD_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); delete it or restore it from the training output") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def write_model_record(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``folder/capfilt.json`` (sorted keys) and return the path."""
    path = Path(folder) / MODEL_RECORD_FILE
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path
