"""Run by tests/test_sharding.py under ``torchrun --nproc-per-node 2``: grow an FSDP2-sharded model.

Every rank trains the same tiny model twice on the same global batches: whole, in one process's
way (each rank alone, no collective), and sharded by FSDP2 with each rank on its half of the
batch. Both grow at step 3 (one layer, zero init), step 5 (one layer, masked init, ramping over
2 steps), step 8 (every layer's FFN 1.5x, zero init) and step 10 (2 more query heads in layers 0
and 2, zero init), with the growth probe before and after each step. Rank 0 writes both loss
curves and growth records, the ranks' fingerprints and whether the grown sharded model equals the
whole one to a JSON file named by the first argument.
"""

import functools
import json
import os
import sys

import torch
import torch.distributed as dist

from arbor import ArborConfig, ArborForCausalLM
from arbor.growth.step import GrowthStep
from arbor.training import distributed, sharding
from arbor_plugins.growth import GrowthError

STEPS, GROW = 12, {3: {"axis": "depth", "num_layers": 1, "init": "zero"},
                   5: {"axis": "depth", "num_layers": 1, "init": "masked", "init_settings": {"ramp_steps": 2}},
                   8: {"axis": "ffn", "factor": 1.5, "init": "zero"},
                   10: {"axis": "heads", "add": 2, "layers": [0, 2], "init": "zero"}}


@torch.no_grad()
def probe_loss(model, batch) -> float:
    model.eval()
    loss = model(batch, labels=batch).loss.item()
    model.train()
    return loss


def run(shard: bool):
    torch.manual_seed(0)
    config = ArborConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = ArborForCausalLM(config)
    if shard:
        sharding.shard_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, 64, (STEPS, 8, 16), generator=torch.Generator().manual_seed(1))
    grow, losses, records = GrowthStep(), [], []
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(STEPS):
        if step in GROW:
            torch.manual_seed(100 + step)  # every rank, and both runs, draw the same new layer
            probe = functools.partial(probe_loss, model, data[0])
            if shard:
                result = sharding.grow_sharded(grow, model, GROW[step], optimizer=optimizer, probe=probe)
                model.reshard()  # what the probe's forward left gathered
            else:
                result = grow(model, GROW[step], optimizer=optimizer, probe=probe)
            records.append({k: result.record[k] for k in ("axis", "positions", "exact", "params_before", "params",
                                                          "new_parameters")}
                           | {"same_loss": abs(result.record["loss_after"] - result.record["loss_before"]) < 1e-5})
        batch = data[step]
        if shard:
            batch = batch[rank * 8 // world:(rank + 1) * 8 // world]
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if shard:
            dist.all_reduce(loss)
            loss = loss / world
        losses.append(loss.item())
    return model, losses, records


if __name__ == "__main__":
    dist.init_process_group("gloo")
    whole, whole_losses, whole_records = run(shard=False)
    sharded, sharded_losses, sharded_records = run(shard=True)
    params = sum(p.numel() for p in sharded.parameters())
    try:
        sharding.grow_sharded(GrowthStep(), sharded, {"axis": "hidden", "factor": 2.0})
        refused = None
    except GrowthError as exc:
        refused = str(exc)
    unchanged = params == sum(p.numel() for p in sharded.parameters())
    ranks = distributed.current_ranks()
    prints = distributed.check_in_sync(sharded, ranks, "at the end")
    full = {name: (p.full_tensor() if isinstance(p, torch.distributed.tensor.DTensor) else p)
            for name, p in sharded.named_parameters()}
    plain = dict(whole.named_parameters())
    same_names = sorted(full) == sorted(plain)
    diff = max(float((full[n] - plain[n]).detach().abs().max()) for n in plain) if same_names else None
    keys = ("layer_intermediate_sizes", "intermediate_size", "layer_num_attention_heads")
    result = {"whole": whole_losses, "sharded": sharded_losses, "fingerprints": prints,
              "whole_records": whole_records, "sharded_records": sharded_records,
              "config": {k: getattr(sharded.config, k) for k in keys},
              "whole_config": {k: getattr(whole.config, k) for k in keys},
              "same_names": same_names, "max_weight_diff": diff,
              "layers": sharded.config.num_hidden_layers, "refused": refused, "unchanged": unchanged,
              "units": len(sharded._get_fsdp_state()._state_ctx.all_states),
              "sharded_layers": sum(map(sharding.is_sharded, sharded.model.layers))}
    if ranks.main:
        with open(sys.argv[1], "w") as out:
            json.dump(result, out)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: once in a while a rank then aborts in C++ ("terminate
    # called without an active exception", SIGABRT) after its work is done, failing a correct run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
