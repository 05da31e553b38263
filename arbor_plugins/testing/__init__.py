"""Conformance kit: check that a component keeps the contract arbor relies on.

Every check builds tiny random models (logits of order 1), drives the
component through the path arbor drives it through, and raises
``AssertionError`` naming the component, what was checked and the values
found. It works from any test runner::

    from arbor_plugins.testing import check_component, check_init_scheme, check_plugin

    check_init_scheme(MyScheme())                    # an object, registered or not
    check_component("trigger", "my-trigger", settings={"window": 5})
    reports = check_plugin("arbor-strategy-x")       # every component the distribution registers

Each check returns a :class:`Report` of what passed and what is worth
knowing without being a failure (a non-exact init scheme's change of the
logits, a save/load skipped because a scheme installed forward hooks).

With pytest, ``pytest_plugins = ["arbor_plugins.testing"]`` in a
``conftest.py`` adds the fixtures ``arbor_tiny_model`` and ``arbor_registry``.

Settings: a check uses ``settings=`` when given, else the component's optional
``example_settings`` class attribute (a dict; for components whose settings
have required fields, so `check_plugin` can run them unattended), else ``{}``.
What each check covers is in its docstring and in docs/plugins.md.

The kit imports ``torch`` and ``arbor`` inside the checks: ``arbor_plugins``
stays importable without them.
"""

from __future__ import annotations

import re
from typing import Any

from arbor_plugins.testing._common import ATOL, AXES, TINY_CONFIGS, Report, tiny_model  # noqa: F401 - public
from arbor_plugins.testing.growth import check_freeze_policy, check_init_scheme, check_insertion_policy, check_trigger
from arbor_plugins.testing.model import check_attention_backend, check_rope_scaling, check_substrate

__all__ = [
    "TINY_CONFIGS",
    "Report",
    "check_attention_backend",
    "check_component",
    "check_freeze_policy",
    "check_init_scheme",
    "check_insertion_policy",
    "check_plugin",
    "check_rope_scaling",
    "check_substrate",
    "check_trigger",
    "tiny_model",
]

# ------------------------------------------------------------------ dispatch
_CHECKS = {
    "init_scheme": check_init_scheme,
    "insertion_policy": check_insertion_policy,
    "substrate": check_substrate,
    "trigger": check_trigger,
    "freeze_policy": check_freeze_policy,
    "attention_backend": check_attention_backend,
    "rope_scaling": check_rope_scaling,
}


def check_component(kind: str, name: str, settings: dict[str, Any] | None = None) -> Report:
    """Run the check for ``kind`` on the component registered as ``name``."""
    from arbor_plugins.registry import KINDS

    if kind not in _CHECKS:
        raise ValueError(f"unknown component kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return _CHECKS[kind](name, settings=settings)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_plugin(plugin: str, settings: dict[str, dict[str, Any]] | None = None) -> list[Report]:
    """Check every component ``plugin`` registers (a distribution or entry-point name).

    ``settings`` maps a component name (or ``"kind:name"``) to its settings.
    The plugin must have loaded without error and registered something.
    """
    from arbor.plugins import plugin_infos

    wanted = _canonical(plugin)
    infos = [i for i in plugin_infos()
             if wanted in {_canonical(i["distribution"] or ""), _canonical(i["entry_point"] or "")}]
    found = sorted({i["distribution"] for i in plugin_infos() if i["distribution"]})
    if not infos:
        raise AssertionError(f"plugin {plugin!r} is not installed (or ARBOR_LOAD_PLUGINS leaves it out); "
                             f"plugins found: {', '.join(found)}")
    for info in infos:
        if "error" in info:
            raise AssertionError(info["error"])
    components = [(c["kind"], c["name"]) for i in infos for c in i["components"]]
    if not components:
        raise AssertionError(f"plugin {plugin!r} loads but registers no component")
    settings = settings or {}
    reports = []
    for kind, name in components:
        chosen = settings.get(f"{kind}:{name}", settings.get(name))
        reports.append(check_component(kind, name, settings=chosen))
    return reports


# ------------------------------------------------------------ pytest fixtures
try:  # the plain checks above work without pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def arbor_tiny_model():
        """A fresh tiny random model (grouped-query attention, tied embeddings), logits of order 1."""
        return tiny_model("gqa-tied")

    @pytest.fixture
    def arbor_registry():
        """The registry of every loaded plugin's components."""
        from arbor.plugins import get_registry

        return get_registry()
