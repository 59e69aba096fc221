"""Shared fixtures: paths, the tiny model cache, and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def _capfilt_cache(tmp_path_factory):
    """Build tiny models once per test session into a private cache (never the user's)."""
    if "CAPFILT_CACHE" not in os.environ:
        os.environ["CAPFILT_CACHE"] = str(tmp_path_factory.mktemp("capfilt-cache"))
    yield


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The tests/fixtures folder."""
    return FIXTURES


@pytest.fixture()
def image_server():
    """A real HTTP server on 127.0.0.1 serving tests/fixtures (see tests/helpers/httpserver.py)."""
    from tests.helpers.httpserver import ImageServer

    with ImageServer(root=FIXTURES) as srv:
        yield srv
