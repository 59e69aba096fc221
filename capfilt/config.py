"""Typed configuration: pipeline recipes (``pipelines/*.yaml``) and model presets (``models/*.yaml``).

Everything here is plain pydantic data: validated when loaded (unknown keys are errors), frozen,
picklable, and written into ``OUT/_capfilt/run.json`` so a run can be reproduced. Stages take
their section of the config in their constructor.

Units: seconds for times, pixels for sizes, bytes for byte sizes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from capfilt.errors import CapfiltError

Scorer = Literal["itm", "itc", "clip"]


class Strict(BaseModel):
    """Base of every config model (recipes, presets, training recipes): unknown keys are errors,
    instances are frozen (hashable, safe to share between stages and processes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=Strict)


class ConfigError(CapfiltError, ValueError):
    """A recipe, preset or command-line override is invalid; the message says which key and why."""


# --------------------------------------------------------------------------------------------
# recipe sections
# --------------------------------------------------------------------------------------------
class InputConfig(Strict):
    """How input metadata is read (img2dataset's ``--url_col`` / ``--caption_col`` semantics).

    ``url_col`` / ``caption_col`` of ``None`` mean: find them case-insensitively among
    ``url``/``URL``/``image_url`` and ``caption``/``TEXT``/``txt``/``text``.
    ``keep_columns`` of ``None`` passes every other input column through; a list passes only those.
    """

    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt", "coco"] = "auto"
    url_col: str | None = None
    caption_col: str | None = None
    keep_columns: list[str] | None = None
    csv_header: bool = True


class DownloadConfig(Strict):
    """Fetching and resizing (img2dataset's downloader/resizer options, same names where they exist).

    Attributes:
        thread_count: download threads inside each download task.
        timeout: seconds for the whole request (connect + headers + body), per try.
        retries: extra tries after a failed download.
        max_bytes: response bodies larger than this are refused (``too_large``).
        max_redirects: redirects followed per request (loops end here).
        image_size: target size in pixels (BLIP's processor uses 384).
        resize_mode: img2dataset's ``no`` | ``keep_ratio`` | ``center_crop`` | ``border`` | ``keep_ratio_largest``.
        min_image_size: shorter side below this (pixels, before resize) gives ``too_small``.
        max_image_pixels: width*height above this (read from the header, before decoding) gives ``too_large``.
        max_aspect_ratio: long/short side above this gives ``too_large`` (``None``: no limit).
        encode_format / encode_quality: stored image format (img2dataset's ``jpg``|``png``|``webp``).
        disallowed_header_directives: ``X-Robots-Tag`` directives that opt an image out.
        allow_private_network: allow loopback/private/link-local hosts (off: ``blocked_address``).
        allow_file_urls: allow ``file://`` URLs (off: ``invalid_url``).
    """

    enabled: bool = True
    thread_count: int = Field(64, ge=1, le=1024)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0, le=10)
    user_agent_token: str | None = "capfilt"
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    max_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_redirects: int = Field(5, ge=0)
    image_size: int = Field(384, ge=8)
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"] = "keep_ratio"
    resize_only_if_bigger: bool = False
    min_image_size: int = Field(0, ge=0)
    max_image_pixels: int = Field(89_478_485, gt=0)  # Pillow's default decompression-bomb limit
    max_aspect_ratio: float | None = Field(None, gt=0)  # None: no limit (run.json stays strict JSON)
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    allow_private_network: bool = False
    allow_file_urls: bool = False


class CaptionConfig(Strict):
    """The captioner (BLIP §3.3 / §4.3): nucleus sampling, repetition penalty 1.1, prompt stripped.

    ``num_beams > 1`` switches to beam search (less diverse, worse data per BLIP §4.3; not default).
    ``seed`` is combined with each row's key, so a row's captions never depend on its batch.
    """

    enabled: bool = True
    num_captions: int = Field(1, ge=1, le=64)
    top_p: float = Field(0.9, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    repetition_penalty: float = Field(1.1, gt=0)
    max_length: int = Field(30, ge=2)
    min_length: int = Field(5, ge=0)
    num_beams: int = Field(1, ge=1)
    prompt: str = "a picture of "
    seed: int = 0
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "CaptionConfig":
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) > max_length ({self.max_length})")
        if self.num_beams > 1 and self.num_captions > self.num_beams:
            raise ValueError(f"beam search returns at most num_beams sequences: num_captions "
                             f"({self.num_captions}) > num_beams ({self.num_beams})")
        return self


