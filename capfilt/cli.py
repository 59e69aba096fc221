"""``capfilt`` command line: a thin typer shell over :mod:`capfilt.api`.

Errors the user can fix (:class:`capfilt.errors.CapfiltError`) print one message and exit 2,
without a traceback.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import typer
from rich.console import Console
from typer.core import TyperCommand

from capfilt.errors import CapfiltError
from capfilt.summary import print_summary

def _no_type_for_flags() -> None:
    """Typer 0.2x with click 8.2+ prints ``<bool>`` after every flag in ``--help`` (a flag takes no
    value); show no type for flags instead, in every capfilt command."""
    from typer.core import TyperOption

    original = TyperOption.display_type_rich
    if getattr(original, "_capfilt", False):
        return

    def display_type_rich(self, ctx):  # noqa: ANN001 - typer's signature
        """Typer's type column, empty for flags."""
        return None if getattr(self, "is_flag", False) else original(self, ctx)

    display_type_rich._capfilt = True
    TyperOption.display_type_rich = display_type_rich


_no_type_for_flags()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="CapFilt (BLIP / BLIP-2) data curation: download, caption, filter, write Parquet shards.")
console = Console(stderr=False)
err_console = Console(stderr=True)


class InputFormat(str, Enum):
    """Values of ``--input-format`` (``input.input_format`` in the recipe)."""

    auto = "auto"
    parquet = "parquet"
    csv = "csv"
    tsv = "tsv"
    jsonl = "jsonl"
    txt = "txt"
    coco = "coco"


class CsvHeader(str, Enum):
    """Values of ``--csv-header`` (``input.csv_header``: ``auto``, ``true``, ``false``)."""

    auto = "auto"
    true = "true"
    false = "false"


