"""``capfilt demo``: the whole pipeline offline, on data served from 127.0.0.1.

Two worlds:

- ``shapes`` (default): a web split of the synthetic shapes world (:mod:`capfilt.synthetic`) whose
  web captions carry labelled noise, run with the ``shapes`` preset: a captioner and filter that
  capfilt trained on that world (``capfilt bootstrap``). The summary shows what CapFilt did: web
  captions removed per noise type, synthetic captions that are right, the noise ratio. A toy world:
  it shows the method working, not the quality on real photos.
- ``photos``: the bundled CC0/public-domain photos (``capfilt/demo_data``, see SOURCES.md there)
  with a small LAION-style parquet (``URL``, ``TEXT``) that swaps two captions on purpose and has
  one missing image and one non-image, so every column and status shows. Meant for real
  checkpoints (``--models blip-base``) or the untrained ``tiny`` preset (pipeline shape only).
"""

from __future__ import annotations

import functools
import os
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

from capfilt.errors import shorten

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


SHAPES_NOTICE = ("This is a [bold]toy world[/]: procedural coloured shapes with web captions that carry labelled "
                 "noise, and a small captioner and filter that capfilt trained on this world "
                 "(`capfilt bootstrap`). It shows CapFilt doing its job where the truth is known; it says nothing "
                 "about quality on real photos. For real data use real checkpoints:\n"
                 "  capfilt run --input laion.parquet --output OUT --models blip-large   # GPU recommended")
#: Rows and world seed of the shapes demo (the shipped models were trained on seed 0's splits).
SHAPES_DEMO_ROWS = 200
SHAPES_DEMO_SEED = 2026


def shapes_image_size() -> int:
    """Side of the shapes world's images in pixels (its recipes' ``download.min_image_size``)."""
    from capfilt.synthetic.world import IMAGE_SIZE

    return IMAGE_SIZE


