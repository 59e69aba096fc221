"""Ray's alarming-but-harmless lines are replaced by capfilt's explanation, from Python and from C/child
processes alike (they write to file descriptor 2 directly); every other line passes unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

CORE_WORKER = ("[2026-12-01 21:37:50,256 E 20179 20179] core_worker.cc:2465: Actor with class name: "
               "'MapWorker(MapBatches(CaptionActor))' and ID: '90822c' has constructor arguments in the object "
               "store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, "
               "the actor restart will fail.")
STARVED = ("2026-12-01 21:40:00,000\tWARNING resource_manager.py:818 -- Cluster resources are not enough to run any "
           "task from ActorPoolMapOperator[MapBatches(CaptionActor)]. The job may hang forever unless the cluster "
           "scales up.")

SCRIPT = """
import os, subprocess, sys
from capfilt.stderr_filter import StderrFilter
with StderrFilter():
    print("before", file=sys.stderr, flush=True)
    subprocess.run(["sh", "-c", 'echo "$CORE" >&2; echo "$CORE" >&2; echo child-ok >&2'], check=True)
    print(os.environ["STARVED"], file=sys.stderr, flush=True)
    print("after", file=sys.stderr, flush=True)
print("outside", file=sys.stderr, flush=True)
"""


def test_known_ray_lines_are_explained_once_and_others_pass():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, CORE=CORE_WORKER, STARVED=STARVED))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "constructor arguments in the object store" not in r.stderr and "may hang forever" not in r.stderr
    assert [x for x in lines if not x.startswith("capfilt: note:")] == ["before", "child-ok", "after", "outside"]
    notes = [x for x in lines if x.startswith("capfilt: note:")]
    assert len(notes) == 2, lines  # one per kind, the repeated core_worker line explained once
    assert "restarted actors find it" in notes[0] and "a wait, not a hang" in notes[1]
