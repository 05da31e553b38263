"""Growth inside a Hugging Face ``transformers.Trainer``: `GrowthCallback`.

A `transformers.Trainer` user adds one callback and the model grows while it
trains, exactly as under ``arbor train``: the trigger decides after each
optimizer step, ``model.grow`` takes the step, the Trainer's AdamW keeps its
moments (resized to the new shapes) and its LR schedule covers the new
parameters, the freeze policy runs, and the event is recorded::

    from arbor.training.integrations import GrowthCallback

    grow = GrowthCallback(trigger="schedule", trigger_settings={"steps": [1000, 2000]},
                          growth={"axis": "depth", "num_layers": 2})
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[grow]).train()

What the trigger sees. ``observe`` runs once per optimizer step. Its ``loss``
is the Trainer's logged training loss (the mean over the last
``logging_steps`` window), handed over at the step after it was logged (the
Trainer logs after the callbacks' ``on_step_end``), and ``None`` on steps
with nothing new; loss-driven triggers (``loss-plateau``) therefore want a
small ``logging_steps``, and their windows count logged losses. ``tokens`` is
``state.num_input_tokens_seen`` when the Trainer counts tokens
(``TrainingArguments(include_num_input_tokens_seen=True)``), else an
estimate: steps x (batch per device x accumulation x processes) x
``seq_len`` (given, or the length of the first training example's
``input_ids``), else 0.

The optimizer. The Trainer steps an accelerate ``AcceleratedOptimizer`` that
wraps the torch optimizer; growth works on the wrapped ``.optimizer`` (the
wrapper's ``param_groups`` and ``state`` are views of it, so the Trainer
steps the new groups), and on the torch LR scheduler (unwrapped from an
``AcceleratedScheduler`` if there is one), whose ``LambdaLR`` gets one lambda
per new group. Warm-ups of new groups (``warmup_steps``) advance here, after
every step.

Several processes. Under ``torchrun``, where the Trainer wraps the model in
``DistributedDataParallel``, the decision is rank 0's (broadcast), every rank
takes the same growth step, the ranks' parameters are compared after it
(`arbor.training.distributed.check_in_sync`), and the Trainer's DDP wrapper is
rebuilt in place around the grown model, so its loop goes on training the grown
model on every rank. FSDP and DeepSpeed shard the parameters in ways the growth
operators do not follow, and are refused at the start of training.

Checkpoints and resume. The grown config is saved with the weights, the
trigger's state, the growth history, the frozen parameters and the optimizer's
group layout go into ``trainer_state.json`` (``stateful_callbacks``), and
``on_train_begin`` restores them whatever ``restore_callback_states_from_checkpoint``
says. A resumed Trainer must start from the grown architecture and the grown
optimizer layout, which ``trainer.train(resume_from_checkpoint=...)`` alone
cannot rebuild; so::

    model = ArborForCausalLM.from_pretrained(ckpt)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[GrowthCallback(...)])
    prepare_resume(trainer, ckpt)
    trainer.train(resume_from_checkpoint=ckpt)

A tenth of this module is this docstring: how the callback meets the
Trainer's loop, optimizer and checkpoints is subtle enough to spell out.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from arbor.growth.optim import _base_group_index, _ramp, drop_frozen_state, step_warmup
from arbor.growth.step import GrowthStep, describe_growth, parse_growth_spec
from arbor.plugins import component_state, get_registry, load_component_state
from arbor.plugins.selection import load_plugins_toml
from arbor.training import distributed
from arbor.training.config import default_marks
from arbor_plugins import DEFAULTS
from arbor_plugins.settings import describe_validation_error

__all__ = ["GrowthCallback", "prepare_resume", "unwrap_model", "unwrap_optimizer", "unwrap_scheduler"]

#: The file in a Trainer checkpoint folder that holds the plugins' training state (``arbor_state_dict``).
COMPONENTS_FILE = "arbor_components.pt"
#: Config fields that fix the architecture: a resumed model must match the checkpoint in all of them.
_ARCHITECTURE = ("vocab_size", "hidden_size", "num_hidden_layers", "layer_intermediate_sizes",
                 "layer_num_attention_heads", "layer_num_key_value_heads")


# ------------------------------------------------------------------ unwrapping
def unwrap_model(model):
    """The arbor model inside ``DataParallel`` / ``torch.compile`` / similar wrappers."""
    while not hasattr(model, "grow"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"GrowthCallback needs an arbor model (ArborForCausalLM, or one wrapped by "
                            f"DataParallel / torch.compile); got {type(model).__name__}")
        model = inner
    return model


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def unwrap_scheduler(scheduler):
    """The torch LR scheduler inside accelerate's ``AcceleratedScheduler``."""
    while scheduler is not None and not hasattr(scheduler, "last_epoch") and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    return scheduler


