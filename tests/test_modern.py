"""The modern architecture's parts equal Qwen3's in transformers on the same weights."""
import pytest
import torch

from config import GPTConfig, TrainConfig, check_values
from errors import UserError
from model import RMSNorm, apply_rotary, rotary_cos_sin

qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")


def test_rmsnorm_equals_qwen3():
    torch.manual_seed(0)
    ours, theirs = RMSNorm(32, 1e-6), qwen3.Qwen3RMSNorm(32, eps=1e-6)
    w = torch.randn(32)
    ours.weight.data.copy_(w)
    theirs.weight.data.copy_(w)
    x = torch.randn(2, 5, 32) * 3
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)


def test_rotary_equals_qwen3_at_explicit_positions():
    torch.manual_seed(0)
    head_dim, theta = 16, 10000.0
    positions = torch.tensor([[0, 1, 2, 3, 0, 1], [5, 6, 7, 8, 9, 10]])
    q, k = torch.randn(2, 3, 6, head_dim), torch.randn(2, 3, 6, head_dim)
    cos, sin = rotary_cos_sin(positions, head_dim, theta)
    rope = qwen3.Qwen3RotaryEmbedding(qwen3.Qwen3Config(head_dim=head_dim, rope_theta=theta,
                                                        hidden_size=48, num_attention_heads=3))
    hf_cos, hf_sin = rope(q, positions)
    hq, hk = qwen3.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), hq, atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), hk, atol=1e-5, rtol=0)


def test_unknown_arch_is_one_line():
    with pytest.raises(UserError, match="arch must be gpt2 or modern"):
        check_values(GPTConfig(arch="llama"), TrainConfig())
