"""Bad data files: binary or badly encoded corpora, text that used to hang BPE training, bytes that are
not UTF-8 in ``metrics.jsonl`` and JSON-lines corpora, and a plugin's checkpoint state of the wrong type.

Every refusal is one ``arbor: error: ...`` line on stderr that names the file (and the line where
there is one), with exit status 2 and no traceback; nothing runs unbounded whatever the text.
"""

from __future__ import annotations

import json
import random
import string
import subprocess
import sys
import time
import warnings

import pytest

from arbor.cli import main
from arbor.training.data import DataError, load_corpus
from arbor.training.plot import PlotError, read_metrics
from arbor.training.textfiles import MAX_INVALID_SHARE, UndecodableBytesWarning, read_utf8
from arbor.training.tokenizer import _cut_at_word_starts, train_bpe, training_sample

SETTINGS = ["--no-progress", "--max-steps", "1", "--set", "seq_len=32", "--set", "vocab_size=300",
            "--set", "sample_tokens=0", "--set", "model.preset=tiny", "--set", "eval_batches=1"]


def train(tmp_path, data) -> list[str]:
    return ["train", "--out", str(tmp_path / "run"), "--data", str(data), *SETTINGS]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arbor: error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ binary and badly encoded corpora


@pytest.mark.parametrize("content", [b"\0" * 1_000_000, "plain text, as UTF-16\n".encode("utf-16")],
                         ids=["nul-bytes", "utf-16"])
def test_a_file_with_nul_bytes_is_refused_as_binary_naming_it(tmp_path, capsys, content):
    data = tmp_path / "blob.bin"
    data.write_bytes(content)
    with pytest.raises(DataError, match="blob.bin': a binary file, not text"):
        load_corpus(data)  # refused before any tokenizer sees it
    started = time.monotonic()
    assert main(train(tmp_path, data)) == 2
    line = one_error_line(capsys)
    assert str(data) in line and "binary file" in line and "NUL byte at line 1" in line
    assert time.monotonic() - started < 30  # refused at once, not after minutes of BPE training


def test_a_file_that_is_mostly_not_utf8_is_refused_with_the_share_of_bad_bytes(tmp_path, capsys):
    data = tmp_path / "random.dat"
    data.write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(4000)) + b"ok")
    assert main(train(tmp_path, data)) == 2
    line = one_error_line(capsys)
    assert f"corpus file {str(data)!r}: not UTF-8 text" in line
    assert "bytes are invalid UTF-8, more than 1%" in line and "line 1, column 1" in line


def test_a_few_bytes_that_are_not_utf8_become_replacement_characters_with_a_warning(tmp_path):
    data = tmp_path / "mostly.txt"
    text = "The quick brown fox jumps over the lazy dog.\n" * 200
    raw = text.encode() + b"caf\xe9 and na\xefve\n"
    assert 2 / len(raw) < MAX_INVALID_SHARE
    data.write_bytes(raw)
    with pytest.warns(UndecodableBytesWarning, match=r"mostly\.txt': 2 byte\(s\) that are not UTF-8 \(the first at "
                                                     r"line 201, column 4\) read as U\+FFFD"):
        (document,) = load_corpus(data)
    assert document == text + "caf\ufffd and na\ufffdve\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file reads without a warning
        data.write_text(text, encoding="utf-8")
        assert load_corpus(data) == [text]


