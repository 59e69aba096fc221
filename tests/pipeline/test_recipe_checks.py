"""Recipe values as the user typed them, and settings checked together before any work."""

from __future__ import annotations


import pytest

from capfilt.config import ConfigError, load_pipeline


def test_set_keeps_text_fields_as_typed():
    """``--set`` is YAML, but a text field gets the text: no comment cut, no yes->True, no dates."""
    cfg = load_pipeline("blip", ["input.caption_col=text #1", "input.url_col=yes", "caption.prompt=2024-01-01"])
    assert (cfg.input.caption_col, cfg.input.url_col, cfg.caption.prompt) == ("text #1", "yes", "2024-01-01")
    cfg = load_pipeline("blip", ["input.caption_col=null", "input.url_col=1", "input.keep_columns=[a, 'b #2']",
                                 "caption.prompt='a photo of '"])
    assert (cfg.input.caption_col, cfg.input.url_col, cfg.input.keep_columns) == (None, 1, ["a", "b #2"])
    assert cfg.caption.prompt == "a photo of "
    # typed values (what the CLI's named flags pass) are used as given, never re-read as YAML
    cfg = load_pipeline("blip", {"input.caption_col": "null", "input.url_col": "text #1", "caption.prompt": "~"})
    assert (cfg.input.caption_col, cfg.input.url_col, cfg.caption.prompt) == ("null", "text #1", "~")


@pytest.mark.parametrize("override, needles", [
    ("caption.num_captions=yes", ["caption.num_captions", "valid integer", "caption.num_captions='yes'"]),
    ("download.timeout=2024-01-01", ["download.timeout", "valid number", "download.timeout='2024-01-01'"]),
    ("input.url_col=-1", ["input.url_col", "greater than or equal to 0"]),
])
def test_bad_override_is_named_not_blamed_on_the_recipe(override, needles):
    with pytest.raises(ConfigError) as e:
        load_pipeline("blip", [override])
    msg = str(e.value)
    assert f"with overrides {override.split('=')[0]}: invalid configuration" in msg, msg
    assert "Value error" not in msg and all(n in msg for n in needles), msg


@pytest.mark.parametrize("overrides, needles", [
    (["download.encode_format=png"], ["download.encode_format=png", "download.encode_quality", "0-9", "95"]),
    (["download.encode_format=webp", "download.encode_quality=0"], ["download.encode_format=webp", "1-100"]),
    (["download.min_image_size=10000"], ["download.min_image_size=10000", "download.max_image_pixels"]),
    (["download.max_aspect_ratio=0.5"], ["download.max_aspect_ratio", "greater than or equal to 1"]),
    (["dedup.enabled=true", "dedup.exact=false"], ["dedup.enabled", "dedup.exact", "dedup.near"]),
    (["resources.caption.concurrency=[4, 2]"], ["resources.caption", "min is above max"]),
    (["resources.score.concurrency=0"], ["resources.score.concurrency", "greater than or equal to 1"]),
    (["select.include_web=false", "select.include_synthetic=false"], ["select.include_web", "include_synthetic"]),
    (["download.enabled=false"], ["download.enabled is false", "caption.enabled", "score.enabled"]),
    (["caption.enabled=false", "select.include_web=false"], ["select.include_web", "caption.enabled"]),
])
def test_settings_that_contradict_each_other_fail_at_load(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_pipeline("blip", overrides)
    msg = str(e.value)
    assert all(n in msg for n in needles), msg


def test_consistent_settings_load():
    cfg = load_pipeline("blip", ["download.encode_format=png", "download.encode_quality=6",
                                 "resources.caption.concurrency=[1, 4]", "dedup.enabled=true", "dedup.exact=false",
                                 "dedup.near=true"])
    assert (cfg.download.encode_quality, cfg.resources.caption.concurrency) == (6, (1, 4))
    for name in ("blip", "blip2", "download", "refilter"):
        load_pipeline(name)
