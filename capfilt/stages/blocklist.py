"""Blocklists: drop known images and URLs right after download, before any model sees them.

Datasets are now released and withdrawn on hash lists (Re-LAION was re-released after removing
rows matched by hash lists from child-safety organisations). This optional stage
(``blocklist.enabled: true``) matches every downloaded row against user-supplied lists and ends
matches with status ``blocked_content``; their image bytes are dropped from the row, so they are
never written to a shard and never reach the captioner or the filter.

A list is a text file, one entry per line, ``#`` comments and blank lines ignored; the list's name
(in ``error_message``) is the file's stem:

- ``sha256:<64 hex>``: the SHA-256 of the stored image bytes (the ``sha256`` column);
- ``url_sha256:<64 hex>``: the SHA-256 of the UTF-8 URL (lists that must not spell the URL);
- ``pdq:<64 hex>``: a PDQ perceptual hash (Meta's hash-sharing standard, via ``pdqhash``;
  ThreatExchange's hex format); it matches at Hamming distance <= ``blocklist.pdq_max_distance``
  (of 256 bits), so re-encoded and resized copies match too.

:func:`pdq_hex` and :func:`sha256_hex` make entries from image bytes.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from capfilt.errors import InputError
from capfilt.schema import BLOCKED_CONTENT, SUCCESS
from capfilt.stages.base import Stage, column_or_nulls, file_sha256, package_version, require_package, set_column

if TYPE_CHECKING:
    from capfilt.config import BlocklistConfig, PipelineConfig
    from capfilt.stages.base import RunContext

KINDS = ("sha256", "url_sha256", "pdq")


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (image bytes, or a URL's UTF-8)."""
    return hashlib.sha256(data).hexdigest()


def pdq_bits(image_bytes: bytes) -> np.ndarray:
    """The 256-bit PDQ hash of an encoded image as a ``(256,)`` uint8 0/1 vector (bit k at index k).

    Raises:
        OSError / PIL.UnidentifiedImageError: the bytes are not a decodable image.
    """
    import pdqhash
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as im:
        rgb = np.asarray(im.convert("RGB"))
    bits, _quality = pdqhash.compute(rgb)
    return bits.astype(np.uint8)


def pdq_hex(image_bytes: bytes) -> str:
    """PDQ hash of an encoded image in ThreatExchange's hex format (bit k is ``1 << k`` of a 256-bit int)."""
    bits = pdq_bits(image_bytes)
    return format(sum(int(b) << k for k, b in enumerate(bits)), "064x")


def _hex_to_bits(h: str) -> np.ndarray:
    value = int(h, 16)
    return np.array([(value >> k) & 1 for k in range(256)], np.uint8)


@dataclass
class Blocklists:
    """Entries of every list: ``{kind: {value: list name}}`` and the PDQ hashes as a bit matrix."""

    exact: dict[str, dict[str, str]] = field(default_factory=lambda: {"sha256": {}, "url_sha256": {}})
    pdq_bits: np.ndarray = field(default_factory=lambda: np.zeros((0, 256), np.uint8))
    pdq_names: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, paths: list[str]) -> Blocklists:
        """Read list files (see the module docs).

        Raises:
            InputError: a file is missing or holds a malformed line (named, with its line number).
        """
        out = cls()
        pdq: list[np.ndarray] = []
        for p in paths:
            path = Path(p).expanduser()
            if not path.is_file():
                raise InputError(f"blocklist {p} does not exist (blocklist.lists); give a text file of "
                                 f"'sha256:<hex>', 'url_sha256:<hex>' or 'pdq:<hex>' lines")
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                kind, _, value = line.partition(":")
                value = value.strip().lower()
                if kind not in KINDS or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                    raise InputError(f"blocklist {p} line {n}: expected 'sha256:<64 hex>', 'url_sha256:<64 hex>' "
                                     f"or 'pdq:<64 hex>', got {line[:80]!r}")
                if kind == "pdq":
                    pdq.append(_hex_to_bits(value))
                    out.pdq_names.append(path.stem)
                else:
                    out.exact[kind].setdefault(value, path.stem)
        if pdq:
            out.pdq_bits = np.stack(pdq)
        return out

    def nearest_pdq(self, bits: np.ndarray) -> tuple[str, int] | None:
        """The list and Hamming distance of the closest PDQ entry to ``bits`` (None: no PDQ entries)."""
        if not len(self.pdq_bits):
            return None
        d = (self.pdq_bits != bits[None, :]).sum(axis=1)
        j = int(d.argmin())
        return self.pdq_names[j], int(d[j])


