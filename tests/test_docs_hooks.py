"""docs/hooks.md documents every hook and every field of the growth types, argument by argument."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import arbor_plugins
from arbor_plugins import hookspecs

DOC = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"


def sections() -> dict[str, str]:
    """Heading text of every ``###`` section -> its body."""
    parts = re.split(r"^### (.+)$", DOC.read_text(), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def documented(body: str) -> set[str]:
    """Names a section documents: the backticked names that open its bullets (``- `a`, `b` (...)``)."""
    names = set()
    for line in re.findall(r"^- (.+)$", body, re.M):
        lead = re.match(r"((?:`[\w()]+`(?:, | / )?)+)", line)
        if lead:
            names |= {n.rstrip("()") for n in re.findall(r"`([\w()]+)`", lead.group(1))}
    return names


def hook_specs() -> dict[str, list[str]]:
    return {name: list(inspect.signature(fn).parameters) for name, fn in vars(hookspecs).items()
            if name.startswith("arbor_") and callable(fn)}


def test_every_hook_has_a_section_with_its_signature_and_every_argument():
    found = sections()
    specs = hook_specs()
    assert len(specs) >= 8
    for name, args in specs.items():
        heading = f"`{name}({', '.join(args)})`"
        assert heading in found, f"docs/hooks.md has no section {heading}"
        assert documented(found[heading]) >= set(args), f"{name}: arguments without a bullet"
        assert "Returns" in found[heading], f"{name}: the section does not say what it returns"


def test_the_page_documents_no_hook_that_does_not_exist():
    hooks = {h for h in re.findall(r"^### `(arbor_\w+)\(", DOC.read_text(), re.M)}
    assert hooks == set(hook_specs())


def test_every_field_of_the_growth_types_is_documented():
    found = sections()
    types = {
        "`GrowthEvent`": [f.name for f in dataclasses.fields(arbor_plugins.GrowthEvent)],
        "`ResizedParameter`": [f.name for f in dataclasses.fields(arbor_plugins.ResizedParameter)],
        "`Decision`": [f.name for f in dataclasses.fields(arbor_plugins.Decision)],
        "`GrowthSpec`": list(arbor_plugins.GrowthSpec.model_fields),
    }
    for heading, fields in types.items():
        missing = set(fields) - documented(found[heading])
        assert not missing, f"{heading}: fields {sorted(missing)} are not documented"


def test_the_types_are_the_ones_core_uses():
    import arbor.growth.operators
    import arbor.growth.step

    assert arbor.growth.operators.GrowthEvent is arbor_plugins.GrowthEvent
    assert arbor.growth.operators.ResizedParameter is arbor_plugins.ResizedParameter
    assert arbor.growth.step.GrowthSpec is arbor_plugins.GrowthSpec
    assert issubclass(arbor.growth.operators.GrowthError, arbor_plugins.UserError)
    assert issubclass(arbor.model.config.ArborConfigError, arbor_plugins.UserError)
