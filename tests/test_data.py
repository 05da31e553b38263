"""Corpora, the train/validation split, token packing and resumable batches (`arbor.data`)."""

from __future__ import annotations

import itertools
import json
import sys
import time

import pytest
import torch

from arbor.data import (
    MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT,
    Batches,
    DataError,
    PackedDataset,
    batch_indices,
    batches,
    builtin_corpus,
    epoch_order,
    eval_batches,
    load_corpus,
    split_documents,
    tokenize_documents,
)
from arbor.tokenizer import train_bpe


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("builtin")


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe(corpus, vocab_size=512)


# --------------------------------------------------------------------------- corpora


def test_builtin_corpus_is_hundreds_of_kb_and_stable(corpus):
    size = sum(map(len, corpus))
    assert 200_000 < size < 2_000_000 and len(corpus) > MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT
    assert builtin_corpus() == corpus


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text\n")
    (tmp_path / "b.md").write_text("# beta\n")
    (tmp_path / "notes.rst").write_text("not read from a directory\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("gamma — ünïcode\n")
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"text": "first"}) + "\n\n" + json.dumps({"body": "x", "text": "second"}) + "\n"
    )
    return tmp_path


def test_text_file_glob_directory_and_jsonl(tree):
    assert load_corpus(tree / "a.txt") == ["alpha text\n"]
    # A file named outright is read whatever its suffix.
    assert load_corpus(str(tree / "notes.rst")) == ["not read from a directory\n"]
    assert load_corpus(str(tree / "*.txt")) == ["alpha text\n"]  # whitespace-only documents are dropped
    assert load_corpus(str(tree / "**" / "*.txt")) == ["alpha text\n", "gamma — ünïcode\n"]
    assert load_corpus(tree) == ["alpha text\n", "# beta\n", "gamma — ünïcode\n"]  # sorted paths, .txt/.md only
    assert load_corpus(tree / "docs.jsonl") == ["first", "second"]
    assert load_corpus([tree / "a.txt", "builtin"])[0] == "alpha text\n"


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        load_corpus(path)
    path.write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: no 'text' field \(fields: 'body'\)"):
        load_corpus(path)
    with pytest.raises(DataError, match=r"d\.jsonl:1: no 'body' field"):
        load_corpus(path, field="body")
    path.write_text('["a list"]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object with a 'text' field, got list"):
        load_corpus(path)
    path.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'text' must be a string, got int"):
        load_corpus(path)


def test_missing_and_empty_corpora_are_one_line_errors(tmp_path):
    for spec, fragment in [
        (tmp_path / "nope.txt", "nope.txt': no such file or directory; expected 'builtin', a text file"),
        (str(tmp_path / "*.txt"), r"\*.txt': the glob matches no file"),
        (tmp_path, "directory holds no .txt/.md file and is not a saved dataset"),
        ([], "no spec given"),
    ]:
        with pytest.raises(DataError, match=fragment) as error:
            load_corpus(spec)
        assert "\n" not in str(error.value)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        load_corpus(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt': not UTF-8 text"):
        load_corpus(tmp_path / "latin1.txt")


def test_saved_dataset_without_the_datasets_package(tmp_path, monkeypatch):
    (tmp_path / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="saved `datasets` dataset, but the datasets package is not installed"):
        load_corpus(tmp_path)


def test_saved_dataset_loads_its_text_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow
    from datasets.table import InMemoryTable

    datasets.disable_progress_bars()

    def dataset(**columns):
        # A fixed fingerprint: computing one pickles the table, which some
        # pyarrow/dill pairs cannot do, and is no part of what is tested here.
        return datasets.Dataset(InMemoryTable(pyarrow.table(columns)), fingerprint="test")

    dataset(text=["one", "two"], n=[1, 2]).save_to_disk(str(tmp_path / "ds"))
    assert load_corpus(tmp_path / "ds") == ["one", "two"]
    with pytest.raises(DataError, match="no 'body' column"):
        load_corpus(tmp_path / "ds", field="body")
    splits = datasets.DatasetDict({"train": dataset(text=["t"]), "validation": dataset(text=["v"])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_corpus(tmp_path / "dict") == ["t"]
    datasets.DatasetDict({"test": dataset(text=["t"])}).save_to_disk(str(tmp_path / "no-train"))
    with pytest.raises(DataError, match=r"needs a 'train' split, it has \['test'\]"):
        load_corpus(tmp_path / "no-train")


# --------------------------------------------------------------------------- split


def test_document_split_is_disjoint_deterministic_and_order_free(corpus):
    train, val = split_documents(corpus, 0.05, seed=0)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(corpus)
    held = sum(map(len, val)) / sum(map(len, corpus))
    assert 0.05 <= held <= 0.10
    assert split_documents(corpus, 0.05, seed=0) == (train, val)
    # A document's side depends on its content, not its position.
    _, val_reversed = split_documents(corpus[::-1], 0.05, seed=0)
    assert sorted(val_reversed) == sorted(val)
    assert split_documents(corpus, 0.05, seed=1)[1] != val


def test_duplicates_stay_on_one_side():
    documents = [f"document number {i} " * 10 for i in range(40)]
    documents += documents[:20]
    train, val = split_documents(documents, 0.1)
    assert val and set(train).isdisjoint(val)


def test_few_documents_hold_out_the_tail():
    documents = ["line one\nline two\n" * 50, "last document\nwith lines\n" * 50]
    train, val = split_documents(documents, 0.2)
    assert "".join(train) + "".join(val) == "".join(documents)
    assert train[0] == documents[0] and val[-1].endswith("with lines\n")
    assert val[0].startswith("last document") or val[0].startswith("with lines")  # cut at a line start
    assert sum(map(len, val)) >= 0.2 * sum(map(len, documents))
    one = ["x" * 1000]
    train, val = split_documents(one, 0.05)
    assert train == ["x" * 950] and val == ["x" * 50]


def test_split_fraction_is_validated(corpus):
    assert split_documents(corpus, 0.0) == (corpus, [])
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(DataError, match="validation fraction="):
            split_documents(corpus, bad)


# --------------------------------------------------------------------------- packing


def test_packing_is_fast_and_separates_documents_with_eos(corpus, tokenizer):
    start = time.perf_counter()
    stream = tokenize_documents(corpus, tokenizer)
    assert time.perf_counter() - start < 5
    eos = tokenizer.eos_token_id
    assert stream.dtype == torch.int32 and stream[-1] == eos
    assert int((stream == eos).sum()) == len(corpus)
    # The stream is the documents' own encodings joined by eos.
    pieces, current = [], []
    for token in stream.tolist():
        if token == eos:
            pieces.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert pieces == corpus


def test_blocks_conserve_tokens_up_to_the_remainder(tokenizer):
    documents = ["first document text", "second one, different", "third"]
    stream = tokenize_documents(documents, tokenizer)
    dataset = PackedDataset(stream, seq_len=4)
    assert len(dataset) == stream.numel() // 4 and dataset.num_tokens == len(dataset) * 4
    assert stream.numel() - dataset.num_tokens < 4
    joined = torch.cat([dataset[i]["input_ids"] for i in range(len(dataset))])
    assert torch.equal(joined, stream[: dataset.num_tokens].long())
    item = dataset[-1]
    assert item["input_ids"].dtype == torch.long and torch.equal(item["input_ids"], item["labels"])
    assert item["input_ids"].data_ptr() != item["labels"].data_ptr()
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    with pytest.raises(DataError, match="seq_len=0 is invalid"):
        PackedDataset(stream, 0)


def test_packing_needs_an_eos_token():
    class NoEos:
        eos_token_id = None

    with pytest.raises(DataError, match="tokenizer has no eos_token"):
        tokenize_documents(["text"], NoEos())


# --------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def dataset(corpus, tokenizer):
    return PackedDataset.from_documents(corpus[:30], tokenizer, seq_len=16)


def test_batches_are_deterministic_and_cover_each_epoch(dataset):
    stream = batches(dataset, batch_size=4, seed=3)
    per_epoch = stream.steps_per_epoch
    first = [next(stream)["input_ids"] for _ in range(per_epoch)]
    assert all(b.shape == (4, 16) for b in first)
    again = [b["input_ids"] for b in itertools.islice(batches(dataset, 4, seed=3), per_epoch)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # One epoch visits distinct blocks; the next epoch is another order.
    order = epoch_order(len(dataset), 3, 0)
    assert sorted(order.tolist()) == list(range(len(dataset)))
    assert not torch.equal(order, epoch_order(len(dataset), 3, 1))
    assert not torch.equal(order, epoch_order(len(dataset), 4, 0))
    assert stream.state_dict()["position"] == per_epoch
    assert torch.equal(next(stream)["input_ids"], dataset.batch(epoch_order(len(dataset), 3, 1)[:4])["input_ids"])
    assert stream.epoch == 1 and stream.step == per_epoch + 1


def test_resuming_mid_run_gives_the_same_batches(dataset):
    uninterrupted = batches(dataset, 8, seed=0)
    expected = [next(uninterrupted)["input_ids"] for _ in range(3 * uninterrupted.steps_per_epoch)]
    for stop in (1, uninterrupted.steps_per_epoch, uninterrupted.steps_per_epoch + 2):
        first = batches(dataset, 8, seed=0)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
        resumed = batches(dataset, 8, seed=0)
        resumed.load_state_dict(state)
        rest = [next(resumed)["input_ids"] for _ in range(len(expected) - stop)]
        assert all(torch.equal(a, b) for a, b in zip(rest, expected[stop:]))
        # The pure function of the step agrees with the stream.
        indices = batch_indices(len(dataset), 8, 0, stop)
        assert torch.equal(dataset.batch(indices)["input_ids"], expected[stop])
    started = batches(dataset, 8, seed=0, epoch=1, position=2)
    assert torch.equal(next(started)["input_ids"], expected[started.steps_per_epoch + 2])


def test_resume_refuses_other_data_or_settings(dataset):
    state = Batches(dataset, 8, seed=0).state_dict()
    with pytest.raises(DataError, match="saved state has seed=0, this stream has seed=1"):
        Batches(dataset, 8, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="batch_size=8, this stream has batch_size=4"):
        Batches(dataset, 4, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="position"):
        Batches(dataset, 8, seed=0, position=10**6)
    with pytest.raises(DataError, match=r"batch_size=\d+ is larger than the \d+ blocks"):
        batches(dataset, len(dataset) + 1)


def test_eval_batches_visit_every_block_in_order(dataset):
    got = list(eval_batches(dataset, 7))
    assert [len(b["input_ids"]) for b in got[:-1]] == [7] * (len(got) - 1) and 1 <= len(got[-1]["input_ids"]) <= 7
    assert torch.equal(torch.cat([b["input_ids"] for b in got]), dataset.batch(range(len(dataset)))["input_ids"])
