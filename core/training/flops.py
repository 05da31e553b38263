"""Training compute, counted from the model that actually ran.

A growth-efficiency comparison (a grown model against the final model trained
from scratch, compute to a target loss) needs the FLOPs each optimizer step
really cost. The per-layer sizes of an arbor model differ and change during a
run, and parts of it may be frozen, so the count is made from the current
config and ``requires_grad`` flags at every step, never assumed.

What is counted
---------------
Matrix multiplications only, at 2 FLOPs per multiply-add. Embedding lookups,
RMSNorms, RoPE, softmax, activations, the residual adds, the loss and the
optimizer update are not counted (they are O(hidden) per token, not
O(hidden^2)). Per token of a causal training block of ``seq_len`` tokens, with
``h = hidden_size``, ``d = head_dim``, ``V = vocab_size`` and, for layer ``i``,
``H_i`` query heads, ``K_i`` kv heads and FFN width ``F_i``::

    forward = sum_i [ 2*h*(H_i*d)            q_proj
                    + 2 * 2*h*(K_i*d)        k_proj, v_proj
                    + 2*(H_i*d)*h            o_proj
                    + 3 * 2*h*F_i            gate_proj, up_proj, down_proj
                    + 2 * 2*H_i*d*c ]        scores Q K^T, then P V
            + 2*h*V                          LM head (tied or not: the same matmul)

where ``c = (seq_len + 1) / 2`` is the average context of a token: position
``t`` (1-based) attends to ``t`` keys, and the mean of ``1..seq_len`` is
``(seq_len + 1) / 2``. This is the useful causal work; a kernel that also
multiplies the masked upper triangle (eager attention does) spends
``2 * 2*H_i*d*(seq_len - c)`` more per token and layer, which is not counted, so
the number does not depend on the attention backend. ``2*2*H_i*d*c`` equals
``2*H_i*d*(seq_len + 1)``, so every count is an integer.

Backward
--------
For ``Y = A @ B`` the backward needs ``dA = dY @ B^T`` only if ``A`` needs a
gradient and ``dB = A^T @ dY`` only if ``B`` does; each costs what the forward
matmul costs. So per matmul::

    backward = forward * ([input needs grad] + [weight is trainable])

and, summed over the matmuls ``m`` of the forward above::

    training_flops = tokens * sum_m forward_m * (1 + [input_m needs grad] + [weight_m trainable])

A trainable weight matrix whose input needs a gradient costs 1 + 1 + 1 = 3x its
forward (the familiar ``6 * N`` per token). A FROZEN weight matrix there costs
1 + 1 = 2x: its weight gradient is skipped, but the input gradient is still
needed to reach the trainable parameters below it. An activation "needs grad" exactly when some trainable parameter lies
below it, as in autograd: the token embedding (if trainable), then, layer by
layer, the norm gains and projections. Below the lowest trainable parameter no
backward runs at all (1x, forward only), and the lowest trainable matrix needs
only its weight gradient (2x). The attention matmuls have no weights:
``Q K^T`` costs ``forward * ([Q needs grad] + [K needs grad])`` and ``P V``
costs ``forward * ([P needs grad] + [V needs grad])``. (A fused attention
kernel computes dQ, dK and dV together; that differs from this only when some
but not all of q/k/v_proj are frozen with nothing trainable below them.)

Hence, with everything trainable, ``training = 3 * forward`` per token exactly
(``6 * N``-style). That stays true with a frozen substrate embedding, because the
first layer's trainable norm gain already makes its input need a gradient.

LoRA adapters (`arbor.growth.lora`), when counting from a model, add their two small
matmuls ``x -> A (r x in) -> B (out x r)`` per wrapped projection, with the same
rule; the wrapped base weight is frozen and counted as such.

``tokens`` are all positions of the training blocks of a step (batch size x
gradient accumulation x ``seq_len``): every position goes through the LM head.

What is not training compute
----------------------------
Growth itself (copying and initialising weights), the probe forwards a growth
step runs to check exactness, evaluation forwards and sampling are not counted:
``flops`` in ``metrics.jsonl`` is the compute of the optimizer steps only, so a
grown run and a from-scratch run compare on the same footing whatever their
evaluation schedules. Activation recomputation under gradient checkpointing is
not counted either (these are model FLOPs, not hardware FLOPs). A step whose
update is skipped for a non-finite loss still ran its forward and backward and
is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from arbor.plugins import get_registry

__all__ = ["FlopCounter", "forward_flops_per_token", "training_flops", "training_flops_per_token"]


def _context_x2(seq_len: int) -> int:
    """Twice the average causal context ``(seq_len + 1) / 2``, an integer."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is invalid: must be a positive integer")
    return seq_len + 1


