"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) with tensor parallelism inside the layers.

Reads like Hugging Face's `modeling_llama.py` and keeps its parameter names, except
that q/k/v and gate/up projections are fused (`qkv_proj`, `gate_up_proj`); the loader
maps checkpoint names onto them. The model runs on one flat batch of tokens from all
requests: activations are `[num_tokens, hidden]`, never padded.
"""
from __future__ import annotations

import torch
from torch import nn

from quire.kernels import kv_quant
from quire.worker.attention import Attention, AttentionMetadata
from quire.worker.embedding import ParallelLMHead, VocabParallelEmbedding
from quire.worker.kv_pool import KVCacheSpec
from quire.worker.linear import MergedColumnParallelLinear, ProjectionWeight, QKVParallelLinear, RowParallelLinear
from quire.worker.parallel import ParallelContext
from quire.worker.rotary import RotaryEmbedding, rotate_qk_


class RMSNorm(nn.Module):
    """Replicated on every rank. Normalises in fp32 and casts back, as HF's LlamaRMSNorm.

    With `residual` (the fused residual add, as vLLM's `fused_add_rms_norm`): `x + residual`
    is formed in place in `x`, normalised, and returned as the new residual stream beside
    the normalised tensor. The same floating-point operations as HF's separate add and
    norm, in the same order, so the results are bit-identical; fewer temporaries."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.kernel = None  # `cpu_layers.rms_norm` after `LlamaForCausalLM.use_cpu_kernels()`

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`x` alone → its norm (x untouched). With `residual` → (norm of x + residual,
        x + residual), the latter being `x` itself, overwritten."""
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x.add_(residual)
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        variance = xf.pow(2).mean(-1, keepdim=True)
        # A new tensor from here on (x is never written): the in-place steps touch only it.
        y = xf * variance.add_(self.eps).rsqrt_()
        return y.to(dtype).mul_(self.weight)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`[T, 2I]` (gate then up) → `silu(gate) * up`, `[T, I]`, a new tensor. Overwrites the
    gate half of `gate_up` (its SiLU is taken in place: one temporary fewer)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.mul(nn.functional.silu(gate, inplace=True), up)


class LlamaMLP(nn.Module):
    """SwiGLU. `gate_up_proj` is column-parallel (each rank: its slice of the intermediate
    size for gate and for up), `down_proj` row-parallel (partial sums all-reduced)."""

    def __init__(self, config, ctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias, ctx, dtype)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias, ctx, dtype)
        self.act_and_mul = silu_and_mul  # `cpu_layers.silu_and_mul` after `use_cpu_kernels()`
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"config hidden_act {config.hidden_act!r} is not supported (only silu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """Each rank computes attention for `H/tp` query heads and their KV heads
    (`qkv_proj` column-parallel by head), then `o_proj` (row-parallel) sums the heads'
    contributions across ranks. Rotary embedding is applied with the step's `(cos, sin)`,
    which the model looks up once for all layers; the layer holds no table."""

    def __init__(self, config, layer_index: int, ctx: ParallelContext, dtype: torch.dtype, qkv_bias: bool):
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          num_kv_heads, qkv_bias, ctx, dtype)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        getattr(config, "attention_bias", False), ctx, dtype)
        self.q_size = self.qkv_proj.num_heads * self.head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * self.head_dim
        self.attn = Attention(layer_index, self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, self.head_dim,
                              self.head_dim ** -0.5)
        self.rotate_qk_ = rotate_qk_  # `cpu_layers.rotate_qk_` after `use_cpu_kernels()`

    def forward(self, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        # Query and key columns are adjacent: one in-place rotation of both, and q, k, v stay
        # views of the projection's output (rows strided, each row contiguous), never copied.
        self.rotate_qk_(qkv[:, :self.q_size + self.kv_size], *position_embeddings)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention then MLP, each added to the residual; the residual stream is
    replicated on every rank (the row-parallel projections all-reduce into it).

    As in vLLM, a layer hands on its MLP output and the residual stream separately, and the
    next norm adds them (`RMSNorm` with `residual`): `(hidden, residual)` in and out, with
    `residual` None for the first layer, whose input is the whole stream."""

    def __init__(self, config, layer_index: int, ctx: ParallelContext, dtype: torch.dtype, qkv_bias: bool):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index, ctx, dtype, qkv_bias)
        self.mlp = LlamaMLP(config, ctx, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, position_embeddings, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding (vocab-parallel), the decoder layers, final norm. Owns the one rotary
    table (`rotary_emb`, replicated on every rank, independent of depth) and looks up
    the step's `(cos, sin)` once per forward, for every layer, as HF's `position_embeddings`."""

    def __init__(self, config, ctx: ParallelContext, dtype: torch.dtype, qkv_bias: bool, max_position: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx, dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, ctx, dtype, qkv_bias) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(config, head_dim, max_position, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        position_embeddings = self.rotary_emb(positions)
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, position_embeddings, meta)
        return self.norm(hidden, residual)[0] if residual is not None else self.norm(hidden)


class LlamaForCausalLM(nn.Module):
    """Also serves MistralForCausalLM and Qwen2ForCausalLM (q/k/v bias)."""

    # checkpoint name fragment → (fused parameter fragment, shard id)
    stacked_params = [
        (".q_proj.", ".qkv_proj.", "q"),
        (".k_proj.", ".qkv_proj.", "k"),
        (".v_proj.", ".qkv_proj.", "v"),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    ]

    def __init__(self, config, ctx: ParallelContext, dtype: torch.dtype, max_position: int):
        super().__init__()
        architecture = (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]
        qkv_bias = architecture == "Qwen2ForCausalLM" or getattr(config, "attention_bias", False)
        self.config = config
        self.dtype = dtype  # of the weights and the activations (and of the KV cache, unless quantized)
        self.model = LlamaModel(config, ctx, dtype, qkv_bias, max_position)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx, dtype)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states `[num_tokens, hidden]`, replicated on every rank."""
        return self.model(input_ids, positions, meta)

    def use_cpu_kernels(self) -> None:
        """Run the norms, SiLU-and-mul and rotary through the C++ CPU kernels (`kernels.cpu_layers`;
        the extension must be loaded: the worker calls this when its attention backend is the C++
        one). Same contracts; results within a few ulps of the torch layers'. Mutates the layers'
        kernel choice, for the model's lifetime."""
        from quire.kernels import cpu_layers

        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.kernel = cpu_layers.rms_norm
            elif isinstance(module, LlamaMLP):
                module.act_and_mul = cpu_layers.silu_and_mul
            elif isinstance(module, LlamaAttention):
                module.rotate_qk_ = cpu_layers.rotate_qk_

    def pack_gemm_weights(self) -> int:
        """Repack every projection's weight (q/k/v, o, gate/up, down, the LM head) for MKL's GEMM
        (`kernels.packed_gemm`): fp32 on the CPU only; elsewhere nothing changes. Call after
        `load_weights`; the packed layers have no `weight` parameter afterwards (a tied LM head
        keeps the embedding's). Returns how many weights were packed."""
        return sum(module.pack_weight() for module in self.modules() if isinstance(module, ProjectionWeight))

    def weight_bytes(self) -> int:
        """Bytes the weights hold: each distinct parameter once, plus packed GEMM panels."""
        params = {id(p): p for p in self.parameters()}.values()
        packed = (m.packed for m in self.modules() if isinstance(m, ProjectionWeight) and m.packed is not None)
        return sum(p.numel() * p.element_size() for p in params) + sum(w.nbytes for w in packed)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.compute_logits(hidden)

    def kv_cache_spec(self, kv_cache_dtype: str = "auto") -> KVCacheSpec:
        """This rank's KV-cache geometry: every layer caches K and V for its share of the KV heads
        (`num_key_value_heads / tp`, at least one: replicated when tp exceeds them), in the dtype
        `kv_cache_dtype` names (`kv_quant.cache_dtype`: the model's for "auto"; ValueError naming
        the field for an unknown name)."""
        attn = self.model.layers[0].self_attn
        return KVCacheSpec(num_layers=len(self.model.layers), num_kv_heads=attn.qkv_proj.num_kv_heads,
                           head_size=attn.head_dim, dtype=kv_quant.cache_dtype(kv_cache_dtype, self.dtype))

    def load_weights(self, tensors) -> None:
        """Load from `(checkpoint_name, source)` pairs; `source` is sliced lazily, so each
        layer reads only this rank's part. Raises if a parameter is left unloaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, source in tensors:
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            shard_id = None
            for ckpt_part, param_part, shard in self.stacked_params:
                if ckpt_part in name:
                    name, shard_id = name.replace(ckpt_part, param_part), shard
                    break
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no parameter in quire's model")
            module = self.get_submodule(name.rsplit(".", 1)[0])
            loader = getattr(module, "weight_loader", None)
            if loader is None:
                params[name].data.copy_(torch.as_tensor(source[:]).to(params[name].dtype))
            elif shard_id is None:
                loader(params[name], source)
            else:
                loader(params[name], source, shard_id)
            loaded.add(name)
        missing = {n for n in params if n not in loaded and not (self.tie_word_embeddings and n == "lm_head.weight")}
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {sorted(missing)[:8]}")
