"""Training in several processes: which rank this is, its share of each batch, and keeping ranks in step.

``torchrun --nproc-per-node N -m arbor train`` (or ``arbor train --nproc N``) starts N processes;
each reads torchrun's environment (`Ranks.from_env`) and joins one process group (`init`): gloo on
CPU, nccl on CUDA. The Trainer then wraps its model in PyTorch's ``DistributedDataParallel``
(or, with ``parallel="fsdp"``, shards it with `arbor.training.sharding`), and this module
supplies what the wrapper does not:

- `shard`: every rank computes the same global batch (`arbor.training.data.batch_at` is a pure
  function of the step) and trains on its own contiguous slice, so ``batch_size`` stays the
  global batch and the learning-rate schedule, token counts and data order mean what they mean
  in one process;
- `mean`: a number every rank contributes (the step's loss), averaged, so every rank logs and
  shows its trigger the loss a one-process run would have;
- `decide`: a growth decision is rank 0's, broadcast, so every rank grows at the same step with
  the same spec; each rank then runs the same growth transaction on its own full copy of the
  model (random inits draw the same numbers: every rank's generator was seeded alike and has
  drawn alike);
- `check_in_sync`: after each growth step and at the end, every rank's parameter count and a
  checksum of its parameters are gathered and compared; a rank that differs stops the run on
  every rank with `RanksDiverged`, naming the ranks, instead of a hang at the next collective.

Checkpoints are written by rank 0 alone: under data parallelism every rank holds the same weights
and optimizer state (a sharded model is gathered whole first), so the checkpoint is the
one-process checkpoint, and it resumes in one process or in any number of them.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from arbor_plugins import Decision

__all__ = ["PARALLEL", "Ranks", "RanksDiverged", "barrier", "check_batch_size", "check_growth", "check_in_sync", "current_ranks", "decide",
           "digest", "find_wrapper", "finish", "fingerprint", "init", "mean", "rewrap", "shard"]

#: What ``--parallel`` may name: ``ddp``, every rank holds the whole model; ``fsdp``, the model is
#: sharded over the ranks by FSDP2 (`arbor.training.sharding`; no hidden-size growth).
PARALLEL = ("ddp", "fsdp")


class RanksDiverged(RuntimeError):
    """The ranks of a distributed run no longer hold the same model (or took different steps)."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the run: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Whether this rank writes files and prints (rank 0)."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        """The ranks torchrun describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (one process without them)."""
        def read(name: str, default: int) -> int:
            value = os.environ.get(name, "")
            try:
                return int(value) if value else default
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

        ranks = cls(read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0))
        if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size:
            raise ValueError(f"RANK={ranks.rank} and WORLD_SIZE={ranks.world_size} do not describe a rank of the run")
        return ranks


def init(ranks: Ranks, device: str) -> torch.device:
    """Join the process group (once) and return the device this rank trains on.

    ``device`` is the run's setting: ``"cpu"`` uses gloo; ``"cuda"`` uses nccl and this rank's
    ``cuda:LOCAL_RANK``. A single process joins nothing and keeps ``device`` as it is.
    """
    if not ranks.distributed:
        return torch.device(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available on rank {ranks.rank}")
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.get_world_size() != ranks.world_size or dist.get_rank() != ranks.rank:
        raise ValueError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                         f"the environment says {ranks.rank} of {ranks.world_size}")
    return torch.device("cuda", ranks.local_rank) if cuda else torch.device("cpu")


def check_batch_size(batch_size: int, ranks: Ranks) -> None:
    """A global batch of ``batch_size`` rows must split evenly over the ranks."""
    if batch_size % ranks.world_size:
        raise ValueError(f"batch_size={batch_size} is invalid for {ranks.world_size} processes: it is the global "
                         f"batch, split evenly over the ranks, so it must be a multiple of {ranks.world_size}")


