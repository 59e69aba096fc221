"""Local paths and object-storage URIs (``s3://``, ``gs://``, ...) through pyarrow filesystems."""

from __future__ import annotations

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


def locate(uri: str) -> Location:
    """Turn a local path or a URI into a :class:`Location`.

    Local paths are made absolute. ``s3://bucket/key`` uses pyarrow's S3 filesystem with the usual
    AWS credential chain and ``AWS_ENDPOINT_URL`` (for S3-compatible servers); other schemes go
    through pyarrow's fsspec bridge when pyarrow has no native filesystem for them.

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
