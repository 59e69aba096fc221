"""``capfilt demo`` without ``--output`` writes into a clearly named folder of the system's temporary folder,
never into the current folder, and says where first (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from capfilt.demo import default_demo_output


def test_default_output_is_in_the_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    out = default_demo_output()
    assert out.parent == tmp_path and out.name.startswith("capfilt-demo-")
    r = subprocess.run([sys.executable, "-m", "capfilt.cli", "demo", "--help"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert "temporary folder" in " ".join(r.stdout.split())


@pytest.mark.slow
def test_demo_without_output_leaves_the_current_folder_alone(tmp_path):
    import shutil
    import tempfile

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix="cfd-", dir="/tmp"))  # short: Ray's sockets live under TMPDIR too
    try:
        r = subprocess.run([sys.executable, "-m", "capfilt.cli", "demo", "--world", "photos"], cwd=cwd,
                           capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(Path(__file__).resolve().parents[2])))
        _check(r, cwd, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check(r: subprocess.CompletedProcess, cwd: Path, tmp: Path) -> None:
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    outs = [p for p in tmp.iterdir() if p.name.startswith("capfilt-demo-")]
    assert len(outs) == 1 and (outs[0] / "_capfilt" / "run.json").is_file()
    first = r.stdout.splitlines()[0]
    assert first.startswith("demo output: ") and str(outs[0]) in " ".join(r.stdout.split())