def default_demo_output() -> Path:
    """Where ``capfilt demo`` writes without ``--output``: ``capfilt-demo-USER`` in the system's temporary
    folder (``TMPDIR``, else ``/tmp``), never the current folder; a rerun replaces it."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        user = str(os.getuid())
    return Path(tempfile.gettempdir()) / f"capfilt-demo-{user}"


def run_demo(output: Path | None = None, models: str | None = None, pipeline: str = "blip", overwrite: bool = True,
             console: Console | None = None, progress: bool = True, world: str = "shapes",
             rows: int = SHAPES_DEMO_ROWS):
    """Serve the demo data on 127.0.0.1, run ``pipeline`` with ``models`` into ``output``, print a summary.

    Args:
        output: the output folder; ``None``: :func:`default_demo_output`. Printed first either way.
        world: ``shapes`` (labelled synthetic web pairs, ``shapes`` preset by default) or ``photos``
            (the bundled photos, ``tiny`` preset by default); see the module docstring.
        rows: image-text pairs of the shapes world.

    Returns:
        The :class:`capfilt.api.RunResult`.

    Raises:
        capfilt.errors.ConfigError: unknown ``world``.
    """
    from capfilt.api import RunOptions, run
    from capfilt.summary import print_summary
    from capfilt.config import ConfigError, load_preset

    if world not in ("shapes", "photos"):
        raise ConfigError(f"unknown demo world {world!r}: shapes or photos")
    models = models or ("shapes" if world == "shapes" else "tiny")
    console = console or Console()
    output = Path(output) if output is not None else default_demo_output()
    console.print(f"demo output: {output.resolve()}  (choose another folder with --output)", highlight=False,
                  soft_wrap=True)
    tmp = Path(tempfile.mkdtemp(prefix="capfilt-demo-"))
    try:
        shapes = world == "shapes"
        if shapes:
            from capfilt.synthetic.splits import write_served_meta, write_split

            write_split(tmp / "web", "web", rows, SHAPES_DEMO_SEED)
        httpd, base = serve(tmp / "web" if shapes else DEMO_DIR)
        try:
            if shapes:
                inp = write_served_meta(tmp / "web", base, tmp / "demo.parquet")
                console.print(f"serving {rows} shapes-world web pairs from {base} (toy world, labelled noise)")
            else:
                inp = write_demo_input(tmp / "demo.parquet", base)
                console.print(f"serving {len(DEMO_ROWS)} demo rows from {base} (bundled CC0/public-domain photos)")
            # the shapes world's images are IMAGE_SIZE (64) px: its floor is set here, not left to the default
            floor = [f"download.min_image_size={shapes_image_size()}"] if shapes else []
            result = run(RunOptions(inputs=[str(inp)], output=str(output), pipeline=pipeline, models=models,
                                    overrides=["download.allow_private_network=true",
                                               f"output.rows_per_shard={100 if shapes else 4}",
                                               "download.timeout=5", *floor],
                                    overwrite=overwrite, progress=progress))
        finally:
            httpd.shutdown()
            httpd.server_close()
        shutil.copy(inp, Path(output) / "_capfilt" / "demo_input.parquet")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_summary(result, console)
    if world == "shapes":
        _print_shapes_summary(Path(output), result, console)
        console.print(Panel(SHAPES_NOTICE, title="about this demo", border_style="yellow"))
        console.print(f"next: capfilt report {output} --label-col noise_type   (HTML report, filter vs labels)")
        return result
    untrained = load_preset(models).builder == "tiny"
    _print_samples(Path(output), console, noise=untrained)
    if untrained:
        console.print(Panel(TINY_NOTICE, title="about these captions", border_style="yellow"))
    console.print(f"next: capfilt report {output}   (HTML report)   |   capfilt inspect {output}")
    return result


def _print_shapes_summary(output: Path, result, console: Console, n: int = 8) -> None:
    """What CapFilt did to the labelled web captions, and a few rows side by side."""
    import json
    from collections import Counter

    import pyarrow.dataset as ds

    from capfilt.synthetic.evaluate import output_report
    from capfilt.synthetic.world import NOISE_TYPES, caption_correct

    threshold = (result.record.config or {}).get("select", {}).get("itm_threshold")
    threshold = 0.5 if threshold is None else float(threshold)
    rep = output_report(str(output), threshold)
    f = rep["filter"]
    t = Table(title=f"web captions by label (ITM threshold {threshold})", title_justify="left")
    t.add_column("web caption is")
    t.add_column("rows", justify="right")
    t.add_column("removed by the filter", justify="right")
    for kind in NOISE_TYPES:
        rows = f["counts"].get(kind, 0)
        if not rows:
            continue
        removed = (1 - f["clean_keep_rate"]) if kind == "clean" else f["recall"][kind]
        t.add_row(kind + (" (should stay)" if kind == "clean" else ""), str(rows), f"{removed:.0%}")
    console.print(t)
    s, sk = rep["synthetic"], rep["synthetic_kept"]
    console.print(f"noise ratio (web captions removed): {f['noise_ratio']:.0%}; removals that were really noisy: "
                  f"{f['precision']:.0%}")
    console.print(f"synthetic captions exactly right: {s['exact']:.0%} of {s['n']} "
                  f"(colours {s['colors']:.0%}, shapes {s['shapes']:.0%}, counts {s['count']:.0%}); "
                  f"of the {sk['n']} synthetic captions the filter kept, {sk['exact']:.0%} are exactly right")
    cols = ["noise_type", "caption", "web_itm", "synthetic_captions", "synthetic_itm", "objects", "status"]
    rows = [r for r in ds.dataset(str(output), format="parquet").to_table(columns=cols).to_pylist()
            if r["status"] == "success"]
    _print_label_suggestion(output, rows, threshold, console)
    picked, seen = [], set()
    for r in rows:  # one row per noise type first, then the rest
        if r["noise_type"] not in seen:
            seen.add(r["noise_type"])
            picked.append(r)
    picked += [r for r in rows if r not in picked][: max(0, n - len(picked))]
    table = Table(title="sample rows", title_justify="left")
    for c in ("label", "web caption", "ITM", "kept", "synthetic caption", "right?"):
        table.add_column(c, overflow="fold", max_width=42)
    for r in picked[:n]:
        content = Counter((o["color"], o["shape"]) for o in json.loads(r["objects"]))
        syn = (r["synthetic_captions"] or [""])[0]
        itm = r["web_itm"]
        table.add_row(r["noise_type"], r["caption"], "" if itm is None else f"{itm:.2f}",
                      "yes" if itm is not None and itm >= threshold else "no", syn,
                      "yes" if caption_correct(syn, content) else "no")
    console.print(table)


def _print_label_suggestion(output: Path, rows: list[dict], threshold: float, console: Console) -> None:
    """The threshold the labels suggest (best F1 of removing noisy captions; ``capfilt report
    --label-col`` computes the same), what it would keep, and the model-free command that applies it."""
    import numpy as np

    from capfilt.report.labels import suggest_thresholds
    from capfilt.synthetic.evaluate import filter_report

    scored = [r for r in rows if r["web_itm"] is not None]
    if not scored:
        return
    scores = np.array([r["web_itm"] for r in scored], dtype=np.float32)
    labels = [r["noise_type"] for r in scored]
    best, _ = suggest_thresholds(scores, np.array([t != "clean" for t in labels]))
    if best is None or abs(best - threshold) < 0.02:
        return
    f = filter_report(scores >= best, labels)
    removed = ", ".join(f"{k} {v:.0%}" for k, v in f["recall"].items())
    console.print(f"the labels suggest ITM >= {best:.2f} (best F1 of removing noisy captions): it would keep "
                  f"{f['clean_keep_rate']:.0%} of clean captions and remove {removed}. Apply it without any model: "
                  f"capfilt run --pipeline refilter --input {output} --output {output}-refiltered "
                  f"--itm-threshold {best:.2f}")


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
        return shorten(v, 60, "...")

    for row in t.slice(0, n).to_pylist():
        table.add_row(*[fmt(v) for v in row.values()])
    console.print(table)
