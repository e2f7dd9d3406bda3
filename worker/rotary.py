"""Rotary position embedding, computed as Hugging Face does (rotate-half layout).

One `RotaryEmbedding` per model (`LlamaModel.rotary_emb`, as in HF): its cos/sin table
is the same for every layer, so it is built once and looked up once per step; the
layers receive the step's `(cos, sin)` and only apply them, in place on the fused QKV
projection's query and key columns (`rotate_qk_`), or out of place (`apply_rotary_pos_emb`).

The sin table carries rotate-half's sign: its first half is `-sin`. HF computes
`x * cos + cat(-x2, x1) * sin`; here `x * cos + cat(x2, x1) * sin_signed`. Each product
is the same float (negation is exact) and so is each sum: results are bit-identical,
with one pass over the rows fewer.

Default RoPE is computed here; scaled variants (llama3, linear, dynamic, yarn, ...)
take their inverse frequencies and attention factor from transformers' own
`ROPE_INIT_FUNCTIONS`, so they match the checkpoint's reference implementation.
"""
from __future__ import annotations

import torch
from torch import nn


def rope_parameters(config) -> dict:
    """`{"rope_type", "rope_theta", ...}` from a transformers config of any recent version."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    scaling.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return scaling


class RotaryEmbedding(nn.Module):
    """The model's one cos/sin table, `[max_position, head_dim]` each, in the model's dtype.

    Not sharded: rotation acts within a head and every rank holds whole heads, so each
    rank keeps the full table once (not once per layer: at 128k positions that would be
    tens of MiB per layer, taken from the KV cache).
    """

    def __init__(self, config, head_dim: int, max_position: int, dtype: torch.dtype):
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            attention_scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"config rope type {rope_type!r} is not supported")
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        positions = torch.arange(max_position, dtype=torch.float)
        freqs = positions[:, None] * inv_freq.float().to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin() * attention_scaling
        sin[:, :sin.shape[-1] // 2].neg_()  # rotate-half's sign, folded in (see the module docstring)
        self.register_buffer("cos", (emb.cos() * attention_scaling).to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)
        self.head_dim = head_dim

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: `[T]` → the step's `(cos, sin)`, each `[T, 1, head_dim]` (broadcast over heads;
        sin signed as the module docstring says). Called once per step by the model; every
        layer applies the same pair."""
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        return cos, sin


def rotate_qk_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every head of `qk` `[T, n*D]` in place and return it; `qk` may be a strided view
    (the query and key columns of a fused QKV projection: rows strided, each row contiguous).
    cos/sin: `[T, 1, D]` from `RotaryEmbedding`; D is the last dimension of cos."""
    num_tokens, head_dim = qk.shape[0], cos.shape[-1]
    half = head_dim // 2
    x = qk.view(num_tokens, -1, head_dim)
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    swapped.mul_(sin)
    x.mul_(cos).add_(swapped)
    return qk


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: `[T, H*D]`, k: `[T, KV*D]`, cos/sin: `[T, 1, D]` from `RotaryEmbedding` → rotated
    (q, k), new tensors of the same shapes; the inputs are left untouched."""
    return rotate_qk_(q.clone(), cos, sin), rotate_qk_(k.clone(), cos, sin)
