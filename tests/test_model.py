"""model.py is GPT-2 exactly (against transformers and against attention written out by hand), its KV cache
changes nothing, and checkpoint.py saves and loads it safely."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import checkpoint
from config import GPTConfig
from errors import UserError
from helpers import Exploit, hf_gpt2
from model import GPT, KVCache, estimate_mfu, flops_per_token

TOL = 1e-4  # fp32, max abs difference of logits


def max_diff(a, b):
    return (a - b).abs().max().item()


def tokens(batch, length, vocab, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- equal to GPT-2 -----------------------------------------------------------------------------------------


@torch.no_grad()
def test_logits_equal_transformers(hf_gpt2_dir):
    ours, theirs = checkpoint.load_gpt2(str(hf_gpt2_dir)).eval(), hf_gpt2(hf_gpt2_dir)
    idx = tokens(2, 128, 50257)  # the whole context
    assert max_diff(ours(idx)[0], theirs(idx).logits) < TOL


@torch.no_grad()
def test_pytorch_model_bin_folder(hf_gpt2_dir, tmp_path):
    """Older hub folders: pickled weights with bare keys (h.0...) and the causal-mask buffers."""
    theirs = hf_gpt2(hf_gpt2_dir)
    sd = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    shutil.copy(hf_gpt2_dir / "config.json", tmp_path)
    ours = checkpoint.load_gpt2(str(tmp_path)).eval()
    idx = tokens(1, 40, 50257)
    assert max_diff(ours(idx)[0], theirs(idx).logits) < TOL


def test_pytorch_model_bin_is_never_unpickled_as_code(tmp_path, hf_gpt2_dir):
    marker = tmp_path / "pwned"
    torch.save({"wte.weight": Exploit(marker)}, tmp_path / "pytorch_model.bin")
    shutil.copy(hf_gpt2_dir / "config.json", tmp_path)
    with pytest.raises(UserError):
        checkpoint.load_gpt2(str(tmp_path))
    assert not marker.exists()


@torch.no_grad()
def test_attention_equals_softmax_written_out(random_gpt):
    model = random_gpt()
    attn, (B, T, C), H = model.transformer.h[0].attn, (2, 10, 64), 4
    x = torch.randn(B, T, C)
    q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    scores = q @ k.transpose(-2, -1) / math.sqrt(C // H)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    assert max_diff(attn(x, 0, None, None), attn.c_proj(y)) < 1e-5


@torch.no_grad()
def test_vocab_padding_changes_nothing(random_gpt):
    padded, plain = random_gpt(pad_vocab_multiple=64), random_gpt(pad_vocab_multiple=1)
    assert padded.transformer.wte.weight.shape[0] == 320 and plain.transformer.wte.weight.shape[0] == 300
    sd = padded.state_dict()
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"][:300]
    sd.pop("lm_head.weight")
    plain.load_state_dict(sd, strict=False)
    idx, targets = tokens(2, 20, 300), tokens(2, 20, 300, seed=1)
    (a, _), (b, _) = padded(idx), plain(idx)
    assert a.shape == b.shape == (2, 20, 300)
    assert max_diff(a, b) < 1e-5
    assert abs(padded(idx, targets)[1].item() - plain(idx, targets)[1].item()) < 1e-5


@torch.no_grad()
def test_loss_is_cross_entropy_ignoring_minus_one(random_gpt):
    model = random_gpt()
    idx, targets = tokens(2, 16, 300), tokens(2, 16, 300, seed=1)
    targets[0, :5] = -1
    logits, _ = model(idx)
    none, loss = model(idx, targets)
    assert none is None  # the training forward returns no logits: it never holds them all
    log_probs = logits.log_softmax(-1)
    keep = targets != -1
    by_hand = -log_probs[keep].gather(-1, targets[keep][:, None]).mean()
    assert abs(loss.item() - by_hand.item()) < 1e-5
    assert abs(loss.item() - F.cross_entropy(logits[keep], targets[keep]).item()) < 1e-5


def test_tied_head_gets_the_gradient_of_both_uses(random_gpt):
    """The head is the token embedding: its gradient sums the loss's (through the fused head) and the input's."""
    model = random_gpt().train()
    idx, targets = tokens(2, 16, 300), tokens(2, 16, 300, seed=1)
    model(idx, targets)[1].backward()
    fused = model.transformer.wte.weight.grad.clone()
    model.zero_grad()
    logits, _ = model(idx)
    F.cross_entropy(logits.reshape(-1, 300), targets.reshape(-1)).backward()
    assert (fused - model.transformer.wte.weight.grad).abs().max().item() < 1e-6


# --- the KV cache -------------------------------------------------------------------------------------------


@torch.no_grad()
def test_cache_prefill_then_token_by_token_equals_full_forward(random_gpt):
    model = random_gpt()
    idx = tokens(2, 30, 300)
    full, _ = model(idx)
    cache = KVCache(model.config, 2, model.config.block_size)
    steps = [model(idx[:, :12], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 30)]
    assert cache.pos == 30
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5


def test_sequence_longer_than_block_is_a_user_error(random_gpt):
    model = random_gpt()
    with pytest.raises(UserError, match="block_size"):
        model(tokens(1, 65, 300))


# --- initialisation, tying, FLOPs ---------------------------------------------------------------------------


def test_init_std_and_scaled_residual_projections():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=1000)
    model = GPT(cfg)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name


def test_head_is_tied_to_the_embedding(random_gpt, hf_gpt2_dir):
    for model in (random_gpt(), checkpoint.load_gpt2(str(hf_gpt2_dir))):
        assert model.lm_head.weight is model.transformer.wte.weight


def test_flops_per_token_and_mfu_by_hand():
    """PaLM's appendix B: training costs 6N + 12·L·d·T FLOPs per token, N the weights that multiply (not the
    position table, which is looked up; the head over the padded vocabulary, as it is computed)."""
    # GPT-2 small: its published 124,439,808 parameters, less the 1024 x 768 position table, plus 47 rows of padding.
    gpt2 = GPTConfig()
    assert flops_per_token(gpt2, 1024) == 6 * (124_439_808 - 1024 * 768 + 47 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(gpt2, 1024) == 855_383_040
    # 100,000 tokens/s on an A100 (312 TFLOP/s dense bf16, NVIDIA's datasheet): 85.5 of 312 TFLOP/s.
    assert estimate_mfu(gpt2, 1024, tokens_per_sec=1e5, peak_flops=312e12) == pytest.approx(0.274161, abs=1e-6)

    # Two layers of width 32, context 16, a vocabulary of 100 padded to 128; N weight by weight.
    tiny = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, pad_vocab_multiple=64)
    layer = (32 + 32  # ln_1 weight and bias
             + 32 * 96 + 96  # c_attn: q, k, v
             + 32 * 32 + 32  # attn.c_proj
             + 32 + 32  # ln_2
             + 32 * 128 + 128  # mlp.c_fc
             + 128 * 32 + 32)  # mlp.c_proj
    n = 2 * layer + (32 + 32) + 128 * 32  # + ln_f + the head (tied to wte), all 128 rows
    assert n == 29_568
    assert flops_per_token(tiny, 16) == 6 * n + 12 * 2 * 32 * 16 == 189_696
    assert estimate_mfu(tiny, 16, tokens_per_sec=1e6, peak_flops=312e12) == pytest.approx(608e-6, rel=1e-12)


# --- checkpoint.load_gpt2 errors ------------------------------------------------------------------------------


def test_load_gpt2_missing_folder(tmp_path):
    with pytest.raises(UserError, match="neither a folder"):
        checkpoint.load_gpt2(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="config"):
        checkpoint.load_gpt2(str(tmp_path))  # a folder without config.json


def test_hub_name_offline_is_a_user_error(monkeypatch):
    import huggingface_hub

    def offline(**_):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="cannot download gpt2"):
        checkpoint.load_gpt2("gpt2")


def test_load_gpt2_without_weights(tmp_path, hf_gpt2_dir):
    shutil.copy(hf_gpt2_dir / "config.json", tmp_path)
    with pytest.raises(UserError, match="neither model.safetensors"):
        checkpoint.load_gpt2(str(tmp_path))


def test_load_gpt2_wrong_shapes(tmp_path, hf_gpt2_dir):
    shutil.copy(hf_gpt2_dir / "model.safetensors", tmp_path)
    cfg = json.loads((hf_gpt2_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_embd": 32}))
    with pytest.raises(UserError, match="shape"):
        checkpoint.load_gpt2(str(tmp_path))


# --- checkpoints --------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(random_gpt, tmp_path, gpt2_tiktoken):
    model = random_gpt(bias=False, n_layer=3)
    state = {"step": 7, "optimizer": {"lr": torch.tensor(3e-4)}, "rng": torch.get_rng_state()}
    ckpt = checkpoint.save_checkpoint(str(tmp_path), 7, model, str(gpt2_tiktoken), state)
    assert os.path.basename(ckpt) == "ckpt_0000007"
    loaded, tokenizer = checkpoint.load_model(str(tmp_path), "cpu")  # the run folder: its newest checkpoint
    assert loaded.config == model.config and not loaded.training
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert tokenizer == os.path.join(ckpt, checkpoint.RANKS) and os.path.isfile(tokenizer)
    restored = checkpoint.load_train_state(ckpt)
    assert restored["step"] == 7 and torch.equal(restored["rng"], state["rng"])


def test_malicious_state_is_refused(random_gpt, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = checkpoint.save_checkpoint(str(tmp_path / "run"), 1, random_gpt(), "gpt2", {"evil": Exploit(marker)})
    with pytest.raises(UserError, match="refusing"):
        checkpoint.load_train_state(ckpt)
    assert not marker.exists()


def test_corrupt_weights_are_a_user_error(random_gpt, tmp_path):
    ckpt = checkpoint.save_checkpoint(str(tmp_path), 1, random_gpt(), "gpt2")
    weights = os.path.join(ckpt, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.load_model(ckpt)
    with open(weights, "wb") as f:
        f.write(b"\xff" * 100)
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.load_model(ckpt)


def test_weights_not_matching_config_are_a_user_error(random_gpt, tmp_path):
    ckpt = checkpoint.save_checkpoint(str(tmp_path), 1, random_gpt(), "gpt2")
    path = os.path.join(ckpt, "config.json")
    meta = json.load(open(path))
    meta["model"]["n_embd"] = 32
    json.dump(meta, open(path, "w"))
    with pytest.raises(UserError, match="does not fit"):
        checkpoint.load_model(ckpt)


def test_half_written_checkpoint_is_never_found(random_gpt, tmp_path):
    model = random_gpt()
    done = checkpoint.save_checkpoint(str(tmp_path), 5, model, "gpt2")
    # A save killed before its rename: complete-looking files under the temporary name, and newer.
    killed = tmp_path / ".ckpt_0000010.tmp-12345"
    shutil.copytree(done, killed)
    os.utime(killed, (os.path.getmtime(done) + 60,) * 2)
    assert checkpoint.list_checkpoints(str(tmp_path)) == [done]
    assert checkpoint.find_checkpoint(str(tmp_path)) == done
    shutil.rmtree(done)
    with pytest.raises(UserError, match="no checkpoint"):
        checkpoint.find_checkpoint(str(tmp_path))
