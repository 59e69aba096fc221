"""The CLIP-embedding NSFW head behind the safety stage (issue 12): weights built and saved here,
loaded from the recipe's path, changing the decision on real photos through the tiny preset's CLIP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.numpy import save_file

from capfilt.api import RunOptions, run
from capfilt.config import ConfigError, load_pipeline, load_preset
from capfilt.errors import ModelLoadError
from capfilt.modeling.clip_scorer import ClipScorer
from capfilt.modeling.nsfw_head import NsfwHead
from capfilt.stages.safety import HEAD_CLASS, SafetyStage

COCO = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images").glob("*.jpg"))[:12]


def _embeddings(images: list[bytes] | None = None) -> np.ndarray:
    """The tiny preset's CLIP embeddings of encoded images (default: the photos' files)."""
    import io

    import torch

    preset = load_preset("tiny")
    clip = ClipScorer.from_spec(preset.clip, preset)
    images = images or [p.read_bytes() for p in COCO]
    with torch.inference_mode():
        return clip.image_features([Image.open(io.BytesIO(b)).convert("RGB") for b in images]).numpy()


def _head(path: Path, emb: np.ndarray, scale: float = 40.0) -> np.ndarray:
    """Save an ``nn.Sequential``-style head (Linear, ReLU, Linear, sigmoid) whose logit is
    ``scale * (e . w - median)``, ``w`` pointing from the other photos towards the first ones;
    return the probabilities it should give ``emb``."""
    w = emb[:3].mean(0) - emb[3:].mean(0)
    s = emb @ w
    b = -float(np.median(s))
    w1 = np.stack([w, -w]) * scale
    b1 = np.array([b, -b], np.float32) * scale
    save_file({"0.weight": w1.astype(np.float32), "0.bias": b1, "2.weight": np.array([[1.0, -1.0]], np.float32),
               "2.bias": np.zeros(1, np.float32)}, str(path))
    return 1.0 / (1.0 + np.exp(-scale * (s + b)))


def test_head_loads_and_scores_like_its_formula(tmp_path):
    emb = _embeddings()
    expected = _head(tmp_path / "head.safetensors", emb)
    head = NsfwHead.from_file(tmp_path / "head.safetensors")
    assert head.input_dim == emb.shape[1]
    np.testing.assert_allclose(head(emb), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=rf"reads \(B, {emb.shape[1]}\)"):
        head(np.zeros((1, 3), np.float32))
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelLoadError, match="bad.safetensors cannot be read"):
        NsfwHead.from_file(tmp_path / "bad.safetensors")
    with pytest.raises(ModelLoadError, match="do not exist"):
        NsfwHead.from_file(tmp_path / "missing.safetensors")


def test_clip_head_needs_its_weights():
    with pytest.raises(ConfigError, match="safety.clip_head.weights is not set"):
        load_pipeline("download", {"safety.enabled": True, "safety.detector": "clip_head"})


def test_head_changes_the_decision_in_a_run(tmp_path):
    """The same 12 photos: NudeNet (default) flags none; the head flags exactly those its formula
    scores >= 0.6, drops their bytes and names itself."""
    pq.write_table(pa.table({"url": [p.as_uri() for p in COCO], "caption": ["c"] * len(COCO)}), tmp_path / "in.parquet")

    records = {}

    def go(out: str, overrides: dict) -> dict[str, dict]:
        records[out] = run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / out), pipeline="download",
                       models="tiny", executor="local", progress=False,
                       overrides={"download.allow_file_urls": True, "safety.enabled": True, **overrides}))
        return {r["url"].rsplit("/", 1)[1]: r for r in pq.read_table(tmp_path / out).to_pylist()}

    plain = go("nudenet", {})
    assert [n for n, r in plain.items() if r["status"] != "success"] == []
    names = [p.name for p in COCO]
    emb = _embeddings([plain[n]["image"] for n in names])  # what the stage sees: the stored images
    expected = _head(tmp_path / "head.safetensors", emb)
    flag = sorted(n for n, p in zip(names, expected) if p >= 0.6)
    assert 0 < len(flag) < len(names)
    rows = go("head", {"safety.detector": "clip_head", "safety.clip_head.weights": str(tmp_path / "head.safetensors")})
    assert sorted(n for n, r in rows.items() if r["status"] == "nsfw") == flag
    for n, p in zip(names, expected):
        assert rows[n]["nsfw_score"] == pytest.approx(p, abs=2e-3)
        if n in flag:
            assert rows[n]["image"] is None and rows[n]["nsfw_classes"] == [HEAD_CLASS]
            assert rows[n]["error_message"].startswith(f"NSFW head (CLIP embedding): {HEAD_CLASS}")
    # run.json names each run's safety model and its version
    assert records["nudenet"].record.resolved["filters"]["safety"]["model"].startswith("NudeNet 320n.onnx")
    import hashlib

    head_info = records["head"].record.resolved["filters"]["safety"]
    assert head_info["version"] == hashlib.sha256((tmp_path / "head.safetensors").read_bytes()).hexdigest()
    assert SafetyStage.model_roles(load_pipeline("download", {"safety.enabled": True})) == set()
