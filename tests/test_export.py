"""Export to a plain `LlamaForCausalLM` checkpoint: exact, self-checking, loadable without arbor.

The oracle is transformers' own Llama loading the written directory: same
logits (fp32, max abs diff <= 1e-5 at logits of order 1) at every unmasked
position of a left-padded batch, whatever growth made the layers uneven.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn
from transformers import LlamaForCausalLM

import arbor.growth.export
import arbor_plugins
from arbor import ArborConfig, ArborForCausalLM
from arbor.cli import main
from arbor.growth.export import ExportError, to_llama
from arbor.plugins import get_plugin_manager

ATOL = 1e-5


def scaled(model: ArborForCausalLM) -> ArborForCausalLM:
    with torch.no_grad():  # weights large enough that a wrong padding shows, logits of order 1
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


def tiny(**overrides) -> ArborForCausalLM:
    return scaled(ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=64, **overrides)))


def padded_batch(vocab: int):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[mask.bool()]


def load_llama(path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def assert_same_function(model, path):
    llama = load_llama(path)
    ids, mask = padded_batch(model.config.vocab_size)
    expected = logits(model, ids, mask)
    # 1e-5 at logits of order 1; float32 rounding grows with the logits, and so does the bound.
    bound = ATOL * max(1.0, expected.abs().max().item())
    assert (logits(llama, ids, mask) - expected).abs().max().item() <= bound
    return llama


def test_uniform_model_exports_exactly(tmp_path):
    model = tiny()
    report = to_llama(model, tmp_path / "out")
    assert report.padded == {} and report.padding_parameters == 0 and report.tied
    assert report.max_abs_diff <= ATOL and report.dtype == "float32"
    assert report.num_parameters == sum(p.numel() for p in model.parameters())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert not list((tmp_path / "out").glob("*.bin")) and (tmp_path / "out" / "model.safetensors").is_file()

    llama = assert_same_function(model, tmp_path / "out")
    ids, mask = padded_batch(64)
    with torch.no_grad():
        kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(llama.generate(ids, **kwargs), model.generate(ids, **kwargs))
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()


# ----------------------------------------------------------- uneven models
@st.composite
def configs(draw) -> dict:
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))
    return dict(
        vocab_size=draw(st.integers(16, 64)),
        hidden_size=heads * head_dim * draw(st.sampled_from([1, 2])),
        head_dim=head_dim,
        intermediate_size=draw(st.integers(4, 24)),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        tie_word_embeddings=draw(st.booleans()),
    )


#: One growth step on one layer (a fraction of the depth picks it), so layers end up uneven.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("ffn"), st.floats(0, 1), st.integers(1, 16)),
        st.tuples(st.just("heads"), st.floats(0, 1), st.integers(0, 2), st.booleans()),
        st.tuples(st.just("depth"), st.integers(1, 2), st.floats(0, 1)),
        st.tuples(st.just("hidden"), st.sampled_from([4, 8, 16])),
    ),
    min_size=1,
    max_size=4,
)


def grow(model: ArborForCausalLM, step: tuple) -> None:
    config = model.config
    n = config.num_hidden_layers
    layer = min(int(step[1] * n), n - 1) if step[0] in ("ffn", "heads") else None
    if step[0] == "ffn":
        model.grow_width(config.layer_intermediate_sizes[layer] + step[2], layers=[layer])
    elif step[0] == "heads":
        q, kv = config.layer_num_attention_heads[layer], config.layer_num_key_value_heads[layer]
        new_kv = kv + step[3]
        model.grow_heads((q // kv + step[2]) * new_kv, new_kv, layers=[layer])
    elif step[0] == "depth":
        model.grow_depth(step[1], positions=[round(step[2] * n)] * step[1])
    else:
        model.grow_hidden(config.hidden_size + step[1])


def representable(config: ArborConfig) -> bool:
    """Whether some uniform (kv heads, group) layout fits every layer and divides hidden_size."""
    kv_min = max(config.layer_num_key_value_heads)
    g_min = max(q // kv for q, kv in zip(config.layer_num_attention_heads, config.layer_num_key_value_heads))
    h = config.hidden_size
    return any(h % (kv * g) == 0 for kv in range(kv_min, h + 1) for g in range(g_min, h // kv + 1))


@given(kwargs=configs(), growth=steps)
# Uneven kv heads, and a hidden size the padded 6 heads do not divide: padded on to 8 (2 kv x 4).
@example(kwargs=dict(vocab_size=32, hidden_size=8, head_dim=4, intermediate_size=8, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                     tie_word_embeddings=False),
         growth=[("heads", 0.0, 1, True), ("ffn", 0.9, 5), ("depth", 1, 0.5), ("hidden", 8)])
def test_grown_uneven_model_exports_exactly(kwargs, growth, tmp_path_factory):
    torch.manual_seed(0)
    model = scaled(ArborForCausalLM._from_config(ArborConfig(**kwargs), attn_implementation="sdpa"))
    for step in growth:
        grow(model, step)
    config = model.config
    out = tmp_path_factory.mktemp("export") / "llama"
    if not representable(config):
        with pytest.raises(ExportError, match="num_attention_heads.*hidden_size"):
            to_llama(model, out)
        assert not out.exists()
        return
    report = to_llama(model, out)
    llama = assert_same_function(model, out)
    assert llama.config.intermediate_size == max(config.layer_intermediate_sizes)
    assert llama.config.num_key_value_heads >= max(config.layer_num_key_value_heads)
    assert config.hidden_size % llama.config.num_attention_heads == 0
    assert report.tied == kwargs["tie_word_embeddings"] == llama.config.tie_word_embeddings
    assert llama.config.rms_norm_eps == config.rms_norm_eps  # scaled by hidden growth, carried over
    assert report.num_parameters == sum(p.numel() for p in llama.parameters())
    uneven = len(set(config.layer_intermediate_sizes)) > 1
    assert ("intermediate_size" in report.padded) == uneven


def test_heads_are_padded_until_they_divide_the_hidden_size(tmp_path):
    # Llama wants hidden_size % num_attention_heads == 0: 3 heads over 16 become 4 (one kv head, group 4).
    model = scaled(ArborForCausalLM(ArborConfig(vocab_size=32, hidden_size=16, head_dim=4, intermediate_size=8,
                                                num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=1)))
    report = to_llama(model, tmp_path / "out")
    assert report.padded["num_attention_heads"] == ([3], 4) and "num_key_value_heads" not in report.padded
    assert_same_function(model, tmp_path / "out")


def test_unrepresentable_heads_are_a_clear_error(tmp_path):
    model = ArborForCausalLM(ArborConfig(vocab_size=32, hidden_size=4, head_dim=2, intermediate_size=8,
                                         num_hidden_layers=1, num_attention_heads=8))
    with pytest.raises(ExportError, match=r"num_attention_heads.*hidden_size=4.*8 heads"):
        to_llama(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class BufferEmbedding(nn.Module):
    """A frozen substrate-like module: a (vocab, hidden) buffer looked up by id."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, input_ids):
        return self.weight[input_ids]


