"""Typed configuration: pipeline recipes (``pipelines/*.yaml``) and model presets (``models/*.yaml``).

Everything here is plain pydantic data: validated when loaded (unknown keys are errors), frozen,
picklable, and written into ``OUT/_capfilt/run.json`` so a run can be reproduced. Stages take
their section of the config in their constructor.

Units: seconds for times, pixels for sizes, bytes for byte sizes.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

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
    ``url``/``URL``/``image_url`` and ``caption``/``TEXT``/``txt``/``text`` (in a CSV/TSV without
    a header row: the URL column is the first whose first cell is an http(s) URL, the caption the
    first other column). A column is named by its header name or by its 0-based position (an int,
    or a string of digits that is no column's name): ``url_col=1, caption_col=0`` reads CC3M's
    headerless ``caption<TAB>url`` TSV.
    ``keep_columns`` of ``None`` passes every other input column through; a list passes only those.
    ``csv_header``: whether CSV/TSV files start with a header row; ``auto`` says yes unless a cell
    of the first row is an http(s) URL (then the first row is data).
    """

    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt", "coco"] = "auto"
    url_col: str | Annotated[int, Field(ge=0)] | None = None
    caption_col: str | Annotated[int, Field(ge=0)] | None = None
    keep_columns: list[str] | None = None
    csv_header: Literal["auto"] | bool = "auto"


#: Default ``download.min_image_size`` (pixels, shorter side, before resizing). Smaller images are
#: ``too_small``: a 1x1 tracking pixel or a 16-px icon, upscaled to the models' 384 px, is noise in
#: the captioner's input and the filter's. BLIP (Li et al. 2022, §4.1 footnote) downloaded only images
#: whose shorter edge exceeds 256 px; capfilt's default is lower so that thumbnails (COCO's 320x240
#: previews, 64-px toy worlds) still run, and ``download.min_image_size=257`` matches BLIP.
MIN_IMAGE_SIZE = 64


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
        min_image_size: shorter side below this (pixels, before resize) gives ``too_small``; by
            default :data:`MIN_IMAGE_SIZE`, so tracking pixels, spacers and icons never reach the
            models (BLIP §4.1 kept only images whose shorter side exceeds 256 px: set 257 to match).
        max_image_pixels: width*height above this (read from the header, before decoding) gives ``too_large``.
        max_aspect_ratio: long/short side above this gives ``too_large`` (``None``: no limit).
        encode_format / encode_quality: stored image format (img2dataset's ``jpg``|``png``|``webp``).
        disallowed_header_directives: ``X-Robots-Tag`` directives that opt an image out.
        allow_private_network: allow loopback/private/link-local hosts (off: ``blocked_address``).
        allow_file_urls: allow ``file://`` URLs (off: ``invalid_url``).
        robots_txt: check each host's ``robots.txt`` (``io/robots.py``) for ``user_agent_token`` and
            every agent of ``robots_agents``; a disallowed URL is ``opted_out``.
        robots_agents: the AI-crawler user agents whose ``robots.txt`` rules also opt an image out.
        robots_unreachable: what a ``robots.txt`` that answers 5xx or cannot be fetched means:
            ``allow`` (fetch the images) or ``disallow`` (RFC 9309's rule: every URL of the host
            ``opted_out``). A 4xx ``robots.txt`` always means no rules.
        tdm_reservation: a ``tdm-reservation: 1`` response header (W3C TDMRep) opts the image out.
        per_host_concurrency: requests in flight at once to one host name, per worker process
            (``None``: no cap).
        per_host_rate: requests started per second to one host name, per worker process (``None``:
            no limit).
        retry_after_max: seconds a ``Retry-After`` of a 429/503 answer is waited for; a host that
            asks for longer fails its rows at once (transient, ``failed_to_download``).
        dns_ttl: seconds a host name's resolved addresses are reused, per worker process (0: no cache).
        dns_negative_ttl: seconds a failed lookup is remembered (0: not remembered).
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
    min_image_size: int = Field(MIN_IMAGE_SIZE, ge=0)
    max_image_pixels: int = Field(89_478_485, gt=0)  # Pillow's default decompression-bomb limit
    max_aspect_ratio: float | None = Field(None, ge=1)  # long/short >= 1; None: no limit (run.json stays strict JSON)
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    allow_private_network: bool = False
    allow_file_urls: bool = False
    robots_txt: bool = True
    robots_agents: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]] = ["GPTBot", "CCBot", "Google-Extended", "anthropic-ai", "ClaudeBot", "img2dataset"]
    robots_unreachable: Literal["allow", "disallow"] = "allow"
    tdm_reservation: bool = True
    per_host_concurrency: int | None = Field(8, ge=1)
    per_host_rate: float | None = Field(None, gt=0)
    retry_after_max: float = Field(30.0, ge=0)
    dns_ttl: float = Field(300.0, ge=0)
    dns_negative_ttl: float = Field(30.0, ge=0)

    #: ``encode_quality`` range per ``encode_format`` (OpenCV's IMWRITE_JPEG_QUALITY 0-100,
    #: IMWRITE_PNG_COMPRESSION 0-9 (a compression level, not a quality), IMWRITE_WEBP_QUALITY 1-100).
    QUALITY_RANGES: ClassVar[dict[str, tuple[int, int, str]]] = {
        "jpg": (0, 100, "JPEG quality"), "png": (0, 9, "PNG compression level"), "webp": (1, 100, "WebP quality")}

    @model_validator(mode="after")
    def _check(self) -> "DownloadConfig":
        lo, hi, what = self.QUALITY_RANGES[self.encode_format]
        if not lo <= self.encode_quality <= hi:
            raise ValueError(f"download.encode_format={self.encode_format} reads download.encode_quality as the "
                             f"{what} ({lo}-{hi}), but it is {self.encode_quality}; set both, e.g. "
                             f"--set download.encode_format={self.encode_format} --set "
                             f"download.encode_quality={hi if self.encode_format != 'png' else 6}")
        if self.min_image_size ** 2 > self.max_image_pixels:
            raise ValueError(f"download.min_image_size={self.min_image_size} asks for at least "
                             f"{self.min_image_size ** 2} pixels but download.max_image_pixels="
                             f"{self.max_image_pixels} refuses more than that: every image would be refused")
        return self


