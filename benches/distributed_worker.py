"""One process of the distributed row of ``benches/throughput.py`` (started by torchrun; not run by hand).

Trains ``arbor.training.trainer.Trainer`` data parallel (``--parallel ddp``) or sharded by FSDP2
(``fsdp``) on random token blocks at a fixed per-rank batch, times training steps, then times one
growth step (a depth step, exact, with the checks a distributed run does) and the first training
step after it (where DDP's wrapper is rebuilt, or FSDP's root takes the new layers in). Rank 0 writes the
timings as JSON to the path given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from arbor import ArborConfig, ArborForCausalLM
from arbor.training.distributed import Ranks, finish
from arbor.training.trainer import TrainConfig, Trainer
from arbor_plugins import Decision


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--config", required=True, help="ArborConfig keyword arguments, as JSON")
    p.add_argument("--batch", type=int, required=True, help="rows per rank")
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--steps", type=int, required=True, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"))
    args = p.parse_args()
    ranks = Ranks.from_env()
    torch.manual_seed(0)
    config = ArborConfig(**json.loads(args.config))
    model = ArborForCausalLM(config)
    blocks = torch.randint(0, config.vocab_size, (4096, args.seq), generator=torch.Generator().manual_seed(1))
    steps = args.warmup + args.steps + 2
    train = TrainConfig(batch_size=args.batch * ranks.world_size, seq_len=args.seq, max_steps=steps, warmup_steps=0,
                        lr=1e-3, eval_interval=10**6, save_interval=10**6, log_interval=10**6, sample_tokens=0,
                        device=args.device)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, train, blocks, blocks[:8], out, progress=False, ranks=ranks, parallel=args.parallel)
        for _ in range(args.warmup):
            trainer.train_step()
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        trainer.grow(Decision(True, "bench", {"axis": "depth", "num_layers": 1, "init": "zero"}))
        grow = time.perf_counter() - started
        started = time.perf_counter()
        trainer.train_step()  # DDP: rebuilds the wrapper around the grown model first; FSDP: the root takes the new units in
        after = time.perf_counter() - started
    step = statistics.median(times)
    if ranks.main:
        with open(args.out, "w") as f:
            json.dump({"world_size": ranks.world_size, "step_seconds": step,
                       "tokens_per_s": args.batch * ranks.world_size * args.seq / step,
                       "growth_seconds": grow, "first_step_after_growth_seconds": after}, f)
    finish(ranks)


if __name__ == "__main__":
    main()
