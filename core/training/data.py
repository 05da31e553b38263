"""Training data: corpora, a train/validation split, token packing and the order of the training batches.

The pipeline is four plain steps, each usable alone::

    documents = load_corpus("builtin")                        # list[str]
    train_docs, val_docs = split_documents(documents, 0.05)
    blocks = PackedDataset.from_documents(train_docs, tokenizer, seq_len=256).blocks  # [N, 256]
    batch = batch_at(blocks, step, batch_size=8, seed=0)      # [8, 256], a pure function of the step

`batch_at` is the order `arbor.training.trainer.Trainer` draws its batches in. A batch is
its own target: causal LMs in arbor (as in transformers) shift the labels
inside the loss, so the Trainer passes ``labels=input_ids``.

The four steps share one module because each is short, they share the corpus
specs and `DataError`, and a reader follows them in the order they run.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import os
import sysconfig
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from arbor.training.tokenizer import clean_text, encode

#: The corpus spec naming the built-in corpus.
BUILTIN = "builtin"
#: The corpus spec naming CPython's standard-library source (see `stdlib_corpus`).
STDLIB = "stdlib"
#: Corpus specs that name a built-in corpus rather than a path.
NAMED_CORPORA = (BUILTIN, STDLIB)
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Files `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write.
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
ACCEPTED = (
    f"{BUILTIN!r}, a text file, a {'/'.join(JSONL_SUFFIXES)} file, a glob, "
    f"a directory of {'/'.join(TEXT_SUFFIXES)} files, a directory written by datasets' save_to_disk, "
    f"or {STDLIB!r} (the Python standard library's source)"
)

#: Below this many documents the split holds out the tail of the text instead
#: of whole documents: with a handful of documents, whole ones would make the
#: validation set a different kind of text rather than a sample of the same.
MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT = 10


class DataError(ValueError):
    """A corpus, split or packing request cannot be served; the message names the path or field."""


# --------------------------------------------------------------------------- corpora


def builtin_corpus() -> list[str]:
    """The English reference text every CPython ships (``pydoc_data.topics``), one document per topic.

    About 450 KB of prose and code samples, available offline everywhere;
    topics are taken in sorted-key order so the corpus is the same on every run.
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


#: Directory names never descended into when collecting the standard library's source:
#: third-party packages, test suites (``test``, ``tests``, ``idlelib/idle_test``) and bytecode caches.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
#: Share of the standard library's files `split_files` holds out for validation by default.
STDLIB_VALIDATION_FRACTION = 0.02


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """Every ``.py`` file of the standard library, as POSIX paths relative to ``root``, sorted.

    ``root`` defaults to `stdlib_root`. Directories named in
    ``STDLIB_EXCLUDED_DIRS`` are skipped at any depth, symbolic links to
    directories are not followed, and the order depends only on the relative
    paths, so two machines with the same CPython list the same files in the
    same order.
    """
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise DataError(f"corpus {STDLIB!r}: the standard library directory {str(root)!r} does not exist")
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        base = Path(folder).relative_to(root)
        names.extend((base / f).as_posix() for f in files if f.endswith(".py"))
    return sorted(names)


@dataclass
class FileCorpus:
    """Documents read one per file, with the relative path (``names[i]``) of each document (``documents[i]``).

    ``skipped`` lists the files left out because they are not UTF-8 text;
    files that are empty or only whitespace are left out without being listed.
    """

    root: Path
    names: list[str] = dataclass_field(default_factory=list)
    documents: list[str] = dataclass_field(default_factory=list)
    skipped: list[str] = dataclass_field(default_factory=list)

    @property
    def num_chars(self) -> int:
        return sum(map(len, self.documents))

    def split(self, fraction: float = STDLIB_VALIDATION_FRACTION, seed: int = 0) -> tuple[list[str], list[str]]:
        """(train, validation) documents, split by file with `split_files`; both sides keep the sorted order."""
        held = set(split_files(self.names, fraction, seed)[1])
        train = [doc for name, doc in zip(self.names, self.documents) if name not in held]
        val = [doc for name, doc in zip(self.names, self.documents) if name in held]
        return train, val


