"""--parallel fsdp on CPU ranks (gloo): the same training as DDP and accumulation, a sharded optimizer that
resumes exactly on the same or another number of ranks, 1/world of the model state per rank, and consolidated
weights that every script reads."""
import re
import shutil

import pytest
import torch

import checkpoint
import distributed
import markov
from errors import UserError
from helpers import COMMON, assert_one_line_error, cut_back_to, kill_and_resume, read_log, run_train

pytestmark = pytest.mark.slow


def sharded_run(tmp_path_factory, markov_dir, parallel: str, ranks: int, batch: int, *flags) -> tuple:
    """(run folder, stdout) of 8 steps of --parallel `parallel` on `ranks` ranks, micro batches of `batch` windows,
    checkpoints at 4 and 8: one run that a module's tests share."""
    out = tmp_path_factory.mktemp(parallel) / "out"
    result = run_train(*COMMON, "--batch-size", batch, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 8,
                       "--checkpoint-interval", 4, "--keep-checkpoints", 0, "--parallel", parallel, *flags,
                       torchrun=ranks)
    return out, result.stdout


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, markov_dir):
    """FSDP on 2 ranks with 2 micro steps each (batch 2), dropout on, evaluated at step 8."""
    return sharded_run(tmp_path_factory, markov_dir, "fsdp", 2, 2, "--eval-interval", 8, "--eval-steps", 2)


def test_fsdp_equals_ddp_and_accumulation(tmp_path, markov_dir, fsdp_run):
    out, _ = fsdp_run
    flags = [*COMMON, "--batch-size", 2, "--data-dir", markov_dir, "--max-steps", 8, "--checkpoint-interval", 100]
    run_train(*flags, "--out-dir", tmp_path / "ddp", torchrun=2)
    run_train(*flags, "--batch-size", 4, "--out-dir", tmp_path / "single")  # 1 process, 2 micro steps of 4
    fsdp, ddp, single = (read_log(p, "loss") for p in (out, tmp_path / "ddp", tmp_path / "single"))
    assert sorted(fsdp) == sorted(ddp) == sorted(single) == list(range(1, 9))
    for step in fsdp:
        assert abs(fsdp[step] - ddp[step]) < 1e-5 and abs(fsdp[step] - single[step]) < 1e-5, step


def test_each_rank_holds_about_half_the_model_state(tmp_path, markov_dir, fsdp_run):
    _, fsdp_stdout = fsdp_run
    ddp = run_train(*COMMON, "--batch-size", 2, "--data-dir", markov_dir, "--out-dir", tmp_path / "ddp",
                    "--max-steps", 1, torchrun=2).stdout
    mb = [float(re.search(r"model state per rank ([\d.,]+) MB", s).group(1).replace(",", "")) for s in (fsdp_stdout, ddp)]
    assert 0.45 < mb[0] / mb[1] <= 0.55, mb


@pytest.mark.parametrize("ranks, parallel", [(1, "fsdp"), (2, "fsdp"), (4, "fsdp"), (0, "ddp")])
def test_a_checkpoint_of_2_ranks_resumes_on_1_2_or_4_or_without_sharding(tmp_path, markov_dir, fsdp_run, ranks,
                                                                          parallel):
    # The same tokens per step on any number of ranks: 2 x 2 x 2 micro batches of 2, or 4 x 2 x 1.
    full, after = resumed_at_4(fsdp_run[0], tmp_path, markov_dir, parallel, ranks)
    for step in range(5, 9):
        assert abs(after[step] - full[step]) < 1e-5, (ranks, step, after[step], full[step])


