"""User text cannot inject control tokens, odd text never crashes a tokenizer, empty prompts are refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from arbor import ArborConfig, ArborForCausalLM
from arbor.cli import main
from arbor.training.data import tokenize_documents
from arbor.training.tokenizer import clean_text, encode, train_bpe
from arbor_substrates.tokenizer import build_codepoint_tokenizer

TEXTS = ["def grow(model):\n    return model\n", "plain words and more words " * 20, "naïve café 日本語"]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS * 10, vocab_size=300)


@pytest.fixture(scope="module")
def codepoints():
    return build_codepoint_tokenizer()


@pytest.fixture(params=["bpe", "codepoints"])
def tokenizer(request, bpe, codepoints):
    return {"bpe": bpe, "codepoints": codepoints}[request.param]


def special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids)


@pytest.mark.parametrize("text", ["a<|eos|>b", "<|bos|>", "x <|pad|> y <|unk|>"])
def test_special_token_text_is_plain_text_unless_asked(tokenizer, text):
    ids = encode(tokenizer, text, add_special_tokens=False).input_ids
    assert not set(ids) & special_ids(tokenizer)
    assert tokenizer.decode(ids) == text
    parsed = encode(tokenizer, text, parse_special=True, add_special_tokens=False).input_ids
    assert set(parsed) & special_ids(tokenizer)  # the opt-in still reads them


def test_packed_data_cannot_forge_document_boundaries(tokenizer):
    stream = tokenize_documents(["one <|eos|> two", "three"], tokenizer).tolist()
    eos = tokenizer.eos_token_id
    assert stream.count(eos) == 2 and stream[-1] == eos  # one after each document, none from the text


def test_lone_surrogates_become_replacement_characters(tokenizer):
    text = "a\ud800b\udfffc"
    assert clean_text(text) == "a\ufffdb\ufffdc"
    ids = encode(tokenizer, text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "a\ufffdb\ufffdc"


@given(text=st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=60))
def test_any_text_encodes_without_crashing(bpe, codepoints, text):
    for tokenizer in (bpe, codepoints):
        ids = encode(tokenizer, text, add_special_tokens=False).input_ids
        forged = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        assert not set(ids) & forged
        assert isinstance(tokenizer.decode(ids), str)


def test_generate_on_an_empty_prompt_is_one_line(tmp_path, bpe, capsys):
    torch.manual_seed(0)
    model = ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=len(bpe)))
    model.save_pretrained(tmp_path)
    bpe.save_pretrained(tmp_path)
    capsys.readouterr()
    assert main(["generate", str(tmp_path), ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt is empty" in err[0]
    assert main(["generate", str(tmp_path), "words <|eos|>", "--max-new-tokens", "2"]) == 0


def test_model_generate_refuses_an_empty_prompt():
    model = ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=48)).eval()
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate(torch.empty(1, 0, dtype=torch.long), max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate(input_ids=torch.empty(2, 0, dtype=torch.long), max_new_tokens=2, pad_token_id=0)
