"""Growth-aware training: `TrainConfig` and `Trainer`.

The loop is plain PyTorch: AdamW, linear warm-up then cosine decay, gradient
clipping and accumulation, optional bf16 autocast and gradient checkpointing,
periodic evaluation on held-out blocks. After every optimizer step the growth
controller asks the trigger; when it says grow, the model grows (insertion
policy, init scheme, operator), the optimizer is carried across the step, the
freeze policy runs, and training goes on in the same process. Every growth
event is one line on the console and one record in ``metrics.jsonl``, with the
trigger's reason and the probe loss just before and after the step (equal for
an exact init).

The learning rate is computed from the step, not kept in a scheduler object:
``lr(group) = lr * group multiplier * schedule(step) * group warm-up``, so the
new param groups growth adds and a resumed run need no scheduler surgery.

The module is the `Trainer` class (loop, evaluation, checkpoints, resume); its
settings are `arbor.training.config`; growth itself is `arbor.growth.step.GrowthStep`, data order
`arbor.training.data.batch_at` and checkpoint files `arbor.training.checkpointing`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from arbor import compat
from arbor.growth.growable import ArborForCausalLM
from arbor.growth.optim import step_warmup
from arbor.growth.step import GrowthStep, describe_growth
from arbor.model.checkpoint import verify_checksums
from arbor.model.modeling import CompiledForward
from arbor.plugins import component_state, get_registry, load_component_state
from arbor.plugins.selection import Selection
from arbor.training import distributed, sharding
from arbor.training.checkpointing import (
    CheckpointError,
    latest_checkpoint,
    load_trainer_state,
    restore_optimizer,
    restore_python_rng,
    save_checkpoint,
    set_rng_state,
)
from arbor.training.config import (  # noqa: F401  (the settings; still importable from here)
    DEFAULT_GROWTH,
    GrowthSettings,
    TrainConfig,
    default_marks,
    lr_factor,
    trigger_choice,
)
from arbor.training.data import (
    batch_at,  # the Trainer's batch order; also importable as arbor.training.trainer.batch_at
)
from arbor.training.distributed import Ranks, shard
from arbor.training.flops import FlopCounter
from arbor.training.stages import (
    apply_stage_selectors,
    describe_stage,
    stage_label,
    trainable_parts,
)
from arbor.training.textfiles import log_lines
from arbor.training.tokenizer import encode
from arbor_plugins import Decision, TriggerState


#: With ``on_nonfinite = "skip"``, how many non-finite steps in a row are skipped before the run stops.
MAX_SKIPPED_IN_A_ROW = 10


class TrainingStopped(RuntimeError):
    """The run cannot go on (a non-finite loss, a growth step that broke its exactness promise);
    the message says why and what was kept."""


def make_optimizer(config: TrainConfig):
    """AdamW with decoupled weight decay on matrices only (norm gains and 1-D tensors decay not)."""

    def make(groups: list[dict[str, Any]]) -> torch.optim.AdamW:
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    return make


def _param_groups(model, config: TrainConfig) -> list[dict[str, Any]]:
    matrices = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}]


class GrowthOff(TriggerState):
    """Stands in for the trigger of a run with ``growth.enabled = false``: it never grows."""

    def decide(self, step, tokens, model) -> Decision:
        return Decision(False, "growth.enabled = false")


class Trainer:
    """One training run in ``out_dir``: metrics, checkpoints, growth events."""

    #: Keyword arguments of ``torch.compile`` when ``config.compile`` is on (e.g. ``backend``, ``mode``,
    #: ``fullgraph``): none by default; a run passes its own as ``compile_options=``.
    compile_options: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, model, config: TrainConfig, train_blocks: torch.Tensor, val_blocks: torch.Tensor,
                 out_dir: str | Path, tokenizer=None, plugins=None, progress: bool = True, echo=print,
                 compile_options: Mapping[str, Any] | None = None, ranks: Ranks | None = None,
                 parallel: str = "ddp"):
        if compile_options is not None:
            self.compile_options = MappingProxyType(dict(compile_options))
        #: This process's place in a distributed run (`arbor.training.distributed`); one process by default.
        self.ranks = ranks or Ranks()
        if parallel not in distributed.PARALLEL:
            raise ValueError(f"parallel={parallel!r} is invalid: allowed: {', '.join(distributed.PARALLEL)}")
        #: Whether the model is sharded by FSDP2 (``parallel="fsdp"`` in a distributed run,
        #: `arbor.training.sharding`) rather than held whole by every rank under DDP.
        self.sharded = self.ranks.distributed and parallel == "fsdp"
        if self.ranks.distributed and config.compile:
            raise ValueError("compile=true is not supported in a distributed run yet; train without it")
        if self.sharded:
            sharding.check_growth_settings(config.growth.model_dump())
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.train_blocks, self.val_blocks = train_blocks, val_blocks
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.selection = plugins if plugins is not None else Selection()
        self.progress, self.echo = progress and self.ranks.main, echo if self.ranks.main else _silent
        self.step, self.tokens, self.history = 0, 0, []
        self.nonfinite_steps = 0
        self.skipped_in_a_row = 0  # non-finite steps skipped since the last applied update
        self.flops = FlopCounter()  # training FLOPs so far, counted from the model of each step
        self._compiled = None  # the compiled training forward (config.compile), built on first use
        self._ddp = None  # the DistributedDataParallel wrapper of a distributed run, rebuilt after growth
        self.device = distributed.init(self.ranks, config.device)
        model.to(self.device)
        if config.gradient_checkpointing:
            compat.enable_gradient_checkpointing(model)
        if config.growth.step is not None:
            model.config.growth = dict(config.growth.step)
        if self.ranks.distributed:  # every rank must start from the same model and the same data
            data = {"train": distributed.digest(train_blocks), "validation": distributed.digest(val_blocks),
                    "step": self.step}
            distributed.check_in_sync(model, self.ranks, "at the start of the run", data)
        if self.sharded:  # from here on each rank holds 1/N of every parameter, and of its optimizer state
            sharding.shard_model(model)
        self.optimizer = make_optimizer(config)(_param_groups(model, config))
        self._setup_growth()

    # ----------------------------------------------------------- components
    def _component(self, kind: str, name: str | None, settings: dict[str, Any]):
        if name is None and self.selection.name(kind):
            return self.selection.component(kind), self.selection.settings(kind)
        if name is None:
            return None, None
        component = get_registry().get(kind, name)
        return component, component.validate_settings(settings)

    def _setup_growth(self) -> None:
        g = self.config.growth
        if g.enabled:
            name, trigger_settings = trigger_choice(self.config, self.selection)
            trigger, settings = self._component("trigger", name, trigger_settings)
            self.trigger_name = name or self.selection.name("trigger")
            self.trigger = trigger.start(self.model, settings)
        else:
            self.trigger_name, self.trigger = None, GrowthOff()
        freeze_policy, freeze_settings = self._component("freeze_policy", g.freeze_policy, g.freeze_settings)
        #: (freeze policy, its settings) of each stage of ``growth.stages``; None: one policy for every step.
        self.stage_policies = None if g.stages is None else [
            self._component("freeze_policy", stage.freeze_policy, stage.freeze_settings) if stage.freeze_policy
            else (None, None) for stage in g.stages]
        self._stage_begun = False
        # bf16 autocast rounds differently once shapes change, even for a function-preserving step.
        tolerance = max(g.exact_tolerance, 1e-2 if self.config.bf16 else 0.0)
        self.growth_step = GrowthStep(plugins=self.selection, init=g.init, insertion_policy=g.insertion_policy,
                                      freeze_policy=freeze_policy, freeze_settings=freeze_settings,
                                      new_param_lr_multiplier=g.new_param_lr_multiplier, warmup_steps=g.warmup_steps,
                                      exact_tolerance=tolerance)

    # ------------------------------------------------------------------ loop
    def _set_lr(self) -> None:
        factor = lr_factor(self.step, self.config, self.history[-1]["step"] if self.history else None)
        if self.config.growth.stages is not None:
            factor *= self.config.growth.stages[self.stage()].lr_scale
        for group in self.optimizer.param_groups:
            warm = group.get("arbor_warmup")
            ramp = min(1.0, (warm["done"] + 1) / warm["steps"]) if warm else 1.0
            group["lr"] = self.config.lr * group.get("arbor_lr_multiplier", 1.0) * factor * ramp

    def _training_forward(self):
        """The model, or with ``config.compile`` its compiled forward, or in a distributed run its
        ``DistributedDataParallel`` wrapper (evaluation stays on the plain model)."""
        if self.ranks.distributed and self.model.training and not self.sharded:
            if self._ddp is None:
                # DDP broadcasts rank 0's weights when it is built: the ranks were checked equal first.
                ids = [self.device.index] if self.device.type == "cuda" else None
                self._ddp = DistributedDataParallel(self.model, device_ids=ids)
            return self._ddp
        if not (self.config.compile and self.model.training):
            return self.model
        if self._compiled is None:
            self._compiled = CompiledForward(self.model, **self.compile_options)
        return self._compiled

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            return self._training_forward()(batch, labels=batch).loss

    def train_step(self) -> float:
        c = self.config
        self.model.train()
        self._set_lr()
        total = 0.0
        for micro in range(c.grad_accum):
            batch = shard(batch_at(self.train_blocks, self.step * c.grad_accum + micro, c.batch_size, c.seed),
                          self.ranks)
            last = micro == c.grad_accum - 1
            # Gradients are averaged over the ranks once per step, on its last micro-batch.
            if self.sharded:
                self.model.set_requires_gradient_sync(last)
            with self._ddp.no_sync() if self._ddp is not None and not last else contextlib.nullcontext():
                loss = self._loss(batch) / c.grad_accum
                loss.backward()
            total += loss.item()
        total = distributed.mean(total, self.ranks)  # the global batch's loss, the same on every rank
        seq = self.train_blocks.shape[1]
        self.flops.step(self.model, c.batch_size * c.grad_accum * seq, seq)  # also a step skipped below
        # The norm is wanted even without clipping: a non-finite one must not reach the weights.
        grads = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, c.grad_clip if c.grad_clip > 0 else math.inf)
        norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # sharded: summed over the ranks
        if not (math.isfinite(total) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_steps += 1
            if c.on_nonfinite == "stop":
                last = latest_checkpoint(self.out)
                kept = f"the last checkpoint ({last.name}) is intact" if last else "no checkpoint was written yet"
                raise TrainingStopped(
                    f"step {self.step + 1}: loss {total} and gradient norm {norm} are not all finite; stopped "
                    f"before applying this update, and {kept}. Lower lr (now {c.lr}), or set on_nonfinite=skip "
                    "to skip such steps"
                )
            self._log({"event": "skipped", "step": self.step + 1, "loss": total, "grad_norm": norm})
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row > MAX_SKIPPED_IN_A_ROW:
                # Skipping is for a rare bad batch; a model that no longer gives a finite loss would
                # otherwise "finish" the run having learnt nothing, and exit as if it had.
                last = latest_checkpoint(self.out)
                kept = f"the last checkpoint ({last.name}) is intact" if last else "no checkpoint was written yet"
                raise TrainingStopped(
                    f"step {self.step + 1}: {self.skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                    f"norm and were skipped (on_nonfinite=skip allows {MAX_SKIPPED_IN_A_ROW}); stopped, and {kept}. "
                    f"Lower lr (now {c.lr})")
            self.step += 1  # the batch is consumed, as in the uninterrupted schedule
            self.tokens += c.batch_size * c.grad_accum * self.train_blocks.shape[1]
            return total
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_warmup(self.optimizer)
        self.skipped_in_a_row = 0
        self.step += 1
        self.tokens += c.batch_size * c.grad_accum * self.train_blocks.shape[1]
        return total

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        c = self.config
        blocks = self.val_blocks
        want = c.eval_batches * c.batch_size
        if blocks.shape[0] > want:  # spread over the whole held-out split, not its first few documents
            blocks = blocks[torch.linspace(0, blocks.shape[0] - 1, want).round().long()]
        total = sum(self._loss(blocks[i:i + c.batch_size]).item() * len(blocks[i:i + c.batch_size])
                    for i in range(0, blocks.shape[0], c.batch_size))
        self._reshard()
        return total / blocks.shape[0]

    @torch.no_grad()
    def _probe_loss(self) -> float:
        self.model.eval()
        loss = self._loss(self.val_blocks[: min(2, len(self.val_blocks))]).item()
        self._reshard()
        return loss

    def _reshard(self) -> None:
        """Free what a forward without backward left gathered: FSDP2 reshards the root's parameters
        (embeddings, final norm, LM head) only after a backward."""
        if self.sharded:
            self.model.reshard()

    def grow(self, decision) -> dict[str, Any]:
        """Take one growth step now; returns the record written to ``metrics.jsonl``."""
        # A sharded model grows through `sharding.grow_sharded`: the same transaction, then the new
        # layers are sharded like the others.
        stage = None
        if self.stage_policies is not None:  # the step begins the next stage, with that stage's policy
            stage = self.stage(len(self.history) + 1)
            self.growth_step.freeze_policy, self.growth_step.freeze_settings = self.stage_policies[stage]
        grow = functools.partial(sharding.grow_sharded, self.growth_step) if self.sharded else self.growth_step
        result = grow(self.model, decision.growth, optimizer=self.optimizer, probe=self._probe_loss,
                      reason=decision.reason, step=self.step, tokens=self.tokens, trigger=self.trigger,
                      trigger_name=self.trigger_name)
        if self._compiled is not None:
            # Its graphs were traced for the old shapes: free them (dynamo's caches are per process)
            # rather than pile up recompilations; the next training step compiles the grown model.
            self._compiled = None
            torch.compiler.reset()
        record = result.record
        if self.ranks.distributed:
            self._ddp = None  # it holds the old parameters; the next step wraps the grown model
            distributed.check_growth(self.model, self.ranks, record)
        self.history.append(record)
        self._log(record)
        if record.get("claimed_exact"):  # the init scheme promised an unchanged function; the probe says otherwise
            g = self.config.growth
            message = (f"step {self.step}: init scheme {record['init']!r} claims an exact growth step, but the "
                       f"probe loss moved {record['loss_before']:.6f} -> {record['loss_after']:.6f} (more than "
                       f"exact_tolerance={g.exact_tolerance:g} relative); logged as not exact")
            if g.exactness == "error":
                raise TrainingStopped(message.replace("; logged as not exact", "; stopped (growth.exactness=error)"))
            self.echo(f"warning: {message}")
        self.echo(describe_growth(record))
        if stage is not None:  # also a step past the last stage: its policy ran, so its selectors run too
            self.begin_stage(stage)
        return record

    def stage(self, growth_steps: int | None = None) -> int | None:
        """The index in ``growth.stages`` of the stage after ``growth_steps`` growth steps (default: the
        steps taken so far); None when the run has no stages."""
        stages = self.config.growth.stages
        if stages is None:
            return None
        return min(len(self.history) if growth_steps is None else growth_steps, len(stages) - 1)

    def begin_stage(self, index: int) -> dict[str, Any]:
        """Apply stage ``index``'s train / freeze selectors and log what trains now (the growth step that
        begins a stage has applied its freeze policy already)."""
        stages = self.config.growth.stages
        trained, frozen = apply_stage_selectors(self.model, stages[index], self.optimizer)
        record = {"event": "stage", "step": self.step, "tokens": self.tokens, "stage": index,
                  "name": stage_label(stages, index), "stages": len(stages), "unfrozen_now": len(trained),
                  "frozen_now": len(frozen), "lr_scale": stages[index].lr_scale, **trainable_parts(self.model)}
        self._stage_begun = True
        self._log(record)
        self.echo(describe_stage(record))
        return record

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _log(self, record: dict[str, Any]) -> None:
        if not self.ranks.main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def trainer_state(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "growth_history": self.history, "trigger": self.trigger.state_dict(),
                "flops": self.flops.total,
                "frozen": [n for n, p in self.model.named_parameters() if not p.requires_grad],
                "trigger_name": self.trigger_name, "config": self.config.model_dump(mode="json"),
                "plugins": self.selection.as_dict()}

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0 only: every rank holds the same model and optimizer state).

        A sharded model is first gathered, one tensor at a time, into rank 0's CPU memory, so the
        checkpoint is the one a single process writes: it resumes in any number of processes.
        """
        whole = {}
        if self.sharded:  # every rank takes part in the gathers
            whole = {"model_state": sharding.full_model_state(self.model),
                     "optimizer_state": sharding.full_optimizer_state(self.optimizer, keep=self.ranks.main)}
        components = component_state(self.model)
        path = None
        if self.ranks.main:
            path = save_checkpoint(self.out, self.step, self.model, self.optimizer, self.trainer_state(),
                                   tokenizer=self.tokenizer, keep=self.config.keep_checkpoints, components=components,
                                   **whole)
        distributed.barrier(self.ranks)  # no rank runs ahead of a checkpoint that may yet fail
        return path

    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to ``max_steps`` (or stop after step ``until``); returns a summary."""
        c = self.config
        stop = c.max_steps if until is None else min(until, c.max_steps)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
            self.echo = bar.write
        if self.config.growth.stages is not None and self.step == 0 and not self.history and not self._stage_begun:
            self.begin_stage(0)  # a new run: the first stage (a resumed one is in its stage already)
        window_tokens, window_start, window_losses, last_loss = 0, time.perf_counter(), [], float("nan")
        while self.step < stop:
            tokens_before = self.tokens
            step_loss = self.train_step()
            window_tokens += self.tokens - tokens_before
            window_losses.append(step_loss)
            self.trigger.observe(self.step, self.tokens, step_loss, self.model)
            if self.step % c.log_interval == 0 or self.step == c.max_steps:
                elapsed = time.perf_counter() - window_start
                # The mean over the steps since the last record: one batch's loss is too noisy to read.
                last_loss = sum(window_losses) / len(window_losses)
                record = {"step": self.step, "tokens": self.tokens, "loss": last_loss,
                          "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                          "params": self.num_parameters(), "layers": self.model.config.num_hidden_layers,
                          "flops": self.flops.total}
                if self.config.growth.stages is not None:
                    record["stage"] = stage_label(self.config.growth.stages, self.stage())
                for key, value in self.trigger.report(self.step, self.tokens, self.model).items():
                    record.setdefault(key, value)  # the trigger's figures (per-layer utilization), never in place of ours
                self._log(record)
                window_tokens, window_start, window_losses = 0, time.perf_counter(), []
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    params=f"{record['params'] / 1e6:.2f}M", layers=record["layers"])
            if self.step % c.eval_interval == 0 or self.step == c.max_steps:
                self._log({"step": self.step, "tokens": self.tokens, "val_loss": self.evaluate()})
            if self.step < c.max_steps:
                decision = distributed.decide(self.trigger.decide(self.step, self.tokens, self.model), self.ranks)
                if decision.grow:
                    self.grow(decision)
            if self.step % c.save_interval == 0 or self.step == c.max_steps:
                self.save()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if self.ranks.distributed:
            fingerprints = distributed.check_in_sync(self.model, self.ranks, f"at the end of the run (step {self.step})")
            self._log({"event": "ranks", "step": self.step, "world_size": self.ranks.world_size,
                       "fingerprints": fingerprints})
        val = self.evaluate()
        return {"step": self.step, "tokens": self.tokens, "loss": last_loss, "val_loss": val,
                "growth_events": len(self.history), "checkpoint": str(latest_checkpoint(self.out)),
                "params": self.num_parameters(), "layers": self.model.config.num_hidden_layers}

    def sample(self, prompt: str | None = None, max_new_tokens: int | None = None) -> str:
        """A greedy continuation of ``prompt`` (needs the tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("sampling needs a tokenizer")
        prompt = self.config.sample_prompt if prompt is None else prompt
        ids = encode(self.tokenizer, prompt, return_tensors="pt").input_ids.to(self.device)
        self.model.eval()
        with torch.no_grad():
            # Greedy, but a small model loops on its favourite tokens; forbidding repeated trigrams
            # keeps the sample readable without making it random.
            out = self.model.generate(ids, max_new_tokens=max_new_tokens or self.config.sample_tokens,
                                      do_sample=False, no_repeat_ngram_size=3,
                                      pad_token_id=self.tokenizer.pad_token_id)
        self._reshard()
        return self.tokenizer.decode(out[0], skip_special_tokens=True)

    # --------------------------------------------------------------- resume
    @classmethod
    def resume(cls, checkpoint: str | Path, train_blocks, val_blocks, out_dir: str | Path, tokenizer=None,
               plugins=None, progress: bool = True, echo=print, config: TrainConfig | None = None,
               ranks: Ranks | None = None, parallel: str = "ddp") -> Trainer:
        """Continue the run saved in ``checkpoint`` (the grown architecture comes from its config)."""

        verify_checksums(checkpoint)  # once here; the load below need not hash the files again
        state, tensors = load_trainer_state(checkpoint)
        config = config or TrainConfig.model_validate(state["config"])
        try:
            model = ArborForCausalLM.from_pretrained(checkpoint, verify_checksums=False)
        except (OSError, ValueError, RuntimeError) as exc:  # a damaged file without checksums to name it
            raise CheckpointError(f"{checkpoint}: the model cannot be loaded: {str(exc).strip().splitlines()[0]}") \
                from None
        # Plugins' state first: it may recreate parameters (LoRA adapters) that the frozen list and the
        # optimizer's saved groups name.
        load_component_state(model, tensors.get("components"))
        frozen = set(state.get("frozen", []))
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        trainer = cls(model, config, train_blocks, val_blocks, out_dir, tokenizer, plugins, progress, echo, ranks=ranks,
                      parallel=parallel)
        trainer.optimizer = restore_optimizer(make_optimizer(config), model, state, tensors)
        if trainer.sharded:  # the checkpoint holds whole moments: each rank keeps its shard
            sharding.shard_optimizer_state(trainer.optimizer)
        trainer.step, trainer.tokens = int(state["step"]), int(state["tokens"])
        trainer.flops.total = int(state.get("flops", 0))
        trainer.history = list(state.get("growth_history", []))
        trainer.trigger.load_state_dict(state.get("trigger", {}))
        set_rng_state(tensors["rng"])
        restore_python_rng(state.get("python_rng"))
        if trainer.ranks.main:
            truncate_metrics(trainer.out, trainer.step)
        return trainer


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop the records of ``metrics.jsonl`` after ``step`` (and a line cut short by a crash).

    Everything logged up to a step is on disk before that step's checkpoint is
    written, so after resuming from it these records are exactly the ones the
    run is about to log again.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for _, line, _ in log_lines(path):  # a byte that is not UTF-8 is an error naming the file and line
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def _silent(message: str) -> None:
    """The echo of a rank other than 0: only rank 0 prints."""