class _Tally:
    """Forward and backward FLOPs per token, matmul by matmul."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0

    def matmul(self, flops: int, grad_a: bool, grad_b: bool) -> bool:
        """Count one matmul of ``flops`` forward FLOPs; returns whether its output needs grad."""
        self.forward += flops
        self.backward += flops * (int(grad_a) + int(grad_b))
        return grad_a or grad_b


def _frozen_matcher(frozen: Iterable[str]) -> Callable[[str], bool]:
    names = [frozen] if isinstance(frozen, str) else list(frozen)
    return lambda name: any(name == f or name.startswith(f if f.endswith(".") else f + ".") for f in names)


def _config_and_flags(model_or_config: Any, frozen: Iterable[str] | None):
    """The config, a ``trainable(param_name)`` function and the model (None for a config)."""
    model = None if hasattr(model_or_config, "layer_intermediate_sizes") else model_or_config
    config = model_or_config if model is None else model.config
    is_frozen = _frozen_matcher(frozen) if frozen is not None else None
    if model is not None:
        named = list(model.named_parameters(remove_duplicate=False))
        flags = {n: p.requires_grad for n, p in named}
        if is_frozen is not None:  # a tied parameter is frozen when any of its names is
            frozen_ids = {id(p) for n, p in named if is_frozen(n)}
            flags = {n: id(p) not in frozen_ids for n, p in named}
        return config, (lambda name: flags.get(name, False)), model
    embed_trainable = _substrate_trainable(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def trainable(name: str) -> bool:
        if name == "lm_head.weight" and tied:
            name = "model.embed_tokens.weight"
        if name == "model.embed_tokens.weight" and not embed_trainable:
            return False
        return is_frozen is None or not is_frozen(name)

    return config, trainable, None


def _substrate_trainable(config: Any) -> bool:
    name = getattr(config, "substrate", "learned") or "learned"
    if name == "learned":
        return True
    try:
        return not getattr(get_registry().get("substrate", name), "frozen", True)
    except Exception:  # an unknown substrate: the built-in non-learned ones are all frozen
        return False


def _adapters(model: Any, path: str) -> list[tuple[int, bool, bool]]:
    """``(rank, A trainable, B trainable)`` of the active, unmerged LoRA adapters on module ``path``."""
    if model is None:
        return []
    module = model.get_submodule(path)
    if not (hasattr(module, "get_base_layer") and hasattr(module, "lora_A")):
        return []
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return []
    out = []
    for name in module.active_adapters:
        if name in module.lora_A:
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            out.append((a.shape[0], a.requires_grad, b.requires_grad))
    return out


def _count(model_or_config: Any, seq_len: int, frozen: Iterable[str] | None = None) -> _Tally:
    config, trainable, model = _config_and_flags(model_or_config, frozen)
    c2 = _context_x2(seq_len)
    h, d = config.hidden_size, config.head_dim
    tally = _Tally()

    def linear(path: str, n_in: int, n_out: int, x_grad: bool) -> bool:
        weight = trainable(f"{path}.weight") or (model is not None and trainable(f"{path}.base_layer.weight"))
        y = tally.matmul(2 * n_in * n_out, x_grad, weight)
        for rank, a_trainable, b_trainable in _adapters(model, path):
            z = tally.matmul(2 * n_in * rank, x_grad, a_trainable)
            y = tally.matmul(2 * rank * n_out, z, b_trainable) or y
        return y

    grad = trainable("model.embed_tokens.weight")  # the residual stream needs grad from here on
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        heads, kv, ffn = (config.layer_num_attention_heads[i], config.layer_num_key_value_heads[i],
                          config.layer_intermediate_sizes[i])
        x = grad or trainable(f"{p}.input_layernorm.weight")
        q = linear(f"{p}.self_attn.q_proj", h, heads * d, x)
        k = linear(f"{p}.self_attn.k_proj", h, kv * d, x)
        v = linear(f"{p}.self_attn.v_proj", h, kv * d, x)
        scores = tally.matmul(heads * d * c2, q, k)  # 2 * heads*d * (seq_len + 1) / 2
        mixed = tally.matmul(heads * d * c2, scores, v)
        grad = linear(f"{p}.self_attn.o_proj", heads * d, h, mixed) or grad
        x = grad or trainable(f"{p}.post_attention_layernorm.weight")
        gate = linear(f"{p}.mlp.gate_proj", h, ffn, x)
        up = linear(f"{p}.mlp.up_proj", h, ffn, x)
        grad = linear(f"{p}.mlp.down_proj", ffn, h, gate or up) or grad
    x = grad or trainable("model.norm.weight")
    linear("lm_head", h, config.vocab_size, x)
    return tally


def forward_flops_per_token(config: Any, seq_len: int) -> int:
    """Matmul FLOPs of one forward pass, per token of a causal block of ``seq_len`` tokens.

    ``config`` is an `ArborConfig` (or a model, whose config is used). See the module
    docstring for the formula.
    """
    if not hasattr(config, "layer_intermediate_sizes"):
        config = config.config
    return _count(config, seq_len).forward


def training_flops_per_token(model_or_config: Any, seq_len: int, frozen: Iterable[str] | None = None) -> int:
    """Forward plus backward matmul FLOPs per training token.

    ``frozen`` names frozen parameters (full names or module prefixes, e.g.
    ``"model.layers.0"``). Left None, a model's ``requires_grad`` flags decide, and a
    config counts everything as trainable (except a frozen substrate's embedding).
    Given, it replaces a model's flags.
    """
    tally = _count(model_or_config, seq_len, frozen)
    return tally.forward + tally.backward


def training_flops(model_or_config: Any, tokens: int, seq_len: int, frozen: Iterable[str] | None = None) -> int:
    """Training FLOPs (forward + backward) of ``tokens`` tokens in blocks of ``seq_len``."""
    return int(tokens) * training_flops_per_token(model_or_config, seq_len, frozen)


class FlopCounter:
    """Cumulative training FLOPs, one `step` call per optimizer step.

    Each call counts that step's tokens at the cost of the model as it is at the
    call, so after a growth step (or a freeze) the new cost applies from the next
    step on.
    """

    def __init__(self, total: int = 0) -> None:
        self.total = int(total)
        #: FLOPs of the last step counted.
        self.last = 0

    def step(self, model: Any, tokens: int, seq_len: int) -> int:
        """Add the FLOPs of one optimizer step over ``tokens`` tokens; returns the new total."""
        self.last = training_flops(model, tokens, seq_len)
        self.total += self.last
        return self.total

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = int(state.get("total", 0))