def _lookup(kind: str, name: str, field: str):
    """The registered ``kind`` called ``name``; the error names ``field`` and the valid names."""

    registry = get_registry()
    if not isinstance(name, str) or not registry.has(kind, name):
        valid = ", ".join(repr(n) for n in registry.names(kind)) or "none are installed"
        raise ValueError(f"{field}={name!r} is not a registered {kind}; valid names: {valid}")
    return registry.get(kind, name)


def _validate(component, settings: dict | None, field: str):
    try:
        return component.validate_settings(settings)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, prefix=field)) from None


# -------------------------------------------------------------------- callback
class GrowthCallback(TrainerCallback, ExportableState):
    """Grow an arbor model while a ``transformers.Trainer`` trains it.

    * ``trigger`` / ``trigger_settings``: a registered trigger (``utilization``,
      ``loss-plateau``, ``schedule``, ``compute-optimal``, or a plugin's) and its
      settings; ``None`` takes ``[trigger]`` of ``plugins.toml``. ``"schedule"``
      without settings grows where ``arbor train`` does, at 10 % and 30 % of
      ``max_steps`` (`arbor.training.trainer.DEFAULT_GROWTH`).
    * ``growth``: the step ``model.grow`` takes when the trigger names none (a
      `GrowthSpec` dict, e.g. ``{"axis": "ffn", "factor": 1.5}``); default the
      model's ``config.growth``, else 4 layers at the middle.
    * ``init`` / ``insertion_policy``: init scheme and insertion policy names
      for steps that name none; ``plugins.toml`` decides otherwise.
    * ``freeze_policy`` / ``freeze_settings``: what trains after each step.
    * ``new_param_lr_multiplier`` / ``warmup_steps``: the new parameters' group.
    * ``plugins``: a ``plugins.toml`` path or a loaded selection (default
      ``./plugins.toml`` when present).
    * ``log_path``: also append each growth record to this JSON-lines file.
    * ``seq_len``: tokens per example, for the token estimate (see the module doc).
    * ``probe_batch``: input ids (a tensor) or a batch dict; its loss just before
      and after each step goes into the record (equal for an exact init).
    * ``echo``: where the one-line growth message goes (default: ``tqdm.write``).

    Each growth appends a record (``"event": "growth"``, step, tokens, spec,
    reason, parameter and layer counts, probe losses, seconds) to
    ``state.log_history`` and to ``self.history``.
    """

    def __init__(self, trigger: str | None = DEFAULTS["trigger"], trigger_settings: dict[str, Any] | None = None,
                 growth: dict[str, Any] | None = None, init: str | None = None, insertion_policy: str | None = None,
                 freeze_policy: str | None = None, freeze_settings: dict[str, Any] | None = None,
                 new_param_lr_multiplier: float = 1.0, warmup_steps: int = 0, plugins: str | Path | Any = None,
                 log_path: str | Path | None = None, seq_len: int | None = None, probe_batch: Any = None,
                 echo: Callable[[str], None] | None = None):
        if isinstance(new_param_lr_multiplier, bool) or not isinstance(new_param_lr_multiplier, (int, float)) \
                or not new_param_lr_multiplier > 0:
            raise ValueError(f"new_param_lr_multiplier={new_param_lr_multiplier!r} is invalid: must be a number > 0")
        for field, value in (("warmup_steps", warmup_steps), ("seq_len", 0 if seq_len is None else seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field}={value!r} is invalid: must be an integer >= 0")
        self._ranks, self._ddp = distributed.Ranks(), None  # set at the start of training
        # Checked now; kept as given (the fields the user set), so records show the spec as written.
        self.growth = None if growth is None else parse_growth_spec(growth).model_dump(exclude_unset=True)
        self.selection = plugins if hasattr(plugins, "choices") else load_plugins_toml(plugins)
        if init is not None:
            _lookup("init_scheme", init, "init")
        if insertion_policy is not None:
            _lookup("insertion_policy", insertion_policy, "insertion_policy")
        # Everything is checked here, so a typo fails when the callback is built, not at the first growth.
        if trigger is None and self.selection.name("trigger"):
            self.trigger_name, self._trigger = self.selection.name("trigger"), self.selection.component("trigger")
            self._trigger_settings = self.selection.settings("trigger")
        else:
            self.trigger_name = DEFAULTS["trigger"] if trigger is None else trigger
            self._trigger = _lookup("trigger", self.trigger_name, "trigger")
            default_schedule = self.trigger_name == "schedule" and not trigger_settings
            # The default schedule depends on max_steps, known when training starts.
            self._trigger_settings = None if default_schedule else _validate(self._trigger, trigger_settings,
                                                                             "trigger_settings")
        self.freeze = self.freeze_settings = None
        if freeze_policy is not None:
            self.freeze = _lookup("freeze_policy", freeze_policy, "freeze_policy")
            self.freeze_settings = _validate(self.freeze, freeze_settings, "freeze_settings")
        elif freeze_settings:
            raise ValueError("freeze_settings apply only together with freeze_policy=")
        elif self.selection.name("freeze_policy"):
            self.freeze = self.selection.component("freeze_policy")
            self.freeze_settings = self.selection.settings("freeze_policy")
        self.init, self.insertion_policy = init, insertion_policy
        self.new_param_lr_multiplier, self.warmup_steps = float(new_param_lr_multiplier), int(warmup_steps)
        self._growth_step = GrowthStep(plugins=self.selection, growth=self.growth, init=init,
                                       insertion_policy=insertion_policy, freeze_policy=self.freeze,
                                       freeze_settings=self.freeze_settings,
                                       new_param_lr_multiplier=new_param_lr_multiplier, warmup_steps=warmup_steps)
        self.log_path = Path(log_path) if log_path is not None else None
        self.seq_len, self.probe_batch, self.echo = seq_len, probe_batch, echo
        # What ExportableState needs to rebuild this callback (JSON only: no probe batch, no echo).
        path = getattr(self.selection, "path", None) if hasattr(plugins, "choices") else plugins
        self._args = {"trigger": trigger, "trigger_settings": trigger_settings, "growth": self.growth, "init": init,
                      "insertion_policy": insertion_policy, "freeze_policy": freeze_policy,
                      "freeze_settings": freeze_settings, "new_param_lr_multiplier": new_param_lr_multiplier,
                      "warmup_steps": warmup_steps, "plugins": str(path) if path is not None else None,
                      "log_path": str(log_path) if log_path is not None else None, "seq_len": seq_len}
        self.trigger = None  # the run's TriggerState, from on_train_begin
        self.history: list[dict[str, Any]] = []
        self._model = self._optimizer = None
        self._pending_loss: float | None = None
        self._tokens_per_step = 0
        self._resume_state: dict[str, Any] | None = None  # set by transformers when it restores callbacks

    # ---------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        """What goes into ``trainer_state.json`` (transformers' ``ExportableState``)."""
        saved = None
        if self.trigger is not None:
            saved = {"trigger_name": self.trigger_name, "trigger": self.trigger.state_dict(),
                     "history": self.history, "frozen": [], "param_groups": None}
            if self._model is not None:
                named = list(self._model.named_parameters())
                saved["frozen"] = [n for n, p in named if not p.requires_grad]
                if self._optimizer is not None:
                    names = {id(p): n for n, p in named}
                    saved["param_groups"] = [[names.get(id(p), "?") for p in g["params"]]
                                             for g in self._optimizer.param_groups]
        return {"args": self._args, "attributes": {"_resume_state": saved}}

    def _saved(self, state) -> dict[str, Any] | None:
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, list):
            raise ValueError(f"the Trainer has {len(stored)} {type(self).__name__}s; one per Trainer is supported")
        saved = (stored or {}).get("attributes", {}).get("_resume_state")
        return saved if saved is not None else self._resume_state

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ValueError(f"GrowthCallback supports one process or DistributedDataParallel (got "
                             f"deepspeed={args.deepspeed!r}, fsdp={args.fsdp!r}): growth changes the parameter "
                             "set, and FSDP and DeepSpeed shard it in ways the growth operators do not follow")
        self._model = unwrap_model(model)
        self._ranks = distributed.current_ranks(getattr(args, "local_rank", 0))
        self._ddp = None
        if self._ranks.distributed:
            self._ddp = distributed.find_wrapper(self._model)
            if self._ddp is None:
                raise ValueError(f"GrowthCallback: the Trainer runs in {self._ranks.world_size} processes but its "
                                 "model is not wrapped in DistributedDataParallel; only DDP is supported")
        self._optimizer = unwrap_optimizer(optimizer)
        settings = self._trigger_settings
        if settings is None:  # the default schedule, at arbor train's fractions of the run (10 % and 30 %)
            settings = self._trigger.validate_settings({"steps": default_marks(state.max_steps)})
        self.trigger = self._trigger.start(self._model, settings)
        self._tokens_per_step = self._estimate_tokens_per_step(args, train_dataloader)
        counts_tokens = self.trigger_name == "compute-optimal" or getattr(settings, "tokens", None) is not None
        if counts_tokens and not self._counts_tokens(args) and not self._tokens_per_step:
            warnings.warn(f"trigger {self.trigger_name!r} counts tokens, but the Trainer does not and no "
                          "seq_len is known: set TrainingArguments(include_num_input_tokens_seen=True) or "
                          "GrowthCallback(seq_len=...); until then tokens stay 0", RuntimeWarning, stacklevel=2)
        saved = self._saved(state)
        if saved and saved.get("trigger") is not None:
            self._restore(saved, lr_scheduler)

    def _restore(self, saved: dict[str, Any], lr_scheduler) -> None:
        """Continue a checkpointed run: trigger state, history, frozen parameters, warm-up ramps."""
        if saved.get("trigger_name") == self.trigger_name:
            self.trigger.load_state_dict(saved["trigger"])
        else:
            warnings.warn(f"the checkpoint's growth trigger is {saved.get('trigger_name')!r} but this "
                          f"GrowthCallback has trigger={self.trigger_name!r}: the new trigger starts afresh",
                          RuntimeWarning, stacklevel=3)
        self.history = list(saved.get("history", []))
        frozen = set(saved.get("frozen", []))
        for name, p in self._model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        if frozen:
            drop_frozen_state(self._optimizer)
        # A LambdaLR rebuilt by the Trainer gives every group the base lambda; put back the
        # warm-up ramp of new groups still warming up (it started `done` scheduler steps ago).
        scheduler = unwrap_scheduler(lr_scheduler)
        lambdas = getattr(scheduler, "lr_lambdas", None)
        groups = self._optimizer.param_groups
        if lambdas is None or len(lambdas) != len(groups):
            return
        base = lambdas[_base_group_index(self._optimizer)]
        for i, group in enumerate(groups):
            warm = group.get("arbor_warmup")
            if warm and warm.get("scheduler") and warm["done"] < warm["steps"]:
                ramp = _ramp(warm["steps"], scheduler.last_epoch - warm["done"])
                lambdas[i] = lambda epoch, fn=base, ramp=ramp: fn(epoch) * ramp(epoch)

    def on_save(self, args, state, control, **kwargs):
        """Plugins' training state (ramping masks, LoRA adapters) beside the Trainer's checkpoint."""
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if self._model is not None and folder.is_dir() and args.should_save:
            components = component_state(self._model)
            if components:
                torch.save({"components": components}, folder / COMPONENTS_FILE)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and isinstance(logs["loss"], (int, float)):
            self._pending_loss = float(logs["loss"])

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.trigger is None:
            return
        optimizer = unwrap_optimizer(optimizer)
        self._optimizer = optimizer
        step_warmup(optimizer)  # the Trainer stepped once; new groups' warm-ups advance
        step, tokens = state.global_step, self._tokens(args, state)
        loss, self._pending_loss = self._pending_loss, None
        self.trigger.observe(step, tokens, loss, self._model)
        if state.max_steps and step >= state.max_steps:
            return  # growing after the last step would only change what gets saved
        decision = distributed.decide(self.trigger.decide(step, tokens, self._model), self._ranks)
        if decision.grow:
            record = self.grow(decision, step, tokens, optimizer, unwrap_scheduler(lr_scheduler))
            state.log_history.append(record)

    # ---------------------------------------------------------------- growth
    def grow(self, decision, step: int, tokens: int, optimizer, scheduler) -> dict[str, Any]:
        """Take one growth step now; returns the record that is logged."""
        result = self._growth_step(self._model, decision.growth, optimizer=optimizer, scheduler=scheduler,
                                   probe=self._probe_loss, reason=decision.reason, step=step, tokens=tokens,
                                   trigger=self.trigger, trigger_name=self.trigger_name)
        record = result.record
        if self._ranks.distributed:
            distributed.check_growth(self._model, self._ranks, record)
            distributed.rewrap(self._ddp)  # the Trainer's loop keeps training through this same wrapper
        self.history.append(record)
        if self._ranks.main:  # one line per step in the log and on the console, however many processes
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            self._echo(describe_growth(record))
        return record

    @torch.no_grad()
    def _probe_loss(self) -> float | None:
        if self.probe_batch is None:
            return None
        model = self._model
        device = next(model.parameters()).device
        batch = self.probe_batch if isinstance(self.probe_batch, dict) else {"input_ids": self.probe_batch}
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch.setdefault("labels", batch["input_ids"])
        was_training = model.training
        model.eval()
        try:
            return float(model(**batch).loss)
        finally:
            model.train(was_training)

    def _echo(self, line: str) -> None:
        if self.echo is not None:
            self.echo(line)
            return
        from tqdm.auto import tqdm

        tqdm.write(line)  # keeps the Trainer's progress bar intact

    # ---------------------------------------------------------------- tokens
    @staticmethod
    def _counts_tokens(args) -> bool:
        return args.include_num_input_tokens_seen not in (None, False, "no")

    def _tokens(self, args, state) -> int:
        if self._counts_tokens(args):
            return int(state.num_input_tokens_seen)
        return state.global_step * self._tokens_per_step

    def _estimate_tokens_per_step(self, args, train_dataloader) -> int:
        seq_len = self.seq_len
        if seq_len is None:  # fixed-length blocks are the common case; padded batches overcount
            try:
                first = train_dataloader.dataset[0]["input_ids"]
                seq_len = len(first)
            except Exception:  # iterable datasets, other layouts: no estimate
                return 0
        return int(seq_len) * args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)


