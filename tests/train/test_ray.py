"""Ray Train: the tiny BLIP recipe on 2 CPU workers (DistributedDataParallel over gloo)."""

from __future__ import annotations

import os

import pytest

from capfilt.train.config import load_recipe
from tests.helpers.train import loss_trend, make_shards, one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.mark.slow
def test_ray_train_two_cpu_workers_ten_steps(tmp_path):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from capfilt.train.ray_train import train_with_ray

    shards = tmp_path / "shards"
    kept = make_shards(shards)
    recipe = load_recipe("tiny-blip-pretrain", ["train.max_steps=10", "train.save_every=5", "data.num_workers=1"])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    try:
        res = train_with_ray(recipe, str(shards), tmp_path / "out", num_workers=2, cpus_per_worker=0.5)
    finally:
        if started:
            ray.shutdown()
    assert res.step == 10 and [r["step"] for r in res.history] == list(range(1, 11))
    loss_trend(res.history, ("itc", "itm", "lm"), k=3)
    assert res.history[-1]["lm"] < res.history[0]["lm"]
    # 2 ranks x 1 loader worker: 4 consumers' positions in the checkpoint, 2 x 10 x 8 samples consumed
    import torch

    state = torch.load(res.checkpoint / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and sorted(state["positions"]) == [0, 1]
    assert sum(state["positions"].values()) == 2 * 10 * 8 and len(kept) == 57
    assert (res.final / "captioner" / "model.safetensors").is_file() and res.preset is not None
