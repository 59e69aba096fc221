"""Language ID of web captions, blocklists and eval-set decontamination (issue 12): the real fastText
model, real PDQ hashes, real COCO photos served over 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.api import RunOptions, run
from capfilt.config import BlocklistConfig, ConfigError, LangIdConfig, load_pipeline
from capfilt.errors import InputError
from capfilt.stages.blocklist import Blocklists, BlocklistStage, pdq_hex, sha256_hex
from capfilt.stages.langid import LangIdStage
from capfilt.stages.select import SelectStage
from tests.helpers.httpserver import ImageServer

COCO = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images").glob("*.jpg"))

CAPTIONS = ["a dog running on the beach at sunset", "un chien qui court sur la plage au coucher du soleil",
            "ein Hund, der bei Sonnenuntergang am Strand läuft", "IMG_2041", None, "海滩上奔跑的狗"]


def _rows(captions, status="success") -> pa.Table:
    n = len(captions)
    return pa.table({"key": [f"0000_{i:09d}" for i in range(n)], "caption": pa.array(captions, pa.string()),
                     "status": [status] * n, "error_message": pa.nulls(n, pa.string())})


def test_langid_detects_languages_and_applies_the_recipe_choice():
    out = LangIdStage(LangIdConfig(enabled=True))(_rows(CAPTIONS))
    langs = out.column("web_lang").to_pylist()
    assert langs[:3] == ["en", "fr", "de"] and langs[4] is None and langs[5] == "zh"
    probs = out.column("web_lang_prob").to_pylist()
    assert probs[0] > 0.5 and probs[1] > 0.9 and probs[4] is None
    # drop_web_caption (default): fr/de/zh unusable; the uncertain 'IMG_2041' stays usable unless confidently other
    ok = out.column("web_lang_ok").to_pylist()
    assert ok[0] is True and ok[1] is False and ok[2] is False and ok[4] is None and ok[5] is False
    assert out.column("status").to_pylist() == ["success"] * 6
    keep = LangIdStage(LangIdConfig(enabled=True, other="keep"))(_rows(CAPTIONS))
    assert keep.column("web_lang_ok").to_pylist() == [True, True, True, True, None, True]
    drop = LangIdStage(LangIdConfig(enabled=True, other="drop_row"))(_rows(CAPTIONS))
    st = drop.column("status").to_pylist()
    assert st[0] == "success" and st[1] == st[2] == st[5] == "wrong_language" and st[4] == "success"
    assert "'fr'" in drop.column("error_message")[1].as_py()
    fr_ok = LangIdStage(LangIdConfig(enabled=True, languages=["en", "fr"]))(_rows(CAPTIONS))
    assert fr_ok.column("web_lang_ok").to_pylist()[:3] == [True, True, False]
    assert LangIdStage.stats(out)["web_captions_unusable"] == 3


def test_an_unusable_web_caption_is_not_selected():
    t = LangIdStage(LangIdConfig(enabled=True))(_rows(CAPTIONS[:2]))
    t = t.append_column("synthetic_captions", pa.array([["a dog"], ["a dog on sand"]]))
    t = t.append_column("web_itm", pa.array([0.9, 0.9], pa.float32()))
    t = t.append_column("synthetic_itm", pa.array([[0.8], [0.7]], pa.list_(pa.float32())))
    out = SelectStage(load_pipeline("blip").select)(t)
    assert out.column("caption_sources").to_pylist() == [["web", "synthetic"], ["synthetic"]]


def _jpeg(im: Image.Image, size: int | None = None, quality: int = 90) -> bytes:
    if size:
        im = im.resize((size, size * im.height // im.width))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_blocklist_lists_are_checked_before_work(tmp_path):
    (tmp_path / "bad.txt").write_text("sha256:abc\n")
    with pytest.raises(InputError, match=r"bad.txt line 1"):
        BlocklistStage.build(load_pipeline("download", {"blocklist.enabled": True,
                                                        "blocklist.lists": [str(tmp_path / "bad.txt")]}), None)
    with pytest.raises(ConfigError, match="blocklist.lists is empty"):
        load_pipeline("download", {"blocklist.enabled": True})


def test_blocklist_blocks_exactly_the_listed_photos_before_the_models(tmp_path):
    """3 COCO photos on lists (one by sha256 of its stored bytes, two by PDQ of the original, one of
    which arrives re-encoded and resized); every other photo passes; blocked rows keep no bytes."""
    photos = [Image.open(p) for p in COCO[:12]]
    served = {f"p{i}.jpg": _jpeg(im) for i, im in enumerate(photos)}
    served["p2.jpg"] = _jpeg(photos[2], size=300, quality=55)  # a re-encoded, resized copy of a listed photo
    srv = ImageServer()
    for name, body in served.items():
        srv.add_route(f"/{name}", lambda req, body=body: srv._send(req, 200, body, "image/jpeg"))
    with srv:
        urls = [srv.url(n) for n in served]
        pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), tmp_path / "in.parquet")
        first = run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "plain"), pipeline="download",
                               executor="local", progress=False, overrides={"download.allow_private_network": True}))
        stored = {r["url"]: r["sha256"] for r in pq.read_table(tmp_path / "plain").to_pylist()}
        assert first.totals["success"] == 12
        (tmp_path / "csam-hashes.txt").write_text(f"# test list\nsha256:{stored[urls[0]]}\n")
        (tmp_path / "takedowns.txt").write_text(f"pdq:{pdq_hex(_jpeg(photos[1]))}\npdq:{pdq_hex(_jpeg(photos[2]))}\n"
                                                f"url_sha256:{sha256_hex(b'http://example.com/never')}\n")
        res = run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out"), pipeline="download",
                             executor="local", progress=False,
                             overrides={"download.allow_private_network": True, "blocklist.enabled": True,
                                        "blocklist.lists": [str(tmp_path / "csam-hashes.txt"),
                                                            str(tmp_path / "takedowns.txt")]}))
    rows = {r["url"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    blocked = {u for u, r in rows.items() if r["status"] == "blocked_content"}
    assert blocked == set(urls[:3]) and res.totals["blocked_content"] == 3
    assert rows[urls[0]]["error_message"] == "on blocklist 'csam-hashes' (sha256)"
    assert rows[urls[2]]["error_message"].startswith("on blocklist 'takedowns' (pdq distance ")
    assert all(rows[u]["image"] is None for u in blocked)
    assert all(rows[u]["status"] == "success" and rows[u]["image"] for u in urls[3:])


def test_url_hash_list_blocks_by_url():
    url = "http://127.0.0.1:9/secret.jpg"
    stage = BlocklistStage(BlocklistConfig())

    stage._lists = Blocklists(exact={"sha256": {}, "url_sha256": {hashlib.sha256(url.encode()).hexdigest(): "urls"}})
    assert stage.match(url, b"", None) == "on blocklist 'urls' (url_sha256)"
    assert stage.match(url + "x", b"", None) is None


def _served_run(tmp_path, bodies: dict[str, bytes], overrides: dict) -> dict[str, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    srv = ImageServer()
    for name, body in bodies.items():
        srv.add_route(f"/{name}", lambda req, body=body: srv._send(req, 200, body, "image/jpeg"))
    with srv:
        urls = [srv.url(n) for n in bodies]
        pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), tmp_path / "in.parquet")
        run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out"), pipeline="download",
                       executor="local", progress=False,
                       overrides={"download.allow_private_network": True, **overrides}))
    rows = {r["url"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    return {n: rows[u] for n, u in zip(bodies, urls)}


def test_decontamination_flags_exactly_the_eval_images_copies(tmp_path):
    """10 of the 79 COCO photos are the eval set; the input holds resized/re-encoded copies of them
    among the other 69 photos: all 10 copies are flagged, no other row is."""
    eval_dir = tmp_path / "coco-test"
    eval_dir.mkdir()
    for p in COCO[:10]:
        (eval_dir / p.name).write_bytes(p.read_bytes())
    served = {}
    for i, p in enumerate(COCO):
        im = Image.open(p)
        served[f"p{i}.jpg"] = _jpeg(im, size=200 + 7 * (i % 10), quality=60 + 3 * (i % 10)) if i < 10 else p.read_bytes()
    rows = _served_run(tmp_path, served, {"decontam.enabled": True, "decontam.eval_sets": [str(eval_dir)]})
    names = list(served)
    flagged = [n for n in names if rows[n]["status"] == "contaminated"]
    assert flagged == names[:10]
    assert all(rows[n]["status"] == "success" for n in names[10:])
    assert rows[names[3]]["error_message"].startswith(f"copy of evaluation image coco-test/{COCO[3].name} (cosine ")


def test_nsfw_detector_flags_none_of_the_bundled_photos(tmp_path):
    rows = _served_run(tmp_path, {p.name: p.read_bytes() for p in COCO}, {"safety.enabled": True})
    assert [n for n, r in rows.items() if r["status"] != "success"] == []
    scores = [r["nsfw_score"] for r in rows.values()]
    assert all(0.0 <= s < 0.6 for s in scores) and max(scores) > 0.3  # the detector ran (one false positive 0.58)
    assert any("FACE_FEMALE" in r["nsfw_classes"] for r in rows.values())


def test_nsfw_path_end_to_end_with_a_detector_class_as_the_positive(tmp_path):
    """No explicit image is needed to test the path: count the detector's face classes instead. The
    rows flagged are exactly those where NudeNet, called directly on the stored (resized) image of a
    plain run, sees a face at >= 0.7; their bytes are dropped, the others kept."""
    from nudenet import NudeDetector

    bodies = {p.name: p.read_bytes() for p in COCO[:40]}
    plain = _served_run(tmp_path / "plain", bodies, {})
    det = NudeDetector()
    expected = sorted(n for n, r in plain.items()
                      if any(d["class"] in ("FACE_FEMALE", "FACE_MALE") and d["score"] >= 0.7
                             for d in det.detect(r["image"])))
    assert expected  # some photos have a clear face
    rows = _served_run(tmp_path / "safe", bodies, {"safety.enabled": True, "safety.classes": ["FACE_FEMALE", "FACE_MALE"],
                                                   "safety.threshold": 0.7})
    flagged = sorted(n for n, r in rows.items() if r["status"] == "nsfw")
    assert flagged == expected
    assert all(rows[n]["image"] is None and rows[n]["error_message"].startswith("NSFW detector: FACE_")
               for n in flagged)
    assert all(r["image"] and r["status"] == "success" for n, r in rows.items() if n not in flagged)


def test_a_missing_filter_package_is_named_before_work():
    from capfilt.stages.base import require_package

    with pytest.raises(ConfigError, match=r"langid.enabled needs the no-such-pkg-xyz package: pip install 'capfilt\[filters\]'"):
        require_package("no_such_pkg_xyz", "langid.enabled")
    require_package("pyarrow", "anything")  # installed: no error
