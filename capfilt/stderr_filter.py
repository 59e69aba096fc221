"""Ray lines that alarm without reason, replaced on stderr by one line of capfilt's explanation.

Every ``capfilt run`` on Ray printed two lines that look like failures but are not:

- ``core_worker.cc:... Actor ... MapWorker(MapBatches(CaptionActor)) ... has constructor arguments
  in the object store and max_restarts > 0``: Ray's C++ core worker (level ``E``) warns about any
  restartable actor created with an argument in the object store. Ray Data always passes its
  stage function that way (``ray.put`` of the map transformer, held by the driver for the whole
  run), so a restarted actor does find it; the line is printed once per actor pool, every run.
- ``Cluster resources are not enough to run any task from ... The job may hang forever unless
  the cluster scales up`` (Ray Data's resource manager, after its first stage waited 60 s for
  resources): on a small machine the model actors hold most CPUs while a block moves through
  them, so the read/download tasks wait. capfilt refuses, before any work, stage resources the
  cluster cannot provide (:func:`capfilt.runner.check_resources`), so the wait ends when a block
  is written.

The first comes from C++ and cannot be reached through Python's ``logging``, so
:class:`StderrFilter` filters the process's file descriptor 2 itself: a pipe whose reader thread
forwards every line to the real stderr except these, each replaced by its explanation the first
time. Only the CLI uses it (``capfilt run``); the library leaves stderr alone.
"""

from __future__ import annotations

import os
import re
import sys
import threading

#: (pattern of a Ray line, capfilt's explanation printed instead the first time; "" prints nothing).
KNOWN_LINES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"has constructor arguments in the object store and max_restarts > 0"),
     "capfilt: note: Ray passes each model stage's function to its actors through the object store; "
     "the driver holds it for the whole run, so restarted actors find it (Ray's core_worker warning "
     "about this is hidden)."),
    (re.compile(r"Cluster resources are not enough to run any task from"),
     "capfilt: note: Ray Data reports that the first stages have waited a minute for a free CPU: the "
     "model stages hold most of this machine's CPUs while a shard passes through them. Every stage was "
     "checked to fit before the run started, so this is a wait, not a hang; the progress lines show "
     "which stage the rows wait on."),
    (re.compile(r"Progress bars disabled\. To enable, set"), ""),
)


class StderrFilter:
    """Filter file descriptor 2 of this process (and of the children it starts meanwhile).

    Use as a context manager around the noisy work. On leaving, fd 2 is the real stderr again;
    lines still in the pipe are forwarded by the reader thread (a daemon) as they arrive.

    Args:
        known: the lines to hide and their explanations (default :data:`KNOWN_LINES`).

    A process without a usable fd 2 (no ``fileno``, e.g. under some test runners) is left as is.
    """

    def __init__(self, known: tuple[tuple[re.Pattern[str], str], ...] = KNOWN_LINES):
        self.known = known
        self.explained: set[int] = set()
        self._orig: int | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StderrFilter:
        try:
            sys.stderr.flush()
            orig = os.dup(2)
        except (OSError, ValueError, AttributeError):
            return self
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._orig = orig
        self._thread = threading.Thread(target=self._pump, args=(r, orig), name="capfilt-stderr", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._orig is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr already closed: nothing left to flush
        os.dup2(self._orig, 2)  # our write end of the pipe closes; children may still hold theirs
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def keep(self, line: str) -> tuple[bool, str]:
        """Whether ``line`` passes, and the explanation to print instead ("" when none or already printed)."""
        for i, (pattern, why) in enumerate(self.known):
            if pattern.search(line):
                first = i not in self.explained
                self.explained.add(i)
                return False, why if first else ""
        return True, ""

    def _pump(self, r: int, orig: int) -> None:
        """Forward lines from the pipe ``r`` to the real stderr ``orig`` until every writer closed it."""
        buf = b""
        with os.fdopen(r, "rb", buffering=0) as pipe:
            while True:
                try:
                    chunk = pipe.read(65536)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    self._emit(orig, raw + b"\n")
        if buf:
            self._emit(orig, buf)

    def _emit(self, orig: int, raw: bytes) -> None:
        ok, why = self.keep(raw.decode("utf-8", "replace"))
        out = raw if ok else (why + "\n").encode() if why else b""
        try:
            if out:
                os.write(orig, out)
        except OSError:
            pass  # the real stderr is gone (closed terminal): drop the line rather than fail the run
