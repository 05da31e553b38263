"""Recipes named after the source models' cards, and the per-stage freezing they run on.

The tiny variant of each recipe runs end to end; between the checkpoints at its stage boundaries
the parameters a stage trains change and every other one stays bitwise equal.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from arbor.cli import main
from arbor.cli.train import RECIPES, load_recipe, recipe_names
from arbor.training.trainer import TrainConfig

TINY = "pgt-unfrozen-1-9-tiny"
#: Checkpoints every 4 steps of the tiny recipe's 24: stage A is steps 1-8, B 9-16, C 17-24.
EVERY_4 = ["--set", "save_interval=4", "--set", "keep_checkpoints=10", "--set", "sample_tokens=0"]


def _run(out, *extra, recipe=TINY):
    assert main(["train", "--recipe", recipe, "--out", str(out), "--no-progress", *EVERY_4, *extra]) == 0


def _weights(run, step):
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def _parts(names):
    """Parameter names grouped as embeddings / layer i / norm / lm_head."""
    out = {}
    for name in names:
        if name.startswith("model.layers."):
            key = f"layer{name.split('.')[2]}"
        elif name.startswith("model.embed_tokens"):
            key = "embeddings"
        elif name.startswith("model.norm"):
            key = "norm"
        else:
            key = "lm_head"
        out.setdefault(key, []).append(name)
    return out


def _changed(before, after):
    """Which parts changed between two checkpoints (of the parts the earlier one has); every part
    is either wholly changed or bitwise equal, so a part half-trained fails here."""
    changed, same = set(), set()
    for part, names in _parts(before).items():
        flags = {name: not before[name].equal(after[name]) for name in names}
        matrices = [name for name in names if before[name].ndim >= 2]
        if any(flags.values()):
            assert all(flags[n] for n in matrices), f"{part}: only some matrices changed: {flags}"
            changed.add(part)
        else:
            same.add(part)
    return changed, same


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    _run(root / "tied")
    _run(root / "untied", "--set", "model.tie_word_embeddings=false")
    return root


def _layers(indices):
    return {f"layer{i}" for i in indices}


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_pgt_unfrozen_trains_what_each_stage_says(runs, tied):
    run = runs / ("tied" if tied else "untied")
    w = {step: _weights(run, step) for step in (4, 8, 12, 16, 20, 24)}
    head = set() if tied else {"lm_head"}
    assert ("lm_head.weight" in w[4]) is not tied
    # Stage A (steps 1-8): layers 0-2, the embeddings, the final norm and the head all train.
    changed, same = _changed(w[4], w[8])
    assert changed == _layers(range(3)) | {"embeddings", "norm"} | head and not same
    # Stage B (steps 9-16): the new layers 3-5, the final norm and (untied) the head; the rest is bitwise equal.
    for a, b in ((8, 12), (12, 16)):
        changed, same = _changed(w[a], w[b])
        assert changed == _layers(range(3, 6)) | {"norm"} | head
        assert same == _layers(range(3)) | {"embeddings"}
    # Stage C (steps 17-24): layers 6-8, the final norm and (untied) the head.
    for a, b in ((16, 20), (20, 24)):
        changed, same = _changed(w[a], w[b])
        assert changed == _layers(range(6, 9)) | {"norm"} | head
        assert same == _layers(range(6)) | {"embeddings"}
    assert all(w[8][name].equal(w[24][name]) for name in _parts(w[8]).get("embeddings", []))


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_pgt_unfrozen_logs_its_stages(runs, tied):
    run = runs / ("tied" if tied else "untied")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stages = [r for r in records if r.get("event") == "stage"]
    head = [] if tied else ["lm_head"]
    assert [(r["step"], r["name"], r["tied"]) for r in stages] == [(0, "A", tied), (8, "B", tied), (16, "C", tied)]
    assert stages[0]["trainable"] == ["embeddings", "layers:0-2", "norm", "lm_head"] and stages[0]["frozen"] == []
    assert stages[1]["trainable"] == ["layers:3-5", "norm", *head]
    assert stages[1]["frozen"] == ["embeddings", "layers:0-2", *(["lm_head"] if tied else [])]
    assert stages[2]["trainable"] == ["layers:6-8", "norm", *head]
    assert [r["layers"] for r in records if r.get("event") == "growth"] == [6, 9]
    steps = {r["step"]: r["stage"] for r in records if "loss" in r and "event" not in r}
    assert steps[4] == "A" and steps[12] == "B" and steps[24] == "C"


def test_resume_in_stage_b_continues_with_stage_b(runs, tmp_path, capsys):
    """Resumed at step 12 (the middle of stage B), the run ends bitwise equal to the uninterrupted one."""
    run = tmp_path / "run"
    shutil.copytree(runs / "tied", run)
    for step in (16, 20, 24):
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "stage C (3/3)" in out and "stage A" not in out and "stage B" not in out
    resumed, whole = _weights(run, 16), _weights(runs / "tied", 16)
    assert all(resumed[name].equal(whole[name]) for name in whole)  # stage B's freezing held after resume
    resumed, whole = _weights(run, 24), _weights(runs / "tied", 24)
    assert all(resumed[name].equal(whole[name]) for name in whole)
    state = json.loads((run / "checkpoints" / "step-00000016" / "trainer_state.json").read_text())
    assert "model.embed_tokens.weight" in state["frozen"] and "model.layers.2.mlp.up_proj.weight" in state["frozen"]


# ------------------------------------------------------------ frozen substrates: 16-bit and glyphs
@pytest.mark.parametrize("recipe", ["pgt-16bit-1-9-tiny", "pgt-unicode-1-9-tiny"])
def test_tiny_pgt_on_a_frozen_substrate_trains_what_each_stage_says(tmp_path, recipe):
    """The substrate never trains (it is not even saved as a weight); the untied head trains throughout."""
    _run(tmp_path / "run", recipe=recipe)
    run = tmp_path / "run"
    w = {step: _weights(run, step) for step in (4, 8, 12, 16, 20, 24)}
    assert "embeddings" not in _parts(w[24]) and (run / "checkpoints" / "step-00000024" / "substrate.safetensors").is_file()
    changed, same = _changed(w[4], w[8])
    assert changed == _layers(range(3)) | {"norm", "lm_head"} and not same
    for a, b in ((8, 12), (12, 16)):
        assert _changed(w[a], w[b]) == (_layers(range(3, 6)) | {"norm", "lm_head"}, _layers(range(3)))
    for a, b in ((16, 20), (20, 24)):
        assert _changed(w[a], w[b]) == (_layers(range(6, 9)) | {"norm", "lm_head"}, _layers(range(6)))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stages = [r for r in records if r.get("event") == "stage"]
    substrate = "binary" if "16bit" in recipe else "unicode-glyphs"
    assert json.loads((run / "checkpoints" / "step-00000024" / "config.json").read_text())["substrate"] == substrate
    assert [(r["name"], r["trainable"], r["frozen"]) for r in stages] == [
        ("A", ["layers:0-2", "norm", "lm_head"], ["embeddings"]),
        ("B", ["layers:3-5", "norm", "lm_head"], ["embeddings", "layers:0-2"]),
        ("C", ["layers:6-8", "norm", "lm_head"], ["embeddings", "layers:0-5"])]


# ------------------------------------------------------------------- abs-bvv: one layer at a time, then LoRA
ABS = "abs-bvv-tiny"
LORA = "arbor_strategies.lora-below"


@pytest.fixture(scope="module")
def abs_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("abs") / "run"
    _run(run, "--set", "save_interval=2", "--set", "keep_checkpoints=20", recipe=ABS)
    return run


def _adapters(run, step):
    """The checkpoint's LoRA tensors (unmerged base weights and adapters), by name."""
    state = torch.load(run / "checkpoints" / f"step-{step:08d}" / "optimizer.pt", weights_only=False)
    return state["components"][LORA]["tensors"] if LORA in state["components"] else {}


