"""The example plugin distribution, installed the way a user installs it.

``pip install --target`` puts it into a throwaway site directory (no network:
``--no-index``; no build environment to download: ``--no-build-isolation``;
the source is copied first so the build leaves nothing in the repository).
That directory then goes on ``PYTHONPATH`` for a real ``arbor plugins``
process, and on ``sys.path`` for the in-process checks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from arbor import ArborConfig, ArborForCausalLM
from arbor.plugins import unwrap
from arbor.plugins import reset_plugins
from arbor.plugins.selection import load_plugins_toml
from arbor_plugins.testing import check_plugin

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "arbor-strategy-example"
DIST = "arbor-strategy-example"

pytest_plugins = ["pytester"]


def offline_build_problem() -> str | None:
    """Why the example cannot be built here without the network, or None."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return "setuptools is not installed (Python >= 3.12 venvs lack it): pip install setuptools"
    major_minor = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if major_minor < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {version} needs the wheel package to build wheels: pip install 'setuptools>=70.1'"
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    problem = offline_build_problem()
    if problem:
        pytest.skip(f"cannot build the example offline: {problem}")
    root = tmp_path_factory.mktemp("example")
    source, target = root / "src", root / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return target


@pytest.fixture
def installed(site, monkeypatch, fresh_plugins):
    """The example importable in this process, plugin state fresh before and after."""
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    reset_plugins()
    yield site
    for name in [m for m in sys.modules if m.split(".")[0] == "arbor_strategy_example"]:
        del sys.modules[name]


def test_arbor_plugins_lists_it(site, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "ARBOR_STRICT_PLUGINS": "1"}
    env.pop("ARBOR_LOAD_PLUGINS", None)
    done = subprocess.run([sys.executable, "-m", "arbor", "plugins"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (line,) = [row for row in done.stdout.splitlines() if row.startswith(DIST)]
    assert line.split()[:3] == [DIST, "(loss-slope)", "0.1.0"]
    rest = " ".join(line.split()[3:])
    assert rest.startswith("arbor_load_state, arbor_register, arbor_state_dict ")  # its hooks
    assert "init_scheme:fade-in" in rest and "trigger:loss-slope" in rest  # its components


def test_conformance_kit_passes_on_it(installed):
    reports = {(r.kind, r.name): r for r in check_plugin(DIST)}
    assert reports.keys() == {("trigger", "loss-slope"), ("init_scheme", "fade-in")}
    assert all(r.passed for r in reports.values())
    assert any(d["grow"] for d in reports["trigger", "loss-slope"].decisions)  # its settings reach real decisions


def test_its_stateful_init_scheme_survives_save_and_resume(installed, tmp_path):
    # fade-in's gates open over training forwards; the weights do not hold how far. A run resumed
    # mid-fade gets them back through arbor_state_dict / arbor_load_state and trains as the one that never stopped.
    from arbor.training.checkpointing import latest_checkpoint, load_trainer_state
    from arbor.plugins.selection import Selection
    from arbor.training.trainer import TrainConfig, Trainer

    gen = torch.Generator().manual_seed(0)
    train, val = markov_batch(gen).repeat(4, 1), markov_batch(gen)
    cfg = TrainConfig.model_validate({
        "max_steps": 10, "batch_size": 4, "seq_len": 16, "lr": 1e-2, "warmup_steps": 2, "eval_interval": 5,
        "save_interval": 5, "log_interval": 1, "sample_tokens": 0,
        "growth": {"trigger": "schedule", "trigger_settings": {"steps": [3]},
                   "step": {"axis": "depth", "num_layers": 1, "init": "fade-in", "init_settings": {"steps": 6}}}})

    def start(out):
        torch.manual_seed(0)
        model = ArborForCausalLM(ArborConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=8))
        return Trainer(model, cfg, train, val, out, plugins=Selection(), progress=False, echo=lambda s: None)

    whole = start(tmp_path / "a")
    whole.fit()
    start(tmp_path / "b").fit(until=7)
    checkpoint = latest_checkpoint(tmp_path / "b")
    _, tensors = load_trainer_state(checkpoint)
    assert tensors["components"]["arbor_strategy_example.fade-in"] == [{"layer": "model.layers.1", "steps": 6,
                                                                         "done": 2}]
    resumed = Trainer.resume(checkpoint, train, val, tmp_path / "b", plugins=Selection(), progress=False,
                             echo=lambda s: None)
    resumed.fit()
    a, b = dict(whole.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def markov_batch(gen: torch.Generator) -> torch.Tensor:
    """Each token is the previous one plus 1 or 2 (mod 16), by a coin: a loss floor of log 2."""
    first = torch.randint(0, 16, (8, 1), generator=gen)
    hops = 1 + torch.randint(0, 2, (8, 15), generator=gen)
    return (first + torch.cat([torch.zeros_like(first), hops.cumsum(1)], 1)) % 16


def test_a_training_loop_grows_when_plugins_toml_selects_it(installed, tmp_path):
    path = tmp_path / "plugins.toml"
    path.write_text(textwrap.dedent("""
        [trigger]
        name = "loss-slope"
        min_slope = 0.1
        min_observations = 8
        clock = "steps"
        growth = { axis = "ffn", add = 8 }
    """))
    selection = load_plugins_toml(path)
    trigger = selection.component("trigger")
    assert type(unwrap(trigger)).__module__ == "arbor_strategy_example.loss_slope"  # the guard wraps it

    torch.manual_seed(0)
    model = ArborForCausalLM(ArborConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = trigger.start(model, selection.settings("trigger"))
    gen = torch.Generator().manual_seed(0)
    grown, reasons = [], []
    for step in range(1, 71):
        batch = markov_batch(gen)
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        state.observe(step, step * batch.numel(), loss.item(), model)
        decision = state.decide(step, step * batch.numel(), model)
        reasons.append(decision.reason)
        if decision.grow:
            event = model.grow(decision.growth, plugins=selection, optimizer=opt)
            state.grew(step, step * batch.numel(), model, event)
            grown.append(step)
    # While the loss still falls steeply the fitted exponent is far above 0.1 and nothing grows;
    # the model grows once the curve bends towards its floor.
    judged = [r for r in reasons if r.startswith("loss ~")]
    assert judged[0].startswith("loss ~ steps^-0.") and float(judged[0].split("^")[1].split()[0]) < -0.3
    assert len(grown) == 1 and 40 <= grown[0] <= 70, reasons
    assert reasons[grown[0] - 1].startswith("loss ~ steps^-0.09")
    # The step is plugins.toml's (the model's default step would have added 4 layers).
    assert model.config.layer_intermediate_sizes == [24] and model.config.num_hidden_layers == 1
    assert "waiting for a full window" in reasons[grown[0]]  # a new window starts after the growth


def test_its_own_tests_pass(installed, pytester):
    # In-process (no second interpreter to start); importlib mode keeps its conftest apart from ours.
    result = pytester.runpytest_inprocess(str(EXAMPLE / "tests"), "-p", "no:cacheprovider", "--import-mode=importlib",
                                          "-q")
    result.assert_outcomes(passed=14)