class ScoreConfig(Strict):
    """The filter's scorers. Each image is encoded once; every candidate text is scored against it.

    Attributes:
        scorers: ``itm`` (BLIP ITM match probability), ``itc`` (BLIP ITC cosine), ``clip`` (CLIP cosine).
        max_text_tokens: texts are truncated to this many tokens before scoring (BLIP/LAVIS use 35).
        batch_size: images per model call; texts of those images are scored together.
        itm_text_prefix: the first text token BLIP's ITM head reads: ``enc`` (BLIP trained and
            evaluated ITM with ``[ENC]``), ``cls`` (``BlipProcessor``'s ``[CLS]``), or ``auto``: what
            a capfilt-trained checkpoint recorded, else ``enc`` when the checkpoint has ``[ENC]``
            (see :mod:`capfilt.modeling.itm_prefix`).
    """

    enabled: bool = True
    scorers: list[Scorer] = ["itm", "itc"]
    max_text_tokens: int = Field(35, ge=4, le=512)
    batch_size: int = Field(8, ge=1)
    itm_text_prefix: Literal["auto", "enc", "cls"] = "auto"

    @field_validator("scorers")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"scorers listed twice: {v}")
        return v


class SelectConfig(Strict):
    """Keep/rank decision from stored scores (no model; ``refilter`` re-runs only this).

    A candidate text (the web caption and each synthetic caption) passes when every set threshold
    holds (score >= threshold). Passing texts are ranked by ``rank_by`` (best first) and cut to
    ``top_k`` when set. ``keep`` is true when at least one text passes. With ``dedup_texts``,
    candidates that are the same text once normalised (:func:`capfilt.stages.select.normalize_text`)
    count once (the best-ranked copy stays), so two identical sampled captions cannot fill BLIP-2's
    top 2 and push the web caption out.
    BLIP §3.3: ``itm_threshold: 0.5``. BLIP-2 §3.4: ``rank_by: clip``, ``top_k: 2``, no threshold.
    """

    itm_threshold: float | None = Field(0.5, ge=0, le=1)  # a probability
    itc_threshold: float | None = Field(None, ge=-1, le=1)  # cosines
    clip_threshold: float | None = Field(None, ge=-1, le=1)
    rank_by: Scorer = "itm"
    top_k: int | None = Field(None, ge=1)
    include_web: bool = True
    include_synthetic: bool = True
    # candidates that read the same (case, spacing, trailing punctuation) count once, best score kept
    dedup_texts: bool = True

    def thresholds(self) -> dict[str, float]:
        """The thresholds that are set, as ``{scorer: threshold}``."""
        t = {"itm": self.itm_threshold, "itc": self.itc_threshold, "clip": self.clip_threshold}
        return {k: v for k, v in t.items() if v is not None}

    def scorers_needed(self) -> set[str]:
        """Scorers whose stored scores this selection reads."""
        return set(self.thresholds()) | {self.rank_by}


class DedupConfig(Strict):
    """Optional duplicate marking after download (see :mod:`capfilt.stages.dedup`).

    ``exact``: same stored image bytes (sha256). ``near``: perceptual-embedding cosine >=
    ``near_threshold`` found with faiss. Later copies get status ``duplicate`` and skip the models.
    """

    enabled: bool = False
    exact: bool = True
    near: bool = False
    near_threshold: float = Field(0.95, gt=0, le=1)


class OutputConfig(Strict):
    """Shard layout. ``rows_per_shard`` input rows go to one shard (img2dataset's number_sample_per_shard)."""

    rows_per_shard: int = Field(1000, ge=1)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"


