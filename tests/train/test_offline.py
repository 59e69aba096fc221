"""``capfilt train`` without a network fails in seconds with one message naming the offline recipes
(issue 14), instead of retrying the Hub for minutes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_blip_without_network_fails_fast_naming_offline_recipes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "empty-hf-home"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    (tmp_path / "data").mkdir()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "capfilt.cli", "train", "blip", "--data", str(tmp_path / "data"),
                        "--output", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300, env=env)
    took = time.monotonic() - t0
    text = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2, text
    assert "Traceback" not in text
    assert "Salesforce/blip-image-captioning-base" in text and "cannot be reached" in text
    assert "--recipe tiny-blip-pretrain" in text and "models/shapes/captioner" in text
    assert "--models tiny" not in text  # capfilt run's advice does not apply to training
    assert not (tmp_path / "ckpt").exists()  # checked before the output is touched
    assert took < 60, f"took {took:.0f} s"  # the process start (torch, transformers) is most of it
