"""The ``binary`` substrate: a token id's bits, repeated to fill the hidden size.

PGT's "16-bit" substrate (Bochkov 2025): with a 65,536-token vocabulary every
id is 16 bits, and each bit is repeated ``hidden_size / 16`` times
(``repeat_interleave``), so d_model 1024 gives 64 copies of each bit.

* Bits: ``bits = ceil(log2(vocab_size))`` by default (at least 1), most
  significant bit first, so id 5 with 4 bits is ``[0, 1, 0, 1]``.
* Lift: each bit is repeated ``width // bits`` times, and the first
  ``width % bits`` bits once more, so the copies fill exactly ``width``
  columns. When ``width`` is a multiple of ``bits`` this is plain
  ``repeat_interleave(width // bits)`` (PGT's case). A width below ``bits`` is
  refused: some bit would get no column and ids would collide.
* Values: ``{0, 1}``, or ``{-1, 1}`` with ``centered = true``; times ``scale``.

Nothing is trainable and nothing is saved: the matrix is recomputed from the
config (see `arbor_substrates.frozen`).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, Field

from arbor import ArborConfigError
from arbor_plugins import StrictSettings, Substrate
from arbor_substrates.frozen import FrozenEmbedding, check_untied, lift_width


class BinarySettings(StrictSettings):
    #: Multiplies every value.
    scale: float = Field(1.0, gt=0)
    #: ``{-1, 1}`` instead of ``{0, 1}``.
    centered: bool = False
    #: Bits per id (None: ``ceil(log2(vocab_size))``); more bits add leading zeros.
    bits: int | None = Field(None, ge=1, le=62)
    #: Columns the bits are lifted to (None: the hidden size). Hidden growth records it here.
    width: int | None = Field(None, ge=1)


def needed_bits(vocab_size: int) -> int:
    """``ceil(log2(vocab_size))``, at least 1."""
    return max(1, (vocab_size - 1).bit_length())


def bit_matrix(vocab_size: int, bits: int) -> torch.Tensor:
    """``(vocab_size, bits)`` float32 of {0, 1}: row ``i`` is ``i`` in binary, most significant bit first."""
    ids = torch.arange(vocab_size, dtype=torch.int64, device="cpu")
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int64, device="cpu")
    return ((ids[:, None] >> shifts) & 1).to(torch.float32)


def binary_matrix(vocab_size: int, width: int, *, bits: int | None = None, scale: float = 1.0,
                  centered: bool = False) -> torch.Tensor:
    """The ``(vocab_size, width)`` matrix of the binary substrate, float32 on the CPU."""
    bits = needed_bits(vocab_size) if bits is None else bits
    values = bit_matrix(vocab_size, bits)
    if centered:
        values = values * 2 - 1
    copies, extra = divmod(width, bits)
    if copies < 1:
        raise ValueError(f"width={width} is invalid: must be >= bits={bits}, or some bit would have no column")
    repeats = torch.tensor([copies + 1] * extra + [copies] * (bits - extra))
    return values.repeat_interleave(repeats, dim=1) * scale


class BinaryEmbedding(FrozenEmbedding):
    def __init__(self, config: Any, settings: BinarySettings, width: int, bits: int):
        self.bits, self.scale, self.centered = bits, settings.scale, settings.centered
        super().__init__(config, width)

    def compute(self) -> torch.Tensor:
        return binary_matrix(self.vocab_size, self.width, bits=self.bits, scale=self.scale, centered=self.centered)


class BinarySubstrate(Substrate):
    description = "frozen: the token id's bits, repeat_interleave'd to the hidden size (PGT 16-bit)"
    frozen = True
    Settings = BinarySettings

    def build(self, config: Any, settings: BaseModel) -> BinaryEmbedding:
        check_untied(config, "binary")
        width = lift_width(config, settings, "binary")
        need = needed_bits(config.vocab_size)
        bits = need if settings.bits is None else settings.bits
        if bits < need:
            raise ArborConfigError(
                "substrate_settings.bits", bits, f"must be >= {need} = ceil(log2(vocab_size={config.vocab_size}))"
            )
        if width < bits:
            field = "substrate_settings.width" if settings.width is not None else "hidden_size"
            raise ArborConfigError(
                field, width, f"must be >= {bits}, the bits per token id of substrate 'binary' (fewer columns "
                "would drop bits and make ids collide)",
            )
        return BinaryEmbedding(config, settings, width, bits)
