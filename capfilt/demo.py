"""``capfilt demo``: the whole pipeline offline, on bundled real photos served from 127.0.0.1.

The photos (``capfilt/demo_data``, CC0/public domain, see SOURCES.md there) are served by a
throw-away HTTP server; a small LAION-style parquet (``URL``, ``TEXT``) points at them, with two
captions swapped on purpose, one missing image and one non-image, so every column and status shows.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

DEMO_DIR = Path(__file__).parent / "demo_data"

#: (file, web caption); two captions are deliberately swapped to give the filter something to do.
DEMO_ROWS = [
    ("astronaut.jpg", "a portrait of an astronaut with the American flag"),
    ("camera.jpg", "a person looking at a camera on a tripod"),
    ("chelsea.jpg", "a facial photo of a tabby cat"),
    ("coffee.jpg", "a rocket standing on a launchpad"),  # swapped with rocket
    ("horse.png", "a black-and-white silhouette of a horse"),
    ("rocket.jpg", "a cup of coffee on a saucer"),  # swapped with coffee
    ("missing.jpg", "a photo that is not on the server"),
    ("SOURCES.md", "a text file served instead of an image"),
]

TINY_NOTICE = ("The [bold]tiny[/] preset is untrained: random weights, built locally so the demo runs "
               "offline. Its synthetic captions are random word-pieces and its ITM/ITC scores mean nothing; "
               "they only show the pipeline's shape. For real CapFilt, run with real checkpoints on a machine "
               "that can reach the Hugging Face Hub (or has them cached):\n"
               "  capfilt run --input laion.parquet --output OUT --models blip-large   # GPU recommended")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        """Silence per-request logging of the demo server."""
        pass


def serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``directory`` on 127.0.0.1 (free port) in a daemon thread; returns (server, base URL)."""
    handler = functools.partial(_Quiet, directory=str(directory))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def write_demo_input(path: Path, base_url: str) -> Path:
    """Write the demo's LAION-style metadata parquet (columns ``URL``, ``TEXT``, ``LICENSE``)."""
    table = pa.table({
        "URL": [f"{base_url}/{name}" for name, _ in DEMO_ROWS],
        "TEXT": [text for _, text in DEMO_ROWS],
        "LICENSE": ["public domain" if n in ("astronaut.jpg", "rocket.jpg") else "CC0" for n, _ in DEMO_ROWS],
    })
    pq.write_table(table, path)
    return path


def run_demo(output: Path, models: str = "tiny", pipeline: str = "blip", overwrite: bool = True,
             console: Console | None = None, progress: bool = True):
    """Serve the demo photos, run ``pipeline`` with ``models`` into ``output``, print a summary.

    Returns:
        The :class:`capfilt.api.RunResult`.
    """
    from capfilt.api import RunOptions, run
    from capfilt.cli import print_summary

    console = console or Console()
    httpd, base = serve(DEMO_DIR)
    tmp = Path(tempfile.mkdtemp(prefix="capfilt-demo-"))
    try:
        inp = write_demo_input(tmp / "demo.parquet", base)
        console.print(f"serving {len(DEMO_ROWS)} demo rows from {base} (bundled CC0/public-domain photos)")
        result = run(RunOptions(inputs=[str(inp)], output=str(output), pipeline=pipeline, models=models,
                                overrides=["download.allow_private_network=true", "output.rows_per_shard=4",
                                           "download.timeout=5"],
                                overwrite=overwrite, progress=progress))
        shutil.copy(inp, Path(output) / "_capfilt" / "demo_input.parquet")
    finally:
        httpd.shutdown()
        httpd.server_close()
        shutil.rmtree(tmp, ignore_errors=True)
    from capfilt.config import load_preset

    untrained = load_preset(models).builder == "tiny"
    print_summary(result, console)
    _print_samples(Path(output), console, noise=untrained)
    if untrained:
        console.print(Panel(TINY_NOTICE, title="about these captions", border_style="yellow"))
    console.print(f"next: capfilt report {output}   (HTML report)   |   capfilt inspect {output}")
    return result


def _print_samples(output: Path, console: Console, n: int = 4, noise: bool = False) -> None:
    import pyarrow.dataset as ds

    files = sorted(str(p) for p in output.glob("*.parquet"))
    if not files:
        return
    cols = ["key", "status", "caption", "synthetic_captions", "web_itm", "keep"]
    t = ds.dataset(files, format="parquet").to_table(columns=[c for c in cols if c in
                                                             pq.read_schema(files[0]).names])
    title = "sample rows" + (" (tiny untrained models: synthetic captions are noise)" if noise else "")
    table = Table(title=title, title_justify="left")
    for c in t.column_names:
        table.add_column(c, overflow="fold", max_width=40)
    def fmt(v) -> str:
        """One table cell: floats to 3 decimals, lists joined, long text cut to 60 characters."""
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, list):
            v = " | ".join(v)
        v = str(v)
        return v if len(v) <= 60 else v[:57] + "..."

    for row in t.slice(0, n).to_pylist():
        table.add_row(*[fmt(v) for v in row.values()])
    console.print(table)
