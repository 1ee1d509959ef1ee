"""One Llama decoder layer with fused projections (qkv in one matmul, gate+up in one).

`csrc/layer_stack.cpp` runs the same forward in C++: change both together
(tests/unit/test_native_layers.py asserts they agree: to fp32 rounding in fp32, where the C++ side
uses one-pass kernels, and bit for bit in fp64).

Fusing cuts the kernels per layer in a decode step, which is what a small-batch decode on a
CPU (or a small GPU batch) pays for; the math is exactly Llama's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hispec.config import ModelConfig
from hispec.kv.cache import KVCache
from hispec.model.rope import apply_rotary
from hispec.model.step import ForwardStep


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # torch's fused kernel: a third fewer dispatches than the spelled-out HF formula, which
    # matters in a small-batch decode step; same result in fp32.
    return F.rms_norm(x, weight.shape, weight, eps)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.eps = cfg.rms_norm_eps
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d, q_dim, kv_dim = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.input_norm = nn.Parameter(torch.ones(d))
        self.qkv_proj = nn.Linear(d, q_dim + 2 * kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, d, bias=cfg.attention_bias)
        self.post_attention_norm = nn.Parameter(torch.ones(d))
        self.gate_up_proj = nn.Linear(d, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=cfg.mlp_bias)

    def parameter_list(self) -> list[torch.Tensor | None]:
        """This layer's tensors in the order the C++ layer stack takes them (csrc/layer_stack.cpp)."""
        return [
            self.input_norm, self.qkv_proj.weight, self.qkv_proj.bias, self.o_proj.weight, self.o_proj.bias,
            self.post_attention_norm, self.gate_up_proj.weight, self.gate_up_proj.bias,
            self.down_proj.weight, self.down_proj.bias,
        ]

    def forward(self, x: torch.Tensor, step: ForwardStep, cache: KVCache) -> torch.Tensor:
        """x: [B, T, d] -> [B, T, d]; writes this layer's K/V for the step into `cache`."""
        q, k, v = self._project_qkv(x, step.cos, step.sin)
        cache.write(self.index, step, k, v)
        keys, values = cache.read(self.index, step.slot_read, step.kv_len)  # [B, Hkv, kv_len, D]
        if step.mask is None and q.shape[1] == 1:
            attn = self._decode_attention(q, keys, values)
        else:
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=step.mask, enable_gqa=self.n_kv_heads != self.n_heads
            )
        return self._output_and_mlp(x, attn)

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One query per sequence attending to all its keys (no mask): three kernels instead of
        SDPA's dispatch, which dominates at this size. Query heads sharing a KV head are stacked
        so GQA needs no key expansion. q [B, 1, H, D] -> [B, H, 1, D]."""
        B, _, H, D = q.shape
        q = q.reshape(B, self.n_kv_heads, H // self.n_kv_heads, D)  # [B, Hkv, G, D]
        scores = torch.matmul(q, keys.transpose(-1, -2)) * D**-0.5  # [B, Hkv, G, kv_len]
        attn = torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(values.dtype), values)  # [B, Hkv, G, D]
        return attn.reshape(B, H, 1, D)

    def forward_causal(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Cache-free causal forward over whole sequences [B, T, d] (training, scoring)."""
        q, k, v = self._project_qkv(x, cos, sin)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self._output_and_mlp(x, attn)

    def _project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, d] -> rotated q [B, T, H, D], rotated k and v [B, T, Hkv, D]."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(rms_norm(x, self.input_norm, self.eps))  # [B, T, (H + 2 Hkv) D]
        qk, v = qkv.split(((H + Hkv) * D, Hkv * D), dim=-1)
        qk = apply_rotary(qk.view(B, T, H + Hkv, D), cos, sin)  # q and k rotated in one go
        q, k = qk.split((H, Hkv), dim=2)
        return q, k, v.view(B, T, Hkv, D)

    def _output_and_mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual attention output (attn [B, H, T, D]) then the residual SwiGLU MLP."""
        B, _, T, _ = attn.shape
        x = x + self.o_proj(attn.transpose(1, 2).reshape(B, T, -1))
        gate, up = self.gate_up_proj(rms_norm(x, self.post_attention_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)