class StageResources(Strict):
    """Ray resources of one stage: per task/actor CPUs and GPUs, and how many run at once.

    ``concurrency`` is a fixed count or ``[min, max]`` for an autoscaling actor pool. ``None``
    lets capfilt size it to the cluster (see :mod:`capfilt.runner`). ``num_gpus: auto`` (the
    captioner's and scorer's default) means 0.5 GPU when the Ray cluster has GPUs, so the two
    model stages share a device, and none on a CPU-only cluster: the same command runs on a
    laptop and on a GPU cluster.
    """

    @field_validator("num_gpus")
    @classmethod
    def _gpus(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("num_gpus must be >= 0 or 'auto'")
        return v

    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float | Literal["auto"] = 0.0
    concurrency: int | tuple[int, int] | None = None


class ResourcesConfig(Strict):
    """Resources for each stage; fractional CPUs keep 2-core machines from deadlocking."""

    read: StageResources = StageResources(num_cpus=0.25)
    download: StageResources = StageResources(num_cpus=0.5)
    dedup: StageResources = StageResources(num_cpus=0.25)
    caption: StageResources = StageResources(num_cpus=0.5, num_gpus="auto")
    score: StageResources = StageResources(num_cpus=0.5, num_gpus="auto")
    select: StageResources = StageResources(num_cpus=0.25)
    write: StageResources = StageResources(num_cpus=0.25)


class PipelineConfig(Strict):
    """A pipeline recipe (``pipelines/NAME.yaml``): what runs and with which settings.

    ``source: output`` reads an existing capfilt output instead of metadata and re-runs only
    ``select`` (the ``refilter`` recipe); ``models`` names the default model preset.
    """

    name: str = "custom"
    description: str = ""
    source: Literal["metadata", "output"] = "metadata"
    models: str = "blip-large"
    input: InputConfig = InputConfig()
    download: DownloadConfig = DownloadConfig()
    dedup: DedupConfig = DedupConfig()
    caption: CaptionConfig = CaptionConfig()
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig = SelectConfig()
    output: OutputConfig = OutputConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        if self.source == "metadata" and self.score.enabled:
            missing = self.select.scorers_needed() - set(self.score.scorers)
            if missing:
                raise ValueError(f"select uses scorer(s) {sorted(missing)} that score.scorers "
                                 f"{self.score.scorers} does not compute; add them to score.scorers")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The parts of the recipe that decide the output's content (compared on resume)."""
        d = self.model_dump(mode="json")
        d.pop("resources", None)
        d.pop("description", None)
        d["download"].pop("thread_count", None)
        for sec in ("caption", "score"):
            d[sec].pop("batch_size", None)
        return d


# --------------------------------------------------------------------------------------------
# model presets
# --------------------------------------------------------------------------------------------
class ModelSpec(Strict):
    """One checkpoint, loaded with ``from_pretrained(id, revision=...)``.

    ``id`` is a Hugging Face Hub id or a local directory. ``kind`` picks the wrapper:
    ``blip`` (BlipForConditionalGeneration / BlipForImageTextRetrieval), ``blip2``
    (Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval), ``clip`` (CLIPModel).
    ``dtype`` ``auto`` means float32 on CPU (bf16 is ~8x slower on CPUs without AMX) and
    bfloat16 on CUDA.
    """

    id: str
    revision: str | None = None
    kind: Literal["blip", "blip2", "clip"] = "blip"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ModelPreset(Strict):
    """A model preset (``models/NAME.yaml``): the captioner, the filter and optionally CLIP.

    ``builder: tiny`` means the checkpoints are built locally with random weights on first use
    (:mod:`capfilt.modeling.tiny`) and ``id`` values are names inside that build directory.
    """

    name: str = "custom"
    description: str = ""
    builder: Literal["tiny"] | None = None
    captioner: ModelSpec
    filter: ModelSpec
    clip: ModelSpec | None = None

    @classmethod
    def roles(cls) -> tuple[str, ...]:
        """The fields that hold a model (``captioner``, ``filter``, ``clip``): the preset's roles."""
        return tuple(n for n, f in cls.model_fields.items() if ModelSpec in (f.annotation, *get_args(f.annotation)))


# --------------------------------------------------------------------------------------------
# loading and overrides
# --------------------------------------------------------------------------------------------
def bundled_dir(kind: Literal["pipelines", "models"]) -> Path:
    """Directory of the bundled ``pipelines/`` or ``models/`` YAML files.

    In a source checkout (editable install) these are the repo's top-level folders; in a wheel
    they are shipped as ``capfilt/_bundled/<kind>``.
    """
    here = Path(__file__).resolve().parent
    for cand in (here / "_bundled" / kind, here.parent / kind):
        if cand.is_dir():
            return cand
    raise ConfigError(f"bundled {kind}/ folder not found next to the capfilt package ({here})")


def _resolve_yaml(name_or_path: str, kind: Literal["pipelines", "models"]) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"{kind[:-1]} file {p} does not exist")
        return p
    d = bundled_dir(kind)
    cand = d / f"{name_or_path}.yaml"
    if not cand.is_file():
        names = sorted(x.stem for x in d.glob("*.yaml"))
        raise ConfigError(f"unknown {kind[:-1]} {name_or_path!r}; bundled: {', '.join(names)} "
                          f"(or give a path to a .yaml file)")
    return cand


