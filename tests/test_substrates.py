"""Built-in frozen substrates (binary, unicode-glyphs) and the code-point tokenizer.

A frozen substrate has no parameter, gets no gradient, is recomputed (not
saved) on load with the same logits, grows its hidden size exactly, and exports
to a plain Llama embedding matrix. The glyph substrate is deterministic, has
unit rows, orders pixels centre-out, caches its matrix on disk and reuses it,
and gives tokens without a glyph distinct pseudo-random patterns.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from arbor import ArborConfig, ArborConfigError, ArborForCausalLM
from arbor.growth.export import to_llama
from arbor.growth.freezing import FreezeError
from arbor_substrates import fonts
from arbor_substrates.binary import binary_matrix, bit_matrix, needed_bits
from arbor_substrates.tokenizer import (
    BMP_SIZE,
    SPECIAL_IDS,
    build_codepoint_tokenizer,
    codepoint_text,
    save_codepoint_tokenizer,
)

CFG = dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def model_with(substrate: str, **settings) -> ArborForCausalLM:
    model = ArborForCausalLM(ArborConfig(**CFG, substrate=substrate, substrate_settings=settings))
    with torch.no_grad():  # logits of order 1, so a wrong embedding would show
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


def glyph_model(**settings) -> ArborForCausalLM:
    """A glyph-substrate model; 16 x 16 bitmaps keep the PCA small unless a test asks otherwise."""
    return model_with("unicode-glyphs", **{"size": 16, **settings})


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[0, 5, 65, 97, 233, 511, 32, 10], [300, 1, 2, 3, 4, 66, 67, 68]])


@pytest.fixture
def glyphs(tmp_path, monkeypatch):
    """The glyph module with an empty cache directory of its own and nothing held in memory.

    No font folder is searched, so the font is DejaVu Sans whether or not Unifont is installed
    here, and its fallback warning (tested on its own) is silenced.
    """
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    from arbor_substrates import glyphs as module

    monkeypatch.setenv("ARBOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fonts, "font_dirs", lambda: [])
    module.clear_memory_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", module.UnifontMissingWarning)
        yield module
    module.clear_memory_cache()


def make_font(path, chars: str) -> None:
    """A TrueType font whose cmap has exactly ``chars``, each a filled box of its own width."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = [".notdef"] + [f"u{ord(c):04X}" for c in chars]
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({ord(c): f"u{ord(c):04X}" for c in chars})
    outlines = {}
    for i, name in enumerate(names):
        pen = TTGlyphPen(None)
        if i:
            right = 200 + 60 * (i % 7)
            pen.moveTo((100, 0)), pen.lineTo((100, 700)), pen.lineTo((right, 700)), pen.lineTo((right, 0))
            pen.closePath()
        outlines[name] = pen.glyph()
    builder.setupGlyf(outlines)
    builder.setupHorizontalMetrics({name: (600, 0) for name in names})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": "Boxes", "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    builder.setupPost()
    builder.save(str(path))


# ------------------------------------------------------------------ binary
def test_binary_bits_most_significant_first():
    assert needed_bits(65_536) == 16 and needed_bits(512) == 9 and needed_bits(513) == 10 and needed_bits(1) == 1
    bits = bit_matrix(16, 4)
    assert bits[5].tolist() == [0, 1, 0, 1] and bits[0].tolist() == [0] * 4 and bits[15].tolist() == [1] * 4
    pgt = bit_matrix(65_536, 16)
    assert pgt[0x8001].tolist() == [1] + [0] * 14 + [1]
    assert torch.equal(pgt[54321], torch.tensor([float(b) for b in format(54321, "016b")]))
    # PGT: each of the 16 bits repeated 1024 / 16 = 64 times.
    lifted = binary_matrix(65_536, 1024)
    assert torch.equal(lifted[54321], pgt[54321].repeat_interleave(64))


def test_binary_lift_when_width_is_not_a_multiple_of_bits():
    # 4 bits to 10 columns: every bit twice, and the first 10 % 4 = 2 bits once more.
    m = binary_matrix(16, 10, scale=0.5, centered=True)
    assert m[5].tolist() == [-0.5] * 3 + [0.5] * 3 + [-0.5] * 2 + [0.5] * 2
    # 6 bits (two leading zeros for vocab 16) to 8 columns: no bit is cut off, so ids stay distinct.
    assert binary_matrix(16, 8, bits=6)[1].tolist() == [0] * 7 + [1]
    assert torch.unique(binary_matrix(16, 8, bits=6), dim=0).shape[0] == 16
    with pytest.raises(ValueError, match="width=3 is invalid"):
        binary_matrix(16, 3)