def resumed_at_4(out, tmp_path, markov_dir, parallel: str, ranks: int) -> tuple[dict, dict]:
    """The losses of the run in out, and of a copy cut back to step 4 and resumed to step 8 with --parallel
    `parallel` on `ranks` ranks, micro batches of 2."""
    resumed = tmp_path / "out"
    shutil.copytree(out, resumed)
    cut_back_to(resumed, 4)
    run_train(*COMMON, "--batch-size", 2, "--data-dir", markov_dir, "--out-dir", resumed, "--max-steps", 8,
              "--checkpoint-interval", 4, "--parallel", parallel, "--resume", torchrun=ranks)
    full, after = read_log(out, "loss"), read_log(resumed, "loss")
    assert sorted(after) == list(range(1, 9))
    return full, after


def test_kill_9_and_resume_is_exact(tmp_path, markov_dir, fsdp_run):
    full, _ = fsdp_run
    out = tmp_path / "out"
    kill_and_resume(out, 4, *COMMON, "--batch-size", 2, "--data-dir", markov_dir, "--max-steps", 8,
                    "--checkpoint-interval", 4, "--keep-checkpoints", 0, "--parallel", "fsdp", torchrun=2)
    after, before = read_log(out, "loss"), read_log(full, "loss")
    assert sorted(after) == list(range(1, 9))
    assert all(abs(after[s] - before[s]) < 1e-6 for s in after), (after, before)


def test_consolidated_weights_give_the_sharded_models_logits(markov_dir, fsdp_run):
    """model.safetensors of an FSDP checkpoint is the whole model: loaded plainly, it reproduces the validation
    loss the sharded model logged at the same step."""
    out, _ = fsdp_run
    model, _ = checkpoint.load_model(str(out / "ckpt_0000008"))
    from dataloader import DataLoader
    from evaluate import evaluate_loss

    # The run's evaluation: 2 ranks x 2 batches of 2 windows; here the same 8 windows as 2 batches of 4.
    plain = evaluate_loss(model, DataLoader(markov_dir, "val", 4, 32), 2, torch.device("cpu"), torch.float32)
    assert abs(read_log(out, "val_loss")[8] - plain) < 1e-5
    assert sorted(p.name for p in (out / "ckpt_0000008").iterdir()) == [
        "config.json", "model.safetensors", "optimizer", "state.pt"]


def test_resuming_a_ddp_checkpoint_with_fsdp_is_one_line(tmp_path, markov_dir):
    out = tmp_path / "out"
    run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 2)
    result = run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 2, "--resume",
                       "--parallel", "fsdp", torchrun=1, check=False)
    assert result.returncode != 0 and "written by a --parallel ddp run" in result.stderr


def test_fsdp_without_torchrun_is_one_line(tmp_path, markov_dir):
    result = run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", tmp_path / "out", "--max-steps", 2,
                       "--parallel", "fsdp", check=False)
    assert_one_line_error(result, "start it with torchrun")


def test_fsdp_with_compiled_blocks_bf16_and_the_sample_hook(tmp_path, gpt2_tiktoken):
    """The CUDA default's CPU twin: compiled blocks, bf16 compute, and a sample generated by all ranks together
    (each forward of a sharded model is a collective) while only rank 0 prints it."""
    markov.write_data(tmp_path / "data", n_train=20_000, n_val=5_000, tokenizer=str(gpt2_tiktoken))
    result = run_train(*COMMON, "--batch-size", 2, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out",
                       "--max-steps", 3, "--parallel", "fsdp", "--compile", "--dtype", "bfloat16",
                       "--sample-interval", 3, "--sample-prompt", "!", torchrun=2)
    assert result.stdout.count("sample: !") == 1 and "recompile_limit" not in result.stderr
    losses = read_log(tmp_path / "out", "loss")
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 3 for v in losses.values())
    assert checkpoint.list_checkpoints(str(tmp_path / "out"))[-1].endswith("ckpt_0000003")