def load_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path`` (an empty file is ``{}``).

    Raises:
        ConfigError: not valid YAML, or the top level is not a mapping.
    """
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def format_validation(err: ValidationError, where: str) -> str:
    """One line per problem of ``err`` (``section.key: why``; extra keys say ``unknown key``), under
    a first line naming ``where`` (e.g. ``pipeline pipelines/blip.yaml``)."""
    lines = [f"{where}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def validate(cls: type[S], data: dict[str, Any], where: str) -> S:
    """``cls.model_validate(data)`` with every problem listed in one :class:`ConfigError`.

    Args:
        cls: a :class:`Strict` config model.
        data: the loaded YAML (overrides applied).
        where: what ``data`` is, for the message (``model preset models/tiny.yaml``).

    Raises:
        ConfigError: unknown keys or invalid values (:func:`format_validation`).
    """
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation(e, where)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value parsed as YAML: ``0.9``, ``true``, ``[itm, clip]``, ``null``).

    Raises:
        ConfigError: if there is no ``=`` or the key is empty.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. caption.num_captions=10")
    key, value = text.split("=", 1)
    path = [k for k in key.strip().split(".") if k]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``section.key=value`` overrides applied (nested keys created)."""
    out = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    for path, value in items:
        if isinstance(path, str):
            path = path.split(".")
        node = out
        for k in path[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                node[k] = nxt
            node = nxt
        node[path[-1]] = value
    return out


def load_pipeline(name_or_path: str = "blip", overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
    """Load a recipe by bundled name (``blip``, ``blip2``, ``download``, ``refilter``) or YAML path.

    Args:
        name_or_path: bundled recipe name or path to a ``.yaml`` file.
        overrides: ``["caption.num_captions=10", ...]`` or ``{"caption.num_captions": 10}``.

    Raises:
        ConfigError: unknown recipe, invalid YAML, unknown keys or invalid values (message lists each).
    """
    path = _resolve_yaml(name_or_path, "pipelines")
    data = apply_overrides(load_yaml(path), overrides or [])
    return validate(PipelineConfig, data, f"pipeline {path}")


def load_preset(name_or_path: str = "blip-large") -> ModelPreset:
    """Load a model preset by bundled name (``blip-large``, ``blip-base``, ``blip2``, ``tiny``, ``shapes``) or YAML path.

    A model ``id`` starting with ``./`` or ``../`` is a folder relative to the preset file (how the
    bundled ``shapes`` preset finds the weights shipped next to it); it is made absolute here.

    Raises:
        ConfigError: unknown preset, invalid YAML, unknown keys or invalid values.
    """
    path = _resolve_yaml(name_or_path, "models")
    data = load_yaml(path)
    for role in ModelPreset.roles():
        spec = data.get(role)
        if isinstance(spec, dict) and isinstance(spec.get("id"), str) and spec["id"].startswith(("./", "../")):
            spec["id"] = str((path.parent / spec["id"]).resolve())
    return validate(ModelPreset, data, f"model preset {path}")
