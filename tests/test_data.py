"""Corpora, the train/validation split, token packing and the training batch order (`arbor.training.data`)."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from arbor.training.data import (
    MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT,
    DataError,
    PackedDataset,
    batch_at,
    builtin_corpus,
    load_corpus,
    split_documents,
    tokenize_documents,
)
from arbor.training.tokenizer import train_bpe


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


def test_tokenizing_in_small_batches_gives_the_same_stream(corpus, tokenizer):
    whole = tokenize_documents(corpus[:20], tokenizer)
    assert torch.equal(tokenize_documents(corpus[:20], tokenizer, max_chars=2_000), whole)
    assert torch.equal(tokenize_documents(corpus[:20], tokenizer, chunk=1), whole)


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


def test_batch_at_is_the_trainers_order_and_visits_each_block_once_per_epoch(dataset):
    import arbor.training.trainer

    assert arbor.training.trainer.batch_at is batch_at
    first = [batch_at(dataset.blocks, i, 4, seed=3) for i in range(5)]
    assert all(b.shape == (4, 16) and b.dtype == dataset.blocks.dtype for b in first)
    assert all(torch.equal(a, batch_at(dataset.blocks, i, 4, seed=3)) for i, a in enumerate(first))
    # Blocks holding their own index: the first n rows drawn are one epoch, each block once;
    # the next epoch is another order, and another seed another pass.
    n = 30
    index = torch.arange(n).view(n, 1)
    drawn = torch.cat([batch_at(index, i, 4, seed=3) for i in range(2 * n // 4)]).view(-1).tolist()
    assert sorted(drawn[:n]) == list(range(n)) and sorted(drawn[n : 2 * n]) == list(range(n))
    assert drawn[n : 2 * n] != drawn[:n]
    assert batch_at(index, 0, 8, seed=4).view(-1).tolist() != drawn[:8]


# --------------------------------------------------------------------------- the standard-library corpus


def _fake_stdlib(root, files=60):
    """A directory laid out like a CPython ``lib/pythonX.Y`` with the folders the corpus must skip."""
    kept = []
    for i in range(files):
        name = f"pkg{i % 5}/mod{i:03d}.py" if i % 3 else f"mod{i:03d}.py"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def f{i}():\n    return {i}  # é\n" * (1 + i % 7), encoding="utf-8")
        kept.append(name)
    for skipped in ("test/test_os.py", "tests/x.py", "pkg1/tests/test_a.py", "idlelib/idle_test/test_b.py",
                    "lib2to3/tests/data/c.py", "site-packages/third/d.py", "dist-packages/e.py",
                    "email/test/f.py", "__pycache__/g.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("SKIPPED = True\n", encoding="utf-8")
    (root / "notes.txt").write_text("not python\n", encoding="utf-8")
    (root / "empty.py").write_text("\n", encoding="utf-8")
    (root / "latin1.py").write_bytes(b"# caf\xe9\nx = 1\n")
    return sorted([*kept, "empty.py", "latin1.py"])


def test_stdlib_files_skip_tests_and_third_party_packages_in_path_order(tmp_path):
    from arbor.training.data import read_stdlib, stdlib_files

    listed = _fake_stdlib(tmp_path)
    assert stdlib_files(tmp_path) == listed  # sorted relative POSIX paths, nothing from the excluded folders
    corpus = read_stdlib(tmp_path)
    assert corpus.skipped == ["latin1.py"]  # not UTF-8: skipped and counted
    assert "empty.py" not in corpus.names and len(corpus.names) == len(corpus.documents) == len(listed) - 2
    assert corpus.documents[0] == (tmp_path / corpus.names[0]).read_text(encoding="utf-8")
    # The same tree under another root gives the same names in the same order.
    other = tmp_path / "elsewhere" / "lib"
    other.mkdir(parents=True)
    _fake_stdlib(other)
    assert read_stdlib(other).names == corpus.names and read_stdlib(other).documents == corpus.documents
    with pytest.raises(DataError, match="does not exist"):
        stdlib_files(tmp_path / "missing")


def test_read_stdlib_leaves_out_files_a_program_wrote(tmp_path):
    from arbor.training.data import is_generated, read_stdlib

    files = {
        "encodings/cp999.py": '""" Python Character Mapping Codec cp999 generated from \'CP999.TXT\' with gencodec.py.\n"""\n',
        "token.py": "# Auto-generated by Tools/scripts/generate_token.py\nENDMARKER = 0\n",
        "keyword.py": '"""Keywords.\n\nThis file is automatically generated; please don\'t muck it up!\n"""\n',
        "stringprep.py": "# This file is generated by mkstringprep.py. DO NOT EDIT.\n",
        "_sysconfigdata__linux_x86_64-linux-gnu.py": "build_time_vars = {}\n",
        # Kept: "generated" about something else, and a marker below the head.
        "parse.py": '"""Parser engine for the grammar tables generated by pgen."""\n',
        "late.py": "x = 1\n" * 5 + "# do not edit the line above\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    corpus = read_stdlib(tmp_path)
    assert corpus.names == ["late.py", "parse.py"]
    assert corpus.generated == sorted(set(files) - {"late.py", "parse.py"})
    assert all(is_generated(name, files[name]) for name in corpus.generated)


