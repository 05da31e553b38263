"""Optimizer carry-over: keep an optimizer's state valid and useful across a growth step.

A growth step changes parameter shapes and adds parameters. Throwing the
optimizer away (what Arbor's published code does) loses Adam's moment
estimates, and the first steps after growth then take large, badly scaled
updates on weights that were already well trained. `carry_over` instead:

* resizes every per-parameter state tensor (``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``, ``momentum_buffer``, ...) into the new shape, old values
  at `ResizedParameter.old_index` (old units may be permuted, e.g. by head
  growth) and zeros for new units, so the old units' next update is exactly
  the update they would have had without growth; ``step`` is kept, so Adam's
  bias correction does not restart;
* applies `GrowthEvent.moment_scales` (Staged Training halves ``exp_avg`` and
  quarters ``exp_avg_sq`` of duplicated units, keeping the update direction);
* puts the new parameters of a growth event into ONE new param group, with
  ``lr = base lr * new_param_lr_multiplier`` and an optional linear warm-up
  (advanced by `step_warmup`), and teaches an LR scheduler about that group;
* drops the state of frozen parameters (`drop_frozen_state`): a frozen tensor
  needs no moments, and stale moments or gradients could otherwise move it.

Typical loop::

    event = model.grow_width(256)                      # or any arbor.growth.operators operator
    carry_over(opt, model, event, new_param_lr_multiplier=2.0, warmup_steps=100, scheduler=sched)
    ...
    opt.step(); sched.step(); step_warmup(opt)

LR schedulers multiply on top of the warm-up: with a ``LambdaLR`` (which
includes transformers' ``get_*_schedule_with_warmup``) the new group's lambda is
the base group's lambda times the warm-up ramp, so ``scheduler.step()`` gives
the new group ``multiplier * base lr * ramp``; with other schedulers
`step_warmup` rescales the group's current lr by the ramp's increment, which is
exact for multiplicative schedules (StepLR, ExponentialLR) and approximate
otherwise.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

#: State keys that hold first / second moments, and which moment-scale factor applies to them.
_FIRST_MOMENT = ("exp_avg", "momentum_buffer")
_SECOND_MOMENT = ("exp_avg_sq", "max_exp_avg_sq")


def _deref(ref) -> Any:
    if isinstance(ref, weakref.ReferenceType):
        return ref()
    return ref


def rebind(optimizer, old: torch.Tensor, new: torch.Tensor) -> bool:
    """Make ``optimizer`` hold ``new`` where it held ``old`` (growth may replace Parameter objects)."""
    found = False
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                found = True
    if old in optimizer.state:
        optimizer.state[new] = optimizer.state.pop(old)
    return found


def _resize_state(state: dict, info, scales, sources=None) -> tuple[list[str], list[str]]:
    """Resize the tensors of one parameter's state in place; returns (resized keys, odd-shaped keys).

    ``sources`` (``(dim, dst, src)``) copies the resized state of duplicated
    units to their copies, so a split unit's copy starts with its original's moments.
    """
    resized, odd = [], []
    index = info.old_index()
    for key in list(state):  # keys, not items: a list of values would keep every old moment alive
        value = state[key]
        if not torch.is_tensor(value) or value.dim() == 0:
            continue  # scalars (``step``) carry over unchanged
        if tuple(value.shape) == tuple(info.new_shape) and info.new_shape != info.old_shape:
            new = value  # already moved (by `hand_over` during the growth step)
        elif tuple(value.shape) == tuple(info.old_shape):
            new = value.new_zeros(info.new_shape)
            new[index] = value
            state[key] = new
            del value  # the old-shaped tensor can go before the next key is resized
        else:
            odd.append(key)
            continue
        if scales is not None and key in _FIRST_MOMENT + _SECOND_MOMENT:
            factor = scales[0] if key in _FIRST_MOMENT else scales[1]
            new[index] = new[index] * factor.to(device=new.device, dtype=new.dtype)
        if sources is not None:
            dim, dst, src = sources
            new.index_copy_(dim, dst.to(new.device), new.index_select(dim, src.to(new.device)))
        resized.append(key)
    return resized, odd


def hand_over(optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor, info) -> None:
    """Give ``optimizer`` the parameter ``new`` that replaced ``old``, with its state resized.

    Growth operators call this for each tensor as they replace it (inside
    `arbor.growth.operators.following`), so the old parameter and its old-shaped state
    are freed before the next tensor grows. Moment scales of init schemes are
    applied later, by `carry_over`.
    """
    rebind(optimizer, old, new)
    state = optimizer.state.get(new)
    if not state:
        return
    if not new.requires_grad:
        optimizer.state.pop(new)
        return
    _resize_state(state, info, None)  # odd-shaped entries stay; carry_over warns and restarts them


def drop_frozen_state(optimizer: torch.optim.Optimizer) -> int:
    """Remove state (and stale gradients) of every parameter with ``requires_grad=False``.

    Call after freezing. The parameters stay in their groups so unfreezing
    needs no optimizer surgery; with no state and no gradient the optimizer
    skips them, so they neither move nor decay. Returns how many were cleared.
    """
    cleared = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                continue
            if optimizer.state.pop(p, None) is not None:
                cleared += 1
            p.grad = None
    return cleared


def _base_group_index(optimizer) -> int:
    """The group holding most parameters (first on ties): new parameters copy its hyper-parameters."""
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    return sizes.index(max(sizes)) if sizes else 0


def _ramp(steps: int, start_epoch: int):
    return lambda epoch: min(1.0, (epoch - start_epoch + 1) / steps)


def _extend_scheduler(scheduler, base: int, group: dict, multiplier: float, warmup_steps: int) -> None:
    """Teach ``scheduler`` about the group just appended to its optimizer.

    Per-group lists (``base_lrs``, ``_last_lr``, ``lr_lambdas``, ``max_lrs``, ``min_lrs``, ...)
    get one more entry derived from the base group's; lr lists are scaled by the
    multiplier so the schedule hands the new group its own scaled lr.
    """
    subs = getattr(scheduler, "_schedulers", None)
    if subs:  # SequentialLR / ChainedScheduler
        for sub in subs:
            _extend_scheduler(sub, base, group, multiplier, warmup_steps)
    n_old = len(scheduler.optimizer.param_groups) - 1
    for name, value in list(vars(scheduler).items()):
        if not isinstance(value, list) or len(value) != n_old:
            continue
        if name == "base_lrs":
            value.append(group.get("initial_lr", value[base] * multiplier))
        elif name == "_last_lr":
            value.append(group["lr"])
        elif name == "lr_lambdas":
            fn = value[base]
            if warmup_steps > 0:  # the ramp lives in the lambda, so scheduler.step() keeps it
                ramp = _ramp(warmup_steps, scheduler.last_epoch)
                group["arbor_warmup"]["scheduler"] = True
                value.append(lambda epoch, fn=fn, ramp=ramp: fn(epoch) * ramp(epoch))
            else:
                value.append(fn)
        elif name.endswith("lrs"):
            item = value[base]
            value.append(item * multiplier if isinstance(item, (int, float)) else item)


def _add_group(optimizer, params, multiplier, warmup_steps, scheduler) -> dict:
    base = _base_group_index(optimizer)
    template = optimizer.param_groups[base]
    group = {k: v for k, v in template.items() if k not in ("params", "arbor_warmup")}
    lr = float(template["lr"]) * multiplier
    group["lr"] = lr
    if "initial_lr" in template:
        group["initial_lr"] = float(template["initial_lr"]) * multiplier
    group["arbor_lr_multiplier"] = multiplier
    if warmup_steps > 0:
        group["arbor_warmup"] = {"steps": int(warmup_steps), "done": 0, "target_lr": lr}
        group["lr"] = lr / warmup_steps
    group["params"] = params
    optimizer.add_param_group(group)
    if scheduler is not None:
        _extend_scheduler(scheduler, base, optimizer.param_groups[-1], multiplier, warmup_steps)
    return optimizer.param_groups[-1]


def step_warmup(optimizer: torch.optim.Optimizer) -> None:
    """Advance every arbor warm-up by one step; call after each ``optimizer.step()``
    (and after ``scheduler.step()`` when one is used).

    A group with ``warmup_steps = n`` trains at ``target/n, 2*target/n, ..., target``
    on its first ``n`` steps, then at ``target``. Finished warm-ups stay recorded with
    ``done == steps``. When the scheduler's lambda carries the ramp, only ``done``
    advances here.
    """
    for group in optimizer.param_groups:
        warm = group.get("arbor_warmup")
        if not warm or warm["done"] >= warm["steps"]:
            continue
        n = warm["steps"]
        before = min(1.0, (warm["done"] + 1) / n)
        warm["done"] += 1
        after = min(1.0, (warm["done"] + 1) / n)
        if warm.get("scheduler"):
            continue
        group["lr"] = group["lr"] * (after / before)


def carry_over(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    event,
    *,
    new_param_lr_multiplier: float = 1.0,
    warmup_steps: int = 0,
    scheduler=None,
) -> dict[str, Any]:
    """Update ``optimizer`` (and ``scheduler``) in place after the growth step ``event``; once per event.

    `arbor.growth.step.GrowthStep` calls it for every growth; a second call on
    the same event would apply the event's moment scales twice.

    Works whether the growth operator kept each `nn.Parameter` object or replaced
    it (then ``ResizedParameter.old_param`` names the object the optimizer still
    holds, and it is swapped for the new one). Returns a report for logs:
    ``resized`` (name -> old shape, new shape, state keys resized), ``new_parameters``,
    ``new_group`` (index or None), ``dropped_frozen``, ``restarted`` (parameters whose
    state had an unknown shape and was dropped, so the optimizer re-initialises it).
    """
    params = dict(model.named_parameters())
    report: dict[str, Any] = {"resized": {}, "new_parameters": [], "new_group": None,
                              "dropped_frozen": [], "restarted": []}
    odd_all: dict[str, list[str]] = {}
    for name, info in event.resized.items():
        new = params.get(name, _deref(info.new_param))
        if new is None:
            continue
        old = _deref(info.old_param)
        if old is not None and old is not new:
            rebind(optimizer, old, new)
        if new.grad is not None and tuple(new.grad.shape) != tuple(new.shape):
            new.grad = None  # a stale old-shaped gradient would break the next step
        if not new.requires_grad:
            if optimizer.state.pop(new, None) is not None:
                report["dropped_frozen"].append(name)
            continue
        state = optimizer.state.get(new)
        if not state:
            continue
        scales, sources = event.moment_scales.get(name), getattr(event, "moment_sources", {}).get(name)
        keys, odd = _resize_state(state, info, scales, sources)
        if odd:
            odd_all[name] = odd
            optimizer.state.pop(new)
            report["restarted"].append(name)
        report["resized"][name] = {"old": list(info.old_shape), "new": list(info.new_shape), "state": keys}
    if odd_all:
        warnings.warn(
            f"{type(optimizer).__name__}: state tensors with shapes other than their parameter's "
            f"({odd_all}) cannot be carried over; that state was dropped and restarts from zero",
            RuntimeWarning, stacklevel=2,
        )
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    fresh = []
    for name in event.new_parameters:
        p = params.get(name)
        if p is None or id(p) in held:
            continue
        if p.requires_grad:
            fresh.append(p)
            report["new_parameters"].append(name)
        held.add(id(p))
    if fresh:
        _add_group(optimizer, fresh, float(new_param_lr_multiplier), int(warmup_steps), scheduler)
        report["new_group"] = len(optimizer.param_groups) - 1
    for group in optimizer.param_groups:  # frozen elsewhere in the model: no state either
        for p in group["params"]:
            if p.requires_grad:
                continue
            p.grad = None
            if optimizer.state.pop(p, None) is not None:
                report["dropped_frozen"].append(next((n for n, q in params.items() if q is p), "?"))
    return report
