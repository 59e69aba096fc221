"""Which token starts a text for BLIP's ITM head: ``[ENC]`` (BLIP) or ``[CLS]`` (transformers).

BLIP trains and evaluates its image-text matching head with the first token of the text replaced
by ``[ENC]`` (``encoder_input_ids[:, 0] = tokenizer.enc_token_id`` in BLIP's ``blip_retrieval.py``
and ``blip_pretrain.py``, LAVIS ``blip_image_text_matching.py``); ITC reads the same text with
``[CLS]``. transformers' ``BlipForImageTextRetrieval`` feeds ``input_ids`` as given, and
``BlipProcessor`` starts every text with ``[CLS]`` (huggingface/transformers issues #22732 and
#25629 asked about this; the conversion script checks its ITM number with ``[CLS]``).

The BLIP checkpoints on the Hub are BLIP's own weights, whose 30524-token vocabulary is
``bert-base-uncased`` (30522) plus ``[DEC]`` (30522, the decoder's BOS) and ``[ENC]`` (30523),
added in that order by BLIP's ``init_tokenizer``; their Hub tokenizer need not name ``[ENC]``.
So :func:`enc_token_id` finds ``[ENC]`` by name, or by that layout.

The setting (``score.itm_text_prefix`` / the training recipe's ``model.itm_text_prefix``):

- ``enc`` / ``cls``: that token.
- ``auto``: the prefix the checkpoint was trained with when capfilt's trainer recorded it
  (``capfilt.json`` next to ``config.json``, see :mod:`capfilt.modeling.record`), else ``enc`` when
  the checkpoint has an ``[ENC]`` token (BLIP's choice), else ``cls``.
"""

from __future__ import annotations

from typing import Any, Literal

ItmPrefix = Literal["enc", "cls"]
#: Values of the setting.
SETTINGS = ("auto", "enc", "cls")
#: BLIP's vocabulary layout (``init_tokenizer``): BERT's 30522 tokens, ``[DEC]``, ``[ENC]``.
BLIP_VOCAB_SIZE, BLIP_DEC_ID, BLIP_ENC_ID = 30524, 30522, 30523


def enc_token_id(tokenizer: Any, text_config: Any = None) -> int | None:
    """The id of ``[ENC]`` for this tokenizer (and model text config), or ``None`` if it has none.

    Args:
        tokenizer: the BLIP (BERT WordPiece) tokenizer.
        text_config: the model's ``BlipTextConfig`` (``vocab_size``, ``bos_token_id``); used when the
            tokenizer does not name ``[ENC]``: a model with BLIP's layout (30524 tokens, ``[DEC]``
            = 30522) has ``[ENC]`` at 30523.
    """
    tid = tokenizer.convert_tokens_to_ids("[ENC]")
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
        return tid
    if text_config is not None and getattr(text_config, "vocab_size", None) == BLIP_VOCAB_SIZE \
            and getattr(text_config, "bos_token_id", None) == BLIP_DEC_ID and len(tokenizer) <= BLIP_ENC_ID:
        return BLIP_ENC_ID
    return None


def resolve_itm_prefix(setting: str, tokenizer: Any, recorded: str | None = None,
                       text_config: Any = None) -> tuple[ItmPrefix, int]:
    """The ITM text prefix to use and its token id.

    Args:
        setting: ``auto``, ``enc`` or ``cls`` (module docstring).
        tokenizer: the checkpoint's tokenizer.
        recorded: the prefix the checkpoint was trained with (its ``capfilt.json``), if known.
        text_config: the model's text config (see :func:`enc_token_id`).

    Returns:
        ``("enc" | "cls", token_id)``.

    Raises:
        ValueError: ``setting`` is not one of :data:`SETTINGS`, or ``enc`` is asked for (or
            recorded) but the checkpoint has no ``[ENC]`` token.
    """
    if setting not in SETTINGS:
        raise ValueError(f"itm_text_prefix must be one of {SETTINGS}, not {setting!r}")
    choice = setting
    if choice == "auto":
        enc = enc_token_id(tokenizer, text_config)
        choice = recorded if recorded in ("enc", "cls") else ("enc" if enc is not None else "cls")
    if choice == "cls":
        return "cls", int(tokenizer.cls_token_id)
    enc = enc_token_id(tokenizer, text_config)
    if enc is None:
        raise ValueError("itm_text_prefix is 'enc', but this checkpoint's tokenizer has no [ENC] token and its "
                         "vocabulary is not BLIP's; use itm_text_prefix: cls")
    return "enc", int(enc)


def with_prefix(input_ids: Any, token_id: int) -> Any:
    """``input_ids`` (int64 ``(T, L)``, starting with ``[CLS]``) with column 0 set to ``token_id`` (a copy)."""
    out = input_ids.clone()
    out[:, 0] = token_id
    return out
