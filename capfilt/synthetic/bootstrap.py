"""``capfilt bootstrap``: BLIP's CapFilt experiment (BLIP §3.3, Table 1) in the shapes world.

For each seed, with capfilt's own trainers and its real Ray pipeline (images fetched over HTTP from
a server on 127.0.0.1), nothing short-circuited:

1. **data**: the ``web`` (noisy), ``human`` (clean, small) and ``test`` (clean) splits of the seed;
2. **pre-train** a fresh BLIP (ITC + ITM + LM, ``shapes-pretrain``) on the raw web pairs plus the
   human split (BLIP pre-trains on web + COCO);
3. **finetune** the captioner (LM, ``shapes-caption``) and the filter (ITC + ITM, ``shapes-itm``)
   separately on the human split (decoupled, BLIP §4.4);
4. **``capfilt run``** the web split with those two (``blip`` recipe: nucleus sampling, ITM
   filter at 0.5 on web and synthetic captions);
5. **pre-train again**, fresh weights, same recipe and steps, on the curated shards (kept web +
   synthetic captions) plus the human split. The *raw* arm is step 2's model: the same recipe,
   steps, size and initial weights on the raw web pairs plus the human split;
6. **evaluate** on the test split: retrieval TR@1 / IR@1 of both arms (ITC top-k, ITM re-rank),
   the filter's recall per noise type against the labels, and the captioner's exact-match rate.

Every step's output is kept under ``DIR/seed-S/``; a step whose output is complete is not redone,
so an interrupted experiment resumes. ``DIR/bootstrap.json`` and ``DIR/bootstrap.md`` hold the
results: means and spreads over seeds, per-seed values, wall time.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from capfilt.synthetic.world import IMAGE_SIZE, NOISE_TYPES, parse_caption


@dataclass(frozen=True)
class Size:
    """How big one seed's experiment is.

    Attributes:
        web, human, test: rows per split.
        pretrain_steps, caption_steps, filter_steps: optimizer steps of the three recipes.
        batch_size: training batch size.
        eval_captions: test images the captioner is graded on.
    """

    web: int
    human: int
    test: int
    pretrain_steps: int
    caption_steps: int
    filter_steps: int
    batch_size: int = 32
    eval_captions: int = 300


#: The sizes: ``default`` is the measured experiment (benchmarks/RESULTS.md), ``quick`` the test suite's.
SIZES = {
    "default": Size(web=4000, human=1500, test=400, pretrain_steps=500, caption_steps=300, filter_steps=400,
                    batch_size=48),
    "quick": Size(web=500, human=400, test=150, pretrain_steps=120, caption_steps=60, filter_steps=180,
                  batch_size=32, eval_captions=100),
}


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def _done(folder: Path) -> bool:
    return (folder / "final" / "COMPLETE").is_file()


class Experiment:
    """One bootstrap experiment under ``output`` (see the module docstring).

    Args:
        output: experiment folder (created).
        size: a :class:`Size` (``SIZES["default"]`` / ``SIZES["quick"]``).
        threshold: the filter's ITM threshold (the ``blip`` recipe's 0.5 by default).
        echo: progress lines (``None``: silent).
        ray_address: passed to ``capfilt run`` (default: a private local Ray).
    """

    def __init__(self, output: str | Path, size: Size, threshold: float = 0.5,
                 echo: Callable[[str], None] | None = print, ray_address: str | None = None) -> None:
        self.out = Path(output)
        self.size = size
        self.threshold = threshold
        self.echo = echo or (lambda _line: None)
        self.ray_address = ray_address

    # --------------------------------------------------------------------------------------
    def run(self, seeds: list[int]) -> dict[str, Any]:
        """Run every seed and write ``bootstrap.json`` / ``bootstrap.md``; returns the results dict."""
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        per_seed = {}
        for seed in seeds:
            per_seed[str(seed)] = self.run_seed(seed)
        results = summarize(per_seed, self.size, self.threshold, time.perf_counter() - t0)
        (self.out / "bootstrap.json").write_text(json.dumps(results, indent=2) + "\n")
        (self.out / "bootstrap.md").write_text(markdown(results))
        return results

    def run_seed(self, seed: int) -> dict[str, Any]:
        """Steps 1-6 for one seed (module docstring); returns its metrics (also in ``seed-S/metrics.json``)."""
        d = self.out / f"seed-{seed}"
        cached = d / "metrics.json"
        if cached.is_file():
            self.echo(f"seed {seed}: done earlier ({cached})")
            return json.loads(cached.read_text())
        t0 = time.perf_counter()
        timings: dict[str, float] = {}

        def step(name: str, fn: Callable[[], Any]) -> Any:
            """Run one step ``fn``, echo its start and end, record its wall time (s) in ``timings``."""
            t = time.perf_counter()
            self.echo(f"seed {seed}: {name} ...")
            res = fn()
            timings[name] = round(time.perf_counter() - t, 1)
            self.echo(f"seed {seed}: {name} done in {timings[name]:.0f} s")
            return res

        data = d / "data"
        step("data", lambda: self._data(data, seed))
        init = step("init", lambda: self._init(d / "init", seed))
        human = str(data / "human" / "captions.json")
        web_raw = str(data / "web" / "captions.json")
        pre = step("pretrain (raw web + human)", lambda: self._train(
            "shapes-pretrain", [web_raw, human], d / "pretrain-raw", seed,
            {"model.captioner": str(init["captioner"]), "model.filter": str(init["filter"]),
             "train.max_steps": self.size.pretrain_steps}))
        cap = step("finetune captioner (human)", lambda: self._train(
            "shapes-caption", [human], d / "captioner", seed,
            {"model.captioner": str(pre / "captioner"), "train.max_steps": self.size.caption_steps}))
        filt = step("finetune filter (human)", lambda: self._train(
            "shapes-itm", [human], d / "filter", seed,
            {"model.filter": str(pre / "filter"), "train.max_steps": self.size.filter_steps}))
        preset = write_preset(d / "preset.yaml", cap / "captioner", filt / "filter", f"bootstrap seed {seed}")
        curated = step("capfilt run (blip recipe) on the web split", lambda: self._capfilt(data / "web", d / "curated",
                                                                                        preset))
        cur = step("pretrain (curated + human)", lambda: self._train(
            "shapes-pretrain", [str(curated), human], d / "pretrain-curated", seed,
            {"model.captioner": str(init["captioner"]), "model.filter": str(init["filter"]),
             "train.max_steps": self.size.pretrain_steps}))
        metrics = step("evaluate", lambda: self._evaluate(data, curated, cap / "captioner", filt / "filter",
                                                          pre / "filter", cur / "filter", seed))
        metrics["timings_s"] = timings
        metrics["wall_s"] = round(time.perf_counter() - t0, 1)
        cached.write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics

    # --------------------------------------------------------------------------------------
    def _data(self, data: Path, seed: int) -> None:
        from capfilt.synthetic.splits import write_split

        for split, n in (("web", self.size.web), ("human", self.size.human), ("test", self.size.test)):
            folder = data / split
            marker = folder / "COMPLETE"
            if marker.is_file() and json.loads(marker.read_text()) == {"n": n, "seed": seed}:
                continue
            write_split(folder, split, n, seed)
            marker.write_text(json.dumps({"n": n, "seed": seed}))

    def _init(self, folder: Path, seed: int) -> dict[str, Path]:
        from capfilt.synthetic.models import write_init_checkpoints

        if (folder / "COMPLETE").is_file():
            return {"captioner": folder / "captioner", "filter": folder / "filter"}
        paths = write_init_checkpoints(folder, seed)
        (folder / "COMPLETE").write_text("1\n")
        return paths

    def _train(self, recipe: str, data: list[str], out: Path, seed: int, overrides: dict[str, Any]) -> Path:
        from capfilt.train.config import load_recipe
        from capfilt.train.loop import train

        if _done(out):
            return out / "final"
        rec = load_recipe(recipe, {**overrides, "train.batch_size": self.size.batch_size, "train.seed": seed})
        res = train(rec, data, out, overwrite=False,
                    echo=lambda line: self.echo("    " + line) if line.startswith(("step", "trained")) else None)
        (res.final / "COMPLETE").write_text("1\n")
        return res.final

    def _capfilt(self, web: Path, out: Path, preset: Path) -> Path:
        """Serve the web split on 127.0.0.1 and run the blip recipe on it; returns the output folder."""
        from capfilt.api import RunOptions, run
        from capfilt.demo import serve
        from capfilt.io.filesystem import locate
        from capfilt.io.run_record import read_run_record
        from capfilt.synthetic.splits import write_served_meta

        previous, _ = read_run_record(locate(str(out)))
        if previous is not None and previous.status == "complete":
            return out
        httpd, base = serve(web)
        try:
            inp = write_served_meta(web, base, web.parent / "web-served.parquet")
            run(RunOptions(inputs=[str(inp)], output=str(out), pipeline="blip", models=str(preset),
                           overrides=["download.allow_private_network=true", f"select.itm_threshold={self.threshold}",
                                      "output.rows_per_shard=1000",
                                      # the world's images are IMAGE_SIZE px: an explicit floor, not the default
                                      f"download.min_image_size={IMAGE_SIZE}"],
                           ray_address=self.ray_address, executor="ray", overwrite=True, progress=False))
        finally:
            httpd.shutdown()
            httpd.server_close()
        return out

    def _evaluate(self, data: Path, curated: Path, captioner: Path, filt: Path, raw_filter: Path,
                  curated_filter: Path, seed: int) -> dict[str, Any]:
        import pyarrow.parquet as pq
        import torch

        from capfilt.config import load_pipeline
        from capfilt.synthetic.evaluate import caption_report, decode, generate_captions, output_report, retrieval

        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            cur = output_report(str(curated), self.threshold)
            test = pq.read_table(data / "test" / "meta.parquet").to_pylist()
            images = decode([(data / "test" / r["url"]).read_bytes() for r in test])
            truth = [parse_caption(r["true_caption"]) for r in test]
            cap = _captioner(captioner)
            from capfilt.stages.caption import decoding_of

            n = min(self.size.eval_captions, len(images))
            caps = generate_captions(cap, images[:n], decoding_of(load_pipeline("blip").caption), seed)
            cap_rep = caption_report(caps, truth[:n])
            texts = [r["caption"] for r in test]
            down = {arm: retrieval(_scorer(path), images, texts, truth)
                    for arm, path in (("raw", raw_filter), ("curated", curated_filter))}
            fin = retrieval(_scorer(filt), images, texts, truth)
        finally:
            torch.set_num_threads(threads)
        return {
            "seed": seed,
            "rows": cur["rows"], "downloaded": cur["downloaded"],
            "filter": cur["filter"],
            "captioner": {"exact_match": cap_rep["exact"], "attributes": cap_rep, "examples": caps[:8],
                          "web": {"exact_match": cur["synthetic"]["exact"],
                                  "kept": cur["synthetic_kept"]["n"],
                                  "kept_exact_match": cur["synthetic_kept"]["exact"]}},
            "finetuned_filter_retrieval": fin,
            "downstream": down,
        }


def _captioner(folder: Path) -> Any:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from capfilt.modeling.captioner import BlipCaptioner

    model = BlipForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    return BlipCaptioner(model, BlipProcessor.from_pretrained(folder))


def _scorer(folder: Path) -> Any:
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from capfilt.modeling.blip_scorer import BlipScorer

    model = BlipForImageTextRetrieval.from_pretrained(folder, attn_implementation="eager").eval()
    return BlipScorer(model, BlipProcessor.from_pretrained(folder))


def write_preset(path: Path, captioner: Path, filt: Path, what: str) -> Path:
    """A model preset YAML naming a trained captioner and filter (absolute paths)."""
    import yaml

    data = {"name": "shapes-bootstrap", "description": f"shapes-world captioner and filter ({what})",
            "captioner": {"id": str(Path(captioner).resolve()), "kind": "blip"},
            "filter": {"id": str(Path(filt).resolve()), "kind": "blip"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
def summarize(per_seed: dict[str, dict[str, Any]], size: Size, threshold: float, wall_s: float) -> dict[str, Any]:
    """Means (and spreads) over seeds of every metric, plus the per-seed values.

    Keys (each a ``{"mean", "sd", "min", "max"}`` dict): ``filter.recall.<noise_type>``,
    ``filter.clean_keep_rate``, ``filter.precision``, ``filter.noise_ratio``,
    ``captioner.exact_match``, ``captioner.web_exact_match``, ``downstream.<arm>.tr1|ir1``,
    ``downstream.delta.tr1|ir1`` (curated - raw).
    """
    seeds = list(per_seed.values())
    flat: dict[str, list[float]] = {}

    def add(key: str, v: float | None) -> None:
        """Append ``v`` to the per-seed list of ``key`` (``None`` and NaN skipped)."""
        if v is not None and v == v:
            flat.setdefault(key, []).append(float(v))

    for m in seeds:
        for t, v in m["filter"]["recall"].items():
            add(f"filter.recall.{t}", v)
        for k in ("clean_keep_rate", "precision", "noise_ratio"):
            add(f"filter.{k}", m["filter"][k])
        add("captioner.exact_match", m["captioner"]["exact_match"])
        add("captioner.web_exact_match", m["captioner"]["web"]["exact_match"])
        for arm in ("raw", "curated"):
            for k in ("tr1", "ir1"):
                add(f"downstream.{arm}.{k}", m["downstream"][arm][k])
        for k in ("tr1", "ir1"):
            add(f"downstream.delta.{k}", m["downstream"]["curated"][k] - m["downstream"]["raw"][k])
    stats = {k: _mean_sd(v) for k, v in flat.items()}
    out: dict[str, Any] = {"seeds": [m["seed"] for m in seeds], "size": asdict(size), "threshold": threshold,
                           "wall_s": round(wall_s, 1), "per_seed": per_seed, "metrics": stats}
    # nested view of the means: results["filter"]["recall"]["junk"] etc.
    nested: dict[str, Any] = {}
    for k, s in stats.items():
        node = nested
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = s["mean"]
    out.update(nested)
    return out


def markdown(results: dict[str, Any]) -> str:
    """The results as a short Markdown report (filter per noise type, captioner, downstream)."""
    m = results["metrics"]

    def f(key: str, pct: bool = True) -> str:
        """``mean ± sd`` of metric ``key`` over seeds (x100 when ``pct``), ``-`` if absent."""
        s = m.get(key)
        if s is None:
            return "-"
        scale = 100 if pct else 1
        return f"{s['mean'] * scale:.1f} ± {s['sd'] * scale:.1f}"

    lines = ["# CapFilt bootstrap in the shapes world (toy world, not real data)", "",
             f"seeds {results['seeds']}, ITM threshold {results['threshold']}, wall {results['wall_s']:.0f} s; "
             f"sizes {results['size']}", "",
             "## Filter on the web split (mean ± sd over seeds, %)", "",
             "| web caption | removed (recall) | rows per seed |", "|---|---|---|"]
    counts = next(iter(results["per_seed"].values()))["filter"]["counts"]
    for t in NOISE_TYPES:
        key = "filter.clean_keep_rate" if t == "clean" else f"filter.recall.{t}"
        label = "clean (kept)" if t == "clean" else t
        lines.append(f"| {label} | {f(key)} | {counts.get(t, 0)} |")
    lines += ["", f"precision of removal {f('filter.precision')} %, noise ratio (web captions removed) "
                  f"{f('filter.noise_ratio')} %", "",
              "## Captioner", "",
              f"exactly right on the test split: {f('captioner.exact_match')} %; on the web split's images: "
              f"{f('captioner.web_exact_match')} %", "",
              "## Downstream: a fresh BLIP pre-trained on raw vs curated data (test split, %)", "",
              "| | TR@1 | IR@1 |", "|---|---|---|",
              f"| raw web + human | {f('downstream.raw.tr1')} | {f('downstream.raw.ir1')} |",
              f"| CapFilt-curated web + human | {f('downstream.curated.tr1')} | {f('downstream.curated.ir1')} |",
              f"| difference | {f('downstream.delta.tr1')} | {f('downstream.delta.ir1')} |", ""]
    return "\n".join(lines)


def copy_models(results_dir: Path, seed: int, dest: Path) -> None:
    """Copy seed ``seed``'s finetuned captioner and filter to ``dest/captioner``, ``dest/filter``."""
    d = Path(results_dir) / f"seed-{seed}"
    for role, src in (("captioner", d / "captioner" / "final" / "captioner"), ("filter", d / "filter" / "final" / "filter")):
        if (dest / role).exists():
            shutil.rmtree(dest / role)
        shutil.copytree(src, dest / role)
