"""Growth in a distributed run: 2 processes on the CPU (gloo), started by ``arbor train --nproc 2``.

The run grows twice (a depth step with the exact zero init, then an FFN step with the masked init,
whose ramp runs across the last steps). Its losses must be those of one process at the same global
batch (up to fp32 reduction order), every rank must end with the same parameters, its checkpoint
must resume in one process and in two with the uninterrupted run's losses, and a rank that drifts
from the others must stop every rank with a message naming them, not hang.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_plugins import make_dist

from arbor.training import distributed
from arbor.training.distributed import Ranks, RanksDiverged

CONFIG = """
vocab_size = 300
seq_len = 16
batch_size = 4
max_steps = 6
eval_interval = 3
eval_batches = 2
save_interval = 3
log_interval = 1
sample_tokens = 0
lr = 0.01
[model]
preset = "tiny"
num_hidden_layers = 2
[growth]
trigger = "schedule"
[growth.trigger_settings]
steps = [2, 4]
growth = [{axis = "depth", num_layers = 1, init = "zero"},
          {axis = "ffn", factor = 1.5, init = "masked", init_settings = {ramp_steps = 2}}]
"""
TIMEOUT = 600  # a hang would otherwise hold CI until its own limit
TESTS = os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])


def arbor_train(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``arbor train ARGS --no-progress`` in ``workdir``, as a user would start it."""
    result = subprocess.run([sys.executable, "-m", "arbor", "train", "--no-progress", *args],
                            cwd=workdir, capture_output=True, text=True, timeout=TIMEOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return result


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "event" not in r]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


def one_and_two(work: Path, config: str, *two: str) -> tuple[subprocess.CompletedProcess, ...]:
    """The run of ``config`` on a small corpus of code in ``work``: in one process (``one/``) and in
    two (``two/``, with ``two`` added to its command line)."""
    text = "\n\n".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}  # line {i}" for i in range(4000))
    (work / "data.txt").write_text(text)
    (work / "run.toml").write_text(f'data = "data.txt"\n{config}')
    one = arbor_train(work, "run.toml", "--out", "one")
    assert one.returncode == 0, one.stderr
    two_processes = arbor_train(work, "run.toml", "--out", "two", "--nproc", "2", *two)
    assert two_processes.returncode == 0, two_processes.stdout + two_processes.stderr
    return one, two_processes


