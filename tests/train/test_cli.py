"""``capfilt train ...`` through the real command line (typer), and recipe validation."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from capfilt.config import ConfigError
from capfilt.train.cli import register
from capfilt.train.config import TASK_OBJECTIVES, load_recipe, recipes_dir
from tests.helpers.train import COCO, one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    a = typer.Typer()

    @a.callback()
    def main() -> None:
        """capfilt."""

    register(a)
    return a


def test_train_caption_on_coco_via_cli(app, tmp_path):
    r = CliRunner().invoke(app, ["train", "caption", "--data", str(COCO / "captions_val2017.json"),
                                 "--recipe", "tiny-caption-coco", "--output", str(tmp_path), "--max-steps", "4",
                                 "--set", "data.num_workers=0", "--stop-after", "2"])
    assert r.exit_code == 0, r.output
    assert "step 2/4" in r.output and "stopped at step 2" in r.output
    r = CliRunner().invoke(app, ["train", "caption", "--data", str(COCO / "captions_val2017.json"),
                                 "--recipe", "tiny-caption-coco", "--output", str(tmp_path), "--max-steps", "4",
                                 "--set", "data.num_workers=0"])
    assert r.exit_code == 0, r.output
    assert "resuming at step 2" in r.output and "step 4/4" in r.output and "capfilt run --models" in r.output
    rows = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    assert (tmp_path / "final" / "captioner" / "config.json").is_file()


def test_cli_errors_are_one_line(app, tmp_path):
    r = CliRunner().invoke(app, ["train", "itm", "--data", str(tmp_path), "--recipe", "tiny-caption-coco",
                                 "--output", str(tmp_path / "o")])
    assert r.exit_code == 2 and "is for `capfilt train caption`" in r.output
    r = CliRunner().invoke(app, ["train", "caption", "--data", str(tmp_path), "--recipe", "tiny-caption-coco",
                                 "--output", str(tmp_path / "o"), "--set", "optim.lr=fast"])
    assert r.exit_code == 2 and "optim.lr" in r.output
    r = CliRunner().invoke(app, ["train", "caption", "--data", str(tmp_path), "--recipe", "tiny-caption-coco",
                                 "--output", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no committed capfilt shards" in r.output
    r = CliRunner().invoke(app, ["train", "--help"])
    assert r.exit_code == 0 and all(c in r.output for c in ("blip", "blip2", "caption", "itm"))


def test_bundled_recipes_load_and_are_consistent():
    names = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    assert names == ["blip-base-pretrain", "blip2-stage1", "blip2-stage2", "caption-coco", "itm-coco",
                     "shapes-caption", "shapes-itm", "shapes-pretrain",
                     "tiny-blip-pretrain", "tiny-blip2-stage1", "tiny-blip2-stage2", "tiny-caption-coco",
                     "tiny-itm-coco"]
    from capfilt.config import load_preset

    for n in names:
        r = load_recipe(n)
        assert set(r.objectives) <= TASK_OBJECTIVES[r.kind]
        if n == "shapes-pretrain":  # trains both roles; `capfilt bootstrap` sets the starting checkpoints
            assert r.preset is None and r.model.init == "random"
            continue
        assert load_preset(r.preset).captioner is not None  # the base preset of final/preset.yaml exists
        if not n.startswith(("tiny-", "shapes-")):
            tiny = load_recipe(f"tiny-{n.replace('-base', '')}")  # every real recipe has a tiny twin
            assert (tiny.task, tiny.stage, tiny.objectives) == (r.task, r.stage, r.objectives)
    assert load_recipe("blip2-stage1").model.num_query_tokens == 32
    assert load_recipe("blip2-stage1").data.text_top_k == 2
    assert load_recipe("caption-coco").data.prompt == "a picture of "


def test_recipe_validation_messages(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_recipe("tiny-caption-coco", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="objectives"):
        load_recipe("tiny-caption-coco", ["objectives=[itc]"])
    with pytest.raises(ConfigError, match="stage"):
        load_recipe("tiny-blip2-stage1", ["stage=null"])
    with pytest.raises(ConfigError, match="unknown training recipe 'nope'; bundled: blip-base-pretrain"):
        load_recipe("nope")
    p = tmp_path / "r.yaml"
    p.write_text("task: itm\nobjectives: [itc]\nmodel: {captioner: x}\n")
    with pytest.raises(ConfigError, match="need model.filter"):
        load_recipe(str(p))
    a = load_recipe("tiny-itm-coco").fingerprint()
    b = load_recipe("tiny-itm-coco", ["train.log_every=7", "train.cpu_threads=2"]).fingerprint()
    c = load_recipe("tiny-itm-coco", ["train.seed=1"]).fingerprint()
    assert a == b != c