def test_tiny_abs_bvv_grows_one_layer_at_a_time_then_through_lora(abs_run):
    run = abs_run
    w = {step: _weights(run, step) for step in range(4, 25, 4)}
    # Stages A-D (steps 1-16): the newest layer, the final norm and the untied head train; older layers are frozen.
    assert _changed(_weights(run, 2), w[4]) == (_layers([0]) | {"norm", "lm_head"}, set())
    assert _changed(w[4], w[8]) == (_layers([1]) | {"norm", "lm_head"}, _layers([0]))
    assert _changed(w[8], w[12]) == (_layers([2]) | {"norm", "lm_head"}, _layers(range(2)))
    assert _changed(w[12], w[16]) == (_layers([3]) | {"norm", "lm_head"}, _layers(range(3)))
    # Stage E (steps 17-20): layer 4 trains; layers 0-3 change only through their adapters.
    changed, same = _changed(w[16], w[20])
    assert changed == _layers(range(5)) | {"norm", "lm_head"} and not same
    for a, b, old in ((16, 18, range(4)), (20, 22, range(5)), (22, 24, range(5))):
        before, after = _adapters(run, a), _adapters(run, b)
        bases = [n for n in before if ".base_layer." in n]
        assert {int(n.split(".")[2]) for n in bases} == set(old)
        assert all(before[n].equal(after[n]) for n in bases)  # the layers' own weights stay frozen
        lora_b = [n for n in before if ".lora_B." in n]
        assert len(lora_b) == 7 * len(old) and all(not before[n].equal(after[n]) for n in lora_b)
        first, last = _weights(run, a), _weights(run, b)  # their norms are frozen: no adapters there
        norms = [n for n in first if n.startswith(tuple(f"model.layers.{i}." for i in old)) and first[n].ndim == 1]
        assert len(norms) == 2 * len(old) and all(first[n].equal(last[n]) for n in norms)
    # Stage F begins by merging E's adapters into layers 0-3 and giving layers 0-4 fresh ones.
    f = _adapters(run, 20)
    assert all(f[n].equal(w[20][n.replace(".base_layer.", ".")]) for n in f if ".base_layer." in n)
    assert all(not f[n].any() for n in f if ".lora_B." in n)
    assert _changed(w[20], w[24]) == (_layers(range(6)) | {"norm", "lm_head"}, set())


