"""Resolve, check and load the checkpoints named in a model preset (``models/*.yaml``).

Every model wrapper loads through :func:`load_pretrained` / :func:`load_processor`, so id and
revision pinning, device/dtype choice, offline behaviour and the error message for a missing model
live in one place. :func:`preflight` checks, before any work starts, that every model a run
needs can be loaded, without downloading anything and without hanging when there is no network.
"""

from __future__ import annotations

import contextlib

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capfilt.config import ModelPreset, ModelSpec
from capfilt.errors import ModelLoadError, one_line, shorten

#: Weight files ``from_pretrained`` accepts, in the order transformers looks for them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: Seconds a Hub metadata probe may take in :func:`preflight` (no probe when offline).
HUB_PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model comes from.

    Attributes:
        path: a local directory or a Hub repo id, as passed to ``from_pretrained``.
        local_only: ``True`` when every file is on disk (a local folder or a fully cached Hub
            repo); then ``from_pretrained`` is called with ``local_files_only=True`` and never
            touches the network.
    """

    path: str
    local_only: bool


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network at all."""
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_local(model_id: str) -> bool:
    """Whether ``model_id`` names a local folder (a path prefix, or it exists) rather than a Hub repo."""
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).expanduser().exists()


_looks_local = looks_local


def _local_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / w).is_file() for w in WEIGHT_FILES)


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    """True when config.json and a weights file of ``repo_id@revision`` are in the HF cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        """True if file ``name`` of the repo is in the local HF cache."""
        try:
            return isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str)
        except ValueError:  # HFValidationError: not a valid repo id
            return False

    return cached("config.json") and any(cached(w) for w in WEIGHT_FILES)


def how_to_provide(model_id: str, run: bool = True) -> str:
    """The one-paragraph advice appended to every :class:`ModelLoadError` about ``model_id``
    (``run=False``: without the ``capfilt run`` preset advice, for training recipes).

    A local folder (:func:`looks_local`) gets advice about the folder (save the model into it with
    ``save_pretrained``), not about downloading a Hub id that it is not.
    """
    if looks_local(model_id):
        head = (f"{model_id} is a local path: save the model there with `model.save_pretrained(folder)` and "
                f"`processor.save_pretrained(folder)` (config.json, the weights and the tokenizer/processor files "
                f"of one checkpoint), or point the model id at a folder that holds a complete one")
        if not run:
            return head + "."
        return head + "; or use `--models tiny` for an offline smoke test with random weights."
    head = (f"To provide it: on a machine with internet run `hf download {model_id}` (older huggingface_hub: "
            f"`huggingface-cli download {model_id}`) and copy the Hugging Face cache (~/.cache/huggingface/hub, "
            f"or $HF_HOME/hub) to this machine")
    if not run:
        return head + "; or save the model to a local directory and set the recipe's model id to that directory."
    return (head + "; or save the model to a local directory, point `id:` at that directory in a preset YAML "
            "(copy one from models/) and pass `--models PATH.yaml`; or use `--models tiny` for an offline smoke "
            "test with random weights.")


def resolve_checkpoint(model_id: str, builder: str | None = None, revision: str | None = None) -> ResolvedModel:
    """Where ``from_pretrained`` finds ``model_id``: the one resolver for pipeline presets and
    training recipes alike.

    Args:
        model_id: a Hub repo id, a local directory (``~`` expanded; ``./`` and ``../`` are taken as
            local even when missing, so the error names the folder), or, with ``builder="tiny"``, a
            name in :data:`capfilt.modeling.tiny.TINY_NAMES`.
        builder: ``"tiny"``: names of the tiny random checkpoints resolve to
            ``<cache>/tiny-v1/<name>``, built on first use by
            :func:`capfilt.modeling.tiny.ensure_tiny_checkpoints`; other ids resolve as usual (a
            training recipe may start from an earlier stage's folder).
        revision: the Hub revision; decides whether a cached copy is complete.

    Returns:
        :class:`ResolvedModel`; ``local_only`` when every file is on disk or ``HF_HUB_OFFLINE`` is set.
    """
    if builder == "tiny":
        from capfilt.modeling.tiny import TINY_NAMES, ensure_tiny_checkpoints

        if model_id in TINY_NAMES:
            return ResolvedModel(str(ensure_tiny_checkpoints() / model_id), True)
    if _looks_local(model_id):
        return ResolvedModel(str(Path(model_id).expanduser()), True)
    return ResolvedModel(model_id, hub_offline() or _hub_cached(model_id, revision))


def resolve_model(spec: ModelSpec, preset: ModelPreset) -> str:
    """The string to pass to ``from_pretrained`` for ``spec`` of ``preset``
    (:func:`resolve_checkpoint` with the preset's builder).

    Raises:
        ModelLoadError: a tiny preset names a model the tiny builder does not make.
    """
    return _resolve(spec, preset).path


def _resolve(spec: ModelSpec, preset: ModelPreset) -> ResolvedModel:
    if preset.builder == "tiny":
        from capfilt.modeling.tiny import TINY_NAMES

        if spec.id not in TINY_NAMES:
            raise ModelLoadError(f"model preset {preset.name!r} uses the tiny builder, which makes "
                                 f"{', '.join(TINY_NAMES)}; it has no model {spec.id!r}. To load a local folder or "
                                 f"a Hub id instead, remove the line `builder: tiny` from the preset.")
    return resolve_checkpoint(spec.id, preset.builder, spec.revision)


def resolve_device_dtype(spec: ModelSpec) -> tuple[Any, Any]:
    """Device and dtype for ``spec``.

    ``device: auto`` is CUDA when available, else CPU. ``dtype: auto`` is ``torch.bfloat16`` on
    CUDA and ``torch.float32`` on CPU (bf16 matmuls are ~8x slower than fp32 on CPUs without AMX).

    Returns:
        ``(torch.device, torch.dtype)``.

    Raises:
        ModelLoadError: ``device: cuda`` was asked for but CUDA is not available.
    """
    import torch

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model {spec.id!r} asks for device: cuda, but torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); set device: auto or cpu in the preset.")
    use_cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if spec.dtype == "auto":
        dtype = torch.bfloat16 if use_cuda else torch.float32
    else:
        dtype = getattr(torch, spec.dtype)
    return device, dtype


#: Packages whose exceptions mean "the checkpoint could not be fetched" (httpx transport errors are
#: not OSErrors); they become a :class:`ModelLoadError` like a missing file.
_TRANSPORT_MODULES = ("httpx", "httpx2", "requests", "urllib3", "huggingface_hub")


def _load_error(spec: ModelSpec, what: str, err: BaseException) -> ModelLoadError:
    detail = shorten(one_line(err).rstrip("."), 300, "...")
    rev = f" (revision {spec.revision})" if spec.revision else ""
    return ModelLoadError(f"cannot load the {what} of model {spec.id!r}{rev}: {type(err).__name__}: {detail}. "
                          + how_to_provide(spec.id))


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-load progress bars and info/warnings (e.g. the torchvision fallback
    notice: BLIP's PIL image processor is the intended one here); restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(cls: type, spec: ModelSpec, preset: ModelPreset, **kw: Any) -> Any:
    """``cls.from_pretrained`` for ``spec``, on its device and dtype, in eval mode.

    Args:
        cls: a transformers model class (``BlipForConditionalGeneration``, ``CLIPModel``, ...).
        spec: model id, revision, dtype and device (``models/*.yaml``).
        preset: the preset ``spec`` belongs to (for ``builder: tiny``).
        **kw: extra ``from_pretrained`` arguments (e.g. ``attn_implementation="eager"``: BLIP has
            no SDPA attention; CLIP uses ``"sdpa"``).

    Returns:
        The model, moved to :func:`resolve_device_dtype`'s device, ``.eval()``.

    Raises:
        ModelLoadError: the checkpoint cannot be found (not cached, offline, no such repo or
            folder, connection failure) or read (e.g. a truncated ``model.safetensors``), or its
            weights do not fit its config (shape mismatch); one paragraph naming the model and how
            to provide it, no traceback.
    """
    device, dtype = resolve_device_dtype(spec)
    res = _resolve(spec, preset)
    try:
        with _quiet_transformers():
            model = cls.from_pretrained(res.path, revision=spec.revision, dtype=dtype,
                                        local_files_only=res.local_only, **kw)
    except (OSError, ValueError, ConnectionError) as e:
        raise _load_error(spec, "weights", e) from None
    except RuntimeError as e:
        if "mismatch" not in str(e):
            raise
        # transformers: "You set ignore_mismatched_sizes to False ..." (its size report is logged, not raised)
        raise ModelLoadError(f"cannot load the weights of model {spec.id!r}: their tensor shapes do not match the "
                             f"architecture its config.json describes (e.g. a hidden size edited or a config.json "
                             f"from another checkpoint). Put the config.json that belongs to these weights back, or "
                             f"point the preset at the checkpoint it came from.") from None
    except Exception as e:  # httpx transport errors are not OSErrors; a truncated file raises SafetensorError
        if type(e).__module__.split(".")[0] in _TRANSPORT_MODULES + ("safetensors",):
            raise _load_error(spec, "weights", e) from None
        raise
    return model.to(device).eval()


def load_processor(cls: type, spec: ModelSpec, preset: ModelPreset, **kw: Any) -> Any:
    """``cls.from_pretrained`` for the processor (image processor + tokenizer) of ``spec``.

    Raises:
        ModelLoadError: as :func:`load_pretrained`.
    """
    res = _resolve(spec, preset)
    try:
        with _quiet_transformers():
            return cls.from_pretrained(res.path, revision=spec.revision, local_files_only=res.local_only, **kw)
    except (OSError, ValueError, ConnectionError) as e:
        raise _load_error(spec, "processor/tokenizer", e) from None
    except Exception as e:
        if type(e).__module__.split(".")[0] in _TRANSPORT_MODULES:
            raise _load_error(spec, "processor/tokenizer", e) from None
        raise


def _check_available(spec: ModelSpec, preset: ModelPreset, role: str) -> None:
    res = _resolve(spec, preset)
    if preset.builder == "tiny" or _looks_local(spec.id):
        folder = Path(res.path)
        if not folder.is_dir():
            raise ModelLoadError(f"the {role} model {spec.id!r} is not a local directory that exists. "
                                 + how_to_provide(spec.id))
        if not _local_weights(folder):
            raise ModelLoadError(f"the {role} model directory {folder} has no config.json and weights "
                                 f"({' or '.join(WEIGHT_FILES[::2])}); save it with save_pretrained(). "
                                 + how_to_provide(spec.id))
        return
    check_hub_model(spec.id, spec.revision, role)


def check_hub_model(model_id: str, revision: str | None, role: str, advice: str = "") -> None:
    """Check that a Hub model is in the Hugging Face cache, or that the Hub has it, without downloading.

    Cached: returns at once. Not cached: fails at once when ``HF_HUB_OFFLINE`` is set, else asks the
    Hub once (``HfApi.model_info``, timeout :data:`HUB_PROBE_TIMEOUT` seconds, ``HF_ENDPOINT``
    honoured), where ``from_pretrained`` would retry for minutes without a network.

    Args:
        model_id: Hub repo id (``Salesforce/blip-itm-base-coco``).
        revision: branch, tag or commit; ``None``: ``main``.
        role: what the model is for, in the message (``captioner``, ``filter``, ...).
        advice: a sentence appended to the message (e.g. the training recipes that need no download);
            when given, the ``capfilt run`` preset advice is left out.

    Raises:
        ModelLoadError: not cached and offline, or the Hub cannot be reached or has no such model.
    """
    if _hub_cached(model_id, revision):
        return
    rev = f" at revision {revision}" if revision else ""
    tail = how_to_provide(model_id, run=not advice) + (f" {advice}" if advice else "")
    if hub_offline():
        raise ModelLoadError(f"the {role} model {model_id!r}{rev} is not in the Hugging Face cache and "
                             f"HF_HUB_OFFLINE is set, so it cannot be downloaded. " + tail)
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(model_id, revision=revision, timeout=HUB_PROBE_TIMEOUT)
    except Exception as e:  # no network, DNS failure, 404, gated repo, invalid id
        detail = shorten(one_line(e), 200, "").rstrip(".")
        raise ModelLoadError(f"the {role} model {model_id!r}{rev} is not in the Hugging Face cache and the Hub "
                             f"cannot be reached or does not have it ({type(e).__name__}: {detail}). "
                             + tail) from None


def require_role(preset: ModelPreset, role: str) -> ModelSpec:
    """The model of ``preset`` in ``role``: the one place a run learns that the preset lacks it.

    Raises:
        ValueError: ``role`` is not a role of :class:`capfilt.config.ModelPreset` (a programming error).
        ModelLoadError: the preset has no model in ``role`` (e.g. no ``clip`` model for
            ``score.scorers: [clip]``); the message says how to add one.
    """
    if role not in ModelPreset.roles():
        raise ValueError(f"unknown model role {role!r}; expected one of {ModelPreset.roles()}")
    spec = getattr(preset, role)
    if spec is None:
        raise ModelLoadError(f"model preset {preset.name!r} has no {role} model, but the pipeline needs one "
                             f"(score.scorers includes {role!r}); add `{role}: {{id: ..., kind: {role}}}` "
                             f"to the preset, drop {role!r} from score.scorers, or choose another --models.")
    return spec


def preflight(preset: ModelPreset, need: set[str]) -> None:
    """Check, before any work, that the models a run needs can be loaded.

    Cheap: only looks for ``config.json`` and a weights file (in a local directory, in the tiny
    build, or in the Hugging Face cache via ``huggingface_hub.try_to_load_from_cache``). A Hub
    model that is not cached is probed once with ``HfApi.model_info`` (timeout
    :data:`HUB_PROBE_TIMEOUT` seconds) unless ``HF_HUB_OFFLINE`` is set, in which case it fails at
    once. Builds the tiny checkpoints if the preset is ``builder: tiny``.

    Args:
        preset: the model preset.
        need: roles to check, a subset of :meth:`capfilt.config.ModelPreset.roles`.

    Raises:
        ModelLoadError: a needed model is missing or unreachable, or the preset has no model in a
            needed role (:func:`require_role`); the message names the model and how to provide it.
        ValueError: ``need`` holds an unknown role.
    """
    unknown = set(need) - set(ModelPreset.roles())
    if unknown:
        raise ValueError(f"unknown model role(s) {sorted(unknown)}; expected a subset of {ModelPreset.roles()}")
    for role in ModelPreset.roles():
        if role in need:
            _check_available(require_role(preset, role), preset, role)


def model_record(spec: ModelSpec, preset: ModelPreset) -> dict[str, Any]:
    """The ``capfilt.json`` (:mod:`capfilt.modeling.record`) of a local model folder; ``{}`` for Hub models
    and folders without one.

    Raises:
        ModelLoadError: the file exists but cannot be read as a JSON object.
    """
    from capfilt.modeling.record import read_model_record

    folder = Path(_resolve(spec, preset).path)
    if not folder.is_dir():
        return {}
    try:
        return read_model_record(folder)
    except ValueError as e:
        raise ModelLoadError(f"model {spec.id!r}: {e}") from None


def resolved_commit(spec: ModelSpec, preset: ModelPreset, cache_dir: str | Path | None = None,
                    probe_hub: bool = False) -> dict[str, Any]:
    """Which exact version of ``spec``'s model a run loads, for the run record.

    The model presets name Hub ids without a ``revision`` (a pinned commit could not be verified
    offline, and an old commit can break with a newer transformers), so the commit a run really
    used is recorded instead: for a Hub id, the snapshot folder of the Hugging Face cache that
    holds its ``config.json`` at ``spec.revision`` (or ``main``) is named by the commit hash
    (``.../models--ORG--NAME/snapshots/<sha>/config.json``); when it is not cached and
    ``probe_hub`` is set (and ``HF_HUB_OFFLINE`` is not), ``HfApi().model_info(...).sha``.

    Args:
        spec: the model (id, revision).
        preset: its preset (``builder: tiny`` models are local builds).
        cache_dir: the hub cache to look in (default: huggingface_hub's, ``HF_HUB_CACHE``).
        probe_hub: ask the Hub when the cache does not know (timeout :data:`HUB_PROBE_TIMEOUT`).

    Returns:
        ``{"id", "revision" (as asked, may be None), "source": "hub" | "local", "commit": 40-hex
        sha or None (local folders, unknown)}``; ``path`` for local folders. Never raises for a
        missing model (that is :func:`preflight`'s job).
    """
    out: dict[str, Any] = {"id": spec.id, "revision": spec.revision, "commit": None}
    try:
        res = _resolve(spec, preset)
    except ModelLoadError:
        return {**out, "source": "unknown"}
    if preset.builder == "tiny" or _looks_local(spec.id):
        return {**out, "source": "local", "path": str(Path(res.path).resolve())}
    out["source"] = "hub"
    rev = spec.revision
    if rev is not None and len(rev) == 40 and all(c in "0123456789abcdef" for c in rev.lower()):
        return {**out, "commit": rev.lower()}
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(spec.id, "config.json", cache_dir=cache_dir, revision=rev)
    except ValueError:  # not a valid repo id
        hit = None
    if isinstance(hit, str):
        parts = Path(hit).parts
        if "snapshots" in parts:
            return {**out, "commit": parts[parts.index("snapshots") + 1]}
    if probe_hub and not hub_offline():
        from huggingface_hub import HfApi

        try:
            return {**out, "commit": HfApi().model_info(spec.id, revision=rev, timeout=HUB_PROBE_TIMEOUT).sha}
        except Exception:  # noqa: BLE001 - no network, gated, 404: the record says unknown
            pass
    return out


def resolved_commits(preset: ModelPreset, roles: set[str] | None = None, **kw: Any) -> dict[str, dict[str, Any]]:
    """:func:`resolved_commit` of every model of ``preset`` in ``roles`` (default: all it has), by role.

    For ``run.json``: call it on the driver after :func:`preflight` (the cache then holds every
    Hub model a local run loads) and store the result, e.g. as ``models.<role>.commit``.
    """
    want = set(roles) if roles is not None else set(ModelPreset.roles())
    return {role: resolved_commit(getattr(preset, role), preset, **kw)
            for role in ModelPreset.roles() if role in want and getattr(preset, role) is not None}
