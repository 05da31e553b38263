"""Byte-level BPE training and tokenizer loading (`arbor.training.tokenizer`)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from arbor.training.data import builtin_corpus
from arbor.training.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, TokenizerError, load_tokenizer, train_bpe

SAMPLES = [
    "def grow(model):\n    return model  # plain ASCII\n",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, emoji 🌳🙂",
    "  leading spaces, trailing spaces  \n\n\ttabs\r\nCRLF\x00nul",
    "",
]


@pytest.fixture(scope="module")
def corpus():
    return builtin_corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe(corpus, vocab_size=1024)


def test_round_trip_is_exact_for_any_text(tokenizer):
    assert tokenizer.unk_token_id is None  # bytes cover everything: nothing is unknown
    for text in SAMPLES:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_special_tokens_come_first_and_are_not_added_on_encode(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    ids = tokenizer("hello")["input_ids"]
    assert not set(ids) & {0, 1, 2}
    # A special token written in text is one token, and decodes back.
    assert tokenizer(f"a{EOS_TOKEN}b")["input_ids"].count(1) == 1
    assert tokenizer.decode(tokenizer(f"a{EOS_TOKEN}b")["input_ids"]) == f"a{EOS_TOKEN}b"


def test_vocab_size_is_reached_and_merges_compress(tokenizer, corpus):
    assert len(tokenizer) == 1024
    text = corpus[0]
    assert len(tokenizer(text)["input_ids"]) < len(text.encode()) / 2


def test_training_is_deterministic(corpus, tmp_path):
    first, second = train_bpe(corpus, 512), train_bpe(list(corpus), 512)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_saved_directory_loads_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
        for text in SAMPLES:
            assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
            assert loaded.decode(loaded(text)["input_ids"]) == text


def test_extra_special_tokens_and_model_max_length(corpus):
    tokenizer = train_bpe(corpus[:10], 300, extra_special_tokens=["<|sep|>"], model_max_length=128)
    assert tokenizer.convert_tokens_to_ids("<|sep|>") == 3
    assert tokenizer.model_max_length == 128


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(vocab_size=100), "vocab_size=100 is invalid: must be an integer >= 259"),
        (dict(vocab_size=300, min_frequency=0), "min_frequency=0"),
        (dict(vocab_size=300, eos_token=BOS_TOKEN), "must differ"),
    ],
)
def test_bad_training_arguments_are_named(kwargs, fragment):
    with pytest.raises(TokenizerError, match=fragment):
        train_bpe(["some text"], **kwargs)


def test_bare_tokenizer_json_gets_its_special_tokens(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert loaded("héllo wörld")["input_ids"] == tokenizer("héllo wörld")["input_ids"]
    # A directory holding only tokenizer.json is the same case.
    (tmp_path / "tokenizer_config.json").unlink()
    assert load_tokenizer(tmp_path).eos_token_id == 1


def llama3_style_tokenizer_json(path, texts):
    """A tokenizer.json laid out like Llama 3's: regex split + byte-level, bos added by a template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tokenizer.save(str(path))
    return path


def test_llama3_style_json_loads_with_bos_and_eos(corpus, tmp_path):
    from arbor.training.data import tokenize_documents

    loaded = load_tokenizer(llama3_style_tokenizer_json(tmp_path / "tokenizer.json", corpus[:20]))
    assert (loaded.bos_token, loaded.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    ids = loaded("hello world")["input_ids"]
    assert ids[0] == 0 and loaded.decode(ids, skip_special_tokens=True) == "hello world"
    # Packing adds no bos, only the eos after each document.
    stream = tokenize_documents(["hello", "world"], loaded).tolist()
    assert 0 not in stream and stream.count(1) == 2 and stream[-1] == 1


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="no such file or directory; expected a directory with tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="directory has no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"broken.json'.*not a JSON tokenizer file"):
        load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "wrong.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(TokenizerError, match=r"wrong.json'.*not a `tokenizers` tokenizer.json"):
        load_tokenizer(tmp_path / "wrong.json")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be loaded"):
        load_tokenizer(bad_dir)
