"""``--executor auto``: small inputs and model-free recipes run in this process, larger model runs and named clusters on Ray."""

from __future__ import annotations

import pytest

from capfilt.api import LOCAL_MAX_ROWS, RunOptions, choose_executor
from capfilt.config import load_pipeline


def _opts(**kw) -> RunOptions:
    return RunOptions(inputs=["in.parquet"], output="out", **kw)


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_auto_is_local_up_to_the_limit_and_ray_above_it():
    blip = load_pipeline("blip")
    assert choose_executor(_opts(), blip, 8) == "local"
    assert choose_executor(_opts(), blip, LOCAL_MAX_ROWS) == "local"
    assert choose_executor(_opts(), blip, LOCAL_MAX_ROWS + 1) == "ray"


def test_a_recipe_without_models_is_local_at_any_size_unless_a_cluster_is_named(monkeypatch):
    download = load_pipeline("download")
    assert choose_executor(_opts(), download, 10**6) == "local"  # one process per core for the download
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert choose_executor(_opts(), download, 10**6) == "ray"


def test_a_named_cluster_always_gets_ray(monkeypatch):
    blip = load_pipeline("blip")
    assert choose_executor(_opts(ray_address="auto"), blip, 8) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # what `ray job submit` sets
    assert choose_executor(_opts(), blip, 8) == "ray"


def test_refilter_is_local_and_explicit_choices_are_kept():
    assert choose_executor(_opts(), load_pipeline("refilter"), 10**6) == "local"
    blip = load_pipeline("blip")
    assert choose_executor(_opts(executor="ray"), blip, 1) == "ray"
    assert choose_executor(_opts(executor="local"), blip, 10**6) == "local"
