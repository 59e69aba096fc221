"""Model resolution, device/dtype choice, readable load errors and the offline preflight."""

from __future__ import annotations

import time

import pytest
import torch

from capfilt.config import ModelPreset, ModelSpec, load_preset
from capfilt.errors import ModelLoadError
from capfilt.modeling.loading import load_pretrained, load_processor, preflight, resolve_device_dtype, resolve_model
from capfilt.modeling.tiny import ensure_tiny_checkpoints

MISSING_HUB_ID = "capfilt-tests/no-such-model-anywhere"


def _preset(**roles) -> ModelPreset:
    base = {"name": "t", "captioner": {"id": MISSING_HUB_ID}, "filter": {"id": MISSING_HUB_ID}}
    base.update(roles)
    return ModelPreset.model_validate(base)


def test_tiny_preset_resolves_to_built_folder():
    preset = load_preset("tiny")
    path = resolve_model(preset.filter, preset)
    assert path == str(ensure_tiny_checkpoints() / "tiny-blip-itm")


def test_tiny_preset_rejects_unknown_name():
    preset = ModelPreset.model_validate({"name": "t", "builder": "tiny", "captioner": {"id": "tiny-blip-captioner"},
                                         "filter": {"id": "tiny-nope"}})
    with pytest.raises(ModelLoadError, match="tiny-nope"):
        resolve_model(preset.filter, preset)


def test_hub_id_resolves_to_itself():
    spec = ModelSpec(id="Salesforce/blip-itm-large-coco")
    assert resolve_model(spec, _preset()) == "Salesforce/blip-itm-large-coco"


def test_device_dtype_auto_on_cpu_is_fp32():
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectation")
    assert resolve_device_dtype(ModelSpec(id="x")) == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype(ModelSpec(id="x", dtype="bfloat16")) == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ModelLoadError, match="no CUDA"):
        resolve_device_dtype(ModelSpec(id="x", device="cuda"))


def test_load_tiny_model_and_processor():
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    preset = load_preset("tiny")
    model = load_pretrained(BlipForImageTextRetrieval, preset.filter, preset, attn_implementation="eager")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "eager"
    proc = load_processor(BlipProcessor, preset.filter, preset)
    assert proc.tokenizer.convert_tokens_to_ids("[DEC]") == model.config.text_config.bos_token_id


def test_missing_hub_model_offline_is_one_readable_paragraph(monkeypatch):
    from transformers import BlipForImageTextRetrieval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(id=MISSING_HUB_ID)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_pretrained(BlipForImageTextRetrieval, spec, _preset())
    assert time.perf_counter() - start < 10
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert MISSING_HUB_ID in msg
    assert f"hf download {MISSING_HUB_ID}" in msg and ".." not in msg
    assert "--models PATH.yaml" in msg and "--models tiny" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_preflight_tiny_passes_and_is_cheap():
    preset = load_preset("tiny")
    ensure_tiny_checkpoints()
    start = time.perf_counter()
    preflight(preset, {"captioner", "filter", "clip"})
    assert time.perf_counter() - start < 1.0


def test_preflight_uncached_hub_model_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as info:
        preflight(_preset(), {"filter"})
    assert time.perf_counter() - start < 2.0
    assert "filter model" in str(info.value) and MISSING_HUB_ID in str(info.value)


def test_preflight_only_checks_needed_roles(tmp_path):
    root = ensure_tiny_checkpoints()
    preset = _preset(filter={"id": str(root / "tiny-blip-itm")})
    preflight(preset, {"filter"})  # the (missing) captioner is not needed
    with pytest.raises(ModelLoadError, match="captioner"):
        preflight(preset, {"captioner", "filter"})


def test_preflight_local_folder_errors(tmp_path):
    preset = _preset(filter={"id": str(tmp_path / "nope")})
    with pytest.raises(ModelLoadError, match="not a local directory"):
        preflight(preset, {"filter"})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no config.json and weights") as got:
        preflight(_preset(filter={"id": str(tmp_path / "empty")}), {"filter"})
    assert "is a local path: save the model there" in str(got.value) and "hf download" not in str(got.value)


