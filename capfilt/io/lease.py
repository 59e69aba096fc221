"""One writer per output folder: an exclusive lease file with owner, host, pid and heartbeat.

Two ``capfilt run`` processes on one output would delete each other's in-flight files as
"leftovers" and commit parts of different attempts side by side. So a run takes
``OUT/_capfilt/lease.json`` before it touches the folder and gives it back when it ends:

- **create** is atomic: ``O_CREAT | O_EXCL`` on local disk; on S3 a conditional ``PUT`` with
  ``If-None-Match: *`` (boto3), which S3, MinIO and moto honour. Other filesystems (GCS through
  pyarrow) fall back to write-then-read-back, which narrows but does not close the race;
- a background thread rewrites the heartbeat every :data:`HEARTBEAT_SECONDS`;
- a lease whose heartbeat is older than :data:`STALE_SECONDS`, or whose process is gone from this
  host, belongs to a run that died without releasing it (SIGKILL, power loss): the next run takes
  it over, and says so;
- a live lease makes the next run refuse with the holder's user, host, pid, command and age.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from capfilt.errors import OutputError
from capfilt.io.filesystem import Location
from capfilt.io.writer import META_DIR, write_bytes

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
#: Seconds between heartbeats of a live lease.
HEARTBEAT_SECONDS = 15.0
#: A lease whose heartbeat is older than this many seconds is taken over.
STALE_SECONDS = 120.0


class LeaseHeld(OutputError):
    """Another live run holds the output's lease."""


def _owner(token: str) -> dict[str, Any]:
    now = time.time()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    return {"token": token, "user": user, "host": socket.gethostname(), "pid": os.getpid(),
            "command": " ".join(sys.argv)[:300], "started_at": now, "heartbeat_at": now}


def _dead(holder: dict[str, Any]) -> bool:
    """True when the holder ran on this host and its process no longer exists (killed, crashed)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _s3_create_exclusive(loc: Location, body: bytes) -> bool | None:
    """Conditional PUT on S3 (``If-None-Match: *``): True created, False exists, None unsupported."""
    if not loc.uri.startswith("s3://"):
        return None
    try:
        import boto3
        from botocore.exceptions import ClientError
    except ImportError:
        return None
    bucket, _, key = loc.uri[len("s3://"):].partition("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client = boto3.client("s3", endpoint_url=endpoint) if endpoint else boto3.client("s3")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
        return True
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        raise


def _create_exclusive(loc: Location, body: bytes) -> bool:
    """Create ``loc`` with ``body`` only if it does not exist; True when this call created it."""
    if loc.is_local:
        try:
            fd = os.open(loc.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return True
    created = _s3_create_exclusive(loc, body)
    if created is not None:
        return created
    if loc.exists():
        return False
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(body)
    return json.loads(_read(loc) or b"{}").get("token") == json.loads(body)["token"]


def _read(loc: Location) -> bytes | None:
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    """``user@host pid N (started 3 min ago, heartbeat 4 s ago): capfilt run ...``."""
    now = time.time() if now is None else now
    age = now - float(holder.get("started_at") or now)
    beat = now - float(holder.get("heartbeat_at") or 0)
    cmd = holder.get("command") or "?"
    return (f"{holder.get('user', '?')}@{holder.get('host', '?')} pid {holder.get('pid', '?')} "
            f"(started {age:.0f} s ago, last heartbeat {beat:.0f} s ago): {cmd}")


@dataclass
class OutputLease:
    """The exclusive lease of one output folder; use as a context manager.

    Args:
        out: the output folder (created if missing).
        stale_seconds: heartbeat age after which a lease is taken over.
        heartbeat_seconds: how often the holder refreshes its heartbeat.

    Raises (on enter):
        LeaseHeld: a live run holds the lease; the message names user, host, pid and command.
        OutputError: the lease file cannot be written (permissions, read-only storage).
    """

    out: Location
    stale_seconds: float = STALE_SECONDS
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _owner: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def location(self) -> Location:
        """``OUT/_capfilt/lease.json``."""
        return self.out.join(META_DIR, LEASE_NAME)

    def acquire(self) -> OutputLease:
        """Take the lease (see the class docs); start the heartbeat thread."""
        loc = self.location
        try:
            self.out.fs.create_dir(self.out.join(META_DIR).path, recursive=True)
            self._owner = _owner(self.token)
            for _ in range(20):
                if _create_exclusive(loc, json.dumps(self._owner).encode()):
                    break
                raw = _read(loc)
                try:
                    holder = json.loads(raw) if raw else None
                except ValueError:
                    holder = None
                if holder is None:  # vanished, being written this instant, or left half-written by a crash
                    mtime = loc.fs.get_file_info(loc.path).mtime
                    if raw is not None and mtime is not None and time.time() - mtime.timestamp() > self.stale_seconds:
                        self._delete_if(raw)
                    else:
                        time.sleep(0.25)
                    continue
                if _dead(holder) or time.time() - float(holder.get("heartbeat_at") or 0) > self.stale_seconds:
                    log.warning("taking over the lease of %s from a run that stopped without releasing it: %s",
                                self.out.uri, describe(holder))
                    self._delete_if(raw)
                    continue
                raise LeaseHeld(f"output {self.out.uri} is being written by another capfilt run: {describe(holder)}. "
                                f"Wait for it to finish or stop it; a lease whose heartbeat is older than "
                                f"{self.stale_seconds:.0f} s is taken over automatically. (Lease file: "
                                f"{loc.uri})")
            else:
                raise LeaseHeld(f"could not take the lease of {self.out.uri} ({loc.uri}): another run keeps "
                                f"taking it; try again")
        except OSError as e:
            raise OutputError(f"cannot write the lease file {loc.uri} of output {self.out.uri}: {e}. Check that "
                              f"the output location is writable.") from None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="capfilt-lease", daemon=True)
        self._thread.start()
        return self

    def _delete_if(self, raw: bytes | None) -> None:
        """Delete the lease file if it still holds ``raw`` (what we judged stale or broken)."""
        if _read(self.location) == raw:
            try:
                self.out.fs.delete_file(self.location.path)
            except (FileNotFoundError, OSError):  # already gone, or taken over meanwhile: nothing to undo
                pass

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            raw = _read(self.location)
            try:
                if raw is None or json.loads(raw).get("token") != self.token:
                    log.error("the lease of %s was taken by another run; this run's writes may conflict",
                              self.out.uri)
                    return
                self._owner["heartbeat_at"] = time.time()
                write_bytes(self.location, json.dumps(self._owner).encode())  # atomic: readers never see half
            except (OSError, ValueError) as e:  # a transient store error: try again next beat
                log.warning("could not refresh the lease of %s: %s", self.out.uri, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        raw = _read(self.location)
        try:
            ours = raw is not None and json.loads(raw).get("token") == self.token
        except ValueError:
            ours = False
        if ours:
            try:
                self.out.fs.delete_file(self.location.path)
            except OSError:  # best effort: a leftover lease is taken over when its pid/heartbeat is dead
                pass

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
