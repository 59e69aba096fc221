"""Check, before a training run touches its output, that every model it starts from can be loaded.

``from_pretrained`` without a network retries the Hub for minutes before it fails; ``capfilt run``
avoids that with :func:`capfilt.modeling.loading.preflight`, and training does the same here: one
cache lookup per Hub model, then (unless ``HF_HUB_OFFLINE`` is set) one Hub probe with a short
timeout, and one message naming the recipes that train without any download.
"""

from __future__ import annotations

from typing import Any

#: Per ``capfilt train`` task: bundled recipes whose models are built locally (tiny random BLIPs).
OFFLINE_RECIPES: dict[str, tuple[str, ...]] = {
    "blip": ("tiny-blip-pretrain",),
    "caption": ("tiny-caption-coco",),
    "itm": ("tiny-itm-coco",),
    "blip2": ("tiny-blip2-stage1", "tiny-blip2-stage2"),
}

#: Recipe fields (:class:`capfilt.train.config.TrainModelConfig`) that name a checkpoint with weights.
#: (``tokenizer`` is left to the loader: a tokenizer-only cache entry has no weights to find.)
MODEL_FIELDS = ("captioner", "filter", "blip2", "qformer_from")


def offline_advice(task: str) -> str:
    """The sentence naming what trains with no download for ``task`` (``blip``, ``blip2``, ``caption``, ``itm``)."""
    from capfilt.config import bundled_dir

    recipes = " or ".join(f"`--recipe {r}`" for r in OFFLINE_RECIPES.get(task, ()))
    shapes = bundled_dir("models") / "shapes"
    out = f"Offline, train with a recipe whose models are built locally: {recipes} (tiny random models, a smoke test)"
    if task in ("blip", "caption", "itm"):
        out += (f"; or start from the `shapes` preset's local BLIPs (the toy shapes world): --set "
                f"model.captioner={shapes / 'captioner'} --set model.filter={shapes / 'filter'}")
    return out + "."


def preflight_recipe(recipe: Any) -> None:
    """Fail fast when a model the training recipe starts from is neither local, cached nor reachable.

    Local folders and ``builder: tiny`` models are left to the loader (they need no network).

    Args:
        recipe: a :class:`capfilt.train.config.TrainRecipe`.

    Raises:
        capfilt.errors.ModelLoadError: naming the model, how to provide it and :data:`OFFLINE_RECIPES`.
    """
    from capfilt.modeling.loading import check_hub_model, looks_local

    m = recipe.model
    if m.builder == "tiny":
        return
    for role in MODEL_FIELDS:
        model_id = getattr(m, role, None)
        if model_id and not looks_local(model_id):
            check_hub_model(model_id, m.revision, role, advice=offline_advice(recipe.task))
