"""Human labels for the raw keys of ``run.json`` / ``report.json`` shown in the HTML report.

The report's tables list recorded values by their JSON path (``timings.wall_seconds``); a curator
reads "Wall time (all attempts)". :func:`human_label` gives that label (exact names in
:data:`LABELS`, then patterns for counters by status, per-stage throughput and package versions,
then a readable form of the last path segment); the report keeps the raw key beside it so the
JSON can be found. :func:`human_value` prints seconds as a duration.
"""

from __future__ import annotations

from typing import Any

#: Exact labels for keys of ``run.json`` (``section.key``) and of the per-stage throughput columns.
LABELS: dict[str, str] = {
    "timings.wall_seconds": "Wall time (all attempts)",
    "timings.last_attempt_seconds": "Wall time of the last attempt",
    "totals.rows": "Rows written",
    "totals.success": "Rows with an image (success)",
    "totals.parts": "Shard parts",
    "totals.image_bytes": "Image bytes stored",
    "totals.keep": "Rows kept",
    "totals.blocked_content": "Rows blocked by a blocklist",
    "totals.web_captions_unusable": "Web captions not in the filter's language",
    "totals.contaminated": "Rows matching evaluation images",
    "totals.nsfw": "Rows flagged NSFW",
    "totals.duplicates": "Duplicate rows",
    "totals.images_captioned": "Images captioned",
    "totals.captions_generated": "Synthetic captions generated",
    "totals.texts_scored": "Texts scored (web + synthetic)",
    "totals.web_texts_truncated": "Web captions longer than the filter reads",
    "totals.texts_kept.web": "Web captions kept",
    "totals.texts_kept.synthetic": "Synthetic captions kept",
    "rows_per_s": "rows/s",
    "images_per_s": "images/s",
    "captions_per_s": "captions/s",
    "texts_per_s": "texts/s",
    "seconds": "busy time",
}


def human_label(key: str) -> str:
    """A label a person reads for the dotted JSON key ``key`` (e.g. ``timings.wall_seconds`` -> "Wall time
    (all attempts)", ``totals.status.too_small`` -> "Rows with status too_small")."""
    if key in LABELS:
        return LABELS[key]
    parts = key.split(".")
    if parts[:2] == ["totals", "status"] and len(parts) == 3:
        return f"Rows with status {parts[2]}"
    if parts[:2] == ["timings", "stage_seconds"] and len(parts) == 3:
        return f"Busy time of stage {parts[2]} (all workers)"
    if parts[:2] == ["totals", "throughput"] and len(parts) == 4:
        return f"{parts[2]}: {human_label(parts[3])}"
    if parts[:2] == ["totals", "web_langs"] and len(parts) == 3:
        return f"Web captions in language {parts[2]}"
    if parts[0] == "versions" and len(parts) == 2:
        return f"{parts[1]} version"
    last = parts[-1]
    if last.endswith("_per_s"):
        return last[: -len("_per_s")].replace("_", " ") + "/s"
    if last.endswith("_seconds"):
        last = last[: -len("_seconds")] + " time"
    text = last.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def human_value(key: str, value: Any) -> Any:
    """``value`` as shown beside :func:`human_label` (``key``): seconds as ``48.1 s`` / ``2 min 5 s``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            key.endswith("_seconds") or key.split(".")[-1] == "seconds" or ".stage_seconds." in key):
        s = float(value)
        if s < 60:
            return f"{s:.1f} s"
        if s < 3600:
            return f"{int(s // 60)} min {int(round(s % 60))} s"
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return value
