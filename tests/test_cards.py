"""The presets against the source models' cards: sizes as the cards state them, parameter counts
within the cards' rounding, and `arbor presets` saying so."""

from __future__ import annotations

import json

import pytest

from arbor import PRESETS, ArborConfig, count_parameters
from arbor.cli import main
from arbor.model.cards import CARD_FIGURES, card_figures


def gpt_block(d: int) -> int:
    """A GPT-2-style block as the PGT cards count it: LayerNorms and biases, a 4x GELU MLP."""
    return 12 * d * d + 13 * d


def arbor_block(d: int, ffn: int) -> int:
    """arbor's block: q, k, v, o (no biases), a SwiGLU MLP of three matrices, two RMSNorm gains."""
    return 4 * d * d + 3 * d * ffn + 2 * d


def test_every_figure_names_a_preset_and_parses():
    assert {f.preset for f in CARD_FIGURES} == {"arbor-500m-1b", "pgt-9", "abs-bvv", "abs-bvv-4"}
    for figure in CARD_FIGURES:
        ArborConfig.from_preset(figure.preset, **figure.overrides)
    figure = card_figures("abs-bvv-4")[0]
    assert (figure.parameters, figure.resolution) == (1_900_000_000, 50_000_000)
    pgt = card_figures("pgt-9")[0]
    assert (pgt.parameters, pgt.resolution) == (247_600_000, 50_000)
    assert card_figures("tiny") == []


def test_pgt_9_is_the_1_9_cards_stack_with_their_count():
    config = ArborConfig.from_preset("pgt-9")
    d, vocab = 1024, 65_536
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (9, d, 32)
    assert (config.vocab_size, config.max_position_embeddings, config.tie_word_embeddings) == (vocab, 1024, False)
    assert count_parameters(config) == 9 * arbor_block(d, 2736) + 2 * vocab * d + d == 247_630_848
    # Each block within 0.05 % of the card's GPT-style block; the whole model rounds to the card's 247.6M.
    assert abs(arbor_block(d, 2736) / gpt_block(d) - 1) < 5e-4
    assert round(count_parameters(config) / 1e5) == 2476
    # The frozen-substrate cards of the same stack: the card counts the frozen table, arbor does not.
    bits = count_parameters(ArborConfig.from_preset("pgt-9", substrate="binary"))
    glyphs = count_parameters(ArborConfig.from_preset("pgt-9", substrate="unicode-glyphs"))
    assert bits == glyphs == 247_630_848 - vocab * d
    assert round((bits + vocab * 16) / 1e5) == 1816 and round((glyphs + vocab * d) / 1e5) == 2476


def test_abs_bvv_presets_are_the_cards_series_on_frozen_glyphs():
    four = ArborConfig.from_preset("abs-bvv-4")
    assert (four.num_hidden_layers, four.hidden_size, four.num_attention_heads, four.vocab_size) == (4, 4096, 32, 131_072)
    assert four.substrate == "unicode-glyphs" and four.tie_word_embeddings is False
    start = ArborConfig.from_preset("abs-bvv")
    assert (start.num_hidden_layers, start.substrate, start.max_layers) == (1, "unicode-glyphs", 6)
    table = 131_072 * 4096  # the frozen glyph matrix: a buffer to arbor, parameters to the cards
    for layers, card in ((2, 1.5e9), (4, 1.9e9), (6, 2.3e9)):
        total = count_parameters(ArborConfig.from_preset("abs-bvv", num_hidden_layers=layers)) + table
        assert round(total / 1e8) == round(card / 1e8), (layers, total)
        card_stack = 2 * table + layers * gpt_block(4096) + 2 * 4096
        assert 0 < total / card_stack - 1 < 0.005  # Llama's FFN 11,008 is a little wider than 2/3 of 4 x 4096
    assert count_parameters(four) + table == 1_883_279_360


def test_arbor_500m_1b_has_the_cards_sizes():
    config = ArborConfig.from_preset("arbor-500m-1b")
    assert (config.num_hidden_layers, config.max_layers, config.hidden_size, config.num_attention_heads) == (
        24, 64, 1024, 16)
    assert (config.vocab_size, config.max_position_embeddings) == (128_000, 131_072)
    assert count_parameters(config) == 533_775_360


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_presets_prints_the_card_comparison(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    for figure in CARD_FIGURES:
        assert f"~ {figure.card}: {figure.stated}" in out
        assert figure.why in out
    assert "pgt-9 ~ PGT unfrozen 1_9 (learned embeddings): 247.6M" in out
    assert "arbor: 247,630,848 parameters (247.63M); +30,848 (+0.01%), within the card's rounding: matches" in out
    assert ("abs-bvv-4 ~ abs-bvv-4: 1.9B\n  arbor: 1,346,408,448 parameters + 536,870,912 in the frozen table the "
            "card counts = 1,883,279,360 (1.88B); -16,720,640 (-0.88%), within the card's rounding: matches") in out
    assert "500M is the model's name, not a count" in out
    # The glyph presets say which font their matrix is drawn with here, and its coverage.
    assert "substrate unicode-glyphs: frozen" in out and "of the 65,536 BMP code points" in out


def test_presets_json_has_every_card_within_its_rounding(capsys):
    code, out, _ = run(capsys, "presets", "--json")
    assert code == 0
    records = {r["name"]: r for r in json.loads(out)}
    assert set(records) == set(PRESETS)
    cards = [card for r in records.values() for card in r["cards"]]
    assert len(cards) == len(CARD_FIGURES)
    for card in cards:
        assert card["compared"] == card["parameters"] + card["frozen_counted"]
        assert card["difference"] == card["compared"] - card["card_parameters"]
        assert card["within_rounding"] == (card["kind"] == "count"), card["card"]
    assert records["abs-bvv-4"]["substrate"] == "unicode-glyphs" and records["tiny"]["cards"] == []


@pytest.mark.parametrize("name", ["pgt-9", "abs-bvv-4"])
def test_presets_for_one_preset_shows_only_its_cards(capsys, name):
    code, out, _ = run(capsys, "presets", name)
    assert code == 0 and f"{name} ~ " in out and "arbor-500m-1b ~" not in out
