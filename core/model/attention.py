"""Built-in attention backends, and the name → transformers key resolution.

arbor runs attention through transformers' ``AttentionInterface``, so a
backend is little more than a name for one of its keys plus an honest answer
to "can this run here?". This module is itself a plugin (entry point
``attention`` of ``arbor-lm``), registered like any third-party one.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

import arbor_plugins
from arbor.plugins import get_registry
from arbor_plugins import AttentionBackend


class EagerAttention(AttentionBackend):
    description = "plain PyTorch matmul + softmax; slow, but runs everywhere and returns attention weights"
    implementation: ClassVar[str] = "eager"


class SdpaAttention(AttentionBackend):
    description = "torch.nn.functional.scaled_dot_product_attention (fused kernels where PyTorch has them)"
    implementation: ClassVar[str] = "sdpa"


class FlexAttention(AttentionBackend):
    description = "torch flex_attention (compiled block-sparse kernels); CUDA only, refused on CPU"
    implementation: ClassVar[str] = "flex_attention"

    def is_available(self) -> tuple[bool, str]:
        ok, reason = _flex_available()
        if ok and not torch.cuda.is_available():
            return False, flex_cpu_refusal()
        return ok, reason


def flex_cpu_refusal() -> str:
    """Why flex attention does not run on CPU tensors, and what to use instead.

    PyTorch compiles flex attention on CPU into an inductor C++ template that
    is wrong for some shapes (batch 2, 4 heads, 8 tokens of head_dim 8 differ
    from sdpa by 0.6 with no mask at all), wrong again once transformers'
    process-wide compiled kernel has recompiled for a model of another shape,
    and fails to compile for left-padded cached decoding. A wrong answer is
    worse than a refusal, so arbor refuses until the CPU kernels are right.
    """
    return (
        f"flex attention is refused on CPU: torch {torch.__version__}'s CPU flex kernels give wrong logits "
        "for some shapes and on repeated calls with models of other shapes, and fail to compile for "
        "left-padded generation; use sdpa (or eager), or flex on CUDA"
    )


def check_attention_device(implementation: str | None, device: torch.device) -> None:
    """Raise ``RuntimeError`` when the attention running as ``implementation`` refuses tensors on ``device``.

    ``is_available()`` answers for the machine; this answers for the tensors,
    which matters on a CUDA machine whose model runs (or was left) on the CPU.
    """
    if implementation == FlexAttention.implementation and device.type == "cpu":
        raise RuntimeError(flex_cpu_refusal())


class FlashAttention2(AttentionBackend):
    description = "Dao-AILab flash-attn 2 kernels (CUDA, fp16/bf16)"
    implementation: ClassVar[str] = "flash_attention_2"

    def is_available(self) -> tuple[bool, str]:
        return _flash_attn_available()


# Imports are attempted once: a failed import is slow to retry and will not heal mid-process.
@functools.cache
def _flex_available() -> tuple[bool, str]:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception as exc:
        return False, f"this PyTorch has no flex_attention ({type(exc).__name__}: {exc}); it needs torch>=2.5"
    return True, ""


@functools.cache
def _flash_attn_available() -> tuple[bool, str]:
    try:
        import flash_attn  # noqa: F401
    except ModuleNotFoundError:
        return False, "the flash-attn package is not installed (pip install flash-attn, on a CUDA machine)"
    except Exception as exc:  # installed but broken, e.g. built against another torch
        return False, f"import flash_attn failed: {type(exc).__name__}: {exc}"
    return True, ""


BUILTIN_BACKENDS: dict[str, AttentionBackend] = {
    "eager": EagerAttention(),
    "sdpa": SdpaAttention(),
    "flex": FlexAttention(),
    "flash-attn": FlashAttention2(),
}


@arbor_plugins.hookimpl
def arbor_register(registry: arbor_plugins.Registry) -> None:
    for name, backend in BUILTIN_BACKENDS.items():
        registry.register("attention_backend", name, backend)


def resolve_attn_implementation(name: str | None, registry: arbor_plugins.Registry | None = None) -> str | None:
    """The transformers attention key for backend ``name``; None stays None.

    ``name`` is a registered ``attention_backend`` component (``"flex"``,
    ``"flash-attn"``, a plugin's backend) or the transformers key one of them
    implements (``"sdpa"``, ``"flex_attention"``, ``"flash_attention_2"``).
    Unknown or unavailable backends raise ``ValueError`` now, with the reason,
    rather than deep inside the first forward pass.
    """
    if name is None:
        return None
    if registry is None:
        registry = get_registry()
    entries = list(registry.entries("attention_backend"))
    match = next((e for e in entries if e.name == name), None)
    if match is None:
        match = next((e for e in entries if e.component.implementation == name), None)
    if match is None:
        valid = sorted({e.name for e in entries} | {e.component.implementation for e in entries})
        raise ValueError(
            f"attn_implementation={name!r} is not a known attention backend; valid names: {', '.join(valid)}"
        )
    ok, reason = match.component.is_available()
    if not ok:
        usable = [e.name for e in entries if e.component.is_available()[0]]
        raise ValueError(
            f"attn_implementation={name!r} (attention backend {match.name!r}) is not available here: {reason}; "
            f"available backends: {', '.join(usable)}"
        )
    return match.component.implementation
