"""Built-in insertion policies (where depth growth puts new layers) and freeze
policies (what trains after a growth step)."""

from __future__ import annotations

from pydantic import Field

from arbor_plugins import FreezePolicy, InsertionPolicy, StrictSettings


# ------------------------------------------------------------------ insertion
class MiddlePolicy(InsertionPolicy):
    description = "all new layers at the middle of the stack, len(layers) // 2 (Arbor's rule)"

    def positions(self, model, num_layers: int, settings) -> list[int]:
        return [model.config.num_hidden_layers // 2] * num_layers


class TopPolicy(InsertionPolicy):
    description = "append new layers on top of the stack (PGT's constructive training)"

    def positions(self, model, num_layers: int, settings) -> list[int]:
        return [model.config.num_hidden_layers] * num_layers


class BottomPolicy(InsertionPolicy):
    description = "new layers first, right after the embedding"

    def positions(self, model, num_layers: int, settings) -> list[int]:
        return [0] * num_layers


class InterleaveSettings(StrictSettings):
    #: A new layer goes after every ``every``-th old layer, from the bottom, wrapping round.
    every: int = Field(1, ge=1)


class InterleavePolicy(InsertionPolicy):
    description = "one new layer after every m-th old layer (setting every), from the bottom"
    Settings = InterleaveSettings

    def positions(self, model, num_layers: int, settings: InterleaveSettings) -> list[int]:
        n = model.config.num_hidden_layers
        slots = list(range(settings.every, n + 1, settings.every)) or [n]
        return sorted(slots[k % len(slots)] for k in range(num_layers))


class StackPolicy(InsertionPolicy):
    description = "new layers on top, in the order of the stack they repeat (G_stack; pair with init 'stack')"

    def positions(self, model, num_layers: int, settings) -> list[int]:
        return [model.config.num_hidden_layers] * num_layers


INSERTION_POLICIES = {
    "middle": MiddlePolicy(),
    "top": TopPolicy(),
    "bottom": BottomPolicy(),
    "interleave": InterleavePolicy(),
    "stack": StackPolicy(),
}


# --------------------------------------------------------------------- freeze
class NoFreeze(FreezePolicy):
    description = "everything keeps training"

    def apply(self, model, event, settings, optimizer=None) -> list[str]:
        return []


class FreezeBelowSettings(StrictSettings):
    #: Keep the final norm trainable with the head.
    train_norm: bool = True


class FreezeBelow(FreezePolicy):
    description = "after depth growth, freeze the embeddings and every older layer; new layers and the head train (PGT)"
    Settings = FreezeBelowSettings

    def apply(self, model, event, settings: FreezeBelowSettings, optimizer=None) -> list[str]:
        if event.axis != "depth":
            return []  # widening keeps training everything: there are no "new layers" to isolate
        new = set(event.layers)
        old = [i for i in range(model.config.num_hidden_layers) if i not in new]
        selectors = [f"layers:{','.join(map(str, old))}"] if old else []
        tied = model.lm_head.weight is getattr(model.model.embed_tokens, "weight", None)
        if not tied:  # with tied embeddings the head IS the embedding matrix, and the head trains
            selectors.append("embeddings")
        if not settings.train_norm:
            selectors.append("norm")
        if not selectors:
            return []
        return model.freeze(*selectors, optimizer=optimizer)  # new layers are trainable as inserted


class LoraBelowSettings(StrictSettings):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    #: Projections of the older layers that get adapters.
    targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    #: Freeze the embeddings too (unless tied to the head), as PGT does.
    freeze_embeddings: bool = True


class LoraBelow(FreezePolicy):
    description = "after depth growth, older layers learn only through LoRA adapters (peft); new layers train fully"
    Settings = LoraBelowSettings

    def apply(self, model, event, settings: LoraBelowSettings, optimizer=None) -> list[str]:
        from arbor.growth.lora import add_lora

        if event.axis != "depth":
            return []
        new = set(event.layers)
        old = [i for i in range(model.config.num_hidden_layers) if i not in new]
        before = {n for n, p in model.named_parameters() if p.requires_grad}
        tied = model.lm_head.weight is getattr(model.model.embed_tokens, "weight", None)
        if settings.freeze_embeddings and not tied:
            model.freeze("embeddings", optimizer=optimizer)
        if old:  # all of an older layer freezes (its norms too); its projections then learn through adapters
            model.freeze(f"layers:{','.join(map(str, old))}", optimizer=optimizer)
        add_lora(model, old, r=settings.r, alpha=settings.alpha, dropout=settings.dropout,
                 targets=tuple(settings.targets), optimizer=optimizer)
        after = {n.replace(".base_layer.", "."): p.requires_grad for n, p in model.named_parameters()}
        return sorted(n for n in before if after.get(n) is False)


FREEZE_POLICIES = {"none": NoFreeze(), "freeze-below": FreezeBelow(), "lora-below": LoraBelow()}
