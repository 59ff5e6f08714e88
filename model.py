"""GPT-2, exactly: pre-LayerNorm blocks, learned positions, tanh GELU, tied embeddings; and what every architecture
shares (CausalLM: the head and its loss, generation with a KV cache; build_model picks the architecture).

Module names follow OpenAI's/Hugging Face's checkpoints (transformer.h.0.attn.c_attn, ...) so their weights map
one to one. Attention runs through F.scaled_dot_product_attention (flash attention on CUDA). A KVCache makes
generation cost one new token per step instead of the whole context.
"""
import math
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

import documents
from config import GPTConfig, count_params
from errors import UserError
from head_loss import head_loss


class KVCache:
    """Keys and values of every layer for B rows and up to max_len positions, filled left to right."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        # Uninitialised: attention only ever reads positions already written.
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def attend(q, k, v, layer: int, cache: Optional[KVCache], attn_mask, dropout_p: float):
    """Attention of (B, n_head, T, head_dim) queries over the cached keys plus these; writes k, v into the cache.
    attn_mask: boolean (B or 1, 1, T, keys), or documents.py's FlexAttention BlockMask (no cache, no dropout)."""
    if isinstance(attn_mask, BlockMask):
        # Under autocast modern's q and k leave their float32 norms beside a bf16 v. scaled_dot_product_attention
        # casts all three to bf16; flex_attention needs one dtype, and older torch releases do not autocast it.
        return flex_attention(q.to(v.dtype), k.to(v.dtype), v, block_mask=attn_mask)
    T = q.shape[2]
    is_causal = attn_mask is None and T > 1
    if cache is not None:
        start = cache.pos
        cache.k[layer, :, :, start:start + T] = k
        cache.v[layer, :, :, start:start + T] = v
        k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]
        if start > 0 and attn_mask is None and T > 1:
            # is_causal aligns the triangle top-left; new queries sit after `start` cached keys.
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
            is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, layer: int, cache: Optional[KVCache], attn_mask):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, layer, cache, attn_mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, layer, cache, attn_mask):
        x = x + self.attn(self.ln_1(x), layer, cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


class CausalLM(nn.Module):
    """What every architecture shares: a stack of `blocks` under its checkpoints' names, `hidden()` up to the final
    norm, the head and its loss, and generation. GPT below is GPT-2; modern.py's ModernGPT the Qwen3-like one."""

    config: GPTConfig
    lm_head: nn.Linear
    # --activation-checkpointing (train.py sets it): while gradients are on, each block keeps only its input and
    # recomputes the rest in backward, a third more compute for a fraction of the memory (BENCHMARKS.md).
    activation_checkpointing: bool = False

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, under whichever name the architecture's checkpoints give them."""
        raise NotImplementedError

    def hidden(self, idx, cache: Optional[KVCache] = None, positions=None, attn_mask=None):
        """Final hidden states (after the final norm), shape (B, T, n_embd).

        positions: (B, T) or (T,) position ids, default cache.pos + arange(T).
        attn_mask: boolean (B or 1, 1, T, keys) where True may attend; default causal.
        """
        raise NotImplementedError

    def run_block(self, block: nn.Module, x, *args):
        """block(x, *args), checkpointed under activation_checkpointing. Non-reentrant checkpointing replays the
        RNG state (the same dropout masks), works under torch.compile, DDP and FSDP, and keeps block.__call__, so
        FSDP's per-block hooks gather the weights again for the recomputation."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def positions(self, idx, cache: Optional[KVCache]) -> torch.Tensor:
        """The default positions of idx's tokens: after those already in the cache, within block_size."""
        start, T = (cache.pos if cache is not None else 0), idx.shape[1]
        if start + T > self.config.block_size:
            raise UserError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        return torch.arange(start, start + T, device=idx.device)

    def logits(self, h):
        """Logits over the real vocabulary: padded rows exist only to speed up the matmul, never in results."""
        return self.lm_head(h)[..., :self.config.vocab_size]

    def forward(self, idx, targets=None, cache: Optional[KVCache] = None):
        """(logits, None) without targets; (None, mean cross-entropy) with them, never holding the whole batch's
        logits (see head_loss.py). Targets of -1 are ignored. With doc_mask, each document of a packed window is
        computed as if alone (documents.py); a KV cache holds one document, so decoding goes on unmasked."""
        positions = attn_mask = None
        if self.config.doc_mask and cache is None:
            positions, attn_mask = documents.layout(idx, self.config.eot_token, self.training and self.config.dropout > 0)
        h = self.hidden(idx, cache, positions, attn_mask)
        if targets is None:
            return self.logits(h), None
        return None, head_loss(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1),
                               self.config.vocab_size)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: float = 1.0, generator: Optional[torch.Generator] = None,
                 use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Yield (B,) next tokens one step at a time, so callers can stream. temperature 0 means greedy.

        Past block_size the context slides, which shifts every position: the cache is then rebuilt each
        step, so cached and uncached decoding stay identical.
        """
        block = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache or idx.shape[1] > block:
                h = self.hidden(idx[:, -block:])
            elif cache is None:
                cache = KVCache(self.config, idx.shape[0], block, idx.device, self.lm_head.weight.dtype)
                h = self.hidden(idx, cache)
            else:
                h = self.hidden(idx[:, -1:], cache)
            # Only the last position's logits: over a whole context the head would be the biggest matmul.
            nxt = sample(self.logits(h[:, -1, :]).float(), temperature, top_k, top_p, generator)
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            yield nxt


class GPT(CausalLM):
    """GPT-2: learned positions, pre-LayerNorm blocks, tanh GELU, the head tied to the token embedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    def hidden(self, idx, cache: Optional[KVCache] = None, positions=None, attn_mask=None):
        T = idx.shape[1]
        positions = self.positions(idx, cache) if positions is None else positions
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for layer, block in enumerate(self.transformer.h):
            x = self.run_block(block, x, layer, cache, attn_mask)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)


def build_model(cfg: GPTConfig) -> CausalLM:
    """The architecture cfg names: GPT-2 (this file) or, for arch "modern", modern.py's ModernGPT."""
    if cfg.arch == "modern":
        from modern import ModernGPT  # modern.py builds on this file's attention and base class

        return ModernGPT(cfg)
    return GPT(cfg)


def sample(logits, temperature: float, top_k: Optional[int], top_p: float, generator=None):
    """One token per row from (B, V) logits: greedy at temperature 0, else top-k then nucleus (top-p) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per weight of the matmuls plus attention scores,
    as in PaLM's appendix B. The head is computed over the padded vocabulary, so that is what it costs."""
    n = count_params(cfg, include_embeddings=False) + (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len


def estimate_mfu(cfg: GPTConfig, seq_len: int, tokens_per_sec: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (the caller knows its device)."""
    return flops_per_token(cfg, seq_len) * tokens_per_sec / peak_flops
