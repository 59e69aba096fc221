"""Which trainer builds which recipe: the registry of task builders.

A builder takes a :class:`~capfilt.train.config.TrainRecipe` and returns its
:class:`~capfilt.train.task.TrainTask`. The task modules (:mod:`capfilt.train.blip`,
:mod:`capfilt.train.blip2`) import :mod:`capfilt.train.task` for their base class; only this module
imports them, so the dependency runs one way. A new task is a module plus one entry in
:data:`BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from capfilt.train.blip import build_blip_task
from capfilt.train.blip2 import build_blip2_task
from capfilt.train.task import TrainTask

#: ``recipe.task`` -> builder. ``caption``, ``itm`` and ``blip`` are BLIP models (one trainer,
#: objectives chosen by the recipe); ``blip2`` is the Q-Former trainer.
BUILDERS: dict[str, Callable[[Any], TrainTask]] = {
    "blip": build_blip_task,
    "caption": build_blip_task,
    "itm": build_blip_task,
    "blip2": build_blip2_task,
}


def build_task(recipe: Any) -> TrainTask:
    """Build the task of a :class:`~capfilt.train.config.TrainRecipe` (weights seeded with ``train.seed``).

    Raises:
        ModelLoadError: a checkpoint cannot be loaded.
        ConfigError: checkpoints that cannot be combined (e.g. captioner and filter of different
            sizes), or a ``recipe.task`` no builder is registered for.
    """
    from capfilt.config import ConfigError

    builder = BUILDERS.get(recipe.task)
    if builder is None:
        raise ConfigError(f"no trainer for task {recipe.task!r}; expected one of {sorted(BUILDERS)}")
    torch.manual_seed(recipe.train.seed)
    return builder(recipe)
