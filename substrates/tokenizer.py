"""The code-point tokenizer: a character's id is its Unicode code point.

PGT pairs its frozen substrates with a tokenizer whose single-character ids
are code points, so the ``binary`` substrate sees a character's code point in
its bits and ``unicode-glyphs`` can render a token from its id alone.

Vocabulary (65,536 ids, the Basic Multilingual Plane):

* id ``i`` is the character ``chr(i)`` for every BMP code point except the two below;
* ids U+E000..U+E003 (the start of the private-use area) are the special
  tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>``, ``<|unk|>``; the characters
  U+E000..U+E003 themselves have no id of their own and encode as ``<|unk|>``,
  so text can never smuggle in a special token that way;
* ids U+D800..U+DFFF (surrogates: halves of UTF-16 pairs, never characters) hold
  placeholders ``<|reserved-D800|>`` .. that no text encodes to; they keep the
  ids contiguous, so ``len(tokenizer) == 65536``;
* characters beyond the BMP (most emoji, historic scripts, U+10000 and up)
  encode as ``<|unk|>``: one id each, so they do not round-trip;
* optional merges (``merges_corpus``): the most frequent character n-grams of
  a corpus, trained as BPE merges, get ids 65,536 and up, in merge order.
  Merges never cross a boundary between a word and the whitespace before it
  ends: text is split into pieces ``" ?\\S+"`` and whitespace runs first.

No normalisation and no added tokens around an encoding: ``decode(encode(t)) == t``
for every BMP text that avoids U+E000..U+E003.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

#: Ids of the Basic Multilingual Plane; merged n-grams get ids from here on.
BMP_SIZE = 65_536
#: Special tokens and their ids: the first code points of the private-use area.
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}
SPECIAL_IDS = {name: 0xE000 + i for i, name in enumerate(SPECIAL_TOKENS.values())}
SURROGATES = range(0xD800, 0xE000)
_RESERVED = "<|reserved-{:04X}|>"
_RESERVED_PATTERN = re.compile(r"<\|reserved-[0-9A-F]{4}\|>")
# Words with at most one leading space, and whitespace runs: the pieces merges stay inside.
_PIECES = r" ?\S+|\s+"


def codepoint_text(token_id: int) -> str | None:
    """The character id ``token_id`` stands for in the code-point vocabulary, or None
    for special tokens, reserved placeholders and ids beyond the BMP."""
    if not 0 <= token_id < BMP_SIZE or token_id in SURROGATES or token_id in SPECIAL_IDS.values():
        return None
    return chr(token_id)


def is_reserved_token(token: str) -> bool:
    """Whether ``token`` is one of the surrogate placeholders (never produced from text)."""
    return bool(_RESERVED_PATTERN.fullmatch(token))


def _base_vocab() -> dict[str, int]:
    names = {i: token for token, i in SPECIAL_IDS.items()}
    vocab = {}
    for i in range(BMP_SIZE):
        text = codepoint_text(i)
        vocab[text if text is not None else names.get(i, _RESERVED.format(i))] = i
    return vocab


def _train_merges(corpus: Iterable[str], num_merges: int, min_frequency: int) -> list[tuple[str, str]]:
    """The ``num_merges`` most frequent n-gram merges of ``corpus``, in the order BPE learns them."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    texts = [t for t in corpus if t]
    alphabet = {c for t in texts for c in t}
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECES), behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + num_merges, min_frequency=min_frequency, show_progress=False,
        limit_alphabet=len(alphabet) + 1,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges][:num_merges]


def build_codepoint_tokenizer(
    merges_corpus: Iterable[str] | None = None,
    *,
    num_merges: int = 1024,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """The code-point tokenizer, as a ``transformers`` fast tokenizer.

    With ``merges_corpus`` (an iterable of texts), up to ``num_merges`` frequent
    n-grams seen at least ``min_frequency`` times become tokens with ids from
    65,536 up; merges that would involve a character without its own id
    (beyond the BMP, or U+E000..U+E003) are left out, and so are merges
    built on them. The same corpus and arguments give the same vocabulary.
    Save with ``save_pretrained(dir)`` (or `save_codepoint_tokenizer`); load with
    ``AutoTokenizer.from_pretrained(dir)``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if not isinstance(num_merges, int) or isinstance(num_merges, bool) or num_merges < 0:
        raise ValueError(f"num_merges={num_merges!r} is invalid: must be an integer >= 0")
    if not isinstance(min_frequency, int) or isinstance(min_frequency, bool) or min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency!r} is invalid: must be an integer >= 1")
    vocab = _base_vocab()
    merges: list[tuple[str, str]] = []
    if merges_corpus is not None and num_merges:
        if isinstance(merges_corpus, (str, bytes)):
            raise ValueError("merges_corpus is invalid: give an iterable of texts (a list of strings), not one string")
        for left, right in _train_merges(merges_corpus, num_merges, min_frequency):
            merged = left + right
            # Both halves need an id of their own (a code point or an earlier merge), and the
            # result must be new; whatever fails here fails for every merge built on it too.
            if left in vocab and right in vocab and merged not in vocab and not is_reserved_token(merged):
                vocab[merged] = len(vocab)
                merges.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=SPECIAL_TOKENS["unk_token"]))
    if merges:  # without merges every character is its own token: splitting would change nothing
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECES), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # tokens are pieces of the text: join them with nothing in between
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS, **kwargs
    )


def save_codepoint_tokenizer(directory: str | os.PathLike, merges_corpus: Iterable[str] | None = None,
                             **kwargs) -> Path:
    """Build the code-point tokenizer and save it in ``directory`` (``tokenizer.json`` and its config)."""
    directory = Path(directory)
    build_codepoint_tokenizer(merges_corpus, **kwargs).save_pretrained(directory)
    return directory