def read_stdlib(root: str | Path | None = None) -> FileCorpus:
    """CPython's standard-library source, one document per `stdlib_files` file, in that order.

    About 700-1,000 files and 10-15 MB of text depending on the CPython
    version, read from the local installation (no download). The documents are
    held in memory as one string per file (the size of the text, about 12 MB
    for CPython 3.11); packing then stores the tokens once as int32.
    """
    root = Path(root) if root is not None else stdlib_root()
    corpus = FileCorpus(root)
    for name in stdlib_files(root):
        try:
            text = (root / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            corpus.skipped.append(name)
            continue
        if text.strip():
            corpus.names.append(name)
            corpus.documents.append(text)
    if not corpus.documents:
        raise DataError(f"corpus {STDLIB!r}: no Python source under {str(root)!r}")
    return corpus


def stdlib_corpus(root: str | Path | None = None) -> list[str]:
    """The documents of `read_stdlib`: every standard-library ``.py`` file's text, in sorted path order."""
    return read_stdlib(root).documents


def load_corpus(spec: str | Path | Sequence[str | Path], *, field: str = "text") -> list[str]:
    """Documents named by ``spec``: ``"builtin"``, ``"stdlib"``, a file, a glob, a directory, or a list of those.

    - ``"builtin"``: `builtin_corpus`; ``"stdlib"``: `stdlib_corpus`;

    - a ``.jsonl``/``.ndjson`` file: one JSON object per line, the document in ``field``;
    - any other file: its whole UTF-8 text is one document;
    - a glob (``data/*.txt``, ``**`` allowed): the matches in sorted order, each as above;
    - a directory written by ``datasets``' ``save_to_disk``: its ``field`` column
      (a ``DatasetDict`` uses its ``train`` split);
    - any other directory: every ``.txt``/``.md`` file below it, in sorted path order.

    Documents that are empty or only whitespace are dropped.
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise DataError(f"corpus: no spec given; expected {ACCEPTED}")
    # Lone surrogates (from JSON escapes) would fail inside the tokenizers; they become U+FFFD.
    documents = [clean_text(doc) for one in specs for doc in _load_spec(str(one), field) if doc.strip()]
    if not documents:
        raise DataError(f"corpus {_show(specs)}: holds no text")
    return documents


def _show(specs: list) -> str:
    return repr(str(specs[0])) if len(specs) == 1 else repr([str(s) for s in specs])


def _load_spec(spec: str, field: str) -> list[str]:
    if spec == BUILTIN:
        return builtin_corpus()
    if spec == STDLIB:
        return stdlib_corpus()
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(path, field)
    if any(char in spec for char in "*?["):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise DataError(f"corpus {spec!r}: the glob matches no file; expected {ACCEPTED}")
        return [doc for match in matches for doc in _load_path(Path(match), field)]
    raise DataError(f"corpus {spec!r}: no such file or directory; expected {ACCEPTED}")


def _load_path(path: Path, field: str) -> list[str]:
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DATASET_MARKERS):
            return load_saved_dataset(path, field)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(
                f"corpus {str(path)!r}: directory holds no {'/'.join(TEXT_SUFFIXES)} file and is not a saved dataset"
            )
        return [_read_text(p) for p in files]
    if path.suffix.lower() in JSONL_SUFFIXES:
        return read_jsonl(path, field)
    return [_read_text(path)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"corpus file {str(path)!r}: not UTF-8 text (byte {error.start}: {error.reason})") from error


def read_jsonl(path: str | Path, field: str = "text") -> list[str]:
    """The ``field`` of every JSON object in a JSON-lines file; blank lines are skipped.

    A line that is not JSON, not an object, or lacks a string ``field`` is an
    error naming the file and the line number.
    """
    path = Path(path)
    documents = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}")
            if field not in record:
                raise DataError(f"{where}: no {field!r} field (fields: {', '.join(map(repr, record)) or 'none'})")
            if not isinstance(record[field], str):
                raise DataError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
            documents.append(record[field])
    return documents


def load_saved_dataset(path: str | Path, field: str = "text") -> list[str]:
    """The ``field`` column of a dataset saved with ``datasets``' ``save_to_disk`` (needs ``datasets``)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"corpus {str(path)!r} is a saved `datasets` dataset, but the datasets package is not installed "
            "(pip install datasets)"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"corpus {str(path)!r}: a DatasetDict needs a 'train' split, it has {sorted(loaded)}")
        loaded = loaded["train"]
    if field not in loaded.column_names:
        columns = ", ".join(map(repr, loaded.column_names))
        raise DataError(f"corpus {str(path)!r}: no {field!r} column (columns: {columns})")
    return [text for text in loaded[field] if isinstance(text, str)]


# --------------------------------------------------------------------------- split