class BlocklistStage(Stage):
    """Set ``status = blocked_content`` and drop the image of rows on a blocklist (see module docs).

    Input columns: ``url``, ``status``, ``error_message``, ``image``, ``sha256``.

    Args:
        cfg: :class:`capfilt.config.BlocklistConfig`.
    """

    name: ClassVar[str] = "blocklist"
    section: ClassVar[str] = "blocklist"

    def __init__(self, cfg: BlocklistConfig):
        self.cfg = cfg
        self._lists: Blocklists | None = None

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext | None) -> BlocklistStage:
        """The stage of this run; its list files are read now, so a bad list stops the run before work.

        Raises:
            InputError: a list file is missing or malformed.
            ConfigError: a list has PDQ entries and ``pdqhash`` is not installed.
        """
        lists = Blocklists.load(list(cfg.blocklist.lists))
        if len(lists.pdq_bits):
            require_package("pdqhash", "blocklist.lists with pdq: entries")
        return cls(cfg.blocklist)

    def setup(self) -> None:
        """Read the list files (once per worker)."""
        if self._lists is None:
            self._lists = Blocklists.load(list(self.cfg.lists))

    @classmethod
    def model_info(cls, cfg: PipelineConfig) -> dict[str, Any]:
        """The lists (sha256 of each file) and the PDQ implementation's version."""
        return {"model": "blocklists (sha256 / url_sha256 / PDQ)", "version": package_version("pdqhash"),
                "lists": {p: file_sha256(p) for p in cfg.blocklist.lists}}

    @staticmethod
    def stats(table: pa.Table) -> dict[str, Any]:
        """``blocked_content``: rows this stage blocked."""
        return {"blocked_content": column_or_nulls(table, "status").count(BLOCKED_CONTENT)}

    def match(self, url: str | None, image: bytes, sha: str | None) -> str | None:
        """Why a downloaded row is blocked (``"on blocklist 'NAME' (pdq distance 4)"``), or None."""
        lists = self._lists
        if sha and sha in lists.exact["sha256"]:
            return f"on blocklist {lists.exact['sha256'][sha]!r} (sha256)"
        if url and lists.exact["url_sha256"]:
            h = sha256_hex(url.encode("utf-8"))
            if h in lists.exact["url_sha256"]:
                return f"on blocklist {lists.exact['url_sha256'][h]!r} (url_sha256)"
        if len(lists.pdq_bits):
            name, dist = lists.nearest_pdq(pdq_bits(image))
            if dist <= self.cfg.pdq_max_distance:
                return f"on blocklist {name!r} (pdq distance {dist})"
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.setup()
        status = column_or_nulls(batch, "status")
        messages = column_or_nulls(batch, "error_message")
        urls, shas = column_or_nulls(batch, "url"), column_or_nulls(batch, "sha256")
        images = batch.column("image") if "image" in batch.column_names else None
        blocked = []
        for i in range(batch.num_rows):
            if status[i] != SUCCESS or images is None:
                continue
            why = self.match(urls[i], images[i].as_py(), shas[i])
            if why:
                status[i], messages[i] = BLOCKED_CONTENT, why
                blocked.append(i)
        if not blocked:
            return batch
        drop = set(blocked)
        out = set_column(batch, "status", pa.array(status, pa.string()))
        out = set_column(out, "error_message", pa.array(messages, pa.string()))
        kept = [None if i in drop else images[i].as_py() for i in range(batch.num_rows)]
        return set_column(out, "image", pa.array(kept, images.type))
