"""Input discovery and reading on the real sample files (tests/fixtures/meta)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.config import InputConfig
from capfilt.errors import InputError
from capfilt.io.reader import inspect_inputs, key_to_position, passthrough_fields, read_rows


def test_laion_parquet_columns_found_case_insensitively(fixtures):
    (f,) = inspect_inputs([str(fixtures / "meta/test_1000.parquet")], InputConfig())
    assert (f.url_col, f.caption_col, f.num_rows, f.format) == ("URL", "TEXT", 1000, "parquet")
    assert f.passthrough == ()  # pandas' __index_level_0__ is dropped
    t = read_rows(f, 0, 1000)
    assert t.column_names == ["key", "url", "caption", "_row"]
    assert t.column("key").to_pylist()[:2] == ["0000_000000000", "0000_000000001"]
    src = pq.read_table(fixtures / "meta/test_1000.parquet")
    assert t.column("url").to_pylist() == src.column("URL").to_pylist()
    assert t.column("caption").to_pylist() == src.column("TEXT").to_pylist()


def test_txt_url_list_keeps_commas(fixtures):
    (f,) = inspect_inputs([str(fixtures / "meta/test_10000.txt")], InputConfig())
    assert f.format == "txt" and f.num_rows == 10000 and f.caption_col is None
    urls = read_rows(f, 0, 10000).column("url").to_pylist()
    assert sum("," in u for u in urls) == 267  # no delimiter parsing (INSPECTION.md)
    assert "UNLIKELY" in urls


def test_slices_and_skip(fixtures):
    (f,) = inspect_inputs([str(fixtures / "meta/test_10000.parquet")], InputConfig())
    t = read_rows(f, 4670, 4680, frozenset({4671, 4672}))
    assert t.num_rows == 8
    assert t.column("_row").to_pylist() == [4670, 4673, 4674, 4675, 4676, 4677, 4678, 4679]
    row = t.to_pylist()[2]
    assert (row["url"], row["caption"]) == ("UNLIKELY", "0.32893747091293335")
    assert key_to_position(row["key"]) == (0, 4674)


def test_csv_tsv_jsonl_with_and_without_header(tmp_path):
    (tmp_path / "a.csv").write_text('url,caption,extra\n"http://x/a,b.jpg",hello,1\nhttp://x/c.jpg,"q, r",2\n')
    (tmp_path / "b.tsv").write_text("http://x/d.jpg\tcap\twith \"quote\nhttp://x/e.jpg\tcap2\tz\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"URL": "http://x/f.jpg", "TEXT": "t"}) + "\n\n")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden.csv").write_text("junk")
    (tmp_path / "part.crc").write_text("junk")
    files = inspect_inputs([str(tmp_path)], InputConfig())
    assert [f.uri.rsplit("/", 1)[-1] for f in files] == ["a.csv", "b.tsv", "c.jsonl"]
    a, b, c = (read_rows(f, 0, f.num_rows) for f in files)
    assert a.column("url").to_pylist() == ["http://x/a,b.jpg", "http://x/c.jpg"]
    assert a.column("caption").to_pylist() == ["hello", "q, r"]
    assert a.column("extra").to_pylist() == ["1", "2"]
    assert b.column("url").to_pylist() == ["http://x/d.jpg", "http://x/e.jpg"]  # no header detected
    assert c.column("caption").to_pylist() == ["t"]
    # keys are unique across files: file index prefix
    keys = a.column("key").to_pylist() + b.column("key").to_pylist() + c.column("key").to_pylist()
    assert len(set(keys)) == 5 and keys[2].startswith("0001_")


def test_missing_url_column_names_file_columns_and_flag(fixtures):
    with pytest.raises(InputError) as e:
        inspect_inputs([str(fixtures / "meta/invalid_utf8.parquet")], InputConfig())
    msg = str(e.value)
    assert "invalid_utf8.parquet" in msg and "invalid_string" in msg and "--url-col" in msg


def test_invalid_utf8_is_replaced_not_crashing(fixtures):
    (f,) = inspect_inputs([str(fixtures / "meta/invalid_utf8.parquet")], InputConfig(url_col="invalid_string"))
    assert read_rows(f, 0, 1).column("url").to_pylist() == ["\ufffd\ufffd\ufffd"]


def test_unreadable_and_lfs_pointer_parquet(tmp_path, fixtures):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="broken.parquet is not a readable Parquet file"):
        inspect_inputs([str(tmp_path / "broken.parquet")], InputConfig())
    lfs = tmp_path / "lfs.parquet"
    lfs.write_bytes((fixtures / "tricky/lfs_pointer_1000268201_693b08cb0e.jpg").read_bytes())
    with pytest.raises(InputError, match="Git-LFS pointer"):
        inspect_inputs([str(lfs)], InputConfig())
    with pytest.raises(InputError, match="does not exist"):
        inspect_inputs([str(tmp_path / "nope.parquet")], InputConfig())


def test_passthrough_and_collisions(tmp_path):
    pq.write_table(pa.table({"url": ["u"], "txt": ["c"], "status": ["x"], "WIDTH": [3]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"url": ["u"], "txt": ["c"], "status": ["y"], "WIDTH": [None]}, ), tmp_path / "b.parquet")
    files = inspect_inputs([str(tmp_path)], InputConfig())
    fields = passthrough_fields(files)
    assert [f.name for f in fields] == ["status_input", "WIDTH"]
    row = read_rows(files[0], 0, 1).to_pylist()[0]
    assert row["status_input"] == "x" and row["WIDTH"] == 3 and row["caption"] == "c"
    only = inspect_inputs([str(tmp_path)], InputConfig(keep_columns=["WIDTH"]))
    assert [n for _, n, _ in only[0].passthrough] == ["WIDTH"]
    with pytest.raises(InputError, match="--keep-columns"):
        inspect_inputs([str(tmp_path)], InputConfig(keep_columns=["nope"]))


def test_coco_caption_json_one_row_per_annotation(fixtures):
    (f,) = inspect_inputs([str(fixtures / "coco/captions_val2017.json")], InputConfig())
    assert f.format == "coco" and f.num_rows == 395
    t = read_rows(f, 0, 395)
    rows = t.to_pylist()
    assert all(r["url"].startswith("http://images.cocodataset.org/") for r in rows)
    assert len({r["image_id"] for r in rows}) == 79
    # real quirks survive untouched: a caption with a newline, trailing spaces
    assert any("\n" in r["caption"] for r in rows) and any(r["caption"].endswith(" ") for r in rows)
    assert {"image_id", "annotation_id", "file_name", "flickr_url"} <= set(t.column_names)


CC3M_ROWS = [("a dog on a beach", "http://x/dog.jpg"), ("city at night, lights", "https://x/city.jpg"),
             ("quote \"inside\" text", "http://x/q.jpg")]


@pytest.mark.parametrize("cfg", [InputConfig(), InputConfig(url_col="1", caption_col="0", csv_header=False),
                                 InputConfig(url_col=1, caption_col=0)], ids=["auto", "flags", "ints"])
def test_headerless_caption_first_tsv_like_cc3m(tmp_path, cfg):
    """CC3M ships ``caption<TAB>url`` without a header: found by content, or named by position."""
    (tmp_path / "cc3m.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in CC3M_ROWS))
    (f,) = inspect_inputs([str(tmp_path / "cc3m.tsv")], cfg)
    assert (f.has_header, f.num_rows, f.url_col, f.caption_col, f.passthrough) == (False, 3, "col1", "col0", ())
    t = read_rows(f, 0, 3)
    assert t.column("url").to_pylist() == [u for _, u in CC3M_ROWS]
    assert t.column("caption").to_pylist() == [c for c, _ in CC3M_ROWS]


def test_headerless_url_first_csv_keeps_extra_columns_by_position(tmp_path):
    (tmp_path / "a.csv").write_text('http://x/a.jpg,"a, b",7\nhttp://x/b.jpg,c,8\n')
    (f,) = inspect_inputs([str(tmp_path / "a.csv")], InputConfig())
    assert (f.url_col, f.caption_col, [n for _, n, _ in f.passthrough]) == ("col0", "col1", ["col2"])
    assert read_rows(f, 0, 2).to_pylist()[0]["caption"] == "a, b"


def test_column_positions_in_a_file_with_header(tmp_path):
    """A digit string that is no column's name is a 0-based position; a column named "1" wins."""
    pq.write_table(pa.table({"txt_a": ["t"], "link": ["http://x/a.jpg"], "1": ["n"]}), tmp_path / "a.parquet")
    (f,) = inspect_inputs([str(tmp_path / "a.parquet")], InputConfig(url_col="1", caption_col="0"))
    assert (f.url_col, f.caption_col) == ("1", "txt_a")
    (f,) = inspect_inputs([str(tmp_path / "a.parquet")], InputConfig(url_col=1, caption_col="0"))
    assert (f.url_col, f.caption_col) == ("link", "txt_a")
    with pytest.raises(InputError, match=r"--url-col 7 was not found.*POSITION \(0-based\)"):
        inspect_inputs([str(tmp_path / "a.parquet")], InputConfig(url_col=7))