def test_split_files_is_by_file_deterministic_and_near_the_fraction():
    from arbor.training.data import split_files

    names = [f"pkg{i % 13}/mod{i}.py" for i in range(4000)]
    train, val = split_files(names, 0.02, seed=0)
    assert not set(train) & set(val) and sorted(train + val) == sorted(names)
    assert 0.012 < len(val) / len(names) < 0.028
    assert (train, val) == split_files(names, 0.02, seed=0)
    kept, held = set(train), set(val)
    assert train == [n for n in names if n in kept]  # input order kept
    # A file's side depends only on its name: other files, order and count do not move it.
    assert split_files(list(reversed(names[:2000])), 0.02)[1] == [n for n in reversed(names[:2000]) if n in held]
    assert split_files(names, 0.02, seed=1)[1] != val
    assert split_files(names, 0.0) == (names, [])
    assert split_files(["a.py", "b.py"], 0.02)[1] and split_files(["a.py", "b.py"], 0.02)[0]  # never one-sided
    with pytest.raises(DataError, match="validation fraction"):
        split_files(names, 1.0)


def test_load_split_splits_stdlib_by_file_and_other_corpora_as_before(tmp_path, monkeypatch):
    import arbor.training.data as data

    _fake_stdlib(tmp_path)
    monkeypatch.setattr(data, "stdlib_root", lambda: tmp_path)
    corpus = data.read_stdlib()
    documents, train, val = data.load_split(data.STDLIB, seed=3, fraction=0.2)
    assert documents == corpus.documents == data.load_corpus("stdlib")
    held = set(data.split_files(corpus.names, 0.2, seed=3)[1])
    assert val == [d for n, d in zip(corpus.names, corpus.documents) if n in held] and val
    assert sorted(train + val) == sorted(documents)  # whole files, not a tail cut
    docs = load_corpus("builtin")
    assert data.load_split("builtin", seed=2)[1:] == split_documents(docs, seed=2)


def test_the_real_stdlib_lists_many_files_and_no_tests():
    from arbor.training.data import STDLIB_EXCLUDED_DIRS, stdlib_files

    names = stdlib_files()
    assert len(names) > 500 and names == sorted(names)
    assert "os.py" in names and "json/__init__.py" in names
    assert not any(set(name.split("/")[:-1]) & STDLIB_EXCLUDED_DIRS for name in names)
    assert not any(name.startswith(("test/", "idlelib/idle_test/", "lib2to3/tests/")) for name in names)


def test_the_real_stdlib_corpus_has_no_codec_tables():
    from arbor.training.data import read_stdlib

    corpus = read_stdlib()
    assert "encodings/cp437.py" in corpus.generated and "pydoc_data/topics.py" in corpus.generated
    assert "encodings/utf_8.py" in corpus.names and "os.py" in corpus.names
    assert not set(corpus.names) & set(corpus.generated)


def test_preflight_accepts_the_stdlib_corpus(tmp_path, monkeypatch):
    from arbor.training.preflight import RunCheckError, check_run
    from arbor.training.trainer import TrainConfig

    monkeypatch.chdir(tmp_path)  # no file or directory named "stdlib" here
    check_run(TrainConfig.model_validate({"data": "stdlib"}))
    with pytest.raises(RunCheckError, match="matches no file or directory"):
        check_run(TrainConfig.model_validate({"data": "stdlib2"}))


def test_the_default_run_reads_less_than_one_epoch_of_the_stdlib():
    """`arbor train` on its defaults must not memorise: every training batch is new text."""
    from arbor.cli.train import prepare
    from arbor.training.trainer import TrainConfig

    config = TrainConfig()
    assert config.data == "stdlib"
    _, train, val = prepare(config, echo=lambda message: None)
    consumed = config.max_steps * config.batch_size * config.grad_accum * config.seq_len
    assert consumed < 0.75 * train.numel(), (consumed, train.numel())
    assert val.numel() > 50 * config.seq_len  # enough held-out text for a stable validation loss
