"""Built-in insertion policies: where depth growth puts new layers."""

from __future__ import annotations

from arbor_plugins import InsertionPolicy


class MiddlePolicy(InsertionPolicy):
    description = "all new layers at the middle of the stack, len(layers) // 2 (Arbor's rule)"

    def positions(self, model, num_layers: int, settings) -> list[int]:
        return [model.config.num_hidden_layers // 2] * num_layers


class EndPolicy(InsertionPolicy):
    description = "append new layers on top of the stack (progressive stacking, PGT)"

    def positions(self, model, num_layers: int, settings) -> list[int]:
        return [model.config.num_hidden_layers] * num_layers


class SpreadPolicy(InsertionPolicy):
    description = "one new layer after every len(layers) / num_layers old layers, spread evenly"

    def positions(self, model, num_layers: int, settings) -> list[int]:
        n = model.config.num_hidden_layers
        return [round((k + 1) * n / (num_layers + 1)) for k in range(num_layers)]


INSERTION_POLICIES = {"middle": MiddlePolicy(), "end": EndPolicy(), "spread": SpreadPolicy()}
