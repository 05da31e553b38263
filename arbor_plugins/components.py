"""What each kind of component must provide.

These are small base classes rather than bare protocols so a plugin author can
subclass one and fill in only what differs; arbor checks the attributes, not
the ancestry, so duck-typed components work too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover - types only
    import torch
    from torch import nn
    from transformers import PreTrainedConfig

    from arbor_plugins.growth import GrowthEvent


class StrictSettings(BaseModel):
    """Base for a component's settings model: an unknown key is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class NoSettings(StrictSettings):
    """Settings model of a component that takes none: any key is an error."""


class Component:
    """Common ground: a one-line description and a pydantic settings model."""

    #: Shown by ``arbor plugins``.
    description: ClassVar[str] = ""
    #: Validates the component's table in ``plugins.toml`` (and ``substrate_settings``).
    Settings: ClassVar[type[BaseModel]] = NoSettings

    @classmethod
    def validate_settings(cls, settings: dict[str, Any] | None) -> BaseModel:
        return cls.Settings.model_validate(settings or {})

    def describe(self, settings: BaseModel) -> str:
        """``description`` as it applies to ``settings`` on this machine (a substrate may name the
        font it found there, say); ``arbor plugins`` and ``arbor presets`` show it."""
        return self.description


class Substrate(Component):
    """Turns token ids into the model's input vectors.

    ``build`` returns the module installed as ``model.embed_tokens``. It is
    called with ``input_ids`` of shape ``(batch, seq)`` and returns
    ``(batch, seq, hidden_size)``. It must expose ``weight``: a
    ``(vocab_size, hidden_size)`` tensor (a parameter for trainable substrates,
    a buffer for frozen ones) so that the export can write it as an ordinary
    embedding matrix and tied heads can share it.
    """

    #: A frozen substrate has no trainable parameters and never gets gradients.
    frozen: ClassVar[bool] = False

    def build(self, config: PreTrainedConfig, settings: BaseModel) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def default_tokenizer(self, settings: BaseModel) -> Any:
        """The tokenizer this substrate's ids assume, or None when any tokenizer will do.

        ``arbor train`` (with ``tokenizer = "auto"``, the default) uses it
        instead of training a BPE tokenizer.
        """
        return None


class AttentionBackend(Component):
    """An attention kernel reachable through transformers' attention interface.

    ``implementation`` is the key of ``transformers.AttentionInterface`` that
    runs it (``"eager"``, ``"sdpa"``, ``"flex_attention"``,
    ``"flash_attention_2"``, or a key the plugin registered there itself).
    """

    implementation: ClassVar[str] = "eager"

    def is_available(self) -> tuple[bool, str]:
        """Whether it can run here, and if not, why (shown to the user)."""
        return True, ""


class InitScheme(Component):
    """How the new parts of a growth step start.

    The growth operators first build the new parts the "zero" way (whatever a
    new unit writes into the residual stream is zero, so the model's function
    is unchanged); ``initialize`` then rewrites them in place. It receives the
    `arbor_plugins.GrowthEvent` of the step, whose ``resized`` map says where
    the old values sit inside each grown tensor and whose ``new_parameters``
    lists the parameters of new layers. It may also fill
    ``event.moment_scales`` / ``event.moment_sources`` so the optimizer
    carry-over treats duplicated units as Staged Training does.

    ``exact`` is a promise checked by the conformance kit: with an exact
    scheme the grown model computes the same function (same logits) as before.
    """

    #: Whether the grown model computes exactly the function it computed before.
    exact: ClassVar[bool] = False
    #: Growth axes the scheme can initialise ("depth", "ffn", "heads", "hidden").
    axes: ClassVar[tuple[str, ...]] = ("depth", "ffn", "heads", "hidden")
    #: Whether new layers are built from existing ones; such a scheme is refused before a model
    #: with no layers grows, since there is nothing to copy.
    copies_layers: ClassVar[bool] = False

    def initialize(self, model: nn.Module, event: GrowthEvent, settings: BaseModel) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def default_positions(self, model: nn.Module, num_layers: int) -> list[int] | None:
        """Where new layers go when the caller names neither positions nor a policy (None: arbor's default)."""
        return None


@dataclass
class Decision:
    """What a trigger decided at one step, with the reason that is logged.

    ``growth`` may name the step to take (a `GrowthSpec` dict, e.g.
    ``{"axis": "depth", "num_layers": 4}``); ``None`` leaves it to the config.
    Every field is JSON-serialisable, so decisions go into logs and checkpoints.
    """

    grow: bool
    reason: str
    growth: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"grow": self.grow, "reason": self.reason, "growth": self.growth}


class TriggerState:
    """The per-run state of a trigger: it observes training and decides when to grow.

    The training loop calls ``observe`` after every optimizer step and
    ``decide`` when it may grow; statistics arrive through
    ``arbor_strategies.stats`` (``layer_utilization(model)``). ``state_dict``
    must be JSON-serialisable so a resumed run decides as the uninterrupted
    one would.
    """

    def observe(self, step: int, tokens: int, loss: float | None, model: nn.Module) -> None:
        """One optimizer step happened (``tokens``: total tokens seen so far)."""

    def decide(self, step: int, tokens: int, model: nn.Module) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError

    def grew(self, step: int, tokens: int, model: nn.Module, event: GrowthEvent) -> None:
        """The model grew (cooldowns start here)."""

    def report(self, step: int, tokens: int, model: nn.Module) -> dict[str, Any]:
        """Figures to add to the training record at each log interval (``metrics.jsonl``), such as the
        measurements the trigger decides on; JSON-serialisable, and none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class Trigger(Component):
    """Decides *when* to grow. The registered object is a factory: each run calls ``start``."""

    def start(self, model: nn.Module, settings: BaseModel) -> TriggerState:  # pragma: no cover - interface
        raise NotImplementedError


class FreezePolicy(Component):
    """Decides which parameters train after a growth step (PGT freezes what came before)."""

    def apply(self, model: nn.Module, event: GrowthEvent, settings: BaseModel, optimizer: Any = None) -> list[str]:  # pragma: no cover
        """Freeze / adapt parts of ``model`` after ``event``; returns the names it froze."""
        raise NotImplementedError


class InsertionPolicy(Component):
    """Where depth growth inserts new layers."""

    def positions(self, model: nn.Module, num_layers: int, settings: BaseModel) -> list[int]:  # pragma: no cover
        """Indices into the current stack (``len(layers)`` appends), one per new layer."""
        raise NotImplementedError


class RopeScaling(Component):
    """A named way to change RoPE parameters before the tables are built."""

    def apply(self, rope_parameters: dict[str, Any], settings: BaseModel) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError


def embedding_matrix(module: nn.Module) -> torch.Tensor:
    """The ``(vocab, hidden)`` matrix a substrate module stands for."""
    weight = getattr(module, "weight", None)
    if weight is None:
        raise TypeError(f"substrate module {type(module).__name__} has no 'weight' tensor")
    return weight
