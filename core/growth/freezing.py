"""Freezing by selector: stop training parts of a model, and start again.

Progressive training freezes what is already learned (PGT: train layers 1-3,
freeze them, add and train 4-6, ...). Parts are named by *selectors*, as
keyword arguments in Python or as strings in config files, ``plugins.toml``
and on the command line::

    model.freeze("embeddings", "layers:0-2", optimizer=opt)
    model.freeze(all_but_newest=3, optimizer=opt)   # after grow_depth(3): train the new layers only
    model.unfreeze(pattern="model.layers.*.mlp.*")

=========================================  ===============================================
keyword                                    string
=========================================  ===============================================
``embeddings=True``                        ``"embeddings"``
``lm_head=True``                           ``"lm_head"``
``norm=True``                              ``"norm"`` (the final norm)
``layers=2``, ``[0, 2]``, ``range(3)``     ``"layers:2"``, ``"layers:0-2"`` (inclusive), ``"layers:0-2,5"``
``all_but_newest=k``                       ``"all-but-newest:k"``
``newest=k``                               ``"newest:k"``
``pattern="glob"``, ``["g1", "g2"]``       ``"name:glob"`` (fnmatch on parameter names)
(string only)                              ``"all"``: every parameter
=========================================  ===============================================

Several selectors select the union. "Newest" follows
``config.layer_generations`` (the depth-growth step that created each layer),
ties broken by position: a higher index counts as newer; counts larger than
the stack are clamped. With tied embeddings the LM head *is* the embedding
matrix, so ``lm_head`` selects ``model.embed_tokens.weight`` (and a glob on
``lm_head.weight`` matches it).

Frozen means ``requires_grad=False`` on the parameter object. Growth keeps
that: resized tensors are new parameters with the old ``requires_grad``, so a
frozen prefix stays frozen across every growth step, including the slices
growth adds to it (new FFN units, heads or hidden columns of a frozen layer do
not train either; unfreeze the layer if they should). Layers inserted by
``grow_depth`` are trainable whatever surrounds them; the frozen ones keep
their state as their indices shift.

A frozen embedding substrate (its component says ``frozen = True``) keeps its
matrix as a buffer: there is no parameter to freeze or unfreeze, so selecting
its embeddings selects nothing, and asking to unfreeze them is an error.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

import torch

from arbor.growth.optim import _base_group_index, drop_frozen_state
from arbor.plugins import call_hook

__all__ = ["SELECTOR_FORMS", "FreezableMixin", "FreezeError", "freeze", "parse_selector", "select_parameters",
           "unfreeze"]

#: The string selector grammar, quoted in every parse error.
SELECTOR_FORMS = (
    '"embeddings", "lm_head", "norm", "all", "layers:N", "layers:A-B" (inclusive; items may be '
    'comma-separated, "layers:0-2,5"), "all-but-newest:K", "newest:K", "name:GLOB"'
)


class FreezeError(ValueError):
    """A selector that cannot be parsed or resolved, or a part that cannot change state."""


# ------------------------------------------------------------------ resolving
def _names_of(module: torch.nn.Module, canonical: dict[int, str]) -> list[str]:
    """The model's names for ``module``'s parameters (a tied head maps to the embedding)."""
    return [canonical[id(p)] for p in module.parameters() if id(p) in canonical]


def _layer_indices(layers: Any, n: int, field: str) -> list[int]:
    items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
        raise FreezeError(f"{field}={layers!r} is invalid: give a layer index, an iterable of indices or a range")
    items = list(items)
    bad = [i for i in items if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n]
    if bad:
        raise FreezeError(
            f"{field}={layers!r} is invalid: {', '.join(map(repr, bad))} is not a layer index; "
            f"the model has {n} layers, indices 0 to {n - 1}"
        )
    return items


def _count(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FreezeError(f"{field}={value!r} is invalid: must be an integer >= 0 (a number of layers)")
    return value


def _by_age(model) -> list[int]:
    """Layer indices from oldest to newest: by generation, then by position."""
    n = len(model.model.layers)
    gens = list(getattr(model.config, "layer_generations", None) or [])
    if len(gens) != n:  # a config that predates generations: position decides alone
        gens = [0] * n
    return sorted(range(n), key=lambda i: (gens[i], i))


def _parse(selector: Any, n: int) -> dict[str, Any]:
    """One string selector as the keyword arguments it stands for."""
    if not isinstance(selector, str):
        raise FreezeError(f"selector {selector!r} is invalid: selectors are strings, one of {SELECTOR_FORMS}")
    text = selector.strip()
    key, sep, value = text.partition(":")
    key = key.strip().lower().replace("_", "-")
    value = value.strip()

    def bad(why: str) -> FreezeError:
        return FreezeError(f"selector {selector!r} is invalid: {why}; allowed forms: {SELECTOR_FORMS}")

    if key in ("embeddings", "lm-head", "norm", "all"):
        if sep:
            raise bad(f"{key!r} takes no value, got {value!r}")
        return {"lm_head" if key == "lm-head" else key: True}
    if not sep or not value:
        raise bad(f"unknown selector {text!r}" if key not in ("layers", "all-but-newest", "newest", "name")
                  else f"{key!r} needs a value after ':'")
    if key == "name":
        return {"pattern": value}
    if key in ("all-but-newest", "newest"):
        if not re.fullmatch(r"\d+", value):
            raise bad(f"the value {value!r} must be a number of layers (an integer >= 0)")
        return {key.replace("-", "_"): int(value)}
    if key != "layers":
        raise bad(f"unknown selector {key!r}")
    indices: list[int] = []
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if match is None:
            raise bad(f"{item.strip()!r} is not a layer index N or an inclusive range A-B")
        a = int(match[1])
        b = int(match[2]) if match[2] is not None else a
        if a > b:
            raise bad(f"the range {item.strip()!r} runs backwards; write it as {b}-{a}")
        if b >= n:
            raise bad(f"layer {b} is out of range; the model has {n} layers, indices 0 to {n - 1}")
        indices.extend(range(a, b + 1))
    return {"layers": indices}


def parse_selector(selector: Any, num_layers: int) -> dict[str, Any]:
    """Check one string selector against a model of ``num_layers`` layers; returns the keywords it
    stands for (`select_parameters`'), or raises `FreezeError` quoting the grammar."""
    return _parse(selector, num_layers)


def select_parameters(
    model,
    *selectors: str,
    embeddings: bool = False,
    lm_head: bool = False,
    norm: bool = False,
    layers: int | Iterable[int] | None = None,
    all_but_newest: int | None = None,
    newest: int | None = None,
    pattern: str | Iterable[str] | None = None,
) -> list[str]:
    """Names of the parameters the selectors pick, in ``model.named_parameters()`` order.

    ``selectors`` are strings in the grammar of this module's docstring; the
    keywords are their Python form. The result is the union of all of them.
    Giving no selector at all is an error; a selector that could match but
    matches nothing (a glob no parameter name fits) is an error too, while
    one that is empty by its own terms (``layers=[]``, ``newest=0``, the
    embeddings of a frozen substrate) just adds nothing.
    """
    n = len(model.model.layers)
    asked = [item for selector in selectors for item in _parse(selector, n).items()]
    for key, flag in (("embeddings", embeddings), ("lm_head", lm_head), ("norm", norm)):
        if not isinstance(flag, bool):
            raise FreezeError(f"{key}={flag!r} is invalid: must be True or False")
        if flag:
            asked.append((key, True))
    for key, value in (("layers", layers), ("all_but_newest", all_but_newest), ("newest", newest),
                       ("pattern", pattern)):
        if value is not None:
            asked.append((key, value))
    if not asked:
        raise FreezeError(f"no selector given: name what to select, as keywords or as strings ({SELECTOR_FORMS})")

    # Tied tensors appear once in named_parameters(); that first name is the one reported.
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    parts = {"embeddings": model.model.embed_tokens, "lm_head": model.lm_head, "norm": model.model.norm}
    age = _by_age(model)
    picked: set[str] = set()
    for key, value in asked:
        if key == "all":
            picked.update(canonical.values())
        elif key in parts:
            picked.update(_names_of(parts[key], canonical))
        elif key == "pattern":
            picked.update(_match(model, value, canonical))
        else:
            if key == "layers":
                chosen = _layer_indices(value, n, key)
            else:  # a count of layers, clamped: "all but the newest 5" of 3 layers is none of them
                k = min(_count(value, key), n)
                chosen = age[n - k:] if key == "newest" else age[: n - k]
            for i in chosen:
                picked.update(_names_of(model.model.layers[i], canonical))
    return [name for name in canonical.values() if name in picked]


def _match(model, pattern: Any, canonical: dict[int, str]) -> set[str]:
    """Names matching a glob or any of a list of globs; each glob must match something."""
    globs = [pattern] if isinstance(pattern, str) else list(pattern) if isinstance(pattern, Iterable) else None
    if not globs or not all(isinstance(g, str) for g in globs):
        raise FreezeError(f"pattern={pattern!r} is invalid: give an fnmatch glob or a non-empty list of globs")
    # Match every name a tensor goes by, so "lm_head.weight" finds a tied head too.
    every = list(model.named_parameters(remove_duplicate=False))
    found: set[str] = set()
    for glob in globs:
        hits = {canonical[id(p)] for name, p in every if fnmatch.fnmatchcase(name, glob)}
        if not hits:
            example = next(iter(canonical.values()), "")
            raise FreezeError(
                f"pattern {glob!r} matches no parameter of the model; patterns are fnmatch globs on "
                f"parameter names such as {example!r} (see model.named_parameters())"
            )
        found |= hits
    return found


# ------------------------------------------------------------------- changing
def _check_substrate_can_unfreeze(model, selectors: tuple, kw: dict) -> None:
    asked = kw.get("embeddings") is True or any(
        isinstance(s, str) and s.strip().lower() == "embeddings" for s in selectors
    )
    embed = model.model.embed_tokens
    if asked and not any(True for _ in embed.parameters()):
        substrate = getattr(model.config, "substrate", "?")
        raise FreezeError(
            f"embeddings cannot be unfrozen: substrate {substrate!r} is frozen by design (its "
            f"{type(embed).__name__} keeps the embedding matrix as a buffer, not a parameter); "
            "choose a trainable substrate such as 'learned' to train the embeddings"
        )


def freeze(model, *selectors: str, optimizer: torch.optim.Optimizer | None = None, **kw: Any) -> list[str]:
    """Stop training the selected parameters; returns the names that were frozen now.

    Gradients of the frozen parameters are dropped, so no optimizer step moves
    them (not even by weight decay); with ``optimizer``, their state (moments,
    momentum) is dropped too (`arbor.growth.optim.drop_frozen_state`). They stay in
    their param groups, so `unfreeze` needs no optimizer surgery. The
    ``arbor_freeze`` hook fires once with the names whose state changed
    (not at all when every selected parameter was frozen already).
    """
    params = dict(model.named_parameters())
    changed = [n for n in select_parameters(model, *selectors, **kw) if params[n].requires_grad]
    for name in changed:
        params[name].requires_grad_(False)
        params[name].grad = None
    if optimizer is not None:
        drop_frozen_state(optimizer)
    if changed:
        call_hook("arbor_freeze", model=model, names=changed, frozen=True)
    return changed


def unfreeze(model, *selectors: str, optimizer: torch.optim.Optimizer | None = None, **kw: Any) -> list[str]:
    """Train the selected parameters again; returns the names that were unfrozen now.

    Their optimizer state starts from zero. With ``optimizer``, parameters it
    does not hold at all (say, layers that were frozen when growth added them,
    so `arbor.growth.optim.carry_over` left them out) join its largest param group,
    so they train from the next step with that group's settings.
    """
    _check_substrate_can_unfreeze(model, selectors, kw)
    params = dict(model.named_parameters())
    changed = [n for n in select_parameters(model, *selectors, **kw) if not params[n].requires_grad]
    for name in changed:
        params[name].requires_grad_(True)
    if optimizer is not None and optimizer.param_groups:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [params[n] for n in changed if id(params[n]) not in held]
        optimizer.param_groups[_base_group_index(optimizer)]["params"].extend(missing)
    if changed:
        call_hook("arbor_freeze", model=model, names=changed, frozen=False)
    return changed


class FreezableMixin:
    """The freezing methods of `ArborForCausalLM` (see `arbor.growth.freezing` for selectors)."""

    def freeze(self, *selectors: str, optimizer: torch.optim.Optimizer | None = None, **kw: Any) -> list[str]:
        """Stop training the selected parameters; returns the names frozen now."""
        return freeze(self, *selectors, optimizer=optimizer, **kw)

    def unfreeze(self, *selectors: str, optimizer: torch.optim.Optimizer | None = None, **kw: Any) -> list[str]:
        """Train the selected parameters again; returns the names unfrozen now."""
        return unfreeze(self, *selectors, optimizer=optimizer, **kw)

    def frozen_parameters(self) -> list[str]:
        """Names of the parameters with ``requires_grad=False``."""
        return [name for name, p in self.named_parameters() if not p.requires_grad]