def test_substrate_module_becomes_an_embedding_matrix(tmp_path):
    model = tiny(tie_word_embeddings=False)
    model.model.embed_tokens = BufferEmbedding(torch.randn(64, 64))
    report = to_llama(model, tmp_path / "out")
    assert not report.tied
    llama = assert_same_function(model, tmp_path / "out")
    assert torch.equal(llama.model.embed_tokens.weight, model.model.embed_tokens.weight)


class GrowthLog:
    def __init__(self):
        self.calls = []

    @arbor_plugins.hookimpl
    def arbor_grow_width(self, model, event):
        self.calls.append(event)

    @arbor_plugins.hookimpl
    def arbor_grow_depth(self, model, event):
        self.calls.append(event)


def test_export_leaves_the_model_alone_and_casts_after_checking(tmp_path):
    model = tiny().train()
    model.grow_width(160, layers=[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    log = GrowthLog()
    get_plugin_manager().register(log, name="test-export-growth-log")
    try:
        report = to_llama(model, tmp_path / "out", dtype=torch.bfloat16)
    finally:
        get_plugin_manager().unregister(log)
    assert log.calls == [] and model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.to_dict() == config_before
    assert report.dtype == "bfloat16" and report.verified_dtype == "float32" and report.max_abs_diff <= ATOL
    assert report.cast_max_abs_diff is not None and "bfloat16" in "\n".join(report.lines())
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


LOAD_WITHOUT_ARBOR = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"arbor", "arbor_plugins", "arbor_strategies", "arbor_substrates"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked for this test")

    sys.meta_path.insert(0, Blocker())
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    try:
        import arbor
    except ImportError:
        pass
    else:
        raise SystemExit("arbor is importable; the test proves nothing")
    expected = torch.load(sys.argv[2])
    for cls in (LlamaForCausalLM, AutoModelForCausalLM):
        llama = cls.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
        assert type(llama).__name__ == "LlamaForCausalLM"
        with torch.no_grad():
            logits = llama(expected["ids"], attention_mask=expected["mask"]).logits[expected["mask"].bool()]
        assert (logits - expected["logits"]).abs().max().item() <= 1e-5
    assert not BLOCKED & {m.split(".")[0] for m in sys.modules}
    print("ok")
    """
)


@pytest.fixture(scope="module", autouse=True)
def without_arbor(tmp_path_factory):
    """An uneven model's export, checked by a python that cannot import arbor.

    Started before the first test of this file and read by the last one, so its
    seconds of importing torch and transformers overlap the other tests.
    """
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("without-arbor")
    model = tiny(tie_word_embeddings=False)
    model.grow_heads(8, 4, layers=[0])
    model.grow_width(200, layers=[1])
    to_llama(model, tmp / "out")
    ids, mask = padded_batch(64)
    torch.save({"ids": ids, "mask": mask, "logits": logits(model, ids, mask)}, tmp / "expected.pt")
    proc = subprocess.Popen(
        [sys.executable, "-c", LOAD_WITHOUT_ARBOR, str(tmp / "out"), str(tmp / "expected.pt")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def break_export(monkeypatch):
    """Make the written weights differ from the model's: a wrong final norm."""
    original = arbor.growth.export.llama_state_dict

    def wrong(*args, **kwargs):
        sd = original(*args, **kwargs)
        sd["model.norm.weight"] = sd["model.norm.weight"] * 1.5
        return sd

    monkeypatch.setattr(arbor.growth.export, "llama_state_dict", wrong)


def test_verification_failure_leaves_no_export(tmp_path, monkeypatch):
    model = tiny()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("previous export")  # a file an export writes: replaceable
    break_export(monkeypatch)
    with pytest.raises(ExportError, match="verification failed.*atol"):
        to_llama(model, tmp_path / "out")
    with pytest.raises(ExportError, match="verification failed"):
        to_llama(model, tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no out, no temporary leftovers
    assert (tmp_path / "old" / "config.json").read_text() == "previous export"


def test_out_dir_and_argument_rules(tmp_path):
    model = tiny()
    (tmp_path / "empty").mkdir()
    to_llama(model, tmp_path / "empty")  # an empty directory is fine
    with pytest.raises(ExportError, match="not empty.*overwrite=True"):
        to_llama(model, tmp_path / "empty")
    (tmp_path / "empty" / "model-00001-of-00002.safetensors").write_text("x")  # a stale shard: arbor's
    to_llama(model, tmp_path / "empty", overwrite=True)
    assert not (tmp_path / "empty" / "model-00001-of-00002.safetensors").exists()
    (tmp_path / "empty" / "stale.txt").write_text("x")  # not arbor's: an overwrite never removes it
    with pytest.raises(ExportError, match="holds stale.txt, which arbor did not write"):
        to_llama(model, tmp_path / "empty", overwrite=True)
    assert (tmp_path / "empty" / "stale.txt").read_text() == "x"
    (tmp_path / "empty" / "stale.txt").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    with pytest.raises(ExportError, match="dtype='int8'.*bfloat16"):
        to_llama(model, tmp_path / "x", dtype="int8")
    with pytest.raises(ExportError, match="probe_input_ids.*vocab_size-1=63"):
        to_llama(model, tmp_path / "x", probe_input_ids=[[1, 64]])
    with pytest.raises(ExportError, match="probe_attention_mask.*at least one 1"):
        to_llama(model, tmp_path / "x", probe_input_ids=[[1, 2]], probe_attention_mask=[[0, 0]])
    assert not (tmp_path / "x").exists()
    assert to_llama(model, tmp_path / "x", probe_input_ids=[5, 6, 7]).max_abs_diff <= ATOL


# --------------------------------------------------------------------- CLI
@pytest.fixture
def checkpoint(tmp_path, fresh_plugins):
    """A grown tiny arbor checkpoint with a tokenizer next to it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny()
    model.grow_width(160, layers=[0])
    model.save_pretrained(tmp_path / "ckpt")
    words = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 64)}}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def test_cli_export(checkpoint, tmp_path, capsys):
    from transformers import AutoTokenizer

    ckpt, model = checkpoint
    code = main(["export", str(ckpt), "--to", "llama", str(tmp_path / "out"), "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "intermediate_size [160, 128] -> 160" in out and "max abs logit difference" in out
    assert "tokenizer: copied tokenizer.json, tokenizer_config.json" in out
    assert_same_function(model, tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("w3 w5").input_ids == [3, 5]


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["missing", "--to", "llama", "out"], ["checkpoint directory missing does not exist"]),
        (["{tmp}", "--to", "llama", "out"], ["not an arbor checkpoint", "no config.json"]),
        (["{ckpt}", "--to", "onnx", "out"], ["--to 'onnx'", "allowed: llama"]),
        (["{ckpt}", "--to", "llama", "{tmp}"], ["contains the checkpoint"]),
        (["{ckpt}", "--to", "llama", "{ckpt}/sub"], ["lies inside the checkpoint"]),
        (["{ckpt}", "--to", "llama", "out", "--broken"], ["verification failed", "atol"]),
    ],
)
def test_cli_export_errors_are_one_line(checkpoint, tmp_path, capsys, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    if "--broken" in argv:
        argv = argv[:-1]
        break_export(monkeypatch)
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint[0]) for a in argv]
    code = main(["export", *argv])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("arbor: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(f in err for f in fragments), err
    assert not (tmp_path / "out").exists()


def test_export_loads_without_arbor(without_arbor):  # last in the file: see the fixture
    out, err = without_arbor.communicate(timeout=120)
    assert without_arbor.returncode == 0 and out.strip() == "ok", err[-2000:]
