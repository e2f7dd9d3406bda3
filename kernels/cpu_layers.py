"""The decoder layer's elementwise steps as C++ CPU kernels (csrc/layers_cpu.cpp, in the
extension `cpu_extension` builds): one pass over the rows each, where the torch versions
(`worker/models/llama.py`'s RMSNorm and silu_and_mul, `worker/rotary.py`'s rotate_qk_) run a
chain of operators, each a pass over memory and a dispatch. A model takes them with
`LlamaForCausalLM.use_cpu_kernels()`, which the worker calls when its attention backend is
the C++ one (so the extension is loaded).

Same contracts and the same arithmetic as the torch versions (fp32 math, rounded to the
activation dtype where HF's modules round): results agree to a few ulps, not bit for bit
(summation order, the exp approximation). Activations are `[tokens, features]` with
contiguous rows (row strides allowed); fp32, bf16 and fp16.
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`RMSNorm.forward`'s contract: `x` alone → its norm, a new tensor (x untouched); with
    `residual` → (norm of x + residual, x + residual), the latter being `x`, overwritten."""
    out = torch.ops.quire_cpu.rms_norm(x, residual, weight, eps)
    return out if residual is None else (out, x)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`[T, 2I]` (gate then up) → `silu(gate) * up`, `[T, I]`, a new tensor; `gate_up` untouched."""
    return torch.ops.quire_cpu.silu_and_mul(gate_up)


def rotate_qk_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotary.rotate_qk_`'s contract: rotates every head of `qk` `[T, n*D]` in place (rows may be
    strided) with cos/sin `[T, 1, D]` in qk's dtype; returns `qk`."""
    torch.ops.quire_cpu.rotate_qk(qk, cos.view(cos.shape[0], -1), sin.view(sin.shape[0], -1))
    return qk
