"""A LAION-style NSFW head: a small MLP over L2-normalised CLIP image embeddings.

LAION's CLIP-based NSFW detector (used to make LAION-5B's ``punsafe`` column) and NeMo Curator's
NSFW classifier are a few ``Linear`` layers with ReLU between them on the CLIP image embedding,
ending in one sigmoid unit (or two softmax units, the second meaning NSFW); some ports first
standardise the embedding (Keras ``Normalization``: ``(x - mean) / sqrt(variance)``).

:class:`NsfwHead` reads such weights from a local file the user supplies (no weights ship with
capfilt): ``.safetensors`` or a PyTorch ``state_dict`` (``.pt`` / ``.pth``, loaded with
``weights_only=True``). Layers are the ``<prefix>.weight`` / ``<prefix>.bias`` pairs in natural
order of their prefix (``0, 2, 4`` of an ``nn.Sequential``, or ``dense0 .. dense4``); optional
``mean`` and ``variance`` tensors (shape ``(D,)``) standardise the input. Knows nothing about pipelines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capfilt.errors import ModelLoadError


def _natural(prefix: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", prefix)]


class NsfwHead:
    """NSFW probability of CLIP image embeddings.

    Args:
        layers: ``[(weight float32 (out, in), bias float32 (out,)), ...]``, applied in order with ReLU
            between; the last has 1 output (sigmoid) or 2 (softmax, probability of the second).
        mean / variance: optional float32 ``(D,)`` input standardisation.

    Raises:
        ValueError: layer shapes do not chain, or the last layer has neither 1 nor 2 outputs.
    """

    def __init__(self, layers: Sequence[tuple[np.ndarray, np.ndarray]], mean: np.ndarray | None = None,
                 variance: np.ndarray | None = None):
        if not layers:
            raise ValueError("no layers")
        for (w0, _), (w1, _) in zip(layers, layers[1:]):
            if w1.shape[1] != w0.shape[0]:
                raise ValueError(f"layer shapes do not chain: {w0.shape} then {w1.shape}")
        if layers[-1][0].shape[0] not in (1, 2):
            raise ValueError(f"the last layer has {layers[-1][0].shape[0]} outputs; an NSFW head ends in 1 or 2")
        self.layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]
        self.mean = None if mean is None else np.asarray(mean, np.float32)
        self.variance = None if variance is None else np.asarray(variance, np.float32)

    @property
    def input_dim(self) -> int:
        """Embedding width the head expects (``D``)."""
        return int(self.layers[0][0].shape[1])

    @classmethod
    def from_file(cls, path: str | Path) -> NsfwHead:
        """Load a head from ``.safetensors`` or a PyTorch ``state_dict`` file (see module docs).

        Raises:
            ModelLoadError: the file is missing, unreadable, or not an MLP head (named, with why).
        """
        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelLoadError(f"NSFW head weights {p} do not exist (safety.clip_head.weights)")
        try:
            if p.suffix == ".safetensors":
                from safetensors.numpy import load_file

                tensors = load_file(str(p))
            else:
                import torch

                tensors = {k: v.float().numpy() for k, v in torch.load(str(p), map_location="cpu",
                                                                        weights_only=True).items()}
        except Exception as e:  # a corrupt or foreign file: one message, not a library traceback
            raise ModelLoadError(f"NSFW head weights {p} cannot be read ({type(e).__name__}: {e}); give a "
                                 f".safetensors or PyTorch state_dict file") from None
        tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
        prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".weight", ".bias"))}, key=_natural)
        try:
            layers = [(tensors[f"{q}.weight"], tensors[f"{q}.bias"]) for q in prefixes]
            mean = next((tensors[k] for k in ("mean", "norm.mean") if k in tensors), None)
            var = next((tensors[k] for k in ("variance", "norm.variance") if k in tensors), None)
            return cls(layers, mean, var)
        except (KeyError, ValueError) as e:
            raise ModelLoadError(f"NSFW head weights {p} are not an MLP head ({e}); expected "
                                 f"<layer>.weight/<layer>.bias pairs ending in 1 or 2 outputs") from None

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        """NSFW probabilities in [0, 1], float32 ``(B,)``, of float32 ``(B, D)`` embeddings.

        Raises:
            ValueError: ``D`` differs from :attr:`input_dim`.
        """
        x = np.asarray(embeddings, np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"embeddings of shape {x.shape}; this NSFW head reads (B, {self.input_dim}): is it "
                             f"for this CLIP model?")
        if self.mean is not None and self.variance is not None:
            x = (x - self.mean) / np.sqrt(self.variance + 1e-7)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        if x.shape[1] == 1:
            return (1.0 / (1.0 + np.exp(-x[:, 0]))).astype(np.float32)
        e = np.exp(x - x.max(1, keepdims=True))
        return (e[:, 1] / e.sum(1)).astype(np.float32)