def test_muon_with_an_untied_head_under_fsdp_resumes_exactly_and_trains_as_ddp(tmp_path, markov_dir):
    """Muon on FSDP's sharded parameters (each matrix gathered whole to one rank for its Newton-Schulz steps, see
    muon.py): the sharded momentum resumes exactly. Against DDP the gradients' reductions round differently in
    float32, which the bfloat16 Newton-Schulz steps can grow to a bfloat16 rounding of the update (1e-5 measured)."""
    flags = [*COMMON, "--arch", "modern", "--no-tie-embeddings", "--optimizer", "muon", "--batch-size", 2,
             "--data-dir", markov_dir, "--max-steps", 8, "--checkpoint-interval", 4]
    run_train(*flags, "--out-dir", tmp_path / "fsdp", "--parallel", "fsdp", torchrun=2)
    run_train(*flags, "--out-dir", tmp_path / "ddp", torchrun=2)
    shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed")
    cut_back_to(tmp_path / "resumed", 4)
    run_train(*flags, "--out-dir", tmp_path / "resumed", "--parallel", "fsdp", "--resume", torchrun=2)
    fsdp, ddp, resumed = (read_log(tmp_path / p, "loss") for p in ("fsdp", "ddp", "resumed"))
    assert sorted(fsdp) == sorted(ddp) == sorted(resumed) == list(range(1, 9))
    assert all(resumed[s] == fsdp[s] for s in range(5, 9)), (resumed, fsdp)
    assert all(abs(fsdp[s] - ddp[s]) < 1e-4 for s in fsdp), (fsdp, ddp)


# ---- --parallel hsdp: FSDP2 on a 2-D mesh, 2 replicas of 2 shards

@pytest.fixture(scope="module")
def hsdp_run(tmp_path_factory, markov_dir):
    """HSDP on 4 ranks (2 replicas x 2 shards), 2 micro steps of 1 window each."""
    return sharded_run(tmp_path_factory, markov_dir, "hsdp", 4, 1, "--replicate-degree", 2)


def test_hsdp_equals_one_process_and_holds_half_the_state(tmp_path, markov_dir, hsdp_run):
    out, stdout = hsdp_run
    run_train(*COMMON, "--batch-size", 4, "--data-dir", markov_dir, "--out-dir", tmp_path / "single", "--max-steps", 8,
              "--checkpoint-interval", 100)
    hsdp, single = read_log(out, "loss"), read_log(tmp_path / "single", "loss")
    assert sorted(hsdp) == sorted(single) == list(range(1, 9))
    assert all(abs(hsdp[s] - single[s]) < 1e-5 for s in hsdp), (hsdp, single)
    # Sharded over the 2 ranks of a replica, not over all 4: half the model state per rank.
    whole = 4 * 4 * sum(p.numel() for p in checkpoint.load_model(str(out / "ckpt_0000008"))[0].parameters()) / 2**20
    mb = float(re.search(r"hsdp: model state per rank ([\d.,]+) MB", stdout).group(1).replace(",", ""))
    assert 0.45 < mb / whole <= 0.55, (mb, whole)


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_an_hsdp_checkpoint_resumes_on_2_ranks(tmp_path, markov_dir, hsdp_run, parallel):
    full, after = resumed_at_4(hsdp_run[0], tmp_path, markov_dir, parallel, 2)
    assert all(abs(after[s] - full[s]) < 1e-5 for s in range(5, 9)), (parallel, after, full)


def test_replicate_degree_defaults_to_the_nodes_and_must_divide_the_ranks(tmp_path, markov_dir, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.mesh_shape("hsdp", 32) == (4, 8)  # 4 nodes of 8: shard within each, replicate across
    assert distributed.mesh_shape("hsdp", 32, replicate_degree=2) == (2, 16)
    assert distributed.mesh_shape("fsdp", 32) == (32,) and distributed.mesh_shape("ddp", 32) is None
    with pytest.raises(UserError, match="--replicate-degree 3 must divide the 32 processes"):
        distributed.mesh_shape("hsdp", 32, replicate_degree=3)
    result = run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", tmp_path / "out", "--max-steps", 1,
                       "--parallel", "fsdp", "--replicate-degree", 2, check=False)
    assert_one_line_error(result, "--replicate-degree is for --parallel hsdp")
    assert not (tmp_path / "out").exists()  # refused before the run folder is touched