def test_binary_has_no_parameters_no_gradient_and_cannot_be_unfrozen():
    model = model_with("binary")
    embed = model.model.embed_tokens
    assert list(embed.parameters()) == [] and not embed.weight.requires_grad
    assert "model.embed_tokens.weight" not in model.state_dict()  # recomputed, never saved
    assert embed.weight.shape == (512, 32) and set(embed.weight.unique().tolist()) == {0.0, 1.0}
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert embed.weight.grad is None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert all(p is not embed.weight for g in opt.param_groups for p in g["params"])
    before = embed.weight.clone()
    opt.step()
    assert torch.equal(embed.weight, before)
    assert model.freeze("embeddings") == []
    with pytest.raises(FreezeError, match="'binary' is frozen by design"):
        model.unfreeze("embeddings")


def test_binary_is_deterministic_and_round_trips_through_save(tmp_path):
    a, b = model_with("binary", centered=True, scale=0.25), model_with("binary", centered=True, scale=0.25)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    a.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert not any(k.startswith("model.embed_tokens") for k in f.keys())
    loaded = ArborForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.embed_tokens.weight, a.model.embed_tokens.weight)
    assert torch.equal(logits(loaded, IDS), logits(a, IDS))


def test_hidden_growth_with_binary_is_exact_and_reloads(tmp_path):
    model = model_with("binary")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = logits(model, IDS)
    model.grow_hidden(48, optimizer=opt)
    embed = model.model.embed_tokens
    assert embed.weight.shape == (512, 48) and not embed.weight[:, 32:].any()  # new dims read zero
    assert model.config.substrate_settings == {"width": 32}  # the lift is kept, and recorded
    after = logits(model, IDS)
    assert (after - before).abs().max() <= 1e-5 * max(1.0, before.abs().max().item())
    model.train()
    model(IDS, labels=IDS).loss.backward()
    opt.step()  # trains after growth; the substrate still has nothing to train
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = ArborForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.embed_tokens.weight, embed.weight)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


@pytest.mark.parametrize("overrides, settings, field", [
    ({"tie_word_embeddings": True}, {}, "tie_word_embeddings"),
    ({"hidden_size": 8, "num_attention_heads": 2}, {}, "hidden_size"),  # 8 columns < 9 bits
    ({}, {"bits": 4}, "substrate_settings.bits"),
    ({}, {"width": 64}, "substrate_settings.width"),
])
def test_binary_refuses_bad_configs_naming_the_field(overrides, settings, field):
    with pytest.raises(ArborConfigError, match=f"ArborConfig.{field}="):
        ArborForCausalLM(ArborConfig(**{**CFG, **overrides}, substrate="binary", substrate_settings=settings))
    with pytest.raises(Exception, match="scale"):
        ArborForCausalLM(ArborConfig(**CFG, substrate="binary", substrate_settings={"scale": -1}))


def test_export_to_llama_with_a_frozen_substrate_keeps_logits(tmp_path):
    # (The conformance kit below exports the glyph substrate too.)
    model = model_with("binary")
    report = to_llama(model, tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    with safe_open(tmp_path / "llama" / "model.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), model.model.embed_tokens.weight)
    torch.testing.assert_close(logits(llama, IDS), logits(model, IDS), atol=1e-5, rtol=1e-5)
    assert report.max_abs_diff <= 1e-5 * report.logit_scale


@pytest.mark.parametrize("name, settings", [("binary", {"centered": True}), ("unicode-glyphs", {"size": 16})])
def test_conformance_kit_passes(name, settings, request):
    from arbor_plugins.testing import check_component

    if name == "unicode-glyphs":
        request.getfixturevalue("glyphs")
    report = check_component("substrate", name, settings=settings)
    assert any("frozen" in line for line in report.passed)


# ------------------------------------------------------------------ glyphs
def test_centre_out_order_on_a_hand_made_bitmap(glyphs):
    # 4 x 4, centre between pixels: the inner ring first, counter-clockwise from the upper right
    # (45, 135, 225, 315 degrees), then the 8 pixels at distance sqrt(2.5), then the corners.
    bitmap = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4).numpy()
    order = glyphs.centre_out_order(4).tolist()
    assert order[:4] == [6, 5, 9, 10]
    assert order[4:12] == [7, 2, 1, 4, 8, 13, 14, 11]
    assert sorted(order[12:]) == [0, 3, 12, 15] and order[12] == 3  # corners, starting at the upper right
    assert (glyphs.bitmap_vectors(bitmap)[0] * 255).round().long().tolist() == order
    assert sorted(glyphs.centre_out_order(32).tolist()) == list(range(1024))


def test_glyph_rows_are_deterministic_unit_norm_and_alike_for_alike_letters(glyphs, tmp_path):
    a = glyph_model(cache=False).model.embed_tokens
    glyphs.clear_memory_cache()
    b = glyph_model(cache=False).model.embed_tokens  # computed again from scratch
    assert torch.equal(a.weight, b.weight) and a.weight.shape == (512, 32)
    assert not (tmp_path / "cache").exists()  # cache=False writes nothing
    w = model_with("unicode-glyphs").model.embed_tokens.weight  # PGT's 32 x 32 bitmaps
    assert list(a.parameters()) == [] and w.shape == (512, 32)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(512))
    nearest = (w @ w.T)[ord("o")].topk(3).indices.tolist()
    assert nearest[0] == ord("o") and set(nearest[1:]) <= {ord(c) for c in "òóôõöøōŏőơǒǫǭȍȏȯȱ"}
    settings = a.config.substrate_settings
    assert len(settings["font_sha256"]) == 64 and len(settings["texts_sha256"]) == 64