def shard(batch: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's contiguous share of a global batch (all of it in one process)."""
    if not ranks.distributed:
        return batch
    rows = batch.shape[0]
    check_batch_size(rows, ranks)
    per = rows // ranks.world_size
    return batch[ranks.rank * per:(ranks.rank + 1) * per]


def mean(value: float, ranks: Ranks) -> float:
    """The mean of ``value`` over the ranks (``value`` itself in one process)."""
    if not ranks.distributed:
        return value
    device = _collective_device()
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / ranks.world_size


def decide(decision: Decision, ranks: Ranks) -> Decision:
    """Rank 0's decision, on every rank."""
    if not ranks.distributed:
        return decision
    box = [decision.to_dict() if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    return Decision(**box[0])


def _bytes(tensor: torch.Tensor) -> bytes:
    # A copy: numpy() would pin the tensor's own storage, which FSDP2 frees by resizing it.
    return tensor.detach().to("cpu", copy=False).contiguous().view(torch.uint8).clone().numpy().tobytes()


def digest(tensor: torch.Tensor) -> str:
    """A short SHA-256 of ``tensor``'s bytes (the token blocks every rank must share)."""
    return hashlib.sha256(_bytes(tensor)).hexdigest()[:16]


def fingerprint(model: torch.nn.Module, extra: Any = None) -> dict[str, Any]:
    """Parameter count and a SHA-256 of every parameter's bytes, in name order (plus ``extra``, JSON).

    A parameter sharded by FSDP2 is gathered whole first (one at a time, a collective every rank
    runs in the same order), so sharded ranks compare the model, not their different shards.
    """
    digest = hashlib.sha256()
    count = 0
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if isinstance(p, DTensor):
            p = p.full_tensor()
        digest.update(name.encode())
        digest.update(_bytes(p))
        count += p.numel()
    if extra is not None:
        digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return {"parameters": count, "checksum": digest.hexdigest()[:16]}


def check_in_sync(model: torch.nn.Module, ranks: Ranks, what: str, extra: Any = None) -> list[dict[str, Any]]:
    """Every rank's `fingerprint`, gathered; raises `RanksDiverged` on every rank when they differ."""
    mine = fingerprint(model, extra)
    if not ranks.distributed:
        return [mine]
    gathered: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(gathered, mine)
    if any(g != gathered[0] for g in gathered):
        groups: dict[str, list[int]] = {}
        for rank, g in enumerate(gathered):
            groups.setdefault(json.dumps(g, sort_keys=True), []).append(rank)
        described = "; ".join(f"ranks {ranks_} hold {g}" for g, ranks_ in groups.items())
        raise RanksDiverged(f"{what}: the ranks no longer hold the same model ({described}); stopped on every rank")
    return gathered


def check_growth(model: torch.nn.Module, ranks: Ranks, record: dict[str, Any]) -> None:
    """`check_in_sync` after a growth step: the same parameters, and the same step taken (its record)."""
    if not ranks.distributed:
        return
    taken = {k: record.get(k) for k in ("step", "spec", "axis", "positions", "init", "layers", "params")}
    check_in_sync(model, ranks, f"after the growth step at step {record.get('step')}", taken)


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def current_ranks(local_rank: int = 0) -> Ranks:
    """The ranks of the process group this process has joined (one process when it has joined none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), max(0, local_rank))


def find_wrapper(model: torch.nn.Module) -> DistributedDataParallel | None:
    """The ``DistributedDataParallel`` that wraps ``model``, wherever it was built.

    The transformers Trainer builds it (through accelerate) and keeps it in its training loop
    without handing it to callbacks, so it is looked up among the live objects: a scan of the
    garbage collector's objects, done once per run.
    """
    for obj in gc.get_objects():
        if isinstance(obj, DistributedDataParallel) and obj.module is model:
            return obj
    return None


def rewrap(wrapper: DistributedDataParallel) -> None:
    """Rebuild ``wrapper`` in place around its grown module, with the settings it was built with.

    A growth step replaces parameters, and DDP's reducer holds the old ones; building a new
    wrapper would leave whoever holds the old object (the transformers Trainer's loop) training
    through it. Running the constructor again on the same object swaps the reducer, registers
    the new parameters and broadcasts rank 0's weights, as a fresh wrapper would.
    """
    DistributedDataParallel.__init__(
        wrapper, wrapper.module, device_ids=wrapper.device_ids, output_device=wrapper.output_device,
        dim=wrapper.dim, process_group=wrapper.process_group,
        bucket_cap_mb=wrapper.bucket_bytes_cap / (1024 * 1024),
        find_unused_parameters=wrapper.find_unused_parameters,
        gradient_as_bucket_view=wrapper.gradient_as_bucket_view, static_graph=wrapper.static_graph)


def finish(ranks: Ranks) -> None:
    """Leave the process group at the end of a run."""
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