def test_bad_utf8_in_a_jsonl_corpus_names_the_file_and_line(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    good = json.dumps({"text": "a document " * 40}).encode() + b"\n"
    data.write_bytes(good * 2 + b'{"text": "caf\xe9"}\n' + good)
    with pytest.raises(DataError, match=r"docs\.jsonl:3: not UTF-8 text \(byte 0xe9 at column 14"):
        load_corpus(data)
    assert main(train(tmp_path, data)) == 2
    assert f"{data}:3: not UTF-8 text" in one_error_line(capsys)


def test_read_utf8_names_the_line_and_column_of_a_bad_byte(tmp_path):
    config = tmp_path / "run.toml"
    config.write_bytes(b"max_steps = 10\nlr = 1e-3\nname = \"caf\xe9\"\n")
    with pytest.raises(ValueError, match=r"run\.toml:3: not UTF-8 text \(byte 0xe9 at column 12: invalid "):
        read_utf8(config)
    config.write_text("name = \"café\"\n", encoding="utf-8")
    assert read_utf8(config) == "name = \"café\"\n"


# ------------------------------------------------------------------ metrics.jsonl


def test_arbor_plot_names_the_line_of_metrics_jsonl_that_is_not_utf8(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    record = json.dumps({"step": 1, "tokens": 64, "loss": 5.0, "params": 1000}).encode() + b"\n"
    metrics.write_bytes(record + b'{"step": 2, "note": "\xff"}\n' + record)
    with pytest.raises(PlotError, match=r"metrics\.jsonl:2: not UTF-8 text \(byte 0xff"):
        read_metrics(run)
    assert main(["plot", str(run)]) == 2
    assert f"{metrics}:2: not UTF-8 text" in one_error_line(capsys)
    # A crash may cut the last line inside a multi-byte character: that line is dropped, as a cut JSON line is.
    metrics.write_bytes(record + '{"step": 2, "note": "é'.encode()[:-1])
    assert read_metrics(run) == [json.loads(record)]


# ------------------------------------------------------------------ BPE training is bounded


def test_cut_pieces_pre_tokenize_into_the_same_words_as_the_whole_text():
    from tokenizers import pre_tokenizers

    def words(text: str) -> list[str]:
        return [word for word, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)]

    rng = random.Random(0)
    # Text where a space or newline starts a word every few characters: every cut falls where a word starts.
    separators, tokens = [" ", "  ", "\n", "\n\n", " \n", "\t ", "\n   "], ["a", "bc", "'s", ".", "42", "é", "x-y"]
    for _ in range(200):
        text = "".join(rng.choice(separators) + rng.choice(tokens) for _ in range(rng.randrange(1, 100)))
        pieces = list(_cut_at_word_starts(text, limit := rng.randrange(8, 60)))
        assert "".join(pieces) == text and all(0 < len(piece) <= limit for piece in pieces)
        assert [w for piece in pieces for w in words(piece)] == words(text)
    prose = load_corpus("builtin")[5]
    assert [w for piece in _cut_at_word_starts(prose, 200) for w in words(piece)] == words(prose)
    # Runs longer than a piece are cut inside, and nothing is lost.
    for text in ["x" * 1000, " " * 1000, "a\tb" * 300, "\n" * 500 + "end"]:
        pieces = list(_cut_at_word_starts(text, 64))
        assert "".join(pieces) == text and max(map(len, pieces)) <= 64


def test_the_training_sample_is_capped_spread_over_the_corpus_and_deterministic():
    texts = [f"document {i:03d} " + "word " * 200 for i in range(100)]
    total = sum(map(len, texts))
    assert "".join(training_sample(texts, max_chars=total)) == "".join(texts)  # under the cap: everything
    sample = list(training_sample(texts, max_chars=total // 10))
    kept = sum(map(len, sample))
    assert total // 10 - 2000 <= kept <= total // 10
    numbers = [int(p.split()[1]) for p in sample if p.startswith("document")]
    assert numbers and min(numbers) < 20 and max(numbers) > 80  # from the whole corpus, not its head
    assert sample == list(training_sample(texts, max_chars=total // 10))


@pytest.mark.parametrize("text", ["\0" * 1_000_000, " " * 1_000_000, "\n" * 1_000_000, "ab" * 500_000],
                         ids=["nul", "spaces", "newlines", "one-word"])
def test_bpe_trains_on_long_runs_of_one_character_in_bounded_time(text):
    started = time.monotonic()
    tokenizer = train_bpe([text], vocab_size=300)
    assert time.monotonic() - started < 30  # minutes before pieces were bounded
    assert tokenizer.decode(tokenizer(text[:5000])["input_ids"]) == text[:5000]


def test_a_3mb_file_without_whitespace_trains_in_bounded_time(tmp_path):
    """The file that held BPE training for hours (its time grew with the square of the word's length)."""
    data = tmp_path / "one-word.txt"
    data.write_text("".join(random.Random(0).choices(string.ascii_letters + string.digits, k=3_000_000)))
    command = [sys.executable, "-m", "arbor", *train(tmp_path, data)]
    started = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"arbor train --data {data} ran past 240 s")
    assert result.returncode == 0, result.stderr
    assert "done: step 1" in result.stdout
    print(f"3 MB without whitespace: trained in {time.monotonic() - started:.0f} s")


# ------------------------------------------------------------------ a plugin's checkpoint state

STATE_PLUGIN = """
import arbor_plugins

@arbor_plugins.hookimpl
def arbor_state_dict(model):
    return {kind!r}
"""


@pytest.fixture
def install(site):
    return lambda dist, code, version="0.3": site(dist, code, version=version)


def test_a_state_dict_hook_returning_the_wrong_type_stops_the_run_naming_its_distribution(install, tmp_path):
    from test_plugins import _trainer

    from arbor.plugins import PluginError

    install("brokenstate", STATE_PLUGIN.replace("{kind!r}", "[1, 2]"))
    with pytest.raises(PluginError, match=r"plugin 'brokenstate' 0\.3 \(entry point 'brokenstate'\) returned a list "
                                          r"from hook arbor_state_dict; expected a dict or None"):
        _trainer(tmp_path, None).fit()  # raised when the run writes its checkpoint at step 2


@pytest.mark.parametrize(("returned", "message"), [
    ("'state'", r"plugin 'brokenstate' 0\.3 .* returned a str from hook arbor_state_dict"),
    ("1 / 0", r"plugin 'brokenstate' 0\.3 .* failed in hook arbor_state_dict: ZeroDivisionError"),
])
def test_a_failing_state_dict_hook_is_named_with_its_distribution(install, returned, message):
    from test_plugins import _tiny

    from arbor.plugins import PluginError, component_state

    install("brokenstate", STATE_PLUGIN.replace("{kind!r}", returned))
    with pytest.raises(PluginError, match=message):
        component_state(_tiny())


def test_two_plugins_returning_one_state_key_are_both_named(install):
    from test_plugins import _tiny

    from arbor.plugins import PluginError, component_state

    install("stateone", STATE_PLUGIN.replace("{kind!r}", "{'shared': 1, 'one': 1}"), version="1.0")
    install("statetwo", STATE_PLUGIN.replace("{kind!r}", "{'shared': 2}"), version="2.0")
    with pytest.raises(PluginError, match=r"plugin 'state(one|two)' .* and plugin 'state(one|two)' .* both "
                                          r"returned the key 'shared'"):
        component_state(_tiny())


def test_a_config_file_that_is_not_utf8_names_its_line(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_bytes(b'max_steps = 1\nsample_prompt = "caf\xe9"\n')
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{config}:2: not UTF-8 text" in err[0]


def test_the_command_line_prints_a_warning_in_one_line(tmp_path):
    data = tmp_path / "mostly.txt"
    data.write_bytes(("The quick brown fox jumps over the lazy dog.\n" * 400).encode() + b"caf\xe9\n")
    # A process of its own: inside pytest, warnings are recorded, not printed.
    proc = subprocess.run([sys.executable, "-m", "arbor.cli", *train(tmp_path, data)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    err = [line for line in proc.stderr.splitlines() if "UTF-8" in line]
    assert len(err) == 1 and err[0].startswith("arbor: warning: ") and "mostly.txt" in err[0], proc.stderr
