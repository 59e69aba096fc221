"""Every trainable parameter of every task gets a gradient (what DistributedDataParallel requires)."""

from __future__ import annotations

import pytest

from capfilt.train.config import load_recipe
from capfilt.train.data import CapfiltShards, ImageTransform, StreamingDataset
from capfilt.train.builders import build_task
from tests.helpers.train import make_shards, one_torch_thread  # noqa: F401 (autouse fixture)

CASES = [
    ("tiny-blip-pretrain", None), ("tiny-blip-pretrain", "[itc]"), ("tiny-blip-pretrain", "[itm]"),
    ("tiny-blip-pretrain", "[itm, lm]"), ("tiny-itm-coco", "[itc]"), ("tiny-itm-coco", "[itm]"),
    ("tiny-caption-coco", None), ("tiny-blip2-stage1", None), ("tiny-blip2-stage1", "[itc]"),
    ("tiny-blip2-stage1", "[itm]"), ("tiny-blip2-stage1", "[itg]"), ("tiny-blip2-stage2", None),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_shards(out)
    return CapfiltShards(str(out))


@pytest.mark.parametrize("name,objectives", CASES)
def test_no_trainable_parameter_is_left_without_gradient(source, name, objectives):
    recipe = load_recipe(name, [f"objectives={objectives}"] if objectives else [])
    task = build_task(recipe).train()
    ds = StreamingDataset(source, ImageTransform(task.image_processor), text_top_k=2)
    it = ds.iter_consumer(0, 1)
    losses = task(task.collator()([next(it) for _ in range(6)]))
    assert sorted(k for k in losses if k != "loss") == sorted(recipe.objectives)
    losses["loss"].backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert trainable
    for frozen in task.frozen.values():
        assert all(not p.requires_grad for p in frozen.parameters())
