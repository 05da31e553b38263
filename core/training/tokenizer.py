"""Tokenizers for training: a byte-level BPE trained on the corpus, or one loaded from disk.

Both give a ``transformers`` fast tokenizer with ``eos_token`` set, because the
data pipeline (:mod:`arbor.training.data`) separates packed documents with it. A trained
tokenizer saves with ``save_pretrained(dir)`` as ``tokenizer.json`` plus
``tokenizer_config.json`` and loads back with ``AutoTokenizer.from_pretrained(dir)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

#: Special tokens of a trained tokenizer; they get ids 0, 1, 2 in this order.
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"

# Byte-level BPE starts from the 256 byte symbols, so every text is encodable
# and a vocabulary must hold at least those plus the special tokens.
_BYTE_ALPHABET = 256

# Names under which published tokenizer.json files (GPT-2, Llama 2/3, Mistral,
# Qwen, ...) carry their special tokens, for bare files that come without a
# tokenizer_config.json to say which is which. First match wins.
_SPECIAL_NAMES = {
    "bos_token": ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"),
    "eos_token": ("<|eos|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>"),
    "pad_token": ("<|pad|>", "<pad>", "<|finetune_right_pad_id|>"),
}


class TokenizerError(ValueError):
    """A tokenizer cannot be trained or loaded as asked; the message names the path or field."""


# Lone surrogates (U+D800..U+DFFF) are halves of UTF-16 pairs, not characters: no UTF-8 encoder
# and no tokenizer takes them. They reach Python strings from mis-decoded files and JSON escapes.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (the replacement character)."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def encode(tokenizer: Any, texts: str | list[str], *, parse_special: bool = False, **kwargs: Any):
    """Tokenize user text (a prompt, training documents) safely.

    Text is text: ``"<|eos|>"`` written in a document is encoded as those
    characters, not as the end-of-document token, unless ``parse_special`` asks
    for special tokens to be recognised. Lone surrogates become U+FFFD instead
    of failing inside the tokenizer.
    """
    texts = clean_text(texts) if isinstance(texts, str) else [clean_text(t) for t in texts]
    return tokenizer(texts, split_special_tokens=not parse_special, **kwargs)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    bos_token: str = BOS_TOKEN,
    eos_token: str = EOS_TOKEN,
    pad_token: str = PAD_TOKEN,
    extra_special_tokens: Iterable[str] = (),
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Byte-level means any text encodes without unknown tokens and
    ``decode(encode(text)) == text`` holds exactly, non-ASCII included. No token
    is added automatically around an encoding: documents are separated by
    ``eos_token`` when the data is packed, and ``bos_token`` is there for
    callers that want one. The same texts and arguments give the same vocabulary
    and merges. ``vocab_size`` is an upper bound: a small corpus may run out of
    pairs that occur ``min_frequency`` times before reaching it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(dict.fromkeys([bos_token, eos_token, pad_token, *extra_special_tokens]))
    if len(specials) < 3:
        raise TokenizerError(
            f"bos_token, eos_token and pad_token must differ, got {bos_token!r}, {eos_token!r}, {pad_token!r}"
        )
    smallest = _BYTE_ALPHABET + len(specials)
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise TokenizerError(
            f"vocab_size={vocab_size!r} is invalid: must be an integer >= {smallest} "
            f"(256 bytes + {len(specials)} special tokens)"
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise TokenizerError(f"min_frequency={min_frequency!r} is invalid: must be an integer >= 1")

    tokenizer = Tokenizer(models.BPE())
    # No prefix space: a leading space would be invented on every encode and
    # break the exact round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=list(specials[3:]) or None,
        **kwargs,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path, model_max_length: int) -> None:
    """``tokenizer.save_pretrained(directory)``, with ``model_max_length`` in its
    ``tokenizer_config.json``: the longest input the model it is saved with takes (its
    ``max_position_embeddings``), where a trained or code-point tokenizer would write transformers'
    "no limit" (about 1e30). The tokenizer itself keeps its own value: encoding whole documents for
    packing must not warn that they are longer than the model's context."""
    own = tokenizer.model_max_length
    tokenizer.model_max_length = model_max_length
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.model_max_length = own


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a directory (``tokenizer.json``/``tokenizer_config.json``) or a bare ``tokenizer.json``.

    A directory goes through ``AutoTokenizer.from_pretrained`` offline, so its
    ``tokenizer_config.json`` decides the class and special tokens. A bare JSON
    file (Llama-3-style tokenizers are shipped like this) is wrapped as a fast
    tokenizer. In both cases special tokens that no config names are recognised
    by their usual spellings (``<|end_of_text|>``, ``</s>``, ...), so packing
    finds an end-of-document token.
    """
    path = Path(path)
    where = f"tokenizer {str(path)!r}"
    if not path.exists():
        raise TokenizerError(
            f"{where}: no such file or directory; expected a directory with tokenizer.json or a tokenizer.json file"
        )
    if path.is_dir():
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise TokenizerError(f"{where}: directory has no tokenizer.json or tokenizer_config.json")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as error:
            raise TokenizerError(f"{where}: cannot be loaded: {_first_line(error)}") from error
    else:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TokenizerError(f"{where}: not a JSON tokenizer file ({_first_line(error)})") from error
        try:
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as error:  # the Rust loader raises a bare Exception on a bad schema
            raise TokenizerError(f"{where}: not a `tokenizers` tokenizer.json ({_first_line(error)})") from error
    _fill_special_tokens(tokenizer)
    return tokenizer


def _fill_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Set bos/eos/pad from the vocabulary's usual names where nothing set them."""
    vocab = tokenizer.get_vocab()
    for attribute, names in _SPECIAL_NAMES.items():
        if getattr(tokenizer, attribute, None) is None:
            found = next((name for name in names if name in vocab), None)
            if found is not None:
                setattr(tokenizer, attribute, found)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