def split_documents(documents: Sequence[str], fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split into (train, validation) with about ``fraction`` of the characters held out.

    With at least ``MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT`` documents, whole
    documents are held out: they are ranked by a hash of ``seed`` and their
    content, so the split depends on what the documents say, not on the order
    they were listed in (a glob on another file system, a shuffled JSONL file
    give the same validation set). Documents are taken in rank order,
    skipping any that would push the held-out text past twice the target, until
    the target is reached. Identical documents go to the same side, so a
    duplicate cannot leak validation text into training. Both sides keep the
    input order.

    With fewer documents, or when no such selection reaches the target (one
    document holding most of the text), the tail of the concatenated text is
    held out instead, cut at a line start where there is one.
    """
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise DataError(f"validation fraction={fraction!r} is invalid: must be a number in [0, 1)")
    documents = list(documents)
    total = sum(map(len, documents))
    target = fraction * total
    if target == 0:
        return documents, []
    if len(documents) >= MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT:
        held = _held_out_documents(documents, target, total, seed)
        if held is not None:
            return [d for d in documents if d not in held], [d for d in documents if d in held]
    return _split_tail(documents, math.ceil(target))


def _held_out_documents(documents: list[str], target: float, total: int, seed: int) -> set[str] | None:
    copies = Counter(documents)
    ranked = sorted(copies, key=lambda doc: (_digest(seed, doc), doc))
    held, held_chars = set(), 0
    for doc in ranked:
        if held_chars >= target:
            break
        size = len(doc) * copies[doc]
        if held_chars + size <= 2 * target and held_chars + size < total:
            held.add(doc)
            held_chars += size
    return held if held_chars >= target else None


def _digest(seed: int, text: str) -> bytes:
    # surrogatepass: JSON may carry lone surrogates, which strict UTF-8 refuses.
    return hashlib.blake2b(f"{seed}\0{text}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


def _split_tail(documents: list[str], held_chars: int) -> tuple[list[str], list[str]]:
    cut = max(1, sum(map(len, documents)) - held_chars)  # character offset where validation starts
    start = 0
    for index, doc in enumerate(documents):
        if start + len(doc) > cut:
            offset = cut - start
            line_start = doc.rfind("\n", 0, offset) + 1
            if line_start > 0 or index > 0:  # keep training text non-empty
                offset = line_start
            head, tail = doc[:offset], doc[offset:]
            return documents[:index] + ([head] if head else []), [tail, *documents[index + 1 :]]
        start += len(doc)
    return documents, []


def split_files(names: Sequence[str], fraction: float = STDLIB_VALIDATION_FRACTION,
                seed: int = 0) -> tuple[list[str], list[str]]:
    """Split file names into (train, validation), each file on one side whole; both keep the input order.

    A file is held out when the SHA-256 of ``seed`` and its name, read as a
    number in [0, 1), is below ``fraction``, so about that share of the files
    is held out. The name (a path relative to the corpus root), not the
    content, is the key: each file's side depends on nothing else, so the
    split is the same on every machine, in every run, and across CPython patch
    releases that edit a file's text or add and remove other files. When no
    file falls below the threshold but ``fraction > 0``, the file with the
    lowest hash is held out, and a file is moved back to training when every
    file fell below it, so both sides are non-empty from two files on.
    """
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise DataError(f"validation fraction={fraction!r} is invalid: must be a number in [0, 1)")
    names = list(names)
    if fraction == 0 or not names:
        return names, []
    scores = {name: _file_score(seed, name) for name in names}
    held = {name for name in names if scores[name] < fraction}
    if not held:
        held = {min(names, key=lambda name: (scores[name], name))}
    if len(held) == len(set(names)) and len(held) > 1:
        held.discard(max(names, key=lambda name: (scores[name], name)))
    return [n for n in names if n not in held], [n for n in names if n in held]


def _file_score(seed: int, name: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{name}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def load_split(spec: str | Path | Sequence[str | Path], *, seed: int = 0,
               fraction: float | None = None) -> tuple[list[str], list[str], list[str]]:
    """(all documents, train, validation) for ``spec``, split the way `arbor train` splits it.

    ``"stdlib"`` is split by file with `split_files` (``fraction`` defaults to
    ``STDLIB_VALIDATION_FRACTION``); any other spec is `load_corpus` followed by
    `split_documents` (``fraction`` defaults to 0.05).
    """
    if isinstance(spec, str) and spec == STDLIB:
        corpus = read_stdlib()
        train, val = corpus.split(STDLIB_VALIDATION_FRACTION if fraction is None else fraction, seed)
        return corpus.documents, train, val
    documents = load_corpus(spec)
    options = {} if fraction is None else {"fraction": fraction}
    train, val = split_documents(documents, seed=seed, **options)
    return documents, train, val


# --------------------------------------------------------------------------- packing


def _batches_of_text(documents: Sequence[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if len(batch) >= max_docs or size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_documents(documents: Sequence[str], tokenizer: Any, *, chunk: int = 1024, max_chars: int = 1_000_000,
                       parse_special: bool = False) -> torch.Tensor:
    """One int32 token stream: each document's tokens followed by ``tokenizer.eos_token_id``.

    No other special tokens are added (``add_special_tokens=False``): the eos
    after a document tells the model where the next one begins. Special-token
    text inside a document (``"<|eos|>"``) is encoded as plain text unless
    ``parse_special``, so data cannot forge document boundaries. Documents are
    encoded in batches (at most ``chunk`` documents or about ``max_chars`` characters)
    through the fast tokenizer, which runs a batch in parallel; each batch's ids
    become an int32 tensor at once, so the Python lists the tokenizer returns
    never hold more than one batch (a few MB) however large the corpus.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("tokenizer has no eos_token: packing separates documents with it; set tokenizer.eos_token")
    parts = []
    for batch in _batches_of_text(documents, chunk, max_chars):
        encoded = encode(
            tokenizer, batch, parse_special=parse_special, add_special_tokens=False,
            return_attention_mask=False, verbose=False,
        )["input_ids"]
        stream: list[int] = []
        for ids in encoded:
            stream.extend(ids)
            stream.append(eos)
        parts.append(torch.tensor(stream, dtype=torch.int32))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)