def test_tiny_abs_bvv_logs_six_stages(abs_run):
    records = [json.loads(line) for line in (abs_run / "metrics.jsonl").read_text().splitlines()]
    stages = [r for r in records if r.get("event") == "stage"]
    assert [(r["step"], r["name"]) for r in stages] == [(0, "A"), (4, "B"), (8, "C"), (12, "D"), (16, "E"), (20, "F")]
    assert [r["trainable"] for r in stages[:4]] == [[f"layers:{i}", "norm", "lm_head"] for i in range(4)]
    assert stages[3]["frozen"] == ["embeddings", "layers:0-2"] and stages[3]["partial"] == []
    assert (stages[4]["trainable"], stages[4]["partial"]) == (["layers:4", "norm", "lm_head"], ["layers:0-3"])
    assert (stages[5]["trainable"], stages[5]["partial"]) == (["layers:5", "norm", "lm_head"], ["layers:0-4"])
    assert [r["layers"] for r in records if r.get("event") == "growth"] == [2, 3, 4, 5, 6]


def test_resume_inside_a_lora_stage_matches_the_uninterrupted_run(abs_run, tmp_path, capsys):
    """Resumed at step 18 (stage E, adapters half-trained), the run ends bitwise equal to the whole one."""
    run = tmp_path / "run"
    shutil.copytree(abs_run, run, ignore=lambda d, names: [n for n in names if n.startswith("step-")
                                                            and int(n[5:]) > 18])
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "stage F (6/6)" in out and "stage E" not in out
    for step in (20, 24):
        resumed, whole = _weights(run, step), _weights(abs_run, step)
        assert resumed.keys() == whole.keys() and all(resumed[n].equal(whole[n]) for n in whole)
        resumed, whole = _adapters(run, step), _adapters(abs_run, step)
        assert resumed.keys() == whole.keys() and all(resumed[n].equal(whole[n]) for n in whole)


