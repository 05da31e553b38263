"""Shared fixtures and hypothesis profiles.

CI sets ``CI=true`` and gets the bounded ``ci`` profile; ``HYPOTHESIS_PROFILE=heavy``
runs many more examples locally.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("heavy", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Caches (glyph matrices) go to a temporary directory, never the user's ~/.cache."""
    previous = os.environ.get("ARBOR_CACHE_DIR")
    os.environ["ARBOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("arbor-cache"))
    yield
    if previous is None:
        os.environ.pop("ARBOR_CACHE_DIR", None)
    else:
        os.environ["ARBOR_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_plugins(monkeypatch):
    """No plugin environment variables and no cached plugin state, before and after."""
    from arbor.plugins import reset_plugins

    monkeypatch.delenv("ARBOR_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("ARBOR_STRICT_PLUGINS", raising=False)
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture
def site(tmp_path, monkeypatch, fresh_plugins):
    """``install(dist, code, **kw)``: a fake plugin distribution (`test_plugins.make_dist`) on sys.path,
    found by the next plugin load; its module leaves sys.modules afterwards."""
    import importlib
    import sys

    from test_plugins import make_dist

    from arbor.plugins import reset_plugins

    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    written: list[str] = []

    def install(dist, code, **kw):
        written.append(make_dist(root, dist, code, **kw))
        importlib.invalidate_caches()
        reset_plugins()
        return root

    yield install
    for module in written:  # the same module name may be reused by the next test
        sys.modules.pop(module, None)