def resume_after_step_3(work: Path, nproc: int, *two: str) -> Path:
    """``two/`` copied without its last checkpoint (step 6), as if it had stopped after step 3, and
    resumed in ``nproc`` processes (``two`` added for 2); the resumed run's directory, its losses
    checked against the uninterrupted run's."""
    copy = work / f"resumed-{nproc}"
    shutil.copytree(work / "two", copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000006")
    args = ["--out", copy.name, "--resume"] + (["--nproc", "2", *two] if nproc == 2 else [])
    result = arbor_train(work, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout
    assert losses(copy) == pytest.approx(losses(work / "two"), rel=1e-5)
    return copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run in one process and in two."""
    work = tmp_path_factory.mktemp("distributed")
    return (work, *one_and_two(work, CONFIG))


def test_two_processes_train_and_grow_as_one(runs):
    work, one, two = runs
    assert "in 2 processes (ddp)" in two.stdout
    assert two.stdout.count("grew depth") == 1 and two.stdout.count("grew ffn") == 1  # printed by rank 0 only
    assert losses(work / "two") == pytest.approx(losses(work / "one"), rel=1e-5)
    records = [json.loads(line) for line in (work / "two" / "metrics.jsonl").read_text().splitlines()]
    grown = [(r["step"], r["axis"], r["init"], r["exact"]) for r in records if r.get("event") == "growth"]
    assert grown == [(2, "depth", "zero", True), (4, "ffn", "masked", True)]
    (ranks,) = [r for r in records if r.get("event") == "ranks"]
    assert ranks["world_size"] == 2 and ranks["fingerprints"][0] == ranks["fingerprints"][1]
    # Weights agree to what AdamW makes of fp32 reduction order: it divides by the gradient's running
    # RMS, which turns a last-bit difference in a near-zero gradient (the new layer's first steps)
    # into a difference of up to about lr * 1e-2.
    want, got = weights(work / "one", 6), weights(work / "two", 6)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=5e-4, msg=name)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_distributed_checkpoint_resumes_in_one_process_and_in_two(runs, nproc):
    work, _, _ = runs
    resumed = weights(resume_after_step_3(work, nproc), 6)
    for name, tensor in weights(work / "two", 6).items():
        if nproc == 2:  # the same reduction order as the uninterrupted run: the same bits
            assert torch.equal(resumed[name], tensor), name
        else:
            torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=5e-4, msg=name)


DRIFT = """
import os

import torch
import arbor_plugins


class Drift(arbor_plugins.InitScheme):
    description = "new layers get noise that differs per rank (a deliberately desynchronised run)"
    exact = False

    def initialize(self, model, event, settings):
        generator = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
        for name, p in model.named_parameters():
            if name in event.new_parameters:
                p.add_(torch.randn(p.shape, generator=generator) * 1e-3)


@arbor_plugins.hookimpl
def arbor_register(registry):
    registry.register("init_scheme", "rank-drift", Drift())
"""


def test_a_rank_that_drifts_stops_every_rank_with_a_message(runs, tmp_path):
    work, _, _ = runs
    site = tmp_path / "site"
    site.mkdir()
    make_dist(site, "drift-plugin", DRIFT)
    config = (work / "run.toml").read_text().replace('init = "zero"', 'init = "rank-drift"')
    (tmp_path / "run.toml").write_text(config.replace('data = "data.txt"', f'data = "{work / "data.txt"}"'))
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    result = arbor_train(tmp_path, "run.toml", "--out", "drift", "--nproc", "2", env={"PYTHONPATH": path})
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "after the growth step at step 2: the ranks no longer hold the same model" in output
    assert "ranks [0] hold" in output and "ranks [1] hold" in output
    assert "a process of the distributed run failed" in output


def test_ranks_from_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Ranks.from_env() == Ranks(1, 2, 1) and Ranks.from_env().distributed and not Ranks.from_env().main
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 and WORLD_SIZE=2"):
        Ranks.from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        Ranks.from_env()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert Ranks.from_env() == Ranks() and not Ranks().distributed


def test_each_rank_takes_its_contiguous_share_of_the_global_batch():
    batch = torch.arange(12).view(6, 2)
    assert torch.equal(distributed.shard(batch, Ranks()), batch)
    parts = [distributed.shard(batch, Ranks(r, 3, r)) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch)
    with pytest.raises(ValueError, match="batch_size=6 is invalid for 4 processes.*multiple of 4"):
        distributed.shard(batch, Ranks(0, 4, 0))


def test_fingerprints_tell_models_apart():
    model = torch.nn.Linear(3, 2)
    same = distributed.fingerprint(model)
    assert distributed.check_in_sync(model, Ranks(), "here") == [same]
    with torch.no_grad():
        model.weight[0, 0] += 1e-7
    assert distributed.fingerprint(model)["checksum"] != same["checksum"]
    assert distributed.fingerprint(model, {"step": 1}) != distributed.fingerprint(model, {"step": 2})
    assert issubclass(RanksDiverged, RuntimeError)


def test_two_nodes_on_one_machine_train_as_two_processes(runs):
    # How a cluster is reached: two torchrun agents (one per "node") meet through a c10d rendezvous.
    work, _, _ = runs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "arbor-test",
               "-m", "arbor", "train", "run.toml", "--out", "nodes", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=TIMEOUT)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(outputs)
    assert sum("in 2 processes (ddp)" in out for out in outputs) == 1  # rank 0's node prints
    assert losses(work / "nodes") == pytest.approx(losses(work / "two"), rel=1e-6)


def test_a_command_line_the_processes_refuse_exits_2(runs, tmp_path, capfd):
    from arbor.cli import main

    work, _, _ = runs
    (tmp_path / "run.toml").write_text((work / "run.toml").read_text().replace("data.txt", str(work / "data.txt")))
    code = main(["train", str(tmp_path / "run.toml"), "--out", str(tmp_path / "uneven"), "--nproc", "2",
                 "--no-progress", "--set", "batch_size=3"])
    assert code == 2
    assert "batch_size=3 is invalid for 2 processes" in capfd.readouterr().err
    assert not (tmp_path / "uneven" / "checkpoints").exists()


# A transformers.Trainer with GrowthCallback, run by torchrun in each process.
TRAINER_SCRIPT = '''
import json
import sys
from pathlib import Path

from transformers import Trainer, TrainingArguments

from arbor.training.distributed import current_ranks, fingerprint
from arbor.training.integrations import GrowthCallback
from test_integrations import Blocks, tiny_model  # the single-process tests' data and model

out = Path(sys.argv[1])
model = tiny_model()
args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                         dataloader_num_workers=0, ddp_backend="gloo")
grow = GrowthCallback(trigger="schedule", trigger_settings={"steps": [2, 4]},
                      growth={"axis": "depth", "num_layers": 1}, log_path=out / "growth.jsonl")
trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[grow])
trainer.train()
ranks = current_ranks()
losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
(out / f"rank-{ranks.rank}.json").write_text(json.dumps({
    "world_size": ranks.world_size, "layers": model.config.num_hidden_layers, "losses": losses,
    "fingerprint": fingerprint(model), "grown_at": [r["step"] for r in grow.history]}))
'''


def test_growth_callback_grows_a_transformers_trainer_under_ddp(tmp_path):
    # A transformers.Trainer in 2 processes (accelerate wraps the model in DDP): the callback grows
    # every rank at the same step, and the Trainer's own DDP wrapper trains the grown model after it,
    # so the ranks, each on its own data, still end with the same parameters.
    (tmp_path / "script.py").write_text(TRAINER_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "script.py", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS})
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["grown_at"] == ranks[1]["grown_at"] == [2, 4]
    assert ranks[0]["layers"] == ranks[1]["layers"] == 4
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 6
    logged = (tmp_path / "out" / "growth.jsonl").read_text().splitlines()
    assert len(logged) == 2  # rank 0 alone writes the growth log


def test_growth_callback_refuses_fsdp_and_deepspeed_at_the_start():
    from types import SimpleNamespace

    from transformers import TrainerState

    from arbor import ArborConfig, ArborForCausalLM
    from arbor.training.integrations import GrowthCallback

    model = ArborForCausalLM(ArborConfig.from_preset("tiny", num_hidden_layers=1))
    for sharding in ({"fsdp": "full_shard", "deepspeed": None}, {"fsdp": None, "deepspeed": "ds.json"}):
        args = SimpleNamespace(world_size=2, local_rank=0, **sharding)
        with pytest.raises(ValueError, match="supports one process or DistributedDataParallel"):
            GrowthCallback().on_train_begin(args, TrainerState(max_steps=10), None, model=model)
