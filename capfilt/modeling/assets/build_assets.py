"""Rebuild the tiny tokenizer vocabularies shipped next to this file (run once by a maintainer).

``python capfilt/modeling/assets/build_assets.py`` reads the COCO val2017 captions fixture
(``tests/fixtures/coco/captions_val2017.json``, CC BY 4.0) and writes:

- ``tiny_wordpiece_vocab.txt``: BERT special tokens, BLIP's ``[DEC]``/``[ENC]``, punctuation,
  digits, ``a``-``z`` and ``##a``-``##z`` (so every lowercase word is encodable) and the caption
  words that occur at least twice, one per line (line number = token id).
- ``tiny_bpe.json``: two small byte-level BPE models trained on the same captions with the
  ``tokenizers`` library: ``clip`` (CLIP style, ``</w>`` end-of-word suffix) and ``gpt2``
  (GPT-2/OPT style, ``Ġ`` space prefix); each as ``{"vocab": {token: id}, "merges": [...]}``.

These files are data, not code: :mod:`capfilt.modeling.tiny` only reads them.
"""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPTIONS = HERE.parents[2] / "tests" / "fixtures" / "coco" / "captions_val2017.json"


def _captions() -> list[str]:
    data = json.loads(CAPTIONS.read_text())
    return [a["caption"].strip().lower() for a in data["annotations"]]


def build_wordpiece(caps: list[str]) -> list[str]:
    """The tiny BERT word-piece vocabulary: specials, characters and the commonest caption words."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    basics = list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    counts = collections.Counter(w for c in caps for w in re.findall(r"[a-z]+", c))
    words = sorted(w for w, n in counts.items() if n >= 2 and len(w) > 1)
    out: list[str] = []
    for t in specials + basics + pieces + words:
        if t not in out:
            out.append(t)
    return out


def build_bpe(caps: list[str], style: str, vocab_size: int = 600) -> dict:
    """Train a small byte-level BPE (``style`` clip or opt, ``vocab_size`` tokens) on the captions."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if style == "clip":
        specials = ["<|startoftext|>", "<|endoftext|>"]
        tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                                 behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=alphabet, end_of_word_suffix="</w>")
    else:
        specials = ["<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(caps, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    if style == "clip":  # CLIP's vocab holds every byte both bare and with the </w> suffix
        for ch in alphabet:
            for t in (ch, ch + "</w>"):
                if t not in vocab:
                    vocab[t] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"vocab": vocab, "merges": merges}


def main() -> None:
    """Regenerate the tiny tokenizer assets from the COCO captions fixture."""
    caps = _captions()
    (HERE / "tiny_wordpiece_vocab.txt").write_text("\n".join(build_wordpiece(caps)) + "\n")
    bpe = {"clip": build_bpe(caps, "clip"), "gpt2": build_bpe(caps, "gpt2")}
    (HERE / "tiny_bpe.json").write_text(json.dumps(bpe, ensure_ascii=False, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