def test_glyph_cache_is_written_once_and_reused(glyphs, monkeypatch, tmp_path):
    calls = []
    real = glyphs.render_bitmaps
    monkeypatch.setattr(glyphs, "render_bitmaps", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = glyph_model().model.embed_tokens.weight
    files = list((tmp_path / "cache" / "glyphs").glob("*.safetensors"))
    assert len(calls) == 1 and len(files) == 1
    stamp = files[0].stat().st_mtime_ns

    def no_render(*args, **kwargs):
        raise AssertionError("rendered again although the matrix is cached")

    glyphs.clear_memory_cache()  # only the disk cache is left to answer
    monkeypatch.setattr(glyphs, "render_bitmaps", no_render)
    second = glyph_model().model.embed_tokens.weight
    assert torch.equal(first, second)
    assert list((tmp_path / "cache" / "glyphs").glob("*.safetensors")) == files
    assert files[0].stat().st_mtime_ns == stamp
    # Another hidden size is another matrix, so another cache entry.
    monkeypatch.setattr(glyphs, "render_bitmaps", real)
    glyph_model(width=16)
    assert len(list((tmp_path / "cache" / "glyphs").glob("*.safetensors"))) == 2


def test_glyph_substrate_saves_loads_and_grows_exactly(glyphs, tmp_path):
    model = glyph_model(scale=2.0)
    before = logits(model, IDS)
    model.grow_hidden(40)
    grown = logits(model, IDS)
    assert (grown - before).abs().max() <= 1e-5 * max(1.0, before.abs().max().item())
    assert model.config.substrate_settings["width"] == 32
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["substrate_settings"]["width"] == 32
    loaded = ArborForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits(loaded, IDS), grown)
    torch.testing.assert_close(loaded.model.embed_tokens.weight[:, :32].norm(dim=1), torch.full((512,), 2.0))


def test_missing_and_blank_glyphs_get_distinct_deterministic_patterns(glyphs):
    font = glyphs.dejavu_sans()
    texts = ["A", " ", None, "\u0fff", "A\u0fff", "\t"]  # U+0FFF: unassigned, so in no font
    bitmaps, no_glyph, blank = glyphs.render_bitmaps(texts, font, 16)
    assert no_glyph == [3, 4] and blank == [1, 2, 5]
    assert bitmaps[0].any() and bitmaps[0].max() == 255
    patterns = [bitmaps[i].tobytes() for i in (1, 2, 3, 4, 5)]
    assert len(set(patterns)) == 5  # tokens without a glyph stay distinguishable
    again, _, _ = glyphs.render_bitmaps(texts, font, 16)
    assert (again == bitmaps).all()
    embed = glyph_model().model.embed_tokens
    assert 0 in embed.no_glyph and 0x80 in embed.no_glyph and 65 not in embed.no_glyph  # controls have no glyph
    assert 32 in embed.blank and 9 in embed.blank and 10 in embed.blank  # whitespace draws nothing
    rows = embed.weight[embed.no_glyph + embed.blank]
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]


def test_glyph_settings_are_checked_and_the_font_is_pinned(glyphs, tmp_path):
    with pytest.raises(ArborConfigError, match="substrate_settings.font="):
        glyph_model(font=str(tmp_path / "nope.ttf"))
    copy = tmp_path / "font.ttf"
    shutil.copy(glyphs.dejavu_sans(), copy)
    same = glyph_model(font=str(copy)).model.embed_tokens.weight
    assert torch.equal(same, glyph_model().model.embed_tokens.weight)  # same bytes, same glyphs
    with pytest.raises(ArborConfigError, match="substrate_settings.font_sha256=.*would differ"):
        glyph_model(font_sha256="0" * 64)
    mono = glyphs.dejavu_sans().with_name("DejaVuSansMono.ttf")
    other = glyph_model(font=str(mono)).model.embed_tokens.weight
    assert not torch.equal(other, same)


