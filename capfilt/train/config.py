"""Training recipes (``models/train/*.yaml``): typed, validated, frozen pydantic data.

A recipe names the task (``blip`` pre-training, ``blip2`` stage 1/2, ``caption`` / ``itm`` COCO
finetuning), the starting checkpoints, the objectives and the optimisation settings. Unknown keys
are errors; ``--set section.key=value`` overrides use :func:`capfilt.config.apply_overrides`.
Units: learning rates per optimizer step, steps are optimizer steps (one step = ``grad_accum``
micro-batches of ``batch_size`` samples per device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from capfilt.config import ConfigError, Strict, apply_overrides, bundled_dir, load_yaml, validate

Task = Literal["blip", "blip2", "caption", "itm"]
Objective = Literal["itc", "itm", "lm", "itg"]

#: Objectives each task (and BLIP-2 stage) may use.
TASK_OBJECTIVES: dict[str, set[str]] = {
    "blip": {"itc", "itm", "lm"},   # BLIP §3.2
    "caption": {"lm"},              # COCO captioner finetuning (BLIP §3.3: LM loss)
    "itm": {"itc", "itm"},          # COCO filter finetuning (BLIP §3.3: ITC + ITM)
    "blip2-1": {"itc", "itm", "itg"},  # BLIP-2 §3.2 representation learning
    "blip2-2": {"lm"},              # BLIP-2 §3.3 generative learning
}

#: The recipe each ``capfilt train`` command uses without ``--recipe``.
DEFAULT_RECIPES: dict[str, str] = {"blip": "blip-base-pretrain", "blip2": "blip2-stage1",
                                   "caption": "caption-coco", "itm": "itm-coco"}


class TrainModelConfig(Strict):
    """Starting checkpoints (Hub ids or local ``save_pretrained`` folders).

    Attributes:
        builder: ``tiny``: ids are names of :mod:`capfilt.modeling.tiny` checkpoints
            (``tiny-blip-captioner``, ``tiny-blip-itm``, ``tiny-blip2-captioner``), built locally.
        captioner: BLIP ``BlipForConditionalGeneration`` (vision encoder + image-grounded decoder);
            needed by the ``lm`` objective of ``blip`` / ``caption``.
        filter: BLIP ``BlipForImageTextRetrieval`` (vision encoder + image-grounded text encoder,
            ITC projections, ITM head); needed by ``itc`` / ``itm`` of ``blip`` / ``itm``.
        blip2: BLIP-2 checkpoint. Stage 1: a ``Blip2ForImageTextRetrieval`` (loaded as is) or any
            BLIP-2 checkpoint whose frozen vision encoder is reused under a new Q-Former. Stage 2:
            a ``Blip2ForConditionalGeneration`` (frozen vision encoder + frozen decoder-only LM).
        qformer_from: stage 2 only: a stage-1 output folder (``.../filter``) whose query tokens
            and Q-Former initialise the stage-2 model (BLIP-2 §3.3).
        tokenizer: stage 1 only: BERT tokenizer of the Q-Former's text side (default: the
            ``blip2`` checkpoint's tokenizer when it is a BERT WordPiece one).
        revision: Hub revision for every id above.
        init: ``pretrained`` loads the weights; ``random`` builds the same architecture from the
            checkpoint's config with fresh weights (``initializer_range`` of that config).
        share_text_layers: ``blip`` with both ``captioner`` and ``filter``: the text encoder and
            decoder share every parameter except the self-attention layers (BLIP §3.1).
        shared_weights_from: ``blip`` with both ``captioner`` and ``filter``: which checkpoint the
            shared modules start from (the one image encoder and, with ``share_text_layers``, the
            text embeddings and every layer's cross-attention and feed-forward blocks). The other
            component's own weights for those modules are discarded (a warning says so when they
            differ): with ``captioner``, a COCO-finetuned filter keeps only its self-attention,
            projections and ITM head.
        itm_text_prefix: the first text token of the ITM objective: ``enc`` (BLIP's ``[ENC]``),
            ``cls``, or ``auto`` (what the starting filter checkpoint recorded in its
            ``capfilt.json``, else ``enc`` when its tokenizer has ``[ENC]``, else ``cls``). The
            choice is recorded in the saved filter's ``capfilt.json`` and ``capfilt run`` scores
            with it (:mod:`capfilt.modeling.itm_prefix`).
        num_query_tokens: BLIP-2 learned queries (32 in BLIP-2 §3.1).
        config_overrides: attributes set on every loaded model config before the model is built,
            by dotted path (``{"qformer_config.hidden_dropout_prob": 0.0}``); e.g. dropout rates.
    """

    builder: Literal["tiny"] | None = None
    captioner: str | None = None
    filter: str | None = None
    blip2: str | None = None
    qformer_from: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    init: Literal["pretrained", "random"] = "pretrained"
    share_text_layers: bool = True
    shared_weights_from: Literal["captioner", "filter"] = "captioner"
    itm_text_prefix: Literal["auto", "enc", "cls"] = "auto"
    num_query_tokens: int = Field(32, ge=1, le=512)
    config_overrides: dict[str, Any] = {}


class LossConfig(Strict):
    """Objective settings (BLIP §3.2 / BLIP-2 §3.2; values of the official code as defaults).

    Attributes:
        temp: initial ITC temperature; learnable when ``learn_temp``, clamped to [0.001, 0.5]
            before each use (BLIP/LAVIS ``self.temp.clamp_(0.001, 0.5)``).
        hard_negatives: ITM negatives sampled from in-batch ITC similarities (BLIP §3.2); false
            samples them uniformly among the non-matching pairs of the batch.
        label_smoothing: cross-entropy label smoothing of the LM / ITG losses (BLIP and LAVIS: 0.1).
        weights: per-objective multipliers of the summed loss (default 1 each).
    """

    temp: float = Field(0.07, gt=0, le=1)
    learn_temp: bool = True
    hard_negatives: bool = True
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    weights: dict[Objective, float] = {}


class TrainDataConfig(Strict):
    """How training samples are read (see :mod:`capfilt.train.data`).

    Attributes:
        format: ``capfilt`` (output shards of ``capfilt run``), ``coco`` (``captions_*.json`` +
            image folder) or ``auto`` (a ``.json`` path is COCO, anything else capfilt shards).
        images: COCO image folder (default: ``images/`` next to the JSON, else the JSON's folder).
        text_top_k: sample each step's text among the first ``k`` kept captions (best first);
            ``None`` = all kept captions. BLIP-2 §3.4 keeps the top two and samples one per step.
        shuffle_buffer: samples in the shuffle buffer of each data-loading worker (0 = no shuffle).
        rows_per_unit: COCO annotations per read unit (capfilt shards use Parquet row groups).
        num_workers: DataLoader worker processes per device (0 = load in the training process).
        max_text_tokens: texts are truncated to this many tokens (BLIP: 30 pre-training, 35 COCO).
        max_words: BLIP's ``pre_caption``: lowercase, punctuation removed, first ``max_words`` words.
        prompt: LM prompt prepended to each text and excluded from the loss (BLIP COCO
            captioning: ``"a picture of "``; capfilt's captioner strips it from its outputs).
    """

    format: Literal["auto", "capfilt", "coco"] = "auto"
    images: str | None = None
    text_top_k: int | None = Field(None, ge=1)
    shuffle_buffer: int = Field(1000, ge=0)
    rows_per_unit: int = Field(256, ge=1)
    num_workers: int = Field(4, ge=0, le=64)
    max_text_tokens: int = Field(35, ge=4, le=512)
    max_words: int = Field(30, ge=1)
    prompt: str = ""


class OptimConfig(Strict):
    """AdamW with a cosine schedule after linear warm-up (``transformers.get_cosine_schedule_with_warmup``).

    Parameters with fewer than 2 dimensions (biases, LayerNorm weights, the ITC temperature) get
    no weight decay (LAVIS ``get_optimizer_params``).
    """

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(None, gt=0)


class RunConfig(Strict):
    """Length, batch, precision, logging and checkpointing of a run.

    Attributes:
        max_steps: optimizer steps of the whole run (the schedule's length).
        batch_size: samples per micro-batch per device.
        grad_accum: micro-batches per optimizer step.
        seed: seeds model init (``init: random``), data order, text sampling, ITM negatives, dropout.
        bf16: autocast to bfloat16 on CUDA (never on CPU: ~8x slower there).
        device: ``auto`` = CUDA when available (the Ray worker's GPU under Ray Train).
        log_every: steps between metric lines (stdout and ``OUTPUT/train_log.jsonl``).
        save_every: steps between checkpoints (``None``: only at the end).
        keep_checkpoints: most recent checkpoints kept (older ones are deleted).
        cpu_threads: ``torch.set_num_threads`` for the run on CPU (restored afterwards); ``None``
            keeps torch's default (one per core). The tiny test models on a busy 2-core machine
            train 16-47x faster with 1 (no OpenMP spinning against the DataLoader workers and
            other processes; ``benchmarks/bench_train.py``).
    """

    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    bf16: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, ge=1)
    save_every: int | None = Field(1000, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    cpu_threads: int | None = Field(None, ge=1)


class TrainRecipe(Strict):
    """A training recipe (``models/train/NAME.yaml``).

    ``preset``: a model preset (``models/NAME.yaml``) whose other models complete the
    ``preset.yaml`` written next to the final checkpoint (e.g. a trained captioner + that preset's
    filter), so ``capfilt run --models OUTPUT/final/preset.yaml`` uses the trained model.

    Raises (on validation):
        ValueError: objectives the task does not have, missing checkpoints for an objective,
            ``stage`` missing for ``blip2`` or given for another task.
    """

    name: str = "custom"
    description: str = ""
    task: Task
    stage: Literal[1, 2] | None = None
    objectives: list[Objective]
    model: TrainModelConfig
    loss: LossConfig = LossConfig()
    data: TrainDataConfig = TrainDataConfig()
    optim: OptimConfig = OptimConfig()
    train: RunConfig = RunConfig()
    preset: str | None = None

    @property
    def kind(self) -> str:
        """``blip``, ``caption``, ``itm``, ``blip2-1`` or ``blip2-2``."""
        return f"blip2-{self.stage}" if self.task == "blip2" else self.task

    @model_validator(mode="after")
    def _check(self) -> "TrainRecipe":
        if self.task == "blip2" and self.stage is None:
            raise ValueError("task blip2 needs stage: 1 (Q-Former ITC/ITM/ITG) or 2 (LM through a frozen LLM)")
        if self.task != "blip2" and self.stage is not None:
            raise ValueError(f"stage is only for task blip2, not {self.task}")
        allowed = TASK_OBJECTIVES[self.kind]
        if not self.objectives:
            raise ValueError("objectives is empty")
        bad = [o for o in self.objectives if o not in allowed]
        if bad or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"task {self.kind} has objectives {sorted(allowed)}; got {self.objectives}")
        m = self.model
        if self.task == "blip2":
            if not m.blip2:
                raise ValueError("task blip2 needs model.blip2 (a BLIP-2 checkpoint)")
        else:
            if "lm" in self.objectives and not m.captioner:
                raise ValueError("objective lm needs model.captioner (a BlipForConditionalGeneration checkpoint)")
            if {"itc", "itm"} & set(self.objectives) and not m.filter:
                raise ValueError("objectives itc/itm need model.filter (a BlipForImageTextRetrieval checkpoint)")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The parts that must not change when a run resumes (all but description and logging)."""
        d = self.model_dump(mode="json")
        d.pop("description", None)
        for k in ("log_every", "save_every", "keep_checkpoints", "cpu_threads"):
            d["train"].pop(k, None)
        return d


def recipes_dir() -> Path:
    """``models/train/`` (bundled training recipes)."""
    return bundled_dir("models") / "train"


def resolve_recipe_path(name_or_path: str) -> Path:
    """A bundled recipe name (``tiny-blip-pretrain``) or a ``.yaml`` path, as a file path.

    Raises:
        ConfigError: unknown name (the message lists the bundled ones) or missing file.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"training recipe file {p} does not exist")
        return p
    cand = recipes_dir() / f"{name_or_path}.yaml"
    if not cand.is_file():
        names = sorted(x.stem for x in recipes_dir().glob("*.yaml"))
        raise ConfigError(f"unknown training recipe {name_or_path!r}; bundled: {', '.join(names)} "
                          f"(or give a path to a .yaml file)")
    return cand


def load_recipe(name_or_path: str, overrides: list[str] | dict[str, Any] | None = None) -> TrainRecipe:
    """Load a training recipe by bundled name or YAML path, with ``section.key=value`` overrides.

    Args:
        name_or_path: e.g. ``caption-coco``, ``tiny-blip2-stage1`` or ``my/recipe.yaml``.
        overrides: ``["optim.lr=1e-5", "train.max_steps=100"]`` or the same as a dict.

    Raises:
        ConfigError: unknown recipe, invalid YAML, unknown keys or invalid values (each listed).
    """
    path = resolve_recipe_path(name_or_path)
    data = apply_overrides(load_yaml(path), overrides or [])
    return validate(TrainRecipe, data, f"training recipe {path}")