# ---------------------------------------------------------------------- resume
def prepare_resume(trainer, checkpoint: str | Path | bool | None = True) -> Path:
    """Get ``trainer`` ready for ``trainer.train(resume_from_checkpoint=checkpoint)`` after growth.

    The Trainer builds its optimizer from the model's parameters in two groups
    (decay / no decay), but after depth growth the saved optimizer holds a third
    group per growth step (the new parameters, with their own lr), and loading
    it into the two-group optimizer fails. This gives the Trainer an optimizer
    with the saved layout (same groups, same parameters in the same order);
    its hyper-parameters and state then load from the checkpoint as usual.

    ``trainer.model`` must already have the checkpoint's (grown) architecture:
    build it with ``ArborForCausalLM.from_pretrained(checkpoint)``. ``True`` or
    ``None`` takes the last checkpoint in ``args.output_dir``. Returns the path.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if checkpoint is True or checkpoint is None:
        found = get_last_checkpoint(trainer.args.output_dir)
        if found is None:
            raise ValueError(f"checkpoint=True: no checkpoint-* folder in output_dir={trainer.args.output_dir!r}")
        checkpoint = found
    path = Path(checkpoint)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise ValueError(f"checkpoint={str(path)!r} has no trainer_state.json; give a Trainer checkpoint folder")
    callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GrowthCallback)]
    if len(callbacks) != 1:
        raise ValueError(f"prepare_resume needs exactly one GrowthCallback on the Trainer; found {len(callbacks)}")
    model = unwrap_model(trainer.model)
    _check_architecture(model, path)
    if (path / COMPONENTS_FILE).is_file():  # first: it may recreate parameters (LoRA adapters) the optimizer names
        saved_components = torch.load(path / COMPONENTS_FILE, map_location="cpu", weights_only=True)
        load_component_state(model, saved_components.get("components"))
    stored = json.loads(state_file.read_text(encoding="utf-8")).get("stateful_callbacks", {})
    saved = (stored.get(type(callbacks[0]).__name__) or {}).get("attributes", {}).get("_resume_state") or {}
    layout = saved.get("param_groups")
    if not layout:
        return path  # saved before training began: the Trainer's own optimizer is the one to load into
    per_group = getattr(unwrap_scheduler(trainer.lr_scheduler), "base_lrs", layout)
    if len(per_group) != len(layout):
        raise ValueError(f"the Trainer's LR scheduler covers {len(per_group)} param groups but the checkpoint's "
                         f"optimizer has {len(layout)}; pass optimizers=(optimizer, None) so the Trainer builds "
                         "its scheduler on the rebuilt optimizer")
    params = dict(model.named_parameters())
    unknown = sorted({n for names in layout for n in names if n not in params})
    if unknown:
        raise ValueError(f"checkpoint={str(path)!r}: the saved optimizer holds parameters the model lacks "
                         f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''})")
    optimizer = unwrap_optimizer(trainer.optimizer) if trainer.optimizer is not None else trainer.create_optimizer()
    template = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    optimizer.param_groups.clear()
    optimizer.state.clear()
    for names in layout:  # hyper-parameters are placeholders: load_state_dict restores each group's own
        optimizer.add_param_group({**template, "params": [params[n] for n in names]})
    trainer.optimizer = optimizer
    return path


def _check_architecture(model, path: Path) -> None:
    config = type(model.config).from_pretrained(path)
    diff = {k: (getattr(config, k, None), getattr(model.config, k, None)) for k in _ARCHITECTURE
            if getattr(config, k, None) != getattr(model.config, k, None)}
    if diff:
        detail = ", ".join(f"{k}={saved} (model: {now})" for k, (saved, now) in diff.items())
        raise ValueError(f"checkpoint={str(path)!r} holds a different (grown) architecture: {detail}; build the "
                         f"Trainer on ArborForCausalLM.from_pretrained({str(path)!r}) to resume it")
