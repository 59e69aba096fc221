"""Checkpoint + resume: stopping at step 20 and resuming gives the losses of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from capfilt.config import ConfigError
from capfilt.train.config import load_recipe
from capfilt.train.loop import STATE_FILE, CheckpointError, latest_checkpoint, load_trainer_state, train
from tests.helpers.train import make_shards, one_torch_thread  # noqa: F401 (autouse fixture)

# 30 steps of the full BLIP recipe (ITM negatives are sampled: the RNG state must be restored too),
# 3 DataLoader workers (the data position of each must be restored, and 20 steps x 2 micro-batches
# = 40 batches is not a multiple of 3: the next batch comes from worker 1, not 0), grad accumulation.
OVERRIDES = ["train.max_steps=30", "train.save_every=null", "train.grad_accum=2", "train.batch_size=6",
             "data.num_workers=3"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_shards(out)
    return out


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_stop_at_20_and_resume_matches_uninterrupted_run(shards, tmp_path):
    recipe = load_recipe("tiny-blip-pretrain", OVERRIDES)
    full = train(recipe, str(shards), tmp_path / "full", echo=None)
    part = train(recipe, str(shards), tmp_path / "resumed", stop_after=20, echo=None)
    assert part.step == 20 and part.final is None and part.checkpoint.name == "step-00000020"
    state = load_trainer_state(part.checkpoint / STATE_FILE)  # the safe loader reads a real checkpoint
    assert state["step"] == 20 and state["batches"] == [40] and sorted(state["positions"]) == [0, 1, 2]
    rest = train(recipe, str(shards), tmp_path / "resumed", echo=None)
    assert rest.resumed_from == 20 and rest.step == 30 and [r["step"] for r in rest.history] == list(range(21, 31))
    a = {r["step"]: r for r in full.history}
    for r in rest.history:
        for k in ("loss", "itc", "itm", "lm"):
            assert r[k] == pytest.approx(a[r["step"]][k], abs=1e-5), (r["step"], k)
        assert r["lr"] == pytest.approx(a[r["step"]]["lr"], rel=1e-9)
    print(f"loss at step 30: uninterrupted {a[30]['loss']:.6f}, resumed {rest.history[-1]['loss']:.6f}")
    assert [r["step"] for r in _log(tmp_path / "resumed")] == list(range(1, 31))
    # the final weights are the same too
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "full" / "final" / "captioner" / "model.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "final" / "captioner" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_running_again_after_the_end_does_nothing_and_another_recipe_is_refused(shards, tmp_path):
    recipe = load_recipe("tiny-caption-coco", ["train.max_steps=3", "data.num_workers=0", "train.save_every=2"])
    from tests.helpers.train import COCO

    data = str(COCO / "captions_val2017.json")
    first = train(recipe, data, tmp_path, echo=None)
    assert first.step == 3 and latest_checkpoint(tmp_path).name == "step-00000003"
    again = train(recipe, data, tmp_path, echo=None)
    assert again.resumed_from == 3 and again.history == [] and again.final is not None
    other = load_recipe("tiny-caption-coco", ["train.max_steps=3", "data.num_workers=0", "optim.lr=0.5"])
    with pytest.raises(ConfigError, match="another recipe .*optim"):
        train(other, data, tmp_path, echo=None)
    fresh = train(other, data, tmp_path, overwrite=True, echo=None)
    assert fresh.resumed_from is None and fresh.step == 3


class _Payload:
    """Unpickling this runs ``os.system(touch MARKER)``: what a hostile trainer_state.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_a_pickled_object_is_refused_and_runs_no_code(tmp_path):
    recipe = load_recipe("tiny-caption-coco", ["train.max_steps=3", "data.num_workers=0", "train.save_every=2"])
    from tests.helpers.train import COCO

    data = str(COCO / "captions_val2017.json")
    out = tmp_path / "out"
    first = train(recipe, data, out, stop_after=2, echo=None)
    assert first.step == 2
    state_file = latest_checkpoint(out) / STATE_FILE
    state = load_trainer_state(state_file)
    marker = tmp_path / "pwned"
    state["fingerprint_extra"] = _Payload(marker)  # an attacker with write access to the output folder
    torch.save(state, state_file)
    with pytest.raises(CheckpointError, match=r"refusing to load trainer checkpoint .*step-00000002.*trainer_state\.pt"):
        train(recipe, data, out, echo=None)
    assert not marker.exists()
    # the old loader would have run the payload: show that the file really is hostile
    torch.load(state_file, weights_only=False)
    assert marker.exists()
