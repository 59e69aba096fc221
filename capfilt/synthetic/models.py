"""Untrained BLIP (and CLIP) checkpoints sized for the shapes world, saved for ``capfilt train``.

The bootstrap experiment starts every model from these folders (``init: random`` in the training
recipes builds fresh weights from their configs), so capfilt's trainers and ``from_pretrained``
path are the only way weights come to exist. Sizes were chosen to learn the world on two CPU cores
in minutes: ViT 4 layers x 128 wide over 8 px patches of the 64 px image (64 patches + [CLS]),
BERT-style text 3 layers x 128 wide, ITC projection 64.

The tokenizer is a BERT WordPiece over a small vocabulary: BLIP's special tokens (``[DEC]``,
``[ENC]``), characters and ``##`` continuations (so any alt text tokenizes, junk included), the
world's grammar and the common words of boilerplate alt text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capfilt.synthetic.world import COLORS, IMAGE_SIZE, SHAPES, TEMPLATES

# ImageNet/OpenAI CLIP normalisation used by BLIP's processors (BLIP model cards).
_MEAN = [0.48145466, 0.4578275, 0.40821073]
_STD = [0.26862954, 0.26130258, 0.27577711]
_WORDS = ("a", "an", "one", "two", "three", "four", "and", "of", "the", "in", "on", "picture", "showing", "image",
          "drawing", "plain", "background", "photo", "click", "here", "to", "buy", "free", "shipping", "all",
          "orders", "sku", "stock", "untitled", "best", "price", "off", "screenshot", "product", "front", "view",
          "img", "dsc", "jpg", "there", "is", "are", "with", "some", "shapes")
#: Model sizes (see module docstring).
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=8, initializer_range=0.02)
TEXT_LAYERS, TEXT_WIDTH = 3, 128


def vocabulary() -> list[str]:
    """The WordPiece vocabulary (deterministic order; index = token id)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    cont = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    words = set(_WORDS) | set(COLORS) | set(SHAPES) | set(SHAPES.values())
    for t in TEMPLATES:
        words |= {w for w in t.replace("{x}", " ").split() if w}
    return specials + chars + cont + sorted(w for w in words if w not in chars)


def tokenizer() -> Any:
    """BLIP-style ``BertTokenizerFast`` over :func:`vocabulary` (``vocab=``, not ``vocab_file=``:
    the latter yields 5 tokens in transformers 5)."""
    from transformers import BertTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary())}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                            cls_token="[CLS]", mask_token="[MASK]", bos_token="[DEC]", model_max_length=64)
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def processor() -> Any:
    """``BlipProcessor``: resize to 64 px (bicubic), CLIP mean/std, :func:`tokenizer`."""
    from transformers import BlipImageProcessor, BlipProcessor

    ip = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=_MEAN, image_std=_STD)
    return BlipProcessor(image_processor=ip, tokenizer=tokenizer())


def blip_config() -> Any:
    """The ``BlipConfig`` of the shapes models (vision ``initializer_range`` 0.02, not BLIP's 1e-10,
    which would make a fresh model ignore its image)."""
    from transformers import BlipConfig

    vocab = vocabulary()
    ids = {"bos_token_id": vocab.index("[DEC]"), "eos_token_id": vocab.index("[SEP]"),
           "sep_token_id": vocab.index("[SEP]"), "pad_token_id": vocab.index("[PAD]")}
    text = dict(vocab_size=len(vocab), hidden_size=TEXT_WIDTH, encoder_hidden_size=VISION["hidden_size"],
                intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=TEXT_LAYERS, num_attention_heads=4,
                max_position_embeddings=64, initializer_range=0.02, **ids)
    return BlipConfig(vision_config=dict(VISION), text_config=text, projection_dim=64, image_text_hidden_size=64)


def write_init_checkpoints(output: str | Path, seed: int = 0) -> dict[str, Path]:
    """Save an untrained captioner and filter (``save_pretrained``) under ``output``.

    Returns:
        ``{"captioner": output/captioner, "filter": output/filter}``; each folder holds the config,
        safetensors weights (seeded with ``seed``) and the processor, loadable with ``from_pretrained``.
    """
    import torch
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    out = Path(output)
    cfg, proc = blip_config(), processor()
    paths = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for role, cls in (("captioner", BlipForConditionalGeneration), ("filter", BlipForImageTextRetrieval)):
            model = cls(cfg)
            model.save_pretrained(out / role)
            proc.save_pretrained(out / role)
            paths[role] = out / role
    return paths
