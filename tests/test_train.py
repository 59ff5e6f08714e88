"""train.py: it learns a source of known entropy, DDP equals accumulation, resume is exact, and the pieces
(schedule, weight-decay groups, accumulation arithmetic) match their definitions."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

import markov
from config import GPTConfig, TrainConfig, fill_schedule_defaults
from errors import UserError
from helpers import COMMON, SMALL, TINY, assert_one_line_error, cut_back_to, kill_and_resume, kill_once_saved, \
    read_log, run_train, start_train
from model import build_model
from muon import Muon
from optimizer import build_optimizer, build_scaler, load_optimizer_state
from schedule import lr_at
from train import grad_accum_steps, train_step

# The optimizers train.py offers; Muon with the architecture it is meant for.
OPTIMIZERS = {"adamw": [], "muon": ["--arch", "modern", "--optimizer", "muon"]}


def test_learns_markov_chain_to_its_entropy(tmp_path):
    """The best any model can do on a block is the marginal entropy at its first position and the chain's
    entropy rate after it; a small GPT must get within 0.05 nats of that."""
    chain = markov.write_data(tmp_path / "data")
    block, rate = 64, chain.entropy_rate
    first = -(chain.pi * np.log(chain.pi)).sum()
    optimum = (first + (block - 1) * rate) / block
    out = tmp_path / "out"
    run_train(*SMALL, "--block-size", block, "--data-dir", tmp_path / "data", "--out-dir", out,
              "--batch-size", 16, "--total-batch-size", 16 * block, "--max-steps", 400, "--eval-interval", 400,
              "--eval-steps", 10, "--log-interval", 50, "--checkpoint-interval", 1000)
    val = read_log(out, "val_loss")[400]
    assert abs(val - optimum) < 0.05, f"val loss {val:.4f}, optimum {optimum:.4f} (entropy rate {rate:.4f})"


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_ddp_equals_accumulation(tmp_path, markov_dir, optimizer):
    common = [*COMMON, *OPTIMIZERS[optimizer], "--data-dir", markov_dir, "--max-steps", 6,
              "--checkpoint-interval", 100]
    run_train(*common, "--out-dir", tmp_path / "single")
    run_train(*common, "--out-dir", tmp_path / "ddp", torchrun=2)
    single, ddp = read_log(tmp_path / "single", "loss"), read_log(tmp_path / "ddp", "loss")
    assert sorted(single) == sorted(ddp) == list(range(1, 7))
    for step in single:
        assert abs(single[step] - ddp[step]) < 1e-5, (step, single[step], ddp[step])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_kill_and_resume_is_exact(tmp_path, markov_dir, optimizer):
    """kill -9 in the middle of a run, --resume, and the loss curve equals a run never stopped, exactly."""
    common = [*COMMON, *OPTIMIZERS[optimizer], "--data-dir", markov_dir, "--max-steps", 40,
              "--checkpoint-interval", 5, "--keep-checkpoints", 2, "--dropout", 0.1]
    run_train(*common, "--out-dir", tmp_path / "full")
    out = tmp_path / "killed"
    kill_and_resume(out, 15, *common)
    assert read_log(out, "loss") == read_log(tmp_path / "full", "loss")


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, markov_dir):
    out = tmp_path / "out"
    proc = start_train(*TINY, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 100000,
                       "--checkpoint-interval", 100000, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not ((out / "log.jsonl").exists() and len(read_log(out, "loss")) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    saved = [p.name for p in out.iterdir() if p.name.startswith("ckpt_")]
    assert len(saved) == 1 and "continue with --resume" in stdout
    step = int(saved[0].split("_")[1])
    assert step == max(read_log(out, "loss"))


@pytest.mark.parametrize("flags, message", [
    (["--n-layer", 3], "different model config"),
    (["--optimizer", "muon"], "trained with --optimizer adamw, now muon"),
])
def test_resume_with_another_model_or_optimizer_is_refused(tmp_path, markov_dir, flags, message):
    common = [*TINY, "--data-dir", markov_dir, "--out-dir", tmp_path / "out", "--max-steps", 2]
    run_train(*common)
    assert_one_line_error(run_train(*common, *flags, "--resume", check=False), message)


def test_nan_loss_stops_with_a_clear_message(tmp_path, markov_dir):
    result = run_train(*TINY, "--data-dir", markov_dir, "--out-dir", tmp_path / "out", "--max-steps", 50,
                       "--learning-rate", 1e30, "--warmup-steps", 1, "--grad-clip", 0, check=False)
    assert_one_line_error(result, "loss became nan or inf")


@pytest.mark.parametrize("flags, message", [
    (["--total-batch-size", 100], "not a multiple"),
    (["--device", "cuda"], "no CUDA"),
    (["--device", "tpu9"], "device"),
    (["--no-such-flag", 1], "unknown option"),
    (["--data-dir", "/nonexistent"], "prepare_data.py"),
])
def test_bad_flags_get_one_clear_line(tmp_path, markov_dir, flags, message):
    result = run_train(*TINY, "--data-dir", markov_dir, "--out-dir", tmp_path / "out", "--max-steps", 1, *flags,
                       check=False)
    assert_one_line_error(result, message)


def test_lr_schedule_matches_its_definition():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # cosine starts at the top
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way: the mean of max and min
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(60, fill_schedule_defaults(TrainConfig(learning_rate=1.0, warmup_steps=10, max_steps=110))) == \
        pytest.approx(0.55)


def names_of(model, params) -> set:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in params}


def test_weight_decay_only_on_matrices_and_embeddings():
    """GPT-2's recipe as nanoGPT has it: the embeddings and the Linear weights decay, LayerNorms and biases do not."""
    model = build_model(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    block = "transformer.h.0."
    assert names_of(model, decay["params"]) == {  # the head is wte, tied: the same tensor, listed once
        "transformer.wte.weight", "transformer.wpe.weight",
        *(block + m for m in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))}
    assert names_of(model, no_decay["params"]) == {
        "transformer.ln_f.weight", "transformer.ln_f.bias",
        *(block + m for m in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias",
                              "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"))}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # each tensor once
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = build_model(GPTConfig(arch="modern", tie_embeddings=False, n_layer=1, n_head=2, n_embd=32, block_size=16,
                          vocab_size=64))
    opt = build_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=4e-3),
                          torch.device("cpu"))
    muon, adamw = opt.parts
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    layer = "model.layers.0."
    assert names_of(model, muon.param_groups[0]["params"]) == {
        layer + m for m in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                            "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                            "mlp.down_proj.weight")}
    decay, no_decay = adamw.param_groups
    assert names_of(model, decay["params"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert names_of(model, no_decay["params"]) == {
        "model.norm.weight", *(layer + m for m in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                                   "self_attn.q_norm.weight", "self_attn.k_norm.weight"))}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert [g["lr_scale"] for g in opt.param_groups] == [4.0, 1.0, 1.0]
    assert muon.defaults["momentum"] == 0.95 and muon.param_groups[0]["split"] == 1


def test_muon_on_gpt2_splits_the_fused_qkv_and_leaves_its_embeddings_and_biases_to_adamw():
    model = build_model(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    muon, adamw = build_optimizer(model, fill_schedule_defaults(TrainConfig(optimizer="muon")),
                                   torch.device("cpu")).parts
    matrices, fused_qkv = muon.param_groups
    assert names_of(model, matrices["params"]) == {
        "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"}
    assert names_of(model, fused_qkv["params"]) == {"transformer.h.0.attn.c_attn.weight"}
    assert (matrices["split"], fused_qkv["split"]) == (1, 3)
    assert names_of(model, adamw.param_groups[0]["params"]) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert len(adamw.param_groups[1]["params"]) == 10  # 2 LayerNorms x 2 + ln_f's 2, and 4 Linear biases


def test_the_schedule_scales_each_group_from_its_own_peak():
    torch.manual_seed(0)
    model = build_model(GPTConfig(arch="modern", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    opt = build_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=2e-2),
                          torch.device("cpu"))
    x = torch.randint(0, 64, (2, 16))
    train_step(model, opt, build_scaler(torch.float32, x.device), iter([(x, x)]), 1, 5e-4, 1.0, torch.float32)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2, 5e-4, 5e-4], rel=1e-12)


def test_a_resumed_optimizer_keeps_the_moments_and_takes_this_runs_settings():
    torch.manual_seed(0)
    model = build_model(GPTConfig(arch="modern", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    saved = build_optimizer(model, TrainConfig(optimizer="muon", muon_lr=1e-2), torch.device("cpu"))
    train_step(model, saved, build_scaler(torch.float32, x.device), iter([(x, x)]), 1, 1e-3, 1.0,
               torch.float32)
    state = saved.state_dict()
    resumed = build_optimizer(model, TrainConfig(optimizer="muon", muon_lr=2e-2, weight_decay=0.05),
                              torch.device("cpu"))
    load_optimizer_state(resumed, lambda: resumed.load_state_dict(state))
    assert [g["lr_scale"] for g in resumed.param_groups] == pytest.approx([2e-2 / 6e-4, 1.0, 1.0])
    assert [g["weight_decay"] for g in resumed.param_groups] == [0.05, 0.05, 0.0]
    for old, new in zip(saved.parts, resumed.parts):
        for p in old.state:
            assert all(torch.equal(v, new.state[p][k]) for k, v in old.state[p].items())


def test_grad_accumulation_arithmetic():
    assert grad_accum_steps(TrainConfig(batch_size=64, total_batch_size=524288), 1024, 1) == 8
    assert grad_accum_steps(TrainConfig(batch_size=64, total_batch_size=524288), 1024, 8) == 1
    assert grad_accum_steps(TrainConfig(batch_size=16, total_batch_size=524288), 1024, 8) == 4
    with pytest.raises(UserError, match="not a multiple"):
        grad_accum_steps(TrainConfig(batch_size=48, total_batch_size=524288), 1024, 1)


def test_bf16_autocast_on_cpu_learns_like_fp32(tmp_path):
    """The CUDA default (bf16 autocast, fp32 master weights) run on the CPU: same data, same init, the same
    validation loss as fp32 to within a few hundredths of a nat."""
    markov.write_data(tmp_path / "data", n_train=100_000, n_val=10_000)
    common = [*SMALL, "--data-dir", tmp_path / "data", "--batch-size", 16, "--total-batch-size", 16 * 32,
              "--max-steps", 150, "--eval-interval", 150, "--eval-steps", 10, "--log-interval", 50,
              "--checkpoint-interval", 1000]
    run_train(*common, "--out-dir", tmp_path / "fp32", "--dtype", "float32")
    run_train(*common, "--out-dir", tmp_path / "bf16", "--dtype", "bfloat16")
    fp32, bf16 = read_log(tmp_path / "fp32", "val_loss")[150], read_log(tmp_path / "bf16", "val_loss")[150]
    assert abs(fp32 - bf16) < 0.03, (fp32, bf16)


@pytest.mark.slow
def test_compile_on_cpu_matches_eager(tmp_path, markov_dir):
    """torch.compile, the CUDA default, through the same code path on the CPU (inductor's C++ backend)."""
    common = [*TINY, "--n-layer", 1, "--data-dir", markov_dir, "--max-steps", 3, "--checkpoint-interval", 100]
    run_train(*common, "--out-dir", tmp_path / "eager", "--no-compile")
    run_train(*common, "--out-dir", tmp_path / "compiled", "--compile")
    eager, compiled = read_log(tmp_path / "eager", "loss"), read_log(tmp_path / "compiled", "loss")
    assert eager.keys() == compiled.keys() == {1, 2, 3}
    for step in eager:
        assert abs(eager[step] - compiled[step]) < 1e-4, (step, eager[step], compiled[step])


def test_wandb_offline_logs_the_run(tmp_path, markov_dir):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    run_train(*TINY, "--data-dir", markov_dir, "--out-dir", tmp_path / "out", "--max-steps", 2, "--wandb",
              "--wandb-run-name", "t", env=env)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_float32_runs_on_several_threads_are_bitwise_repeatable_and_resume_exactly(tmp_path, english_dir):
    """Issue 21: on 2 threads and real English, two identical float32 runs give the same bits at every step, and a
    run killed with kill -9 and resumed equals them for the 40 steps after its resume point."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # users run every core; one thread hides order-dependent sums
    # 8 x 64 rows: the head's gradient sums enough of them that a CPU kernel splits the sum over threads.
    common = [*SMALL, "--data-dir", english_dir, "--block-size", 64, "--batch-size", 8, "--total-batch-size", 8 * 64,
              "--pad-vocab-multiple", 64, "--max-steps", 80, "--checkpoint-interval", 20, "--keep-checkpoints", 2]
    for name in ("a", "b"):
        run_train(*common, "--out-dir", tmp_path / name, env=env)
    first, second = read_log(tmp_path / "a", "loss"), read_log(tmp_path / "b", "loss")
    assert sorted(first) == list(range(1, 81)) and first == second

    out = tmp_path / "killed"
    proc = start_train(*common, "--out-dir", out, env=env)
    kill_once_saved(proc, out / "ckpt_0000040", timeout=300)
    cut_back_to(out, 40)  # resume from step 40 whatever the kill let through
    run_train(*common, "--out-dir", out, "--resume", env=env)
    resumed = read_log(out, "loss")
    assert all(resumed[step] == first[step] for step in range(41, 81)), \
        max(abs(resumed[step] - first[step]) for step in range(41, 81))