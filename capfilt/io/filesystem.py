"""Local paths and object-storage URIs (``s3://``, ``gs://``, ...) through pyarrow filesystems."""

from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    """A file or folder: a pyarrow filesystem plus a path inside it.

    ``uri`` is what the user typed (kept for messages); ``path`` is the filesystem path
    (absolute for local files, ``bucket/key`` for object stores).
    """

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> "Location":
        """Child location ``path/part/...``."""
        p = posixpath.join(self.path, *parts)
        return Location(self.fs, p, posixpath.join(self.uri, *parts))

    @property
    def is_local(self) -> bool:
        """True for the local filesystem."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def exists(self) -> bool:
        """True if a file or folder exists here."""
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        """True if a folder exists here."""
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    """The AWS region of ``bucket`` (one HeadBucket request per process), or ``None`` if unknown.

    pyarrow's ``S3FileSystem()`` does not look the region up itself (``FileSystem.from_uri``
    does), and a wrong region fails every request with a redirect; unknown (no network, no
    permission) leaves pyarrow's default (``~/.aws/config`` or ``us-east-1``).
    """
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError):
        return None


def locate(uri: str) -> Location:
    """Turn a local path or a URI into a :class:`Location`.

    Local paths are made absolute. ``s3://bucket/key`` uses pyarrow's S3 filesystem with the usual
    AWS credential chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
    ``~/.aws``, instance or pod roles), ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for
    S3-compatible servers (MinIO, Ceph, R2; ``http://`` endpoints switch to plain HTTP) and
    ``AWS_REGION``/``AWS_DEFAULT_REGION``, else the bucket's own region looked up once. ``gs://``
    and others use pyarrow's native filesystems, or fsspec's (e.g. ``gcsfs``) through pyarrow's
    bridge. Credentials never come from the recipe. The same URI is located again inside each Ray
    worker, so workers need the same environment (see :data:`capfilt.runner.FORWARDED_ENV`).

    Raises:
        ValueError: if the URI's scheme has no filesystem (message names the URI).
    """
    import os

    if "://" not in uri:
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(pafs.LocalFileSystem(), path, path)
    scheme = uri.split("://", 1)[0]
    if scheme == "file":
        path = uri[len("file://"):]
        return Location(pafs.LocalFileSystem(), path, uri)
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["scheme"] = "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region and not endpoint:
            region = _bucket_region(uri[len("s3://"):].split("/", 1)[0])
        if region:
            kwargs["region"] = region
        fs = pafs.S3FileSystem(**kwargs)
        return Location(fs, uri[len("s3://"):].rstrip("/"), uri.rstrip("/"))
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception:  # noqa: BLE001 - pyarrow has no native filesystem: try fsspec
        try:
            import fsspec

            fsspec_fs, path = fsspec.core.url_to_fs(uri)
            fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
        except Exception as e:  # noqa: BLE001 - any failure here means: unsupported URI
            raise ValueError(f"cannot open {uri}: no filesystem for scheme {scheme!r} ({e})") from None
    return Location(fs, path.rstrip("/"), uri.rstrip("/"))