def test_mostly_invalid_urls_warn_at_inspection(tmp_path, caplog):
    """Reading captions as URLs (the old headerless naming) must not pass silently."""
    rows = [f"caption {i}\thttp://x/{i}.jpg\n" for i in range(10)]
    (tmp_path / "wrong.tsv").write_text("".join(rows))
    with caplog.at_level("WARNING", logger="capfilt.io.reader"):
        (f,) = inspect_inputs([str(tmp_path / "wrong.tsv")], InputConfig(url_col=0, caption_col=1, csv_header=False))
    (rec,) = [r for r in caplog.records if "not http(s) URLs" in r.getMessage()]
    msg = rec.getMessage()
    assert "wrong.tsv" in msg and "100% of the first 10 values" in msg and "'col0'" in msg and "--url-col" in msg
    caplog.clear()
    with caplog.at_level("WARNING", logger="capfilt.io.reader"):
        inspect_inputs([str(tmp_path / "wrong.tsv")], InputConfig())
    assert not [r for r in caplog.records if "not http(s) URLs" in r.getMessage()]


def test_same_file_through_a_symlink_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/a.csv").write_text("url,caption\nhttp://x/a.jpg,a\n")
    (tmp_path / "link.csv").symlink_to(tmp_path / "data/a.csv")
    with pytest.raises(InputError, match="given twice"):
        inspect_inputs([str(tmp_path / "data"), str(tmp_path / "link.csv")], InputConfig())
    with pytest.raises(InputError, match="given twice"):
        inspect_inputs([str(tmp_path / "data/a.csv"), str(tmp_path / "data/../link.csv")], InputConfig())


def test_an_image_given_as_input_is_named_as_an_image(tmp_path):
    from capfilt.config import InputConfig
    from capfilt.errors import InputError
    from capfilt.io.reader import inspect_inputs

    (tmp_path / "photo.JPG").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(InputError, match=r"photo.JPG is an image, but --input takes metadata.*file:// URLs"):
        inspect_inputs([str(tmp_path / "photo.JPG")], InputConfig())


def test_no_url_column_in_an_auto_header_text_file_suggests_csv_header_false(tmp_path):
    """A headerless TSV whose first line has no http(s) URL is read as having a header; the message
    must say how to keep that first line as data (found by a fresh-clone trial)."""
    from capfilt.config import InputConfig
    from capfilt.errors import InputError
    from capfilt.io.reader import inspect_inputs

    (tmp_path / "x.tsv").write_text("not a url\tftp://example.com/x.jpg\na cat\thttp://h/a.jpg\n")
    with pytest.raises(InputError, match=r"no URL column found.*--csv-header false"):
        inspect_inputs([str(tmp_path / "x.tsv")], InputConfig())
    files = inspect_inputs([str(tmp_path / "x.tsv")], InputConfig(csv_header=False, url_col=1, caption_col=0))
    assert files[0].num_rows == 2
