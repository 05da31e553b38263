"""Guards while training: non-finite steps stop the run (or are skipped) before they touch the
weights, and a growth step that breaks its exactness promise is caught."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from arbor import ArborConfig, ArborForCausalLM
from arbor.model.checkpoint import verify_checksums
from arbor.training.checkpointing import latest_checkpoint
from arbor.training.trainer import TrainConfig, Trainer, TrainingStopped


def blocks(n=40, seq=16, vocab=48):
    data = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return data[: n - 8], data[n - 8:]


def trainer(tmp_path, echo=None, **overrides) -> Trainer:
    base = dict(max_steps=8, batch_size=4, seq_len=16, warmup_steps=0, lr=1e-2, eval_interval=4,
                save_interval=2, log_interval=1, growth={"trigger": "schedule", "trigger_settings": {"steps": [100]}})
    base.update(overrides)
    torch.manual_seed(0)
    model = ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=48, hidden_size=32, intermediate_size=64))
    train, val = blocks()
    return Trainer(model, TrainConfig.model_validate(base), train, val, tmp_path, progress=False,
                   echo=echo or (lambda s: None))


def test_a_non_finite_loss_stops_before_the_update(tmp_path):
    run = trainer(tmp_path)
    run.fit(until=4)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    with torch.no_grad():
        run.model.model.norm.weight[0] = math.nan  # the next forward's loss is NaN
    before["model.norm.weight"][0] = math.nan
    with pytest.raises(TrainingStopped, match=r"step 5: loss nan .*step-00000004\) is intact"):
        run.fit()
    for name, p in run.model.named_parameters():  # the optimizer never stepped on the NaN gradients
        assert torch.equal(torch.nan_to_num(p), torch.nan_to_num(before[name])), name
    assert latest_checkpoint(tmp_path).name == "step-00000004" and verify_checksums(latest_checkpoint(tmp_path))


def test_skip_mode_skips_a_step_with_non_finite_gradients_and_goes_on(tmp_path):
    run = trainer(tmp_path, on_nonfinite="skip")
    run.fit(until=3)
    weight = run.model.model.layers[0].mlp.up_proj.weight
    handle = weight.register_hook(lambda grad: grad * math.nan)
    snapshot = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.fit(until=4)
    handle.remove()
    assert all(torch.equal(p, snapshot[n]) for n, p in run.model.named_parameters())  # step 4: no update
    run.fit()
    assert run.step == 8 and run.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    skipped = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
               if '"skipped"' in line]
    assert [r["step"] for r in skipped] == [4]


@pytest.mark.parametrize("setting", ["lr=inf", "lr=nan", "weight_decay=inf", "grad_clip=nan"])
def test_infinite_or_nan_settings_are_refused(setting):
    key, value = setting.split("=")
    with pytest.raises(ValidationError, match=key):
        TrainConfig.model_validate({key: float(value)})


def _perturbing(operate):
    """A growth step's operator that returns an event claiming exactness but changes the function."""

    def wrapped(model, *args, **kwargs):
        event = operate(model, *args, **kwargs)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)
        return event

    return wrapped


class _Grow:
    grow = True
    reason = "test"
    growth = {"axis": "depth", "num_layers": 1}


def test_a_growth_step_that_breaks_its_exactness_claim_is_logged_as_not_exact(tmp_path):
    lines = []
    run = trainer(tmp_path, echo=lines.append)
    run.fit(until=2)
    run.growth_step._operate = _perturbing(run.growth_step._operate)
    record = run.grow(_Grow())
    assert record["exact"] is False and record["claimed_exact"] is True and record["init"] == "zero"
    assert any(line.startswith("warning:") and "claims an exact growth step" in line for line in lines)
    assert any("(zero, not exact)" in line for line in lines)


def test_exactness_error_mode_stops_the_run(tmp_path):
    run = trainer(tmp_path, growth={"trigger": "schedule", "trigger_settings": {"steps": [100]},
                                    "exactness": "error"})
    run.fit(until=2)
    run.growth_step._operate = _perturbing(run.growth_step._operate)
    with pytest.raises(TrainingStopped, match="growth.exactness=error"):
        run.grow(_Grow())


def test_an_exact_growth_step_passes_the_check(tmp_path):
    lines = []
    run = trainer(tmp_path, echo=lines.append)
    run.fit(until=2)
    record = run.grow(_Grow())
    assert record["exact"] is True and "claimed_exact" not in record
    assert not any(line.startswith("warning:") for line in lines)
