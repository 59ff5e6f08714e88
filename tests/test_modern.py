"""The modern architecture's parts equal Qwen3's in transformers on the same weights."""
import pytest
import torch
from transformers.models.qwen3 import modeling_qwen3 as qwen3

from config import GPTConfig, TrainConfig, check_values
from errors import UserError
from modern import RMSNorm, apply_rotary, rotary_cos_sin


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


def test_modern_logits_equal_qwen3():
    from model import build_model

    cfg = GPTConfig(arch="modern", n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=128)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    for p in ours.parameters():  # zero-initialised projections would hide mistakes
        p.data.normal_(0, 0.1)
    theirs = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config(
        vocab_size=cfg.padded_vocab_size, hidden_size=64, intermediate_size=256,  # 8/3 x 64 = 170.7, up to 2 x 128
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=True, attention_bias=False)).eval()
    theirs.load_state_dict(ours.state_dict())
    idx = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits[..., :128], atol=1e-4, rtol=0)


def random_modern(seed=0, **overrides):
    from model import build_model

    torch.manual_seed(seed)
    model = build_model(GPTConfig(**{**dict(arch="modern", n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=100),
                             **overrides})).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


def test_modern_greedy_same_with_and_without_cache_past_first_fill():
    model = random_modern()
    idx = torch.randint(0, 100, (2, 5))
    # 30 new tokens run past block_size 16, where the context slides and the cache is rebuilt.
    cached = torch.stack(list(model.generate(idx, 30, temperature=0, use_cache=True)), 1)
    plain = torch.stack(list(model.generate(idx, 30, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached, plain)


def test_modern_packed_positions_and_mask_equal_separate_forwards():
    """Two sequences packed in one row, each with its own positions and a block-diagonal causal mask."""
    model = random_modern()
    a, b = torch.randint(0, 100, (1, 6)), torch.randint(0, 100, (1, 5))
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None]
    seg = torch.tensor([0] * 6 + [1] * 5)
    mask = (seg[:, None] == seg[None, :]) & torch.ones(11, 11, dtype=torch.bool).tril()
    with torch.no_grad():
        h = model.hidden(packed, positions=positions, attn_mask=mask[None, None])
        torch.testing.assert_close(h[:, :6], model.hidden(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(h[:, 6:], model.hidden(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_modern_checkpoint_round_trip(tmp_path, tied):
    import checkpoint
    from safetensors.torch import load_file

    model = random_modern(tie_embeddings=tied)
    ckpt = checkpoint.save_checkpoint(str(tmp_path), 3, model, "gpt2")
    assert ("lm_head.weight" in load_file(f"{ckpt}/model.safetensors")) is not tied
    loaded, _ = checkpoint.load_model(ckpt)
    assert loaded.config.arch == "modern" and loaded.config.tie_embeddings is tied
    head, embedding = loaded.lm_head.weight, loaded.model.embed_tokens.weight
    assert (head is embedding) is tied and torch.equal(head, model.lm_head.weight)
    idx = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_modern_presets_within_5_percent_of_gpt2_and_count_params_exact():
    from config import PRESETS
    from model import build_model, count_params

    for gpt2, modern in (("gpt2", "modern-124m"), ("gpt2-medium", "modern-350m"), ("gpt2-large", "modern-774m"),
                         ("gpt2-xl", "modern-1558m")):
        ours = count_params(GPTConfig(**{k: v for k, v in PRESETS[modern].items()}))
        assert abs(ours / count_params(GPTConfig(**PRESETS[gpt2])) - 1) < 0.05
    for tied in (True, False):
        cfg = GPTConfig(arch="modern", n_layer=2, n_head=4, n_embd=64, vocab_size=128, pad_vocab_multiple=1,
                        tie_embeddings=tied)
        assert count_params(cfg) == sum(p.numel() for p in build_model(cfg).parameters())


def test_untied_gpt2_is_one_line():
    with pytest.raises(UserError, match="for --arch modern"):
        check_values(GPTConfig(tie_embeddings=False), TrainConfig())
