#!/usr/bin/env bash
# One prepared CUDA check of the model layer (< 13 min on one GPU; each step has its own timeout).
#
#   bash benchmarks/gpu_check.sh            # from the repo root, on a machine with a CUDA GPU
#
# 1. environment: torch/transformers versions, GPU name, bf16 support;
# 2. bench_score.py on CUDA in bf16: naive per-pair forwards vs BlipScorer, images/s, texts/s,
#    torch.cuda.max_memory_allocated, max |diff| between the two;
# 3. bench_caption.py on CUDA in bf16: num_captions 1 vs 10, captions/s, max_memory_allocated;
# 4. the caption and score stages end to end on CUDA with the tiny preset (device/dtype checks,
#    per-row seed independence of the batch on the GPU);
# 5. benchmarks/gpu_e2e.py: caption + score stages on random BLIP-base/-large, images/s, GPU busy %, MFU.
# Model: the blip-base preset when its checkpoints are already in the HF cache (never downloads:
# HF_HUB_OFFLINE=1), else a BLIP-base-shaped model with random weights (same FLOPs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CAPFILT_CACHE="${CAPFILT_CACHE:-$(mktemp -d)}"

echo "== environment"
timeout 60 python - <<'EOF'
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
print(f"GPU: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}, "
      f"memory {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

MODEL=random-base
if timeout 60 python -c "from capfilt.config import load_preset; from capfilt.modeling.loading import preflight; preflight(load_preset('blip-base'), {'captioner', 'filter'})" 2>/dev/null; then
  MODEL=blip-base
fi
echo "== model: ${MODEL}"

echo "== score: naive vs optimized (CUDA, bf16, 32 images x 11 texts)"
timeout 180 python benchmarks/bench_score.py --model "${MODEL}" --device cuda --dtype bfloat16 --images 32 --texts 11

echo "== caption: num_captions 1 vs 10 (CUDA, bf16, 32 images, batch 32)"
timeout 180 python benchmarks/bench_caption.py --model "${MODEL}" --device cuda --dtype bfloat16 --images 32 --batch-size 32

echo "== stages on CUDA with the tiny preset"
timeout 120 python - <<'EOF'
import time
from pathlib import Path

import pyarrow as pa
import torch

from capfilt.config import CaptionConfig, ScoreConfig, load_preset
from capfilt.stages.caption import CaptionStage
from capfilt.stages.score import ScoreStage

files = sorted(Path("tests/fixtures/coco/images").glob("*.jpg"))[:16]
batch = pa.table({"key": [f.stem for f in files], "status": ["success"] * len(files),
                  "caption": ["a photo"] * len(files), "image": [f.read_bytes() for f in files]})
preset = load_preset("tiny")
cap = CaptionStage(CaptionConfig(num_captions=10, batch_size=8), preset)
cap.setup()
p = next(cap.captioner.model.parameters())
assert p.device.type == "cuda" and p.dtype == torch.bfloat16, (p.device, p.dtype)
t = time.perf_counter()
out = cap(batch)
print(f"caption stage: {len(files)} rows in {time.perf_counter() - t:.2f} s, device {p.device}, dtype {p.dtype}")
alone = cap(batch.slice(3, 1)).column("synthetic_captions").to_pylist()
assert alone == out.column("synthetic_captions").to_pylist()[3:4], "row captions depend on the batch on CUDA"
sc = ScoreStage(ScoreConfig(scorers=["itm", "itc", "clip"], batch_size=8), preset)
sc.setup()
t = time.perf_counter()
scored = sc(out)
print(f"score stage: {len(files)} rows, {sum(scored.column('_texts_score').to_pylist())} texts in "
      f"{time.perf_counter() - t:.2f} s; statuses {set(scored.column('status').to_pylist())}")
assert set(scored.column("status").to_pylist()) == {"success"}
print(f"max_memory_allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
EOF
echo "== gpu_check OK"

echo "== caption + score stages end to end on the GPU: images/s per stage, GPU busy %, MFU (random BLIP-base and -large)"
timeout 240 python benchmarks/gpu_e2e.py --size base --images 1024 --batch 128 || echo "gpu_e2e base: failed or timed out"
timeout 300 python benchmarks/gpu_e2e.py --size large --images 1024 --batch 128 || echo "gpu_e2e large: failed or timed out"