def _fail(e: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


class _RunCommand(TyperCommand):
    """The ``run`` command: ``--retry-failed`` may be given without a value (then ``transient``)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        """Insert ``transient`` after a bare ``--retry-failed`` (last, or followed by another option)."""
        args = list(args)
        for i, a in enumerate(args):
            if a == "--":
                break
            if a == "--retry-failed" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                args.insert(i + 1, "transient")
        return super().parse_args(ctx, args)


@app.command(cls=_RunCommand)
def run(
    input: Annotated[list[str], typer.Option("--input", "-i", help="Input file(s) or folder(s): .parquet .csv "
                                             ".tsv .jsonl .txt; local or s3://, gs://. Repeat for several.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder (local or object storage).")],
    pipeline: Annotated[str, typer.Option(help="Recipe name (blip, blip2, download, refilter) or YAML path.")] = "blip",
    models: Annotated[Optional[str], typer.Option(help="Model preset (blip-large, blip-base, blip2, tiny, shapes) or "
                                                  "YAML path; default: the recipe's.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any recipe value: "
                                                      "section.key=value, e.g. caption.num_captions=10.")] = None,
    url_col: Annotated[Optional[str], typer.Option(help="URL column: its name, or its 0-based position (e.g. 1 "
                                                   "for CC3M's headerless caption<TAB>url TSV). Default: "
                                                   "url/URL/image_url; in a file without a header, the "
                                                   "column whose first cell is an http(s) URL.")] = None,
    caption_col: Annotated[Optional[str], typer.Option(help="Caption column: name or 0-based position (default: "
                                                       "caption/TEXT/txt/text; without a header, the first "
                                                       "column that is not the URL).")] = None,
    keep_columns: Annotated[Optional[str], typer.Option(help="Comma-separated input columns to pass through "
                                                        "(default: all).")] = None,
    input_format: Annotated[Optional[InputFormat], typer.Option(
        help="Input format; auto (default) goes by suffix: .parquet .csv .tsv .jsonl/.json/.ndjson .txt "
             "(one URL per line), COCO captions_*.json.")] = None,
    csv_header: Annotated[Optional[CsvHeader], typer.Option(
        help="Whether CSV/TSV files start with a header row. auto (default): yes, unless a cell of the "
             "first row is an http(s) URL. Without a header, columns are named col0, col1, ... and "
             "--url-col/--caption-col take positions.")] = None,
    rows_per_shard: Annotated[Optional[int], typer.Option(
        help="Input rows per output shard (default: the recipe's, 1000 in the bundled ones).")] = None,
    num_captions: Annotated[Optional[int], typer.Option(help="Synthetic captions per image.")] = None,
    itm_threshold: Annotated[Optional[float], typer.Option(help="Keep texts with ITM probability >= this.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Keep at most this many texts per image.")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="Download timeout per try, seconds.")] = None,
    allow_private_network: Annotated[bool, typer.Option(help="Allow URLs on loopback/private/link-local "
                                                        "addresses.")] = False,
    allow_file_urls: Annotated[bool, typer.Option(help="Allow file:// URLs.")] = False,
    decontaminate: Annotated[Optional[list[str]], typer.Option(
        help="Folder of evaluation images (or Parquet with image+id) whose copies in the input are flagged "
             "'contaminated' before the models run; repeatable.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Join a Ray cluster (e.g. auto); default: "
                                                       "RAY_ADDRESS or a local Ray.")] = None,
    executor: Annotated[str, typer.Option(help="ray | local (in-process, a thread per stage) | auto: local for "
                                               "refilter, for inputs of <= 1000 rows and for recipes without a model "
                                               "stage (download: one process per core), unless --ray-address or "
                                               "RAY_ADDRESS names a cluster; else ray")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Delete what capfilt wrote in the output (any earlier run, same "
                                            "settings or not) and start again; other files are kept.")] = False,
    progress: Annotated[bool, typer.Option(help="Show Ray's progress bars (a terminal); capfilt's progress lines "
                                           "are logged either way.")] = True,
    progress_every: Annotated[float, typer.Option(help="Seconds between capfilt's progress lines (rows done / "
                                                  "total, rows/s, ETA, failures, stage time).", min=0)] = 30.0,
    retry_failed: Annotated[Optional[str], typer.Option(
        "--retry-failed", metavar="[CLASS_OR_STATUS,...]",
        help="After the run, fetch again the failed rows of these error classes or statuses (comma-separated; "
             "alone: transient = dns, connect, timeout, http_5xx, http_429) and replace them in their shards, "
             "keys unchanged.")] = None,
) -> None:
    """Run a CapFilt pipeline: read -> download -> caption -> score -> select -> write shards.

    Rerunning the same command resumes: committed shards are kept, the rest is redone.
    """
    from capfilt.api import RunOptions
    from capfilt.api import run as api_run

    from capfilt.config import PipelineConfig, parse_override

    # --set values are YAML, except that text fields keep the text as typed (parse_override);
    # named flags are typed by typer and go to the recipe as they are, never through YAML
    try:
        overrides: dict[str, Any] = {".".join(path): value
                                     for path, value in (parse_override(s, PipelineConfig) for s in set_ or [])}
    except CapfiltError as e:  # a malformed --set (no '=', empty key): one line, exit 2
        _fail(e)
    flags = {"input.url_col": url_col, "input.caption_col": caption_col,
             "input.input_format": None if input_format is None else input_format.value,
             "input.csv_header": None if csv_header is None else {"auto": "auto", "true": True,
                                                                  "false": False}[csv_header.value],
             "output.rows_per_shard": rows_per_shard, "caption.num_captions": num_captions,
             "select.itm_threshold": itm_threshold, "select.top_k": top_k, "download.timeout": timeout,
             "input.keep_columns": None if keep_columns is None else [c.strip() for c in keep_columns.split(",")
                                                                      if c.strip()],
             "download.allow_private_network": allow_private_network or None,
             "download.allow_file_urls": allow_file_urls or None,
             "decontam.enabled": True if decontaminate else None,
             "decontam.eval_sets": list(decontaminate) if decontaminate else None}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    opts = RunOptions(inputs=input, output=output, pipeline=pipeline, models=models, overrides=overrides,
                      ray_address=ray_address, executor=executor, overwrite=overwrite, progress=progress,
                      progress_every=progress_every,
                      retry_failed=None if retry_failed is None else [retry_failed])
    _log_to_stderr()
    from capfilt.stderr_filter import StderrFilter

    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    with StderrFilter():  # Ray's alarming-but-harmless lines become one explanation each
        try:
            result = api_run(opts)
        except CapfiltError as e:
            _fail(e)
        except KeyboardInterrupt as e:
            err_console.print("[yellow]interrupted[/]: committed shards are kept; rerun the same command to resume.")
            raise typer.Exit(143 if isinstance(e, Terminated) else 130)  # 128 + SIGTERM / SIGINT
        finally:
            signal.signal(signal.SIGTERM, previous)
            from capfilt.runner import shutdown_local_ray

            shutdown_local_ray()  # no Ray worker of this run outlives it
    print_summary(result, console)
    if result.export is not None:
        x = result.export
        console.print(f"export ({x.format}): {x.totals['written']:,} of {x.totals['rows_in']:,} rows in "
                      f"{len(x.shards)} shard(s): {x.train_data or x.dest}", highlight=False, soft_wrap=True)


def _log_to_stderr() -> None:
    """capfilt's INFO lines (progress, warnings) to stderr with a timestamp; other libraries untouched."""
    import logging

    logger = logging.getLogger("capfilt")
    if not any(getattr(h, "_capfilt", False) for h in logger.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s capfilt: %(message)s", "%H:%M:%S"))
        h._capfilt = True
        logger.addHandler(h)
        logger.setLevel(logging.INFO)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so the same clean-up runs; exit code 143."""


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a scheduler's stop) ends a run like Ctrl-C: record kept, workers stopped."""
    raise Terminated


@app.command()
def demo(
    output: Annotated[Optional[str], typer.Option(help="Output folder for the demo run (default: capfilt-demo-USER "
                                                  "in the system's temporary folder, not the current one; the "
                                                  "path is printed first).")] = None,
    world: Annotated[str, typer.Option(help="shapes: the synthetic shapes world with labelled web noise and models "
                                       "capfilt trained on it; photos: the bundled real photos.")] = "shapes",
    models: Annotated[Optional[str], typer.Option(help="Model preset (default: shapes for the shapes world, the "
                                                  "untrained tiny preset for photos).")] = None,
    pipeline: Annotated[str, typer.Option(help="Recipe to run.")] = "blip",
    rows: Annotated[int, typer.Option(help="Image-text pairs of the shapes world.", min=1)] = 200,
    overwrite: Annotated[bool, typer.Option(help="Start again if the output exists.")] = True,
) -> None:
    """Offline demo on 127.0.0.1: CapFilt on a labelled toy world (default) or on bundled CC0 photos."""
    from capfilt.demo import run_demo
    from capfilt.stderr_filter import StderrFilter

    with StderrFilter():  # Ray's alarming-but-harmless lines become one explanation each, as in `run`
        try:
            run_demo(Path(output) if output else None, models=models, pipeline=pipeline, overwrite=overwrite,
                     console=console, world=world, rows=rows)
        except CapfiltError as e:
            _fail(e)


def _register_subcommands() -> None:
    """Add the report/inspect, export and train commands (their packages own them; imports stay lazy)."""
    from capfilt.export.cli import register as register_export
    from capfilt.report.cli import register as register_report
    from capfilt.synthetic.cli import register as register_synthetic
    from capfilt.train.cli import register as register_train

    register_report(app)
    register_export(app)
    register_train(app)
    register_synthetic(app)


_register_subcommands()


#: Collector thresholds for the CLI process: a run's start-up imports torch, transformers and
#: img2dataset's resizer, millions of long-lived objects and next to no garbage, and with CPython's
#: default (700, 10, 10) the collector keeps re-scanning them (importing torch + transformers' BLIP
#: + img2dataset's resizer took 10-15 % less time with these, on this 2-core VM, 3 interleaved runs).
#: Cycles are still collected, in larger steps.
GC_THRESHOLDS = (50_000, 20, 20)


def main() -> None:
    """Console-script entry point.

    Sets :data:`GC_THRESHOLDS` for this process and, when the command ends, freezes what is alive
    (:func:`gc.freeze`) so the interpreter's final collection does not walk every object torch and
    transformers created (about 1 s of a cold ``capfilt run``'s exit on this 2-core machine).
    """
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        app()
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
