"""What every trainable task shares: checkpoint resolution, saving/loading, frozen parts, building.

A task (:class:`TrainTask`) is an ``nn.Module`` whose ``forward(batch)`` returns a dict of scalar
losses (one per objective, plus ``loss``, their weighted sum). It owns one or more Hugging Face
*components* (e.g. ``captioner`` = ``BlipForConditionalGeneration``) that are saved with
``save_pretrained`` (+ their processor) into ``DIR/<component>/``, so a ``models/`` preset can
point at them. Parameters that belong to no component (the ITC temperature, the BLIP-2 ITG head)
are saved in ``DIR/extras.safetensors``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capfilt.errors import ModelLoadError

log = logging.getLogger(__name__)

EXTRAS_FILE = "extras.safetensors"


def load_hf(cls: Any, model_id: str, builder: str | None, revision: str | None = None, **kw: Any) -> Any:
    """``cls.from_pretrained`` with the recipe's id resolution and one readable error.

    Args:
        cls: a transformers class (model, processor, tokenizer or config).
        model_id / builder / revision: see :func:`capfilt.modeling.loading.resolve_checkpoint`.
        **kw: passed to ``from_pretrained`` (e.g. ``config=``, ``ignore_mismatched_sizes=True``).

    Raises:
        ModelLoadError: not found locally / not cached while offline / unreadable.
    """
    from capfilt.modeling.loading import resolve_checkpoint

    res = resolve_checkpoint(model_id, builder, revision)
    path, local_only = res.path, res.local_only
    try:
        return cls.from_pretrained(path, revision=revision, local_files_only=local_only, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {cls.__name__} from {model_id!r} ({path}): {e}. Use a local "
                             f"save_pretrained folder, or fill the Hugging Face cache on a machine with "
                             f"internet (huggingface-cli download {model_id}).") from None


def apply_config_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Set ``overrides`` (``{"a.b": value}``) on a transformers config in place and return it.

    Raises:
        ConfigError: a path names an attribute the config does not have.
    """
    from capfilt.config import ConfigError

    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        obj = config
        for name in parents:
            obj = getattr(obj, name, None)
        if obj is None or not hasattr(obj, leaf):
            raise ConfigError(f"model.config_overrides: {type(config).__name__} has no attribute {path!r}")
        setattr(obj, leaf, value)
    return config


def init_query_tokens(query_tokens: nn.Parameter, std: float) -> bool:
    """Give all-zero BLIP-2 query tokens N(0, std) values (LAVIS ``query_tokens.data.normal_``).

    transformers initialises ``query_tokens`` to zeros, which makes all queries identical forever
    (they get identical gradients). Returns True if it re-initialised them.
    """
    with torch.no_grad():
        if bool((query_tokens == 0).all()):
            query_tokens.normal_(0.0, std)
            return True
    return False


class TrainTask(nn.Module):
    """Base class of the training tasks (:mod:`capfilt.train.blip`, :mod:`capfilt.train.blip2`).

    Subclasses set :attr:`objectives`, :attr:`components` (``{name: (model, processor)}``) and
    :attr:`frozen` (``{name: module}``), and implement :meth:`forward` and :meth:`collator`.
    """

    objectives: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.components: dict[str, tuple[nn.Module, Any]] = {}
        self.frozen: dict[str, nn.Module] = {}
        self.loss_weights: dict[str, float] = {}

    # -- interface ------------------------------------------------------------------------------
    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """A picklable ``samples -> batch`` function (runs in DataLoader workers)."""
        raise NotImplementedError

    @property
    def image_processor(self) -> Any:
        """The image processor that turns decoded images into this task's ``pixel_values``."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        """Scalar losses ``{objective: loss, "loss": weighted sum}`` for one micro-batch."""
        raise NotImplementedError

    # -- shared behaviour -----------------------------------------------------------------------
    def total(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add ``loss`` = sum of ``weight x loss`` over the objectives (weights default to 1)."""
        losses["loss"] = sum(self.loss_weights.get(k, 1.0) * v for k, v in losses.items())
        return losses

    def freeze(self, name: str, module: nn.Module) -> None:
        """Freeze ``module``: ``requires_grad=False`` and kept in eval mode (no dropout) while training."""
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
        self.frozen[name] = module

    def exclude(self, *modules: nn.Module | None) -> None:
        """Leave parameters the chosen objectives never use out of training (``requires_grad=False``).

        Keeps DistributedDataParallel from waiting for gradients that never come and AdamW from
        holding state for them (e.g. the ITM head when a recipe trains ITC only).
        """
        for m in modules:
            if m is not None:
                for p in m.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> "TrainTask":
        """``nn.Module.train`` that keeps frozen modules in eval mode."""
        super().train(mode)
        for m in self.frozen.values():
            m.eval()
        return self

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        owned = {id(t) for m, _ in self.components.values() for t in list(m.parameters()) + list(m.buffers())}
        return {k: t for k, t in self.state_dict(keep_vars=True).items() if id(t) not in owned}

    def model_record(self, name: str) -> dict[str, Any]:
        """What to record in component ``name``'s ``capfilt.json`` (:mod:`capfilt.modeling.record`);
        ``{}`` writes none. Tasks add how the component was trained (e.g. the ITM text prefix)."""
        return {}

    def save(self, directory: Path) -> list[Path]:
        """Write each component with ``save_pretrained`` (+ processor), its ``capfilt.json`` record, and the extras.

        Returns:
            The component folders (``directory/<name>``).
        """
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        out = []
        from capfilt.modeling.record import write_model_record

        for name, (model, processor) in self.components.items():
            model.save_pretrained(directory / name)
            processor.save_pretrained(directory / name)
            record = self.model_record(name)
            if record:
                write_model_record(directory / name, record)
            out.append(directory / name)
        extras = {k: t.detach().cpu().contiguous() for k, t in self._extra_tensors().items()}
        if extras:
            save_file(extras, str(directory / EXTRAS_FILE))
        return out

    def load(self, directory: Path) -> None:
        """Load weights written by :meth:`save` into this task (shared/tied modules stay shared).

        Raises:
            ModelLoadError: a component folder or the extras file is missing or does not fit.
        """
        from safetensors.torch import load_file

        for name, (model, _) in self.components.items():
            folder = directory / name
            try:
                loaded = type(model).from_pretrained(folder, local_files_only=True)
                model.load_state_dict(loaded.state_dict())
            except (OSError, RuntimeError, ValueError) as e:
                raise ModelLoadError(f"cannot load checkpoint component {folder}: {e}") from None
        want = self._extra_tensors()
        if want:
            path = directory / EXTRAS_FILE
            if not path.is_file():
                raise ModelLoadError(f"checkpoint {directory} lacks {EXTRAS_FILE} ({sorted(want)})")
            sd = load_file(str(path))
            missing = sorted(set(want) - set(sd))
            if missing:
                raise ModelLoadError(f"{path} lacks {missing}")
            with torch.no_grad():
                for k, t in want.items():
                    t.copy_(sd[k])