def test_preflight_clip_needed_but_preset_has_none():
    preset = load_preset("tiny").model_copy(update={"clip": None})
    with pytest.raises(ModelLoadError, match="no clip model"):
        preflight(preset, {"filter", "clip"})
    with pytest.raises(ValueError, match="unknown model role"):
        preflight(preset, {"scorer"})


def test_resolved_commits_name_the_cached_snapshot_a_run_loads(tmp_path):
    """Presets name Hub ids without a revision; the commit really used is the HF cache's snapshot
    folder name (issue 10 item 17: recorded, not pinned)."""
    from capfilt.modeling.loading import resolved_commits

    sha, old = "a" * 40, "b" * 40
    repo = tmp_path / "models--Salesforce--blip-itm-large-coco"
    for s in (sha, old):
        (repo / "snapshots" / s).mkdir(parents=True)
        (repo / "snapshots" / s / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    preset = load_preset("blip-large")
    got = resolved_commits(preset, {"filter", "captioner"}, cache_dir=tmp_path)
    assert got["filter"] == {"id": "Salesforce/blip-itm-large-coco", "revision": None, "source": "hub", "commit": sha}
    assert got["captioner"]["commit"] is None and got["captioner"]["source"] == "hub"  # not cached: unknown
    assert "clip" not in got
    # a revision that names a commit is that commit; a branch resolves through the cache's refs
    pinned = ModelPreset(name="p", captioner=ModelSpec(id="Salesforce/blip-itm-large-coco", revision=old),
                         filter=ModelSpec(id="Salesforce/blip-itm-large-coco", revision="main"))
    got = resolved_commits(pinned, cache_dir=tmp_path)
    assert got["captioner"]["commit"] == old and got["filter"]["commit"] == sha
    # local folders and the tiny build are not Hub models
    tiny = resolved_commits(load_preset("tiny"), {"filter"})
    assert tiny["filter"]["source"] == "local" and tiny["filter"]["commit"] is None
    assert tiny["filter"]["path"].endswith("tiny-blip-itm")


def test_model_presets_do_not_claim_pins_they_do_not_have():
    """No invented revisions: a preset revision, where set, is a 40-hex commit."""
    import re

    from capfilt.config import bundled_dir

    for path in sorted((bundled_dir("models")).glob("*.yaml")):
        preset = load_preset(str(path))
        for role in ModelPreset.roles():
            spec = getattr(preset, role)
            if spec is not None and spec.revision is not None:
                assert re.fullmatch(r"[0-9a-f]{40}", spec.revision), (path.name, role, spec.revision)


def test_weights_that_do_not_fit_their_config_give_one_clear_error(tmp_path):
    """Fresh-clone trial: a config.json whose vision hidden size was edited made transformers raise
    a RuntimeError ("ignore_mismatched_sizes"), which reached the user as a traceback."""
    import json
    import shutil

    from transformers import BlipForConditionalGeneration

    folder = tmp_path / "captioner"
    shutil.copytree(ensure_tiny_checkpoints() / "tiny-blip-captioner", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"]["hidden_size"] *= 2
    (folder / "config.json").write_text(json.dumps(cfg))
    spec = ModelSpec(id=str(folder), kind="blip", device="cpu", dtype="float32")
    preset = ModelPreset(captioner=spec, filter=spec)
    with pytest.raises(ModelLoadError, match="tensor shapes do not match the architecture its config.json") as got:
        load_pretrained(BlipForConditionalGeneration, spec, preset)
    assert "hf download" not in str(got.value)


def test_a_corrupt_local_checkpoint_gets_advice_about_the_folder_not_a_hub_download(tmp_path):
    """Fresh-clone trial: truncated weights in a local folder were answered with `hf download <path>`."""
    import shutil

    from transformers import BlipForConditionalGeneration

    folder = tmp_path / "captioner"
    shutil.copytree(ensure_tiny_checkpoints() / "tiny-blip-captioner", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    spec = ModelSpec(id=str(folder), kind="blip", device="cpu", dtype="float32")
    with pytest.raises(ModelLoadError, match="cannot load the weights") as got:
        load_pretrained(BlipForConditionalGeneration, spec, ModelPreset(captioner=spec, filter=spec))
    msg = str(got.value)
    assert f"{folder} is a local path: save the model there" in msg and "hf download" not in msg