def test_font_choice_order_unifont_first_then_dejavu(glyphs, tmp_path):
    pytest.importorskip("fontTools")
    boxes = tmp_path / "boxes.ttf"
    make_font(boxes, "AB")
    system, user = tmp_path / "share" / "fonts", tmp_path / "home" / "fonts"
    for folder, names in ((system / "truetype" / "unifont", ["unifont.ttf", "unifont_upper.ttf", "unifont_csur.ttf"]),
                          (user, ["unifont-15.1.05.otf", "unifont_jp.otf", "unifont.pcf.gz"])):
        folder.mkdir(parents=True)
        for name in names:
            shutil.copy(boxes, folder / name)
    # Only the BMP font counts (not _upper, _csur, _jp); OpenType before TrueType.
    assert glyphs.find_unifont([system, user]) == user / "unifont-15.1.05.otf"
    (system / "truetype" / "unifont" / "unifont.otf").write_bytes(boxes.read_bytes())
    fonts._scan_unifont.cache_clear()
    assert glyphs.find_unifont([system, user]) == system / "truetype" / "unifont" / "unifont.otf"  # unversioned first
    assert glyphs.find_unifont([tmp_path / "nowhere"]) is None

    found = glyphs.choose_font(None, dirs=[system])
    assert (found.name, found.path.name, found.coverage, found.fallback) == ("GNU Unifont", "unifont.otf", 2, None)
    assert glyphs.choose_font("unifont", dirs=[system]).path == found.path
    assert glyphs.choose_font("dejavu", dirs=[system]).name == "DejaVu Sans"
    assert glyphs.choose_font(str(boxes), dirs=[system]).name == "boxes.ttf"  # a named file wins
    # A model built with DejaVu keeps it once Unifont is installed: the recorded hash decides.
    dejavu_hash = hashlib.sha256(glyphs.dejavu_sans().read_bytes()).hexdigest()
    kept = glyphs.choose_font(None, recorded_sha256=dejavu_hash, dirs=[system])
    assert kept.name == "DejaVu Sans" and kept.fallback is None

    fallback = glyphs.choose_font(None, dirs=[user / "none"])
    assert fallback.name == "DejaVu Sans" and fallback.path == glyphs.dejavu_sans()
    coverage = f"{glyphs.bmp_coverage(glyphs.dejavu_sans()):,} of the 65,536 BMP code points"
    assert "GNU Unifont is not installed" in fallback.fallback and coverage in fallback.fallback
    assert "apt install fonts-unifont" in fallback.fallback and "\n" not in fallback.fallback
    bitmap = tmp_path / "X11" / "misc"
    bitmap.mkdir(parents=True)
    (bitmap / "unifont.pcf.gz").write_bytes(b"")  # found, named, but not used
    assert "unifont.pcf.gz, a bitmap format" in glyphs.choose_font(None, dirs=[bitmap]).fallback
    with pytest.raises(ArborConfigError, match="font='unifont' is invalid: GNU Unifont is not installed.*fonts-unifont"):
        glyphs.choose_font("unifont", dirs=[user / "none"])
    with pytest.raises(ArborConfigError, match='font=.* is invalid: must be the path .*"unifont" or "dejavu"'):
        glyphs.choose_font(str(tmp_path / "missing.ttf"))


