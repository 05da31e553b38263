"""What the frozen substrates share: a fixed matrix looked up like an embedding.

The matrix is a *non-persistent* buffer. It is a pure function of the config
(and of files the settings name), so checkpoints do not store it: loading
rebuilds it, and ``model.safetensors`` holds no ``model.embed_tokens.weight``.
There is no parameter, so the optimizer never sees it, no gradient reaches
it, and ``model.unfreeze("embeddings")`` says it cannot be trained.

A substrate computes ``width`` columns (by default the hidden size the model
was built with). Growing the hidden size appends zero columns, which is what
exact growth needs (new residual dimensions start at zero); the original
columns are kept as they are, not recomputed at the new width. The width is
written into ``config.substrate_settings["width"]`` at that moment, so a
grown model saves and loads with the same matrix.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from arbor import ArborConfigError


def on_meta_device() -> bool:
    """Whether new tensors land on the meta device (``with torch.device("meta")``).

    transformers builds models there before loading, and arbor does to count
    parameters or check shapes; nothing is computed then, and
    ``reset_substrate`` fills the matrix once the model holds real memory.
    """
    return torch.empty(0).device.type == "meta"


def check_untied(config: Any, name: str) -> None:
    # A tied head would be the fixed matrix itself: the LM head could not train, and
    # transformers cannot tie a parameter to a buffer anyway.
    if config.tie_word_embeddings:
        raise ArborConfigError(
            "tie_word_embeddings", True,
            f"must be False with the frozen substrate {name!r}: its embedding matrix is a fixed buffer, "
            "so a tied LM head could not train; set tie_word_embeddings=False",
        )


def lift_width(config: Any, settings: BaseModel, name: str) -> int:
    """The number of columns the substrate computes: ``settings.width`` or the hidden size."""
    width = getattr(settings, "width", None)
    if width is None:
        return config.hidden_size
    if width > config.hidden_size:
        raise ArborConfigError(
            "substrate_settings.width", width,
            f"must be <= hidden_size={config.hidden_size} (substrate {name!r} pads columns beyond "
            "its width with zeros, it never drops any)",
        )
    return width


class FrozenEmbedding(nn.Module):
    """Embedding lookup into ``weight``, a fixed ``(vocab, hidden)`` buffer.

    Subclasses implement ``compute()``, returning the ``(vocab, width)``
    float32 matrix on the CPU; columns ``width..hidden`` are zero.
    """

    def __init__(self, config: Any, width: int):
        super().__init__()
        # Kept to record the width in the config when the hidden size grows.
        self.config = config
        self.vocab_size = config.vocab_size
        self.width = width
        self.hidden_size = config.hidden_size
        placeholder = torch.zeros(self.vocab_size, self.hidden_size)  # default dtype, current device context
        self.register_buffer("weight", placeholder, persistent=False)
        if not on_meta_device():
            self.reset_substrate()

    def compute(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def reset_substrate(self) -> None:
        """Fill ``weight`` from ``compute()`` (the model's weight init calls this, also after loading)."""
        if self.weight.device.type == "meta":  # no memory yet: filled once there is
            return
        matrix = self.compute()
        self.weight.zero_()
        self.weight[:, : matrix.shape[1]] = matrix

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight)

    @torch.no_grad()
    def grow_hidden(self, hidden_size: int) -> None:
        """Append zero columns up to ``hidden_size`` (what exact hidden growth needs)."""
        if hidden_size < self.hidden_size:
            raise ValueError(f"hidden_size={hidden_size} is invalid: must be >= the current {self.hidden_size}")
        # A new dict rather than an edit: the caller's settings dict may be shared with other configs.
        self.config.substrate_settings = {**(self.config.substrate_settings or {}), "width": self.width}
        grown = self.weight.new_zeros(self.vocab_size, hidden_size)
        grown[:, : self.hidden_size] = self.weight
        self.weight = grown  # a tensor assigned to a buffer's name replaces the buffer (still non-persistent)
        self.hidden_size = hidden_size

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}, width={self.width}, frozen"
