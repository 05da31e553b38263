"""Checkpoints load as the model cards load theirs: ``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` in a Python where arbor cannot be imported.

arbor saves several models (uniform, grown uneven with an explicit head_dim, untied with scaled
RoPE, and on the frozen substrates); a subprocess that refuses every arbor package loads each one
through the remote code and records its logits, hidden states and greedy generations (cached,
uncached, static cache, left-padded), and this process compares them with arbor's.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from arbor import ArborConfig, ArborForCausalLM
from arbor.model import remote_code
from arbor.model.checkpoint import (
    REMOTE_CODE_AUTO_MAP,
    REMOTE_CODE_FILE,
    SUBSTRATE_FILE,
    RemoteCodeWarning,
    verify_checksums,
    write_checksums,
)

NEW = 6  # tokens generated


def _randomise(model: ArborForCausalLM, seed: int) -> ArborForCausalLM:
    # Weights far from the default init, so that a wrong size, key or lookup changes the logits.
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


def uniform() -> ArborForCausalLM:
    return _randomise(ArborForCausalLM(ArborConfig.from_preset("tiny")), 1)


def grown() -> ArborForCausalLM:
    # head_dim 8 is not hidden_size // heads, before or after the hidden size grows.
    model = ArborForCausalLM(ArborConfig.from_preset("tiny", head_dim=8))
    model.grow_depth(1, positions=[1])
    model.grow_width(192, layers=[0, 2])
    model.grow_heads(6, 3, layers=[1])
    model.grow_heads(8, layers=[2])
    model.grow_hidden(96)
    config = model.config
    assert config.layer_intermediate_sizes == [192, 128, 192]
    assert config.layer_num_attention_heads == [4, 6, 8]
    assert config.layer_num_key_value_heads == [2, 3, 2]
    assert (config.hidden_size, config.head_dim) == (96, 8)
    return _randomise(model, 2)  # the grown parts are no longer silent


def untied() -> ArborForCausalLM:
    rope = {"rope_type": "linear", "rope_theta": 500_000.0, "factor": 4.0}
    return _randomise(ArborForCausalLM(ArborConfig.from_preset("tiny", tie_word_embeddings=False,
                                                                rope_parameters=rope)), 3)


def binary() -> ArborForCausalLM:
    rope = {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 2.0, "original_max_position_embeddings": 256}
    config = ArborConfig.from_preset("tiny", tie_word_embeddings=False, substrate="binary",
                                     substrate_settings={"centered": True}, rope_parameters=rope)
    model = ArborForCausalLM(config)
    model.grow_hidden(96)  # the matrix gains zero columns, and its width is recorded
    assert model.config.substrate_settings["width"] == 64
    return _randomise(model, 4)


def glyphs() -> ArborForCausalLM:
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    config = ArborConfig.from_preset("tiny", tie_word_embeddings=False, substrate="unicode-glyphs",
                                     substrate_settings={"size": 16})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # which font renders is not the point here
        return _randomise(ArborForCausalLM(config), 5)


CASES = {"uniform": uniform, "grown": grown, "untied": untied, "binary": binary, "glyphs": glyphs}


def prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts (5 and 3 tokens) and their attention mask."""
    ids = torch.randint(1, vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def greedy(model, ids, mask, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs)


#: The start of a script for a fresh interpreter in which every arbor package is refused before
#: anything is imported: what a machine without arbor installed sees.
WITHOUT_ARBOR = textwrap.dedent(r"""
    import importlib.abc, json, sys

    HIDDEN = ("arbor", "arbor_plugins", "arbor_strategies", "arbor_substrates")

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Refuse())
""")

LOADER = WITHOUT_ARBOR + textwrap.dedent(r"""
    for name in HIDDEN:
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"{name} is importable")

    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    def greedy(model, ids, mask, **kwargs):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                  **kwargs)

    for directory in sys.argv[1:]:
        inputs = torch.load(f"{directory}/inputs.pt")
        ids, mask = inputs["ids"], inputs["mask"]
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_hidden_states=True, labels=ids)
            base = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()(ids, attention_mask=mask)
        results = {
            "module": type(model).__module__,
            "rope_parameters": model.config.rope_parameters,
            "logits": out.logits,
            "loss": out.loss,
            "hidden_states": torch.stack(out.hidden_states),
            "base": base.last_hidden_state,
            "cached": greedy(model, ids, mask),
            "uncached": greedy(model, ids, mask, use_cache=False),
            "static": greedy(model, ids, mask, cache_implementation="static"),
        }
        # Saved again by the remote code: it reloads, here and with arbor.
        model.save_pretrained(f"{directory}/resaved")
        resaved = AutoModelForCausalLM.from_pretrained(f"{directory}/resaved", trust_remote_code=True).eval()
        with torch.no_grad():
            results["resaved"] = resaved(ids, attention_mask=mask).logits
        torch.save(results, f"{directory}/remote.pt")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
    assert not loaded, loaded
""").replace("NEW", str(NEW))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Matrices this small gain nothing from a second thread, and on busy shared cores its
    # spin-waiting makes each generate() call several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, _one_thread):
    """Each case saved by arbor with its reference outputs, then loaded by the remote code in one
    subprocess: name -> (directory, arbor model, arbor's outputs, the remote code's outputs)."""
    root = tmp_path_factory.mktemp("remote")
    cases = {}
    for name, build in CASES.items():
        try:
            model = build()
        except pytest.skip.Exception:
            continue
        directory = root / name
        model.save_pretrained(directory)
        ids, mask = prompts(model.config.vocab_size)
        torch.save({"ids": ids, "mask": mask}, directory / "inputs.pt")
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_hidden_states=True, labels=ids)
        reference = {"logits": out.logits, "loss": out.loss, "hidden_states": torch.stack(out.hidden_states),
                     "greedy": greedy(model, ids, mask)}
        cases[name] = (directory, model, reference)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", LOADER, *(str(c[0]) for c in cases.values())],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return {name: (d, m, ref, torch.load(d / "remote.pt")) for name, (d, m, ref) in cases.items()}


