"""Shared pieces of the conformance kit: reports, tiny models, logits, save/load."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import dataclass, field
from typing import Any

from arbor_plugins.growth import AXES  # noqa: F401 - re-exported by arbor_plugins.testing

#: Small configs the checks grow: grouped-query + tied, multi-head + untied, multi-query with one layer.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gqa-tied": dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=4, tie_word_embeddings=True),
    "mha-untied": dict(vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    "mqa-one-layer": dict(vocab_size=24, hidden_size=16, intermediate_size=12, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False),
}
#: Exactness bound at logits of order 1; it scales with the logits' size (fp32 rounding does).
ATOL = 1e-5


@dataclass
class Report:
    """What a check established about one component."""

    kind: str
    name: str
    #: The checks that passed, in words.
    passed: list[str] = field(default_factory=list)
    #: Worth knowing, not failures (a non-exact scheme's logit change, a skipped save/load).
    notes: list[str] = field(default_factory=list)
    #: Init schemes: the declared ``exact`` flag, and the largest logit change per axis.
    exact: bool | None = None
    max_logit_diff: dict[str, float] = field(default_factory=dict)
    #: Triggers: every decision of the loop (``to_dict()`` form), in order.
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.kind} {self.name!r}: {len(self.passed)} checks passed"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Check:
    """Failures name the component; passes are recorded in the report."""

    def __init__(self, kind: str, name: str):
        self.report = Report(kind, name)

    def __call__(self, ok: Any, message: str) -> None:
        if not ok:
            raise AssertionError(f"{self.report.kind} {self.report.name!r}: {message}")

    def passed(self, what: str) -> None:
        self.report.passed.append(what)

    def note(self, what: str) -> None:
        self.report.notes.append(what)

    @contextlib.contextmanager
    def calling(self, what: str):
        """An exception from the component fails the check with its name on it."""
        try:
            yield
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(f"{self.report.kind} {self.report.name!r}: {what} raised "
                                 f"{type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _seeded(seed: int = 0):
    """Deterministic inside, and the caller's RNG state untouched afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_model(config: str | dict[str, Any] = "gqa-tied", seed: int = 0, **overrides: Any):
    """A tiny random `ArborForCausalLM` in eval mode whose logits are of order 1.

    ``config`` names one of :data:`TINY_CONFIGS` or is a dict of config fields.
    Weight matrices are drawn with std 0.2 (the default 0.02 would give logits
    near zero, where any change looks small); buffers are left as built.
    """
    import torch

    from arbor import ArborConfig, ArborForCausalLM

    fields = dict(TINY_CONFIGS[config]) if isinstance(config, str) else dict(config)
    fields = {"max_position_embeddings": 64, **fields, **overrides}
    with _seeded(seed):
        model = ArborForCausalLM(ArborConfig(**fields))
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1:
                    p.normal_(0.0, 0.2)
    return model.eval()


def _inputs(vocab: int, seed: int = 1):
    """Two rows of 8 tokens, the second left-padded by 2."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def _logits(model, ids, mask):
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    model.train(was_training)
    return out[mask.bool()]  # padded positions compute nothing anyone reads


def _greedy(model, ids):
    import torch

    model.eval()
    with torch.no_grad():
        return model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)[0].tolist()


def _diff(a, b) -> tuple[float, float]:
    """(max abs difference, the bound exactness allows for logits like ``a``)."""
    return float((a - b).abs().max()), ATOL * max(1.0, float(a.abs().max()))


def _train_steps(model, optimizer, ids, steps: int = 1) -> float:
    model.train()
    loss = None
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def _hooks(model) -> set[int]:
    return {id(h) for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()}


def _shapes_fit_config(check: _Check, model) -> None:
    """The grown tensors are the ones its config describes: what save -> load relies on."""
    import torch

    model.config.validate_arbor()
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = {k: (have.get(k), want.get(k)) for k in want.keys() | have.keys() if have.get(k) != want.get(k)}
    check(not wrong, f"tensors do not fit the config (name: (model, config)): {dict(sorted(wrong.items())[:4])}")


def _save_load(check: _Check, model, ids, mask, what: str) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            loaded = type(model).from_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    ref = _logits(model, ids, mask)
    diff, bound = _diff(ref, _logits(loaded, ids, mask))
    check(diff <= bound, f"{what}: save_pretrained -> from_pretrained changes the logits by {diff:.3g} (> {bound:.3g})")


def _settings(component: Any, settings: dict[str, Any] | None, check: _Check):
    """Validated settings: ``settings``, else the component's ``example_settings``, else defaults."""
    if settings is None:
        settings = getattr(component, "example_settings", None) or {}
    validate = getattr(component, "validate_settings", None)
    check(callable(validate), "has no validate_settings(); subclass arbor_plugins.Component or provide one")
    try:
        return validate(settings)
    except Exception as exc:
        from pydantic import ValidationError

        from arbor_plugins.settings import describe_validation_error

        why = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise AssertionError(
            f"{check.report.kind} {check.report.name!r}: settings {settings!r} are invalid ({why}); "
            "pass settings= or give the component an example_settings dict"
        ) from None


def _name_of(component: Any) -> str:
    return getattr(component, "name", None) or type(component).__name__


def _resolve(kind: str, component: Any, registry=None) -> tuple[str, Any, bool]:
    """(name, component, registered) for a registered name or a component object."""
    if registry is None:
        from arbor.plugins import get_registry

        registry = get_registry()
    if isinstance(component, str):
        return component, registry.get(kind, component), True
    for entry in registry.entries(kind):
        if entry.component is component:
            return entry.name, component, True
    return _name_of(component), component, False
