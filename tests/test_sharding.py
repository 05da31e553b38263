"""Growth of a model sharded by FSDP2: 2 processes on the CPU (gloo), against one whole model.

The worker (`sharded_growth_worker.py`) trains the same model whole and sharded over the same
global batches and grows both four times: two depth steps (zero init, then masked init), an FFN
step of every layer and a heads step of two layers (zero init), each layer of a width step
gathered, grown and sharded again in turn. The sharded run must give the whole run's losses up
to fp32 reduction order and the same growth records, end with every rank holding the same model
and every layer, old and new, sharded and known to the root, and refuse a hidden-size step
unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "sharded_growth_worker.py"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "result.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_sharded_model_grows_in_depth_and_width_with_the_losses_of_a_whole_one(result):
    assert result["whole"] == pytest.approx(result["sharded"], rel=1e-5)
    # Weights agree to what AdamW makes of fp32 reduction order: the zero-initialised parts start
    # with near-zero gradients, whose last-bit differences its RMS division turns into steps of up
    # to about lr (1e-2).
    assert result["same_names"] and result["max_weight_diff"] < 1e-2
    assert result["sharded_records"] == result["whole_records"]  # one record per step, exact, sizes alike
    assert [r["axis"] for r in result["sharded_records"]] == ["depth", "depth", "ffn", "heads"]
    assert all(r["same_loss"] for r in result["sharded_records"])
    assert result["config"] == result["whole_config"]


def test_every_rank_ends_with_the_same_model_and_every_layer_sharded(result):
    first, second = result["fingerprints"]
    assert first == second and first["parameters"] > 0
    assert result["layers"] == result["sharded_layers"] == 4
    assert result["units"] == result["layers"] + 1  # the root took the new layers in


def test_a_hidden_size_step_on_a_sharded_model_is_refused_before_anything_changes(result):
    assert "axis='hidden' is not supported on a model sharded by FSDP2" in result["refused"]
    assert result["unchanged"]
