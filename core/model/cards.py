"""What the source models' cards say about their size, beside the presets that follow them.

arbor's presets come from five documents: the Arbor-500M-1B card and the
Progressive Growth Transformers (PGT) cards of the "1_9" comparative study
(unfrozen, 16-bit and visual-UNICODE embeddings, ≈247M / ≈181M) and of the
abs-bvv series (abs-bvv-2 … abs-bvv-6, 1.5B … 2.3B). Each `CardFigure` is one
parameter count a card states, the preset (and settings) that build the card's
model, and why arbor's count is not exactly the card's. ``arbor presets``
computes arbor's side and prints both; the tests hold every figure to within the
card's own rounding.

How the cards count: a frozen embedding table is a parameter to them (an
``nn.Embedding`` that is never trained), while arbor's frozen substrates keep
their matrix as a buffer, rebuilt on load and never saved. So a card's figure is
compared with arbor's parameters plus the table the card counted
(``frozen_counted``): the whole ``vocab x hidden`` glyph matrix, or for the
16-bit substrate the ``vocab x 16`` bit table before it is repeated to the
hidden size. The PGT cards' blocks are GPT-style (LayerNorm, biases, a 4x-wide
GELU MLP: 12·d² + 13·d parameters a block); arbor's are Llama-style (RMSNorm, no
biases, a SwiGLU MLP of three matrices), so the presets pick the FFN width that
gives a block about the same count.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

_FIGURE = re.compile(r"(\d+(?:\.\d+)?)([MB])")


@dataclasses.dataclass(frozen=True)
class CardFigure:
    """One parameter count a source card states, and the preset that builds that model."""

    #: The preset, and the settings that turn it into the card's model (a substrate, a depth).
    preset: str
    overrides: dict[str, Any]
    #: The card, by the model's name.
    card: str
    #: The figure as the card writes it: "247.6M", "1.9B".
    stated: str
    #: "count": a parameter count, precise to its last digit; "name": a size in the model's
    #: name ("500M"), which the card gives no count for.
    kind: Literal["count", "name"]
    #: The frozen embedding table the card counts as parameters: "none", "matrix" (vocab x
    #: hidden, the glyph substrate's) or "bits" (vocab x 16, the 16-bit substrate before its lift).
    frozen_counted: Literal["none", "matrix", "bits"]
    #: Why arbor's count is what it is, against this figure.
    why: str

    @property
    def parameters(self) -> int:
        """The stated figure as a number of parameters."""
        number, unit = _FIGURE.fullmatch(self.stated).groups()
        return round(float(number) * (1e9 if unit == "B" else 1e6))

    @property
    def resolution(self) -> int:
        """Half a unit of the stated figure's last digit: a count within this rounds to it."""
        number, unit = _FIGURE.fullmatch(self.stated).groups()
        decimals = len(number.partition(".")[2])
        return round(0.5 * 10 ** -decimals * (1e9 if unit == "B" else 1e6))


CARD_FIGURES: tuple[CardFigure, ...] = (
    CardFigure(
        "arbor-500m-1b", {}, "Arbor-500M-1B (24 layers)", "500M", "name", "none",
        "the sizes the card gives (24 layers, hidden 1024, 16 heads, 128,000-token vocabulary, 131,072 "
        "positions) are the preset's; FFN 4,096 and the tied LM head are arbor's reading of what it leaves open",
    ),
    CardFigure(
        "arbor-500m-1b", {"num_hidden_layers": 64}, "Arbor-500M-1B (grown to 64 layers)", "1B", "name", "none",
        "the 24-layer model and 40 more layers of 16.8M each, the card's 64-layer limit",
    ),
    CardFigure(
        "pgt-9", {}, "PGT unfrozen 1_9 (learned embeddings)", "247.6M", "count", "none",
        "its title says ≈247M, and the UNICODE 1_9 card gives the same stack 247.6M; the card's blocks are GPT-style (4x GELU MLP, biases: 12.6M each); arbor's SwiGLU blocks at FFN "
        "2,736 have as many, and both untied 65,536 x 1,024 tables (embedding, LM head) are trainable",
    ),
    CardFigure(
        "pgt-9", {"substrate": "unicode-glyphs"}, "PGT UNICODE 1_9 (frozen glyphs)", "247.6M", "count", "matrix",
        "the card counts its frozen 65,536 x 1,024 glyph table (67.1M) as parameters; arbor keeps it as a "
        "buffer, so its own count is 67.1M lower and the two are compared with the table added",
    ),
    CardFigure(
        "pgt-9", {"substrate": "binary"}, "PGT 16-bit 1_9 (frozen bits)", "181.6M", "count", "bits",
        "the card counts its frozen 65,536 x 16 bit table (1.05M) as parameters; arbor's binary substrate is "
        "a buffer (the bits repeated to 1,024 columns), so they are compared with the 16-bit table added",
    ),
    CardFigure(
        "abs-bvv", {"num_hidden_layers": 2}, "abs-bvv-2", "1.5B", "count", "matrix",
        "the abs-bvv preset grown to 2 layers; the card counts the frozen 131,072 x 4,096 glyph table (537M), "
        "arbor's buffer, and rounds to 0.1B",
    ),
    CardFigure(
        "abs-bvv-4", {}, "abs-bvv-4", "1.9B", "count", "matrix",
        "the card counts the frozen 131,072 x 4,096 glyph table (537M), arbor's buffer; its GPT-style blocks "
        "come to 1.879B in all, arbor's SwiGLU blocks at Llama's FFN 11,008 to 0.2 % more, and the card "
        "rounds to 0.1B",
    ),
    CardFigure(
        "abs-bvv", {"num_hidden_layers": 6}, "abs-bvv-6", "2.3B", "count", "matrix",
        "the abs-bvv preset grown to its max_layers, 6; the card counts the frozen glyph table (537M), "
        "arbor's buffer, and rounds to 0.1B",
    ),
)


def card_figures(preset: str) -> list[CardFigure]:
    """The card figures a preset is compared with (none for arbor's own small presets)."""
    return [figure for figure in CARD_FIGURES if figure.preset == preset]