@pytest.fixture(params=list(CASES))
def case(request, saved):
    if request.param not in saved:
        pytest.skip(f"{request.param}: its substrate cannot be built here")
    return saved[request.param]


def test_the_remote_code_computes_arbors_logits_without_arbor(case):
    directory, model, reference, remote = case
    assert remote["module"].startswith("transformers_modules.") and remote["module"].endswith(".modeling_arbor")
    assert remote["rope_parameters"] == model.config.rope_parameters
    keep = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]], dtype=torch.bool)  # logits of padding positions mean nothing
    assert reference["logits"].abs().max() > 1  # large enough that a wrong weight would show
    torch.testing.assert_close(remote["logits"][keep], reference["logits"][keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remote["hidden_states"][:, keep], reference["hidden_states"][:, keep],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remote["loss"], reference["loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remote["base"][keep], reference["hidden_states"][-1][keep], atol=1e-5, rtol=1e-5)


def test_a_checkpoint_the_remote_code_saves_again_loads_with_it_and_with_arbor(case):
    directory, model, reference, remote = case
    torch.testing.assert_close(remote["resaved"], remote["logits"], atol=0, rtol=0)
    ids, mask = prompts(model.config.vocab_size)
    with torch.no_grad():
        logits = ArborForCausalLM.from_pretrained(directory / "resaved").eval()(ids, attention_mask=mask).logits
    assert torch.equal(logits, model(ids, attention_mask=mask).logits)


def test_the_remote_code_generates_arbors_tokens_with_and_without_cache(case):
    _, _, reference, remote = case
    assert torch.equal(remote["cached"], reference["greedy"])
    assert torch.equal(remote["uncached"], remote["cached"])
    assert torch.equal(remote["static"], remote["cached"])


def test_arbor_still_loads_the_checkpoint_with_its_checksums(case):
    directory, model, reference, _ = case
    write_checksums(directory)  # as a training checkpoint is written
    assert verify_checksums(directory) is True  # every file, the remote-code ones included
    ids, mask = prompts(model.config.vocab_size)
    for loaded in (ArborForCausalLM.from_pretrained(directory),
                   AutoModelForCausalLM.from_pretrained(directory)):  # arbor's own class: no remote code asked for
        assert isinstance(loaded, ArborForCausalLM)
        with torch.no_grad():
            logits = loaded.eval()(ids, attention_mask=mask).logits
        assert torch.equal(logits, model(ids, attention_mask=mask).logits)
        assert "auto_map" not in loaded.config.__dict__  # the map is the saved directory's, not the model's


def test_what_a_checkpoint_carries(case):
    directory, model, _, _ = case
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == REMOTE_CODE_AUTO_MAP and config["model_type"] == "arbor"
    assert (directory / REMOTE_CODE_FILE).read_bytes() == open(remote_code.__file__, "rb").read()
    assert "auto_map" not in model.config.__dict__  # saving left the model's config as it was
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
    embed = model.get_input_embeddings()
    if model.config.substrate == "learned":
        assert "model.embed_tokens.weight" in keys and not (directory / SUBSTRATE_FILE).exists()
    else:  # the fixed matrix lives beside the weights, as the model computes with it
        assert "model.embed_tokens.weight" not in keys
        with safe_open(directory / SUBSTRATE_FILE, framework="pt") as handle:
            assert torch.equal(handle.get_tensor("weight"), embed.weight)


def test_remote_code_false_saves_without_it_and_clears_an_earlier_save(tmp_path):
    model = binary()
    model.save_pretrained(tmp_path)
    assert (tmp_path / REMOTE_CODE_FILE).exists() and (tmp_path / SUBSTRATE_FILE).exists()
    model.save_pretrained(tmp_path, remote_code=False)
    assert not (tmp_path / REMOTE_CODE_FILE).exists() and not (tmp_path / SUBSTRATE_FILE).exists()
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    torch.testing.assert_close(ArborForCausalLM.from_pretrained(tmp_path).model.embed_tokens.weight,
                               model.model.embed_tokens.weight)


def test_an_embedding_the_remote_code_cannot_reproduce_is_saved_without_it(tmp_path):
    model = uniform()
    model.save_pretrained(tmp_path)
    model.model.embed_tokens = nn.Embedding(model.config.vocab_size, model.config.hidden_size, padding_idx=0)
    with pytest.warns(RemoteCodeWarning, match="loads with arbor installed only"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / REMOTE_CODE_FILE).exists()
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())


def test_the_shipped_code_imports_only_the_standard_library_torch_transformers_and_safetensors():
    tree = ast.parse(open(remote_code.__file__, encoding="utf-8").read())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
    assert roots - sys.stdlib_module_names <= {"torch", "transformers", "safetensors"}, roots


def test_other_auto_map_entries_are_kept(tmp_path):
    model = uniform()
    model.config.auto_map = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert saved == {**REMOTE_CODE_AUTO_MAP, "AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    assert model.config.auto_map == {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    assert ArborForCausalLM.from_pretrained(tmp_path).config.auto_map == model.config.auto_map
