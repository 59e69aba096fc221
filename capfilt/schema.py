"""The output-shard contract: column names, Arrow types, row statuses.

Every capfilt output shard has one row per input row and exactly the columns of
:func:`capfilt.stages.registry.output_schema`: the groups below, each declared by the stage that
writes it, plus the input columns passed through. Names are part of
the contract (see DESIGN.md "The output contract"): add columns, never rename them.

List-valued columns are parallel *flat* lists (``list<string>``, ``list<float32>``), never
``list<struct>``: fastparquet silently reads nested structs as all-null.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

# --- row statuses ---------------------------------------------------------------------------
SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_RESIZE = "failed_to_resize"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
OPTED_OUT = "opted_out"
INVALID_URL = "invalid_url"
BLOCKED_ADDRESS = "blocked_address"
DUPLICATE = "duplicate"
BLOCKED_CONTENT = "blocked_content"
WRONG_LANGUAGE = "wrong_language"
CONTAMINATED = "contaminated"
NSFW = "nsfw"
FAILED_TO_CAPTION = "failed_to_caption"
FAILED_TO_SCORE = "failed_to_score"

#: Every status a row can end with, and what it means (shown by ``capfilt run --help`` and the report).
STATUSES: dict[str, str] = {
    SUCCESS: "image downloaded, resized, captioned and scored",
    FAILED_TO_DOWNLOAD: "HTTP error, timeout, connection failure, or the body was not an image",
    FAILED_TO_RESIZE: "the bytes arrived but could not be decoded or resized",
    TOO_SMALL: "shorter side below download.min_image_size",
    TOO_LARGE: "more pixels than download.max_image_pixels, aspect ratio or byte size too large",
    OPTED_OUT: "the server sent an X-Robots-Tag directive opting out (noai, noimageai, ...)",
    INVALID_URL: "the URL is empty, null, not http(s) or malformed",
    BLOCKED_ADDRESS: "the host resolves to a private, loopback, link-local or multicast address",
    DUPLICATE: "exact duplicate image (same sha256) of an earlier row in the run",
    BLOCKED_CONTENT: "the image or URL is on a blocklist (blocklist.lists); its bytes are not written",
    NSFW: "the NSFW detector flagged the image (safety.threshold); its bytes are not written",
    CONTAMINATED: "the image is a copy of an evaluation-set image (decontam.eval_sets / --decontaminate)",
    WRONG_LANGUAGE: "the web caption is in a language langid.languages does not list (langid.other: drop_row)",
    FAILED_TO_CAPTION: "the captioner raised on this row (retried alone)",
    FAILED_TO_SCORE: "the filter raised on this row (retried alone)",
}

# --- drop reasons (set by the select stage) ---------------------------------------------------
DROP_NOT_DOWNLOADED = "not_downloaded"
DROP_BELOW_THRESHOLD = "below_threshold"
DROP_NO_CANDIDATES = "no_candidates"
#: Set after the run by semantic dedup (:mod:`capfilt.stages.semdedup`) on a kept row whose image
#: is a near-duplicate of a better-scored kept row.
DROP_SEMANTIC_DUPLICATE = "semantic_duplicate"

SOURCE_WEB = "web"
SOURCE_SYNTHETIC = "synthetic"

# --- column groups ----------------------------------------------------------------------------
#: Identity columns, first in every shard.
ID_FIELDS: list[pa.Field] = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
]

#: Download stage output.
DOWNLOAD_FIELDS: list[pa.Field] = [
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_message", pa.string()),
    # the failure's cause (capfilt.io.failures.CLASSES: dns, timeout, http_5xx, ...); null on success
    pa.field("error_class", pa.string()),
    pa.field("image", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("sha256", pa.string()),
]

#: Language-ID stage output (:mod:`capfilt.stages.langid`): the web caption's top language (ISO
#: 639-1), its probability, and whether the filter may use the web caption (null: not judged).
LANGID_FIELDS: list[pa.Field] = [
    pa.field("web_lang", pa.string()),
    pa.field("web_lang_prob", pa.float32()),
    pa.field("web_lang_ok", pa.bool_()),
]

#: Safety stage output (:mod:`capfilt.stages.safety`): the best counted NSFW detection's
#: confidence (0 when none) and every detector class found.
SAFETY_FIELDS: list[pa.Field] = [
    pa.field("nsfw_score", pa.float32()),
    pa.field("nsfw_classes", pa.list_(pa.string())),
]

#: Caption stage output.
CAPTION_FIELDS: list[pa.Field] = [
    pa.field("synthetic_captions", pa.list_(pa.string())),
]


def score_fields(scorer: str) -> list[pa.Field]:
    """Columns written by one scorer.

    Args:
        scorer: ``"itm"`` (BLIP ITM match probability in [0, 1]), ``"itc"`` (BLIP ITC cosine in
            [-1, 1]) or ``"clip"`` (CLIP image-text cosine in [-1, 1]).

    Returns:
        ``[synthetic_<scorer>: list<float32>, web_<scorer>: float32]``; the list is aligned with
        ``synthetic_captions``; ``web_<scorer>`` is null when the row has no web caption.
    """
    return [
        pa.field(f"synthetic_{scorer}", pa.list_(pa.float32())),
        pa.field(f"web_{scorer}", pa.float32()),
    ]


#: Score stage output besides the scores: the web caption's length for the filter's tokenizer
#: (special tokens included, untruncated; null without a web caption or when not scored) and whether
#: it exceeds ``score.max_text_tokens`` (CLIP: its context), i.e. was judged on its first tokens only.
TEXT_LENGTH_FIELDS: list[pa.Field] = [
    pa.field("web_text_tokens", pa.int32()),
    pa.field("web_text_truncated", pa.bool_()),
]

#: Select stage output.
SELECT_FIELDS: list[pa.Field] = [
    pa.field("captions", pa.list_(pa.string())),
    pa.field("caption_scores", pa.list_(pa.float32())),
    pa.field("caption_sources", pa.list_(pa.string())),
    pa.field("keep", pa.bool_(), nullable=False),
    pa.field("drop_reason", pa.string()),
]

#: Semantic dedup (:mod:`capfilt.stages.semdedup`): the image's L2-normalised embedding from the
#: scorer (BLIP ITC ``vision_proj`` or CLIP, float32 ``(D,)``; null unless ``semdedup.enabled``),
#: the key of the kept row a semantic duplicate repeats, and their cosine.
SEMDEDUP_FIELDS: list[pa.Field] = [
    pa.field("image_embedding", pa.list_(pa.float32())),
    pa.field("semantic_duplicate_of", pa.string()),
    pa.field("semantic_similarity", pa.float32()),
]

CONTRACT_COLUMNS = {f.name for f in (ID_FIELDS + DOWNLOAD_FIELDS + LANGID_FIELDS + SAFETY_FIELDS + CAPTION_FIELDS
                                     + TEXT_LENGTH_FIELDS + SELECT_FIELDS + SEMDEDUP_FIELDS)} | {
    f.name for s in ("itm", "itc", "clip") for f in score_fields(s)
}

#: Columns of the input that are never passed through (pandas' stored index).
DROPPED_INPUT_COLUMNS = {"__index_level_0__"}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return ``table`` with exactly ``schema``'s columns, in order, cast to its types.

    Missing columns are filled with nulls (for a non-nullable bool such as ``keep``, ``False``);
    extra columns (internal ``_``-prefixed ones) are dropped.

    Raises:
        pyarrow.ArrowInvalid: if a present column cannot be cast to the contract type.
    """
    n = table.num_rows
    arrays = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            if col.type != field.type:
                col = col.cast(field.type)
            arrays.append(col)
        elif pa.types.is_boolean(field.type) and not field.nullable:
            arrays.append(pa.array([False] * n, pa.bool_()))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
