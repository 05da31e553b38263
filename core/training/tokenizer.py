"""Tokenizers for training: a byte-level BPE trained on the corpus, or one loaded from disk.

Both give a ``transformers`` fast tokenizer with ``eos_token`` set, because the
data pipeline (:mod:`arbor.training.data`) separates packed documents with it. A trained
tokenizer saves with ``save_pretrained(dir)`` as ``tokenizer.json`` plus
``tokenizer_config.json`` and loads back with ``AutoTokenizer.from_pretrained(dir)``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
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


#: Longest piece of text the BPE trainer is given at once. The `tokenizers` trainer's time grows with
#: the square of a word's length: a 3 MB file without whitespace, or 1 MB of one repeated character,
#: ran for many minutes as one word. Text is cut into pieces at most this long, at word starts
#: (see `_cut_at_word_starts`), so ordinary text splits into exactly the words it would uncut; only
#: a run this long with no space or newline in it is cut inside, which bounds the trainer's time by
#: (characters x this length).
MAX_PIECE_CHARS = 1000
#: Most characters BPE is trained on. A larger corpus is sampled (`training_sample`), evenly and
#: deterministically: a tokenizer's merges settle long before this, and training time stays bounded
#: (measured on 2 busy cores at vocab 2048: 10 M characters of Python in about 8 s, 3 M random letters,
#: the slowest kind of text, in about 21 s). Every built-in corpus is smaller, so trains on all its text.
MAX_TRAINING_CHARS = 20_000_000
#: Above this many characters, training shows the trainer's progress bars when stderr is a terminal.
PROGRESS_CHARS = 2_000_000


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
    max_chars: int = MAX_TRAINING_CHARS,
    show_progress: bool | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Byte-level means any text encodes without unknown tokens and
    ``decode(encode(text)) == text`` holds exactly, non-ASCII included. No token
    is added automatically around an encoding: documents are separated by
    ``eos_token`` when the data is packed, and ``bos_token`` is there for
    callers that want one. The same texts and arguments give the same vocabulary
    and merges. ``vocab_size`` is an upper bound: a small corpus may run out of
    pairs that occur ``min_frequency`` times before reaching it.

    Training takes bounded time whatever the text: the trainer sees at most
    ``max_chars`` characters (`training_sample`), in pieces of at most
    ``MAX_PIECE_CHARS``. ``show_progress`` shows the trainer's progress bars;
    by default they show when the sample exceeds ``PROGRESS_CHARS`` and stderr
    is a terminal.
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
    if not isinstance(max_chars, int) or max_chars < 1:
        raise TokenizerError(f"max_chars={max_chars!r} is invalid: must be a positive integer")
    texts = [texts] if isinstance(texts, str) else texts if isinstance(texts, Sequence) else list(texts)
    if show_progress is None:
        show_progress = min(sum(map(len, texts)), max_chars) > PROGRESS_CHARS and sys.stderr.isatty()

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
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(training_sample(texts, max_chars), trainer=trainer)
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=list(specials[3:]) or None,
        **kwargs,
    )


def training_sample(texts: Sequence[str], max_chars: int = MAX_TRAINING_CHARS,
                    piece_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """The text BPE trains on: ``texts`` cut into pieces of at most ``piece_chars`` characters
    (`_cut_at_word_starts`), of which at most ``max_chars`` characters are kept.

    When ``texts`` hold more, pieces are kept evenly across the whole corpus: a piece is kept when
    keeping it leaves the characters kept so far within ``max_chars / total`` of those seen. The
    sample depends only on the texts, so the same corpus trains the same tokenizer on every run.
    """
    total = sum(map(len, texts))
    share = min(1.0, max_chars / total) if total else 1.0
    seen = kept = 0
    for text in texts:
        for piece in _cut_at_word_starts(text, piece_chars):
            seen += len(piece)
            if kept + len(piece) <= share * seen:
                kept += len(piece)
                yield piece


# How many spaces or newlines `_cut_at_word_starts` tries before it cuts where the piece is full.
_CUT_TRIES = 64


def _cut_at_word_starts(text: str, limit: int) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``limit`` characters, each but the first starting at
    a space or newline that is followed by a non-space character.

    The byte-level pre-tokenizer always starts a word at such a character (a space joins the word
    after it; a newline before a word is a word of its own, and any whitespace before it another),
    so the pieces split into the same words as the whole text. Where the last ``limit`` characters
    hold no such place (a long run with no whitespace), the piece is cut where it is full.
    """
    start = 0
    while len(text) - start > limit:
        full = start + limit  # < len(text), so text[i + 1] below exists
        cut, i = full, full
        for _ in range(_CUT_TRIES):
            i = max(text.rfind(" ", start + 1, i), text.rfind("\n", start + 1, i))
            if i < 0:
                break
            if not text[i + 1].isspace():
                cut = i
                break
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


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
