"""docs/plugins.md must keep telling the truth: every Python block on it runs, in page order.

A Python block whose first line names a module (``# below_top.py``) is installed
as a plugin distribution (a ``*.dist-info`` with an ``arbor`` entry point, named
by the page's ``pyproject.toml`` block when one names that module). A TOML
block whose first line names a file (``# plugins.toml``) is written into the
working directory of every later block. Every other Python block runs as a
script in a fresh directory, with every plugin installed so far loaded;
``# tests/...`` blocks also have their ``test_*`` functions called. Finally the
conformance kit checks every component the page's plugins register.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

from arbor.plugins import plugin_infos, reset_plugins
from arbor_plugins.settings import parse_plugins_toml
from arbor_plugins.testing import check_plugin, tiny_model
from test_plugins import make_dist

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str | None, str]]:
    """(language, the file its first line names or None, code) for every fenced block."""
    found = []
    for lang, code in BLOCK.findall(DOC.read_text()):
        first = code.splitlines()[0] if code else ""
        named = first[2:].strip() if re.fullmatch(r"# [\w/.-]+\.(py|toml)", first) else None
        found.append((lang, named, code))
    return found


def distributions() -> dict[str, tuple[str, str]]:
    """module -> (distribution, entry point), from the page's pyproject.toml blocks."""
    names = {}
    for lang, named, code in blocks():
        if lang == "toml" and named == "pyproject.toml":
            data = tomllib.loads(code)
            for entry_point, module in data["project"]["entry-points"]["arbor"].items():
                names[module] = (data["project"]["name"], entry_point)
    return names


def test_the_page_has_the_blocks_it_promises():
    named = {n for _, n, _ in blocks() if n}
    assert {"below_top.py", "pyproject.toml", "plugins.toml", "tests/test_below_top.py", "tests/conftest.py"} <= named
    text = DOC.read_text()
    for word in ("arbor_register", "arbor_pre_forward_stats", "arbor_grow_width", "arbor_grow_depth", "arbor_freeze",
                 "arbor_rope_config", "ARBOR_LOAD_PLUGINS", "ARBOR_STRICT_PLUGINS", "examples/arbor-strategy-example"):
        assert word in text, word
    for kind in ("trigger", "insertion_policy", "init_scheme", "freeze_policy", "substrate", "attention_backend",
                 "rope_scaling"):
        assert f"### {kind}" in text, kind


def test_plugins_toml_examples_follow_the_schema():
    tables = [code for lang, named, code in blocks() if lang == "toml" and named != "pyproject.toml"]
    assert len(tables) >= 3
    for code in tables:
        parse_plugins_toml(code)


def test_every_python_block_runs(tmp_path, monkeypatch, fresh_plugins):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    dists = distributions()
    files: dict[str, str] = {}
    modules: list[str] = []
    try:
        for n, (lang, named, code) in enumerate(blocks()):
            if lang == "toml" and named and named != "pyproject.toml":
                files[named] = code
            if lang != "python":
                continue
            if named and "/" not in named:  # a plugin module: install it as a distribution
                module = named.removesuffix(".py")
                dist, entry_point = dists.get(module, (module.replace("_", "-"),) * 2)
                make_dist(site, dist, code, module=module, entry_point=entry_point)
                modules.append(module)
                continue
            where = tmp_path / f"block-{n}"
            where.mkdir()
            for name, text in files.items():
                (where / name).write_text(text)
            monkeypatch.chdir(where)
            importlib.invalidate_caches()
            reset_plugins()
            namespace = {"__name__": f"docs_plugins_block_{n}"}
            try:
                exec(compile(code, f"docs/plugins.md (block {n}: {named or 'script'})", "exec"), namespace)
                for name, test in list(namespace.items()):
                    if name.startswith("test_") and callable(test):
                        fixtures = {"arbor_tiny_model": tiny_model}
                        test(**{p: fixtures[p]() for p in inspect.signature(test).parameters})
            except Exception as exc:
                raise AssertionError(f"docs/plugins.md block {n} ({named or 'script'}) fails: {exc!r}") from exc

        # Every component the page's plugins register keeps the contract.
        reset_plugins()
        ours = {dists.get(m, (m.replace("_", "-"),))[0] for m in modules}
        infos = [i for i in plugin_infos() if i["distribution"] in ours]
        assert not [i["error"] for i in infos if "error" in i]
        checked = [(r.kind, r.name) for i in infos if i["components"] for r in check_plugin(i["distribution"])]
        assert len(checked) == 7 and {kind for kind, _ in checked} == {
            "insertion_policy", "trigger", "init_scheme", "freeze_policy", "substrate", "attention_backend",
            "rope_scaling"}
    finally:
        for module in modules:
            sys.modules.pop(module, None)
        reset_plugins()
