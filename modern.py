"""The modern architecture (--arch modern): rotary positions, RMSNorm, SwiGLU, QK-norm, no biases, an optional
untied head; module names and layout of transformers' Qwen3ForCausalLM, so its checkpoints map one to one.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import GPTConfig
from model import CausalLM, KVCache, attend


class RMSNorm(nn.Module):
    """Gain only, no mean subtraction; the parameter is named `weight` so Qwen3 checkpoints map one to one."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 as Qwen3 does, so bf16 activations give the same result as its class.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos and sin for explicit positions (B, T) or (T,), so packed sequences and a KV cache rotate correctly."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    # Halves, not interleaved pairs: the layout of Qwen3's (and Llama's) checkpoints.
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, n_head, T, head_dim); cos/sin: (T, head_dim) or (B, T, head_dim)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class ModernAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.dropout
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(cfg.n_embd, cfg.n_embd, bias=False) for _ in range(4))
        self.q_norm, self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps), RMSNorm(self.head_dim, cfg.norm_eps)

    def forward(self, x, layer, cache, attn_mask, cos, sin):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # QK-norm per head before rotation, as Qwen3.
        q, k, v = apply_rotary(self.q_norm(q).transpose(1, 2), cos, sin), \
            apply_rotary(self.k_norm(k).transpose(1, 2), cos, sin), v.transpose(1, 2)
        y = attend(q, k, v, layer, cache, attn_mask, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.swiglu_hidden_size
        self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ModernBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = ModernAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, layer, cache, attn_mask, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), layer, cache, attn_mask, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class ModernGPT(CausalLM):
    """Rotary, RMSNorm, SwiGLU, QK-norm, no biases; names and layout of transformers' Qwen3ForCausalLM."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            layers=nn.ModuleList(ModernBlock(cfg) for _ in range(cfg.n_layer)),
            norm=RMSNorm(cfg.n_embd, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # Zero output projections: every block starts as the identity, so depth does not scale the initial residual.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.zeros_(p)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def hidden(self, idx, cache: Optional[KVCache] = None, positions=None, attn_mask=None):
        T = idx.shape[1]
        positions = self.positions(idx, cache) if positions is None else positions
        cos, sin = rotary_cos_sin(positions, self.config.n_embd // self.config.n_head, self.config.rope_theta)
        x = self.model.embed_tokens(idx)
        for layer, block in enumerate(self.model.layers):
            x = self.run_block(block, x, layer, cache, attn_mask, cos, sin)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)