class CaptionConfig(Strict):
    """The captioner (BLIP §3.3 / §4.3): nucleus sampling, repetition penalty 1.1, prompt stripped.

    ``num_beams > 1`` switches to beam search (less diverse, worse data per BLIP §4.3; not default).
    ``seed`` is combined with each row's key, so a row's captions never depend on its batch.
    ``batch_size``: images per ``generate`` call (32: each decoding step reads every decoder
    weight once for the whole batch, so larger batches cost less per image; halved on CUDA
    out-of-memory).
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
    batch_size: int = Field(32, ge=1)

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

    @model_validator(mode="after")
    def _check(self) -> "SelectConfig":
        if not (self.include_web or self.include_synthetic):
            raise ValueError("select.include_web and select.include_synthetic are both false: no text could be "
                             "kept and every row would be dropped; set one of them to true")
        return self

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

    @model_validator(mode="after")
    def _check(self) -> "DedupConfig":
        if self.enabled and not (self.exact or self.near):
            raise ValueError("dedup.enabled is true but dedup.exact and dedup.near are both false: nothing "
                             "would be deduplicated; enable one of them, or set dedup.enabled=false")
        return self


class LangIdConfig(Strict):
    """Optional language ID of web captions (see :mod:`capfilt.stages.langid`).

    ``languages``: ISO 639-1 codes the filter reads (BLIP: English). A caption is in another
    language when fastText's top language is not listed and has probability >= ``min_prob``.
    ``other``: ``keep``, ``drop_web_caption`` (not scored nor selected; the image stays) or
    ``drop_row`` (status ``wrong_language``).
    """

    enabled: bool = False
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1)
    min_prob: float = Field(0.5, ge=0, le=1)
    other: Literal["keep", "drop_web_caption", "drop_row"] = "drop_web_caption"


class BlocklistConfig(Strict):
    """Optional blocklists matched right after download, before any model (see
    :mod:`capfilt.stages.blocklist`).

    ``lists``: files of ``kind:hex`` lines (``sha256:``, ``pdq:``, ``url_sha256:``), each list
    named by its file stem. ``pdq_max_distance``: Hamming distance (of 256 bits) at or below which
    a PDQ hash matches (31 is the threshold Meta's PDQ documentation gives for near-identical images).
    """

    enabled: bool = False
    lists: list[str] = Field(default_factory=list)
    pdq_max_distance: int = Field(31, ge=0, le=128)

    @model_validator(mode="after")
    def _check(self) -> "BlocklistConfig":
        if self.enabled and not self.lists:
            raise ValueError("blocklist.enabled is true but blocklist.lists is empty; give at least one list file")
        return self


class DecontamConfig(Strict):
    """Optional eval-set decontamination (see :mod:`capfilt.stages.decontam`).

    ``eval_sets``: folders of images or Parquet files (``image`` bytes + ``id``) of evaluation
    images; input images at perceptual cosine >= ``threshold`` to one of them end ``contaminated``.
    """

    enabled: bool = False
    eval_sets: list[str] = Field(default_factory=list)
    threshold: float = Field(0.95, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> "DecontamConfig":
        if self.enabled and not self.eval_sets:
            raise ValueError("decontam.enabled is true but decontam.eval_sets is empty; give a folder of "
                             "evaluation images (--decontaminate PATH)")
        return self


class SemDedupConfig(Strict):
    """Optional semantic dedup after the run (see :mod:`capfilt.stages.semdedup`; SemDeDup, Abbas et al. 2023).

    The scorer stores each image's embedding (``image_embedding``); once every row is committed,
    k-means (faiss, ``n_clusters`` at most, fitted on ``sample_size`` rows) groups them and, within
    each cluster, a kept row whose image embedding has cosine >= ``threshold`` with a better-scored
    kept row is dropped (``drop_reason: semantic_duplicate``). ``kmeans_iterations`` and ``seed``
    make the clustering reproducible.
    """

    enabled: bool = False
    threshold: float = Field(0.95, gt=0, le=1)
    n_clusters: int = Field(1000, ge=1)
    sample_size: int = Field(100_000, ge=1)
    kmeans_iterations: int = Field(20, ge=1)
    seed: int = 0


class NsfwHeadConfig(Strict):
    """A LAION-style NSFW head on CLIP image embeddings (see :mod:`capfilt.modeling.nsfw_head`).

    ``weights``: a local ``.safetensors`` / ``.pt`` / ``.npz`` file of the MLP's ``Linear`` layers
    (``dense0..N`` or ``0..N`` names, LAION's CLIP-based-NSFW-Detector layout); it scores the
    preset's ``clip`` model's embeddings.
    """

    weights: str


class SafetyConfig(Strict):
    """Optional NSFW image detection (see :mod:`capfilt.stages.safety`; NudeNet's ONNX detector).

    ``classes``: detector classes that count (default: exposed nudity); ``threshold``: a row whose
    best counted detection reaches it ends ``nsfw`` (0.6: on the 79 bundled COCO photos the highest
    counted score is 0.58, a false positive on a bowl of oranges at 240 px); ``min_detection``:
    detections below it are not recorded in ``nsfw_classes``.
    """

    enabled: bool = False
    classes: list[str] = Field(default_factory=lambda: ["FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
                                                        "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED", "ANUS_EXPOSED"],
                               min_length=1)
    threshold: float = Field(0.6, ge=0, le=1)
    min_detection: float = Field(0.25, ge=0, le=1)
    detector: Literal["nudenet", "clip_head"] = "nudenet"
    clip_head: NsfwHeadConfig | None = None

    @model_validator(mode="after")
    def _check_head(self) -> "SafetyConfig":
        if self.detector == "clip_head" and self.clip_head is None:
            raise ValueError("safety.detector is clip_head but safety.clip_head.weights is not set; give the "
                             "path of the NSFW head's weights (safety.clip_head.weights=PATH)")
        return self


class ExportConfig(Strict):
    """Export the output after the run (the final step of ``capfilt run``), as ``capfilt export`` does.

    Attributes:
        format: ``webdataset`` (one ``NAME.tar`` per shard part: ``KEY.jpg``/``.txt``/``.json``) or
            ``hf-parquet`` (one ``NAME.parquet`` per part, ``image`` as HF ``Image``); ``none``: no export.
        to: the destination folder (local or ``s3://...``), outside the output; ``None``: beside the
            output, named ``OUT-webdataset`` / ``OUT-hf-parquet``.
        all_rows: every row with an image, not only the rows the filter kept.
        rows_per_file: split each shard part into files of at most this many of its rows
            (``NAME_0000.tar``, ...); ``None``: one file per part (``output.rows_per_shard`` rows).

    Not part of the recipe's identity: changing it never blocks a resume, and a rerun of a complete
    run only finishes the export.
    """

    format: Literal["none", "webdataset", "hf-parquet"] = "none"
    to: str | None = None
    all_rows: bool = False
    rows_per_file: int | None = Field(None, ge=1)


class OutputConfig(Strict):
    """Shard layout and streaming unit.

    ``rows_per_shard`` input rows go to one shard (img2dataset's number_sample_per_shard): the unit
    that is committed. ``block_rows`` is the unit that streams through the stages under Ray: a
    shard's rows travel as blocks of that many rows, so download, caption and score overlap
    within a shard, and the writer commits the shard whole once all its blocks arrived (blocks
    wait in ``_capfilt/staging/`` until then; see :mod:`capfilt.stages.write`). ``auto``: 64 rows
    (at least twice the largest model batch) when a model stage runs, else whole shards (a
    download-only run overlaps across shards already and saves the staging copy).
    """

    rows_per_shard: int = Field(1000, ge=1)
    block_rows: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"

    def resolved_block_rows(self, models: bool, model_batch: int = 1) -> int:
        """Rows per streaming block: ``block_rows``, or for ``auto`` the rule above.

        Args:
            models: a caption or score stage runs.
            model_batch: the largest model micro-batch (rows).
        """
        if self.block_rows != "auto":
            return min(self.block_rows, self.rows_per_shard)
        if not models:
            return self.rows_per_shard
        return min(self.rows_per_shard, max(AUTO_BLOCK_ROWS, 2 * model_batch))


#: Rows per streaming block for ``output.block_rows: auto`` when a model stage runs.
AUTO_BLOCK_ROWS = 64


#: An actor or task count: an int >= 1.
PositiveCount = Annotated[int, Field(ge=1)]


class StageResources(Strict):
    """Ray resources of one stage: per task/actor CPUs and GPUs, and how many run at once.

    ``concurrency`` is a fixed count or ``[min, max]`` for an autoscaling actor pool. ``None``
    lets capfilt size it to the cluster (see :mod:`capfilt.runner`). ``num_gpus: auto`` (the
    model stages' default) means 0.5 GPU when the Ray cluster has GPUs and two stages say
    ``auto`` (the captioner and the scorer share a device), a whole GPU when one does (the fused
    ``caption_score`` stage, or a recipe with one model stage), and none on a CPU-only cluster: the same command runs on a
    laptop and on a GPU cluster. ``threads`` is the torch thread count of an actor-pool stage's
    actors (Ray sets ``OMP_NUM_THREADS=1`` for fractional CPUs, so without it a model computes
    on one core); ``auto`` is :func:`capfilt.runner.actor_threads`'s rule.
    """

    @field_validator("num_gpus")
    @classmethod
    def _gpus(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("num_gpus must be >= 0 or 'auto'")
        return v

    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float | Literal["auto"] = 0.0
    concurrency: PositiveCount | tuple[PositiveCount, PositiveCount] | None = None
    threads: PositiveCount | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "StageResources":
        if isinstance(self.concurrency, tuple) and self.concurrency[0] > self.concurrency[1]:
            raise ValueError(f"concurrency [min, max] = {list(self.concurrency)}: min is above max")
        return self


class ResourcesConfig(Strict):
    """Resources for each stage; fractional CPUs keep 2-core machines from deadlocking.

    ``fused``: caption and score run in one actor (``caption_score``, :mod:`capfilt.stages.fused`)
    instead of two pools: one model process, one GPU share, each image decoded once, and on a CPU
    node every core for whichever model is computing (1.26-1.29x the two pools end to end on 2 cores,
    ``benchmarks/RESULTS.md``). ``auto`` (the default) is resolved when the recipe is read: fused,
    unless the recipe sets ``resources.caption`` or ``resources.score`` (which only two pools use);
    ``false`` forces two pools. ``true`` together with ``resources.caption`` or ``resources.score``
    is refused: those pools would not exist, so their sizes would be ignored.
    """

    fused: bool = True

    @model_validator(mode="before")
    @classmethod
    def _resolve_fused(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        pools = sorted({"caption", "score"} & set(data))
        if data.get("fused", "auto") == "auto":
            return {**data, "fused": not pools}
        if pools and str(data["fused"]).strip().lower() in ("true", "1", "yes", "on", "t", "y"):
            named = " and ".join(f"resources.{p}" for p in pools)
            raise ValueError(f"fused=true runs caption and score in one caption_score actor, so {named} (the "
                             f"size of a separate pool) would be ignored: size resources.caption_score instead, "
                             f"or set resources.fused=false for two pools")
        return data

    read: StageResources = StageResources(num_cpus=0.25)
    download: StageResources = StageResources(num_cpus=0.5)
    blocklist: StageResources = StageResources(num_cpus=0.25)
    langid: StageResources = StageResources(num_cpus=0.25)
    decontam: StageResources = StageResources(num_cpus=0.25)
    safety: StageResources = StageResources(num_cpus=0.5)
    dedup: StageResources = StageResources(num_cpus=0.25)
    semdedup: StageResources = StageResources(num_cpus=0.25)
    caption: StageResources = StageResources(num_cpus=0.5, num_gpus="auto")
    score: StageResources = StageResources(num_cpus=0.5, num_gpus="auto")
    caption_score: StageResources = StageResources(num_cpus=1.0, num_gpus="auto")
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
    blocklist: BlocklistConfig = BlocklistConfig()
    langid: LangIdConfig = LangIdConfig()
    decontam: DecontamConfig = DecontamConfig()
    safety: SafetyConfig = SafetyConfig()
    dedup: DedupConfig = DedupConfig()
    caption: CaptionConfig = CaptionConfig()
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig = SelectConfig()
    semdedup: SemDedupConfig = SemDedupConfig()
    output: OutputConfig = OutputConfig()
    export: ExportConfig = ExportConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        """Settings of different sections that only make sense together (checked before any work)."""
        if self.source == "metadata" and self.score.enabled:
            missing = self.select.scorers_needed() - set(self.score.scorers)
            if missing:
                raise ValueError(f"select uses scorer(s) {sorted(missing)} that score.scorers "
                                 f"{self.score.scorers} does not compute; add them to score.scorers")
        if self.source == "metadata" and not self.download.enabled:
            need = [f"{sec}.enabled" for sec in ("caption", "score", "dedup") if getattr(self, sec).enabled]
            if need:
                raise ValueError(f"download.enabled is false but {', '.join(need)} is true: those stages need the "
                                 f"downloaded images; enable download or disable them")
        if self.source == "metadata" and self.semdedup.enabled and not self.score.enabled:
            raise ValueError("semdedup.enabled is true but score.enabled is false: semantic dedup uses the image "
                             "embeddings the scorer computes; enable score or disable semdedup")
        if self.source == "metadata" and not self.caption.enabled and not self.select.include_web:
            raise ValueError("select.include_web is false and caption.enabled is false: there are no synthetic "
                             "captions, so no text could be kept; set select.include_web=true or enable caption")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The parts of the recipe that decide the output's content (compared on resume)."""
        d = self.model_dump(mode="json")
        d.pop("resources", None)
        d.pop("description", None)
        d.pop("export", None)  # an export after the run does not change the shards
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


def _model_in(ann: Any) -> tuple[type[BaseModel] | None, bool]:
    """The config model inside an annotation (``X``, ``X | None``, ``list[X]``, ``dict[str, X]``)
    and whether it sits in a container (the next location part is then an index or a key)."""
    members = get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,)
    for m in members:
        if isinstance(m, type) and issubclass(m, BaseModel):
            return m, False
        if get_origin(m) in (list, dict):
            inner = [a for a in get_args(m) if isinstance(a, type) and issubclass(a, BaseModel)]
            return (inner[0] if inner else None), True
    return None, False


def _field_loc(loc: tuple, model: type[BaseModel] | None) -> str:
    """The dotted key of a pydantic error location, without the union-member tags pydantic adds
    (``input.url_col.constrained-int`` -> ``input.url_col``) when ``model`` is known."""
    if model is None:
        return ".".join(str(x) for x in loc)
    keep: list[str] = []
    ann: type[BaseModel] | None = model
    in_container = False
    for x in loc:
        if in_container:  # a list index or a dict key
            keep.append(str(x))
            in_container = False
            continue
        if ann is None:
            break  # past a leaf field: what follows names union members, not keys
        keep.append(str(x))
        if x not in ann.model_fields:
            break  # an unknown key
        ann, in_container = _model_in(ann.model_fields[x].annotation)
    return ".".join(keep)


def format_validation(err: ValidationError, where: str, overrides: dict[str, Any] | None = None,
                      model: type[BaseModel] | None = None) -> str:
    """One line per invalid key of ``err`` (``section.key: why``; extra keys say ``unknown key``),
    under a first line naming ``where`` (e.g. ``pipeline pipelines/blip.yaml``). A key set by an
    override (``overrides``: ``{"section.key": value}``) names the override and its value; the
    alternatives of a union field (``str | int``) are joined on one line when ``model`` is given."""
    problems: dict[str, list[str]] = {}
    for e in err.errors():
        loc = _field_loc(e["loc"], model) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] == "value_error" and "error" in e.get("ctx", {}):
            msg = str(e["ctx"]["error"])  # our own validators' sentences, without "Value error, "
        if msg not in problems.setdefault(loc, []):
            problems[loc].append(msg)
    lines = [f"{where}: invalid configuration"]
    for loc, msgs in problems.items():
        src = next((k for k in (overrides or {})
                    if loc == k or loc.startswith(k + ".") or k.startswith(loc + ".")), None)
        tail = f" (from the override {src}={overrides[src]!r})" if src is not None else ""
        lines.append(f"  {loc}: {'; or '.join(msgs)}{tail}")
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
        raise ConfigError(format_validation(e, where, model=cls)) from None


_YAML_NULLS = ("", "~", "null", "Null", "NULL")


def _leaf_types(model: type[BaseModel] | None, path: list[str]) -> tuple[Any, ...] | None:
    """The plain types a recipe key accepts (``(str, int, NoneType)`` for ``str | int | None``),
    or ``None`` when ``path`` names no field of ``model`` (validation will say so)."""
    ann: Any = model
    for k in path:
        fields = getattr(ann, "model_fields", None)
        if not fields or k not in fields:
            return None
        ann = fields[k].annotation
    out = []
    for a in (get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,)):
        out.append(get_args(a)[0] if get_origin(a) is Annotated else a)
    return tuple(out)


def parse_override(text: str, model: type[BaseModel] | None = None) -> tuple[list[str], Any]:
    """Parse ``section.key=value``: the value as YAML (``0.9``, ``true``, ``[itm, clip]``, ``null``).

    With ``model`` (e.g. :class:`PipelineConfig`), a key whose field takes text keeps the text as
    typed: ``input.caption_col=text #1`` is ``"text #1"`` (YAML would cut a comment), ``yes`` and
    ``2024-01-01`` stay strings; only ``null``/``~`` (when the field allows none), a quoted YAML
    string, and an integer for a field that also takes integers are parsed.

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
    types = _leaf_types(model, path) if model is not None else None
    if types is not None and isinstance(parsed, (bool, datetime.date)) and type(parsed) not in types:
        return path, value.strip()  # YAML 1.1's yes/no/on/off and dates: validated as the text typed
    if types is not None and str in types:
        raw = value.strip()
        if raw in _YAML_NULLS and type(None) in types:
            return path, None
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" and isinstance(parsed, str)
        if quoted or (isinstance(parsed, int) and not isinstance(parsed, bool) and int in types):
            return path, parsed
        return path, raw
    return path, parsed


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any],
                    model: type[BaseModel] | None = None) -> dict[str, Any]:
    """Return a copy of ``data`` with ``section.key=value`` overrides applied (nested keys created).

    ``overrides`` are strings (parsed by :func:`parse_override` against ``model``) or a dict of
    dotted keys to typed values, used as given.
    """
    out = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o, model) for o in overrides]
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


def _override_keys(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``{"section.key": value}`` of the overrides, for error messages."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return {k if isinstance(k, str) else ".".join(k): v for k, v in overrides.items()}
    return {".".join(p): v for p, v in (parse_override(o, PipelineConfig) for o in overrides)}


def load_pipeline(name_or_path: str = "blip", overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
    """Load a recipe by bundled name (``blip``, ``blip2``, ``download``, ``refilter``) or YAML path.

    Args:
        name_or_path: bundled recipe name or path to a ``.yaml`` file.
        overrides: ``["caption.num_captions=10", ...]`` or ``{"caption.num_captions": 10}``.

    Raises:
        ConfigError: unknown recipe, invalid YAML, unknown keys or invalid values (message lists each).
    """
    path = _resolve_yaml(name_or_path, "pipelines")
    data = apply_overrides(load_yaml(path), overrides or [], PipelineConfig)
    over = _override_keys(overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        where = f"pipeline {path}" + (" with overrides " + ", ".join(over) if over else "")
        raise ConfigError(format_validation(e, where, over, PipelineConfig)) from None


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
