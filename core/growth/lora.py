"""LoRA adapters on parts of an arbor model, through peft, merged away when it matters.

PGT's deeper stages train a new layer while the layers below it learn only
through low-rank adapters. `add_lora` wraps chosen projections with peft's
LoRA layers (``peft.inject_adapter_in_model``), leaving every other
parameter's ``requires_grad`` as it was; the wrapped base weights are frozen.

A checkpoint never contains adapters: ``save_pretrained`` writes
`merged_state_dict` (base + scaled ``B @ A``, under the plain Llama names), and
the Llama export reads `effective_weight`. Growth that resizes projections
first calls `merge_lora`, which folds the adapters into the base weights
(exact) and unwraps the modules, so the operators see plain ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from arbor.growth.optim import drop_frozen_state
from arbor.plugins import call_hook

#: Adapter name arbor uses inside peft.
ADAPTER = "arbor"
#: Projections of a decoder layer that may get adapters.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "get_base_layer") and hasattr(module, "lora_A")


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` wrapped by peft LoRA, by name."""
    return {name: m for name, m in model.named_modules() if _is_lora(m)}


def has_lora(model: nn.Module) -> bool:
    return any(_is_lora(m) for m in model.modules())


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight ``module`` computes with: a LoRA layer's base weight plus its unmerged deltas."""
    if not _is_lora(module):
        return module.weight
    weight = module.get_base_layer().weight
    if module.merged:
        return weight
    with torch.no_grad():
        delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
    return weight + delta if torch.is_tensor(delta) else weight


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every LoRA layer folded into a plain ``<name>.weight``."""
    wrapped = lora_modules(model)
    state = {}
    for key, value in model.state_dict().items():
        owner = next((n for n in wrapped if key.startswith(n + ".")), None)
        if owner is None:
            state[key] = value
        elif key == f"{owner}.base_layer.weight":
            state[f"{owner}.weight"] = effective_weight(wrapped[owner]).detach()
        elif key.startswith(f"{owner}.base_layer."):  # a bias, if any
            state[owner + key[len(owner) + len(".base_layer"):]] = value
    return state


def _forget(optimizer, params: list[torch.Tensor]) -> None:
    gone = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for p in params:
        optimizer.state.pop(p, None)
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]


def merge_lora(model: nn.Module, optimizer=None) -> list[str]:
    """Fold every adapter into its base weight and unwrap the module; returns the merged module names.

    The function is unchanged. Base weights stay frozen (they were frozen while
    wrapped); the adapters' parameters leave ``optimizer`` when given.
    """
    wrapped = lora_modules(model)
    adapters = [p for m in wrapped.values() for n, p in m.named_parameters() if "lora_" in n]
    for name, module in wrapped.items():
        with torch.no_grad():
            weight = effective_weight(module).detach().clone()
            base = module.get_base_layer()
            base.weight.copy_(weight)  # the same Parameter object: an optimizer holding it stays valid
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    if optimizer is not None and adapters:
        _forget(optimizer, adapters)
    if wrapped and "peft_config" in model.__dict__:
        del model.peft_config  # no adapters left: the next add_lora starts clean
    return list(wrapped)


def add_lora(model: nn.Module, layers: list[int], *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: tuple[str, ...] = PROJECTIONS, optimizer=None, lr: float | None = None) -> list[str]:
    """Wrap ``targets`` of decoder ``layers`` with fresh LoRA adapters; returns the adapters' parameter names.

    Existing adapters are merged first, so each call starts a new low-rank
    stage (as ReLoRA and PGT's stages do). The wrapped base weights freeze;
    everything else keeps its ``requires_grad``. With ``optimizer`` the adapter
    parameters join it as one new param group (``lr`` or the first group's).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("LoRA adapters need peft: pip install 'arbor-lm[lora]'") from None


    bad = [t for t in targets if t not in PROJECTIONS]
    if bad:
        raise ValueError(f"targets={bad} is invalid: LoRA targets must be among {', '.join(PROJECTIONS)}")
    n = model.config.num_hidden_layers
    if any(not 0 <= i < n for i in layers):
        raise ValueError(f"layers={list(layers)} is invalid: layer indices must lie in [0, {n - 1}]")
    merge_lora(model, optimizer)
    if not layers:
        return []
    names = [f"model.layers.{i}.{'self_attn' if t.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{t}"
             for i in layers for t in targets]
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    frozen_bases = []
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer.", ".")
        if ".base_layer." in name:
            p.requires_grad_(False)
            if trainable.get(plain, False):
                frozen_bases.append(plain)
        else:  # peft froze everything else; give back what was trainable
            p.requires_grad_(trainable.get(name, True))
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if optimizer is not None:
        group: dict[str, Any] = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        group.pop("arbor_warmup", None)
        if lr is not None:
            group["lr"] = group["initial_lr"] = lr
        optimizer.add_param_group({**group, "params": list(adapters.values())})
        drop_frozen_state(optimizer)
    if frozen_bases:
        call_hook("arbor_freeze", model=model, names=frozen_bases, frozen=True)
    return list(adapters)


def lora_state(model: nn.Module) -> dict[str, Any] | None:
    """The adapters of ``model`` as they are, for a checkpoint (None: no adapters).

    Which modules are wrapped, the LoRA settings, and every tensor of the
    wrapped modules (base weights and adapters, unmerged), so `restore_lora`
    rebuilds them bit for bit; the saved model weights hold the merged sum.
    """
    wrapped = lora_modules(model)
    if not wrapped:
        return None
    config = model.peft_config[ADAPTER]
    prefixes = tuple(name + "." for name in wrapped)
    tensors = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}
    return {"modules": sorted(wrapped), "r": int(config.r), "alpha": float(config.lora_alpha),
            "dropout": float(config.lora_dropout), "tensors": tensors}


def restore_lora(model: nn.Module, state: dict[str, Any] | None) -> list[str]:
    """Wrap the modules `lora_state` saved again and load their base weights and adapters.

    Parameters outside the wrapped modules keep their ``requires_grad``; base
    weights freeze and adapters train, as `add_lora` left them. Returns the
    adapters' parameter names.
    """
    if not state:
        return []
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("this checkpoint holds LoRA adapters, which need peft: pip install 'arbor-lm[lora]'") \
            from None
    merge_lora(model)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    config = LoraConfig(r=state["r"], lora_alpha=state["alpha"], lora_dropout=state["dropout"],
                        target_modules=list(state["modules"]), bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    missing = set(state["tensors"]) - set(model.state_dict())
    if missing:
        raise ValueError(f"saved LoRA tensors name what the model does not have: {sorted(missing)[:3]}")
    model.load_state_dict(state["tensors"], strict=False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
        elif ".base_layer." in name:
            p.requires_grad_(False)
        else:
            p.requires_grad_(trainable.get(name, True))
    return [n for n, _ in model.named_parameters() if "lora_" in n]