def test_missing_unifont_warns_once_with_the_font_used_and_how_to_install(glyphs):
    with pytest.warns(glyphs.UnifontMissingWarning) as caught:
        embed = glyph_model().model.embed_tokens
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("unicode-glyphs: GNU Unifont is not installed") and "DejaVu Sans" in message
    assert f"{glyphs.bmp_coverage(glyphs.dejavu_sans()):,} of the 65,536 BMP code points" in message
    assert "fonts-unifont" in message and "unifoundry.com/unifont" in message
    assert embed.font.name == "DejaVu Sans" and "BMP code points" in repr(embed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", glyphs.UnifontMissingWarning)
        glyph_model(font="dejavu")  # chosen, not fallen back to: no warning
        with torch.device("meta"):  # nothing drawn, nothing to warn about
            glyph_model()


def test_unifont_is_used_when_installed(glyphs, tmp_path, monkeypatch):
    pytest.importorskip("fontTools")
    folder = tmp_path / "fonts" / "opentype" / "unifont"
    folder.mkdir(parents=True)
    make_font(folder / "unifont.otf", "ABCxyz")  # a stand-in with six glyphs
    monkeypatch.setattr(fonts, "font_dirs", lambda: [tmp_path / "fonts"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", glyphs.UnifontMissingWarning)
        embed = glyph_model().model.embed_tokens
    assert embed.font.path == folder / "unifont.otf" and embed.font.coverage == 6
    drawn = set(range(512)) - set(embed.no_glyph) - set(embed.blank)
    assert drawn == {ord(c) for c in "ABCxyz"}
    described = glyphs.UnicodeGlyphSubstrate().describe(glyphs.GlyphSettings())
    assert described.endswith("font: GNU Unifont (unifont.otf), glyphs for 6 of the 65,536 BMP code points")


def test_bmp_coverage_counts_the_cmap(glyphs, tmp_path):
    pytest.importorskip("fontTools")
    from fontTools.ttLib import TTFont

    font = tmp_path / "five.ttf"
    make_font(font, "AB\u00e9\u4e2d\U0001F600")  # the emoji is outside the BMP: not counted
    assert glyphs.bmp_coverage(font) == 4
    dejavu = glyphs.dejavu_sans()
    # DejaVu Sans as matplotlib ships it (5,367 code points in 2.37), read by a second library.
    expected = sum(1 for code in TTFont(dejavu).getBestCmap() if code < 65_536)
    assert glyphs.bmp_coverage(dejavu) == expected and 5_000 < expected < 6_000


def test_glyph_texts_come_from_a_tokenizer_file(glyphs, tmp_path):
    from tokenizers import AddedToken, Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<s>": 0, "a": 1, "hello": 2, " ": 3, "ß": 4}, unk_token="<s>"))
    tok.add_special_tokens([AddedToken("<s>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert glyphs.token_texts(8, str(tmp_path)) == [None, "a", "hello", " ", "ß", None, None, None]
    with pytest.raises(ArborConfigError, match="vocab_size=4 is invalid: must be > 4"):
        glyphs.token_texts(4, str(tmp_path / "tokenizer.json"))
    with pytest.raises(ArborConfigError, match="substrate_settings.tokenizer="):
        glyphs.token_texts(8, str(tmp_path / "missing.json"))
    cfg = dict(CFG, vocab_size=8)
    settings = {"tokenizer": str(tmp_path), "size": 16}
    embed = ArborForCausalLM(ArborConfig(**cfg, substrate="unicode-glyphs", substrate_settings=settings)).model.embed_tokens
    assert embed.no_glyph == [] and embed.blank == [0, 3, 5, 6, 7]


# --------------------------------------------------------------- tokenizer
def test_codepoint_tokenizer_ids_are_code_points_and_round_trip():
    tok = build_codepoint_tokenizer()
    assert len(tok) == BMP_SIZE
    text = "Grüße, мир! 你好 ∑ ok\n\tdone"
    ids = tok(text).input_ids
    assert ids == [ord(c) for c in text]
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (0xE000, 0xE001, 0xE002, 0xE003)
    assert tok.convert_ids_to_tokens(0xE000) == "<|bos|>" == tok.bos_token
    # Beyond the BMP, and the private-use code points the specials occupy: unknown.
    assert tok("a\U0001F600\ue000b").input_ids == [97, 0xE003, 0xE003, 98]
    assert tok.decode(tok("x<|eos|>").input_ids) == "x<|eos|>"
    assert codepoint_text(65) == "A" and codepoint_text(0xD800) is None and codepoint_text(0xE001) is None
    assert set(SPECIAL_IDS.values()) == {0xE000, 0xE001, 0xE002, 0xE003}


def test_codepoint_tokenizer_with_merges_saves_and_loads_through_auto_tokenizer(tmp_path):
    corpus = ["the cat sat on the mat, then the cat ate"] * 4 + ["über über grün"] * 3
    directory = save_codepoint_tokenizer(tmp_path / "tok", corpus, num_merges=12)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(directory))
    tok = AutoTokenizer.from_pretrained(directory)
    assert len(tok) == BMP_SIZE + 12
    ids = tok("the cat über").input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert "the" in tokens and " cat" in tokens and any(i >= BMP_SIZE for i in ids)
    assert tok.decode(ids) == "the cat über"
    assert tok("é").input_ids == [0xE9]  # single characters keep their code points
    again = build_codepoint_tokenizer(corpus, num_merges=12)
    assert again.get_vocab() == tok.get_vocab()  # the same corpus gives the same merges
    with pytest.raises(ValueError, match="num_merges=-1"):
        build_codepoint_tokenizer(corpus, num_merges=-1)
