"""Bundled BLIP / BLIP-2 trainers that consume capfilt output shards (and COCO captions).

- :mod:`capfilt.train.config`: typed training recipes (``models/train/*.yaml``).
- :mod:`capfilt.train.data`: streaming ``IterableDataset`` over capfilt shards; :mod:`capfilt.train.coco`: COCO captions.
- :mod:`capfilt.train.blip`: BLIP ITC / ITM / LM (pre-training, COCO captioner and filter finetuning).
- :mod:`capfilt.train.blip2`: BLIP-2 stage 1 (Q-Former ITC / ITM / ITG) and stage 2 (frozen LM).
- :mod:`capfilt.train.loop`: the training loop (:func:`train`); :mod:`capfilt.train.ray_train`: Ray Train.
- :mod:`capfilt.train.cli`: the ``capfilt train`` commands.

``from capfilt.train import train, load_recipe`` is the Python API behind ``capfilt train``.
"""

from __future__ import annotations

from typing import Any

from capfilt.train.config import TrainRecipe, load_recipe

__all__ = ["TrainRecipe", "TrainResult", "load_recipe", "train", "train_with_ray"]


def __getattr__(name: str) -> Any:
    """Import the torch-heavy parts on first use."""
    if name in ("train", "TrainResult"):
        from capfilt.train import loop

        return getattr(loop, name)
    if name == "train_with_ray":
        from capfilt.train.ray_train import train_with_ray

        return train_with_ray
    raise AttributeError(name)
