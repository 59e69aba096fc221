"""The ``tiny`` model preset: small BLIP / BLIP-2 / CLIP checkpoints with deterministic RANDOM weights.

They are built locally on first use (no network), saved with ``save_pretrained`` and then loaded
through the same ``X.from_pretrained(path)`` code path as real Hub checkpoints, so tests and the
offline demo exercise the real loading, processing and generation code. Their captions are noise
and their scores mean nothing.

Layout (``<cache>`` is ``$CAPFILT_CACHE`` or ``~/.cache/capfilt``)::

    <cache>/tiny-v1/tiny-blip-captioner/    BlipForConditionalGeneration + BlipProcessor
    <cache>/tiny-v1/tiny-blip-itm/          BlipForImageTextRetrieval + BlipProcessor
    <cache>/tiny-v1/tiny-clip/              CLIPModel + CLIPProcessor
    <cache>/tiny-v1/tiny-blip2-captioner/   Blip2ForConditionalGeneration (tiny OPT) + Blip2Processor

Tokenizers are built offline from the vocabularies in ``capfilt/modeling/assets/`` (see
``assets/build_assets.py``): a BERT WordPiece vocabulary with BLIP's ``[DEC]``/``[ENC]`` tokens,
and two small byte-level BPE vocabularies (CLIP style and GPT-2/OPT style).

Also here: :func:`blip_config` with ``size="base"`` (ViT-B/16 at 384 px + BERT-base text, the
shape of ``Salesforce/blip-itm-base-coco``) for the equivalence tests and benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

TINY_VERSION = "tiny-v1"
TINY_NAMES = ("tiny-blip-captioner", "tiny-blip-itm", "tiny-clip", "tiny-blip2-captioner")
#: Image side (pixels) of the tiny vision towers; the processors resize to this.
TINY_IMAGE_SIZE = 64
#: Fixed torch seeds: the same checkpoints on every machine and every build.
_SEEDS = {"tiny-blip-captioner": 1, "tiny-blip-itm": 2, "tiny-clip": 3, "tiny-blip2-captioner": 4}
_ASSETS = Path(__file__).resolve().parent / "assets"
# ImageNet/OpenAI CLIP normalisation used by BLIP's and CLIP's processors (BLIP model cards).
_MEAN = [0.48145466, 0.4578275, 0.40821073]
_STD = [0.26862954, 0.26130258, 0.27577711]


def default_cache_dir() -> Path:
    """``$CAPFILT_CACHE`` if set, else ``~/.cache/capfilt``."""
    env = os.environ.get("CAPFILT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "capfilt"


# ------------------------------------------------------------------------------------------------
# tokenizers (offline, from the shipped vocabularies)
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _wordpiece_vocab() -> dict[str, int]:
    lines = (_ASSETS / "tiny_wordpiece_vocab.txt").read_text().splitlines()
    return {tok: i for i, tok in enumerate(t for t in lines if t)}


@lru_cache(maxsize=1)
def _bpe(style: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = json.loads((_ASSETS / "tiny_bpe.json").read_text())[style]
    merges = [tuple(m.split(" ")) for m in data["merges"]]
    return dict(data["vocab"]), merges  # type: ignore[return-value]


def blip_tokenizer() -> Any:
    """A BLIP text tokenizer: ``BertTokenizerFast`` (lowercasing WordPiece) over the shipped vocab.

    Special tokens as in BLIP's tokenizer: ``[CLS]`` starts a text, ``[SEP]`` ends it (and is the
    decoder's end-of-sequence), ``[DEC]`` is the decoder's BOS, ``[ENC]`` the encoder's.
    The vocab is passed as a dict (``vocab=``): ``vocab_file=`` silently yields 5 tokens in
    transformers 5.

    Returns:
        transformers.BertTokenizerFast with ``len(tokenizer) == len(vocab)``.
    """
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(vocab=_wordpiece_vocab(), do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]",
                            pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]", bos_token="[DEC]",
                            model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def clip_tokenizer() -> Any:
    """A CLIP tokenizer (``CLIPTokenizerFast``: lowercase, byte-level BPE with ``</w>``) over the shipped BPE."""
    from transformers import CLIPTokenizerFast

    vocab, merges = _bpe("clip")
    return CLIPTokenizerFast(vocab=vocab, merges=merges, model_max_length=77)


def opt_tokenizer() -> Any:
    """An OPT-style tokenizer (``GPT2TokenizerFast`` byte-level BPE; ``</s>`` is BOS and EOS, ``<pad>``)."""
    from transformers import GPT2TokenizerFast

    vocab, merges = _bpe("gpt2")
    return GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="</s>", eos_token="</s>",
                             pad_token="<pad>", add_bos_token=True, model_max_length=512)


def blip_processor(image_size: int = TINY_IMAGE_SIZE) -> Any:
    """``BlipProcessor`` = ``BlipImageProcessor`` (resize to ``image_size`` square, bicubic, CLIP mean/std) + :func:`blip_tokenizer`."""
    from transformers import BlipImageProcessor, BlipProcessor

    ip = BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=_MEAN, image_std=_STD)
    return BlipProcessor(image_processor=ip, tokenizer=blip_tokenizer())


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
def blip_config(size: Literal["tiny", "base", "large"] = "tiny") -> Any:
    """A ``BlipConfig`` for random-weight models.

    Args:
        size: ``tiny``: ViT with hidden 32, 2 layers, 64 px images, 16 px patches (17 tokens) and a
            2-layer hidden-32 BERT over the shipped vocab; a forward takes milliseconds.
            ``base``: the shape of ``Salesforce/blip-itm-base-coco`` / ``blip-image-captioning-base``
            (ViT-B/16 at 384 px = 577 tokens, BERT-base text with 30524-token vocab, ITC dim 256).
            ``large``: the shape of ``Salesforce/blip-image-captioning-large`` / ``blip-itm-large-coco``
            (ViT-L/16 at 384 px: hidden 1024, 24 layers; BERT-base text cross-attending to 1024-d).

    Both vision and text use ``initializer_range=0.02``: BLIP's vision default (1e-10) would make a
    random model ignore its image.
    """
    from transformers import BlipConfig

    tok = _wordpiece_vocab()
    ids = {"bos_token_id": tok["[DEC]"], "eos_token_id": tok["[SEP]"], "sep_token_id": tok["[SEP]"],
           "pad_token_id": tok["[PAD]"]}
    if size == "tiny":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=TINY_IMAGE_SIZE, patch_size=16, initializer_range=0.02)
        text = dict(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                    initializer_range=0.02, **ids)
        return BlipConfig(vision_config=vision, text_config=text, projection_dim=32, image_text_hidden_size=16)
    if size == "base":
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=384, patch_size=16, initializer_range=0.02)
        text = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
                    initializer_range=0.02, **ids)
        return BlipConfig(vision_config=vision, text_config=text, projection_dim=512, image_text_hidden_size=256)
    if size == "large":
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=384, patch_size=16, initializer_range=0.02)
        text = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
                    initializer_range=0.02, **ids)
        return BlipConfig(vision_config=vision, text_config=text, projection_dim=512, image_text_hidden_size=256)
    raise ValueError(f"size must be 'tiny', 'base' or 'large', got {size!r}")


def random_blip(model_cls: type, size: Literal["tiny", "base", "large"] = "tiny", seed: int = 0) -> tuple[Any, Any]:
    """Build ``model_cls(blip_config(size))`` with ``torch.manual_seed(seed)`` weights, in eval mode, fp32.

    Args:
        model_cls: ``BlipForConditionalGeneration`` or ``BlipForImageTextRetrieval``.

    Returns:
        ``(model, processor)``; the processor resizes to the config's image size.
    """
    import torch

    cfg = blip_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg)
    model.eval()
    return model, blip_processor(cfg.vision_config.image_size)


def _clip(seed: int) -> tuple[Any, Any]:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, initializer_range=0.02),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TINY_IMAGE_SIZE, patch_size=16, projection_dim=32, initializer_range=0.02),
        projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    ip = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                            image_mean=_MEAN, image_std=_STD)
    return model, CLIPProcessor(image_processor=ip, tokenizer=tok)


def _blip2(seed: int) -> tuple[Any, Any]:
    import torch
    from transformers import BlipImageProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    num_query = 4
    tok = opt_tokenizer()
    ip = BlipImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=_MEAN,
                            image_std=_STD)
    proc = Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=num_query)  # adds "<image>"
    image_token_id = tok.convert_tokens_to_ids("<image>")
    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TINY_IMAGE_SIZE, patch_size=16, initializer_range=0.02),
        qformer_config=dict(vocab_size=len(_wordpiece_vocab()), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32,
                            max_position_embeddings=64, initializer_range=0.02),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, init_std=0.02),
        num_query_tokens=num_query, image_token_index=image_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(cfg)
    return model, proc


def _build(name: str) -> tuple[Any, Any]:
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    seed = _SEEDS[name]
    if name == "tiny-blip-captioner":
        return random_blip(BlipForConditionalGeneration, "tiny", seed)
    if name == "tiny-blip-itm":
        return random_blip(BlipForImageTextRetrieval, "tiny", seed)
    if name == "tiny-clip":
        return _clip(seed)
    return _blip2(seed)


def ensure_tiny_checkpoints(cache_dir: Path | None = None) -> Path:
    """Build the tiny checkpoints once and return ``<cache>/tiny-v1``.

    Each of :data:`TINY_NAMES` becomes a ``save_pretrained`` folder (config, safetensors weights,
    processor and tokenizer files) loadable with ``X.from_pretrained(path)``. The weights are
    deterministic (fixed ``torch.manual_seed`` per model, the global RNG state is restored).

    Safe when several processes (Ray actors) race: each builds into its own temporary folder next
    to the target and ``os.rename``s it into place; a loser discards its copy and uses the winner's.

    Args:
        cache_dir: parent folder; default :func:`default_cache_dir`.

    Returns:
        The ``tiny-v1`` folder (absolute path).

    Raises:
        OSError: if the cache folder cannot be created or written.
    """
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).expanduser().resolve()
    target = root / TINY_VERSION
    if (target / "COMPLETE").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}.{os.getpid()}.{uuid.uuid4().hex[:8]}.", dir=root))
    try:
        for name in TINY_NAMES:
            model, processor = _build(name)
            model.save_pretrained(tmp / name)
            processor.save_pretrained(tmp / name)
        (tmp / "COMPLETE").write_text(json.dumps({"version": TINY_VERSION, "models": list(TINY_NAMES)}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "COMPLETE").is_file():  # a half-written target cannot exist: rename is atomic
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
