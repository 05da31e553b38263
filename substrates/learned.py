"""The ordinary trainable embedding matrix."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from torch import nn

from arbor_plugins import Substrate


class LearnedSubstrate(Substrate):
    description = "trainable embedding matrix (nn.Embedding), as in Llama"
    frozen = False

    def build(self, config: Any, settings: BaseModel) -> nn.Module:
        return nn.Embedding(config.vocab_size, config.hidden_size)