class PackedDataset(Dataset):
    """A token stream cut into blocks of ``seq_len`` tokens; the tokens after the last full block are dropped.

    Item ``i`` is ``{"input_ids": block, "labels": block}`` (labels a copy, so
    masking them in place cannot change the inputs). Tokens are stored once as
    int32 and widened to int64 per batch; ``blocks`` is the int32
    ``[num_blocks, seq_len]`` view of them.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"seq_len={seq_len!r} is invalid: must be a positive integer")
        if tokens.dim() != 1:
            raise DataError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
        self.seq_len = seq_len
        self.num_blocks = tokens.numel() // seq_len
        self.tokens = tokens
        self.blocks = tokens[: self.num_blocks * seq_len].view(self.num_blocks, seq_len)

    @classmethod
    def from_documents(cls, documents: Sequence[str], tokenizer: Any, seq_len: int, *,
                       parse_special: bool = False) -> PackedDataset:
        return cls(tokenize_documents(documents, tokenizer, parse_special=parse_special), seq_len)

    @property
    def num_tokens(self) -> int:
        """Tokens in full blocks, i.e. what one epoch trains on."""
        return self.num_blocks * self.seq_len

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.num_blocks <= index < self.num_blocks:
            raise IndexError(f"block {index} out of range for {self.num_blocks} blocks")
        return _batch(self.blocks[index])

    def batch(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """The blocks at ``indices`` stacked into one batch."""
        return _batch(self.blocks[torch.as_tensor(indices, dtype=torch.long)])


def _batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    input_ids = blocks.long()
    return {"input_ids": input_ids, "labels": input_ids.clone()}


# --------------------------------------------------------------------------- batches


def batch_at(blocks: torch.Tensor, index: int, batch_size: int, seed: int) -> torch.Tensor:
    """Batch number ``index`` of an endless, epoch-wise shuffled pass over ``blocks``: the rows the Trainer trains on.

    Row ``k`` of the pass (``index * batch_size <= k < (index + 1) * batch_size``)
    is block ``_epoch_order(n, seed, epoch)[pos]`` with ``epoch, pos = divmod(k, n)``:
    every epoch visits each of the ``n`` blocks once, and a batch may straddle two
    epochs. A pure function of its arguments, so a resumed run draws exactly the
    batches the uninterrupted run would have drawn.
    """
    n = blocks.shape[0]
    rows = []
    for k in range(index * batch_size, (index + 1) * batch_size):
        epoch, pos = divmod(k, n)
        rows.append(int(_epoch_order(n, seed, epoch)[pos]))
    return blocks[rows]


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # The order of every published run: torch's randperm under the generator
    # seed ``seed * 100_003 + epoch`` (distinct for each (seed, epoch) while
    # epoch < 100_003). Changing it changes which blocks every step trains on.
    # Drawn once per epoch rather than once per row (a 30,000-block permutation costs ~0.7 ms);
    # still a pure function of its arguments. Read only: the cached tensor is shared.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