# ------------------------------------------------------------------- arbor-500m-1b: the card's trigger
def test_tiny_arbor_500m_1b_grows_at_the_middle_when_the_card_rule_says(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--recipe", "arbor-500m-1b-tiny", "--out", str(run), "--no-progress",
                 "--set", "sample_tokens=0"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    grew = [r for r in records if r.get("event") == "growth"]
    assert [(r["layers_before"], r["layers"], r["positions"]) for r in grew] == [(2, 6, [1, 2, 3, 4]),
                                                                              (6, 10, [3, 4, 5, 6])]
    for r in grew:  # the card's rule, with the figures it decided on; exact
        assert r["trigger"] == "utilization" and "above 0.92 capacity utilization" in r["reason"], r["reason"]
        assert r["exact"] and r["loss_after"] == r["loss_before"]
    assert grew[1]["step"] - grew[0]["step"] >= 12  # the cooldown, scaled from the card's 5,000 steps
    logged = [r["utilization"] for r in records if "utilization" in r]  # per-layer figures in the log
    assert logged and len(logged[-1]) == 10 and all(0 <= u <= 1 for u in logged[-1])
    full = TrainConfig.model_validate(load_recipe("arbor-500m-1b"))
    assert full.model == {"preset": "arbor-500m-1b"} and full.growth.insertion_policy == "middle"
    assert (full.growth.trigger_settings, full.lr) == ({"threshold": 0.92, "fraction": 0.8, "cooldown": 5000,
                                                        "num_layers": 4}, 2e-5)


def test_recipe_files_are_recipes():
    cards = {"pgt-unfrozen-1-9", "pgt-16bit-1-9", "pgt-unicode-1-9", "abs-bvv", "arbor-500m-1b"}
    assert {"default", "pgt", "arbor", *cards, *(f"{name}-tiny" for name in cards)} <= set(recipe_names())
    assert list(recipe_names())[: len(RECIPES)] == list(RECIPES)
    full = TrainConfig.model_validate(load_recipe("pgt-unfrozen-1-9"))
    assert full.model["preset"] == "pgt-9" and [s.name for s in full.growth.stages] == ["A", "B", "C"]
    pgt = TrainConfig.model_validate(load_recipe("pgt"))  # the built-in PGT recipe freezes as the card does
    assert [s.model_dump(exclude={"name"}) for s in pgt.growth.stages] == \
        [s.model_dump(exclude={"name"}) for s in full.growth.stages]
    tiny = TrainConfig.model_validate(load_recipe(TINY))  # extends the full recipe: the same stages
    assert tiny.growth.stages == full.growth.stages and tiny.model["preset"] == "tiny" and tiny.max_steps == 24


@pytest.mark.parametrize(("settings", "message"), [
    (["growth.stages=[]"], "growth.stages: is empty"),
    (['growth.stages=[{"freeze_policy": "freeze-below"}]'], "the first stage has freeze_policy='freeze-below'"),
    (['growth.stages=[{}, {"freeze": ["layerz:1"]}]'], "growth.stages.1.freeze: selector 'layerz:1' is invalid"),
    (['growth.stages=[{}, {"freeze_settings": {"train_norm": false}}]'], "no freeze_policy"),
    (['growth.stages=[{}, {"colour": 1}]'], "growth.stages.1.colour: unknown setting"),
    (['growth.stages=[{}, {"freeze_policy": "freeze-abov"}, {}]'],
     "growth.stages.1.freeze_policy='freeze-abov': not a registered freeze policy"),
    (['growth.stages=[{}, {"freeze_policy": "freeze-below", "freeze_settings": {"train_nrm": 1}}, {}]'],
     "growth.stages.1.freeze_settings.train_nrm"),
    (['growth.stages=[{}, {}]'], "growth.stages: 2 stages for a schedule of 2 growth steps; give 3"),
    (["growth.freeze_policy=none"], "cannot be used with growth.freeze_policy"),
])
def test_bad_stage_settings_are_one_line_naming_the_field(tmp_path, capsys, settings, message):
    argv = ["train", "--recipe", TINY, "--out", str(tmp_path / "run"), "--check"]
    for setting in settings:
        argv += ["--set", setting]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_unknown_recipe_lists_the_files_too(tmp_path, capsys):
    assert main(["train", "--recipe", "pgt-unfrozen", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--recipe 'pgt-unfrozen' is unknown" in err and TINY in err
