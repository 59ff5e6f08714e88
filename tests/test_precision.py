"""--dtype float16 with its gradient scaler, on the CPU (whose autocast has float16): it trains like float32,
skipped steps are counted and are not a diverged run, the loss scale resumes exactly after kill -9, FSDP's ranks
skip alike; and --dtype auto's choice on each kind of hardware."""
import subprocess
import sys

import pytest
import torch

import hardware
import train
from helpers import COMMON, REPO, TORCHRUN, assert_one_line_error, in_process, kill_once_saved, read_log, run_cli, \
    run_train

FP16 = [*COMMON, "--dtype", "float16"]


def overflowing(*flags, torchrun: int = 0, popen: bool = False):
    """train.py whose float16 scaler starts at 2**30 (tests/inject_failure.py overflow): its first steps overflow
    and are skipped, the scale halving each time, until it fits (about 2**18 for COMMON's model)."""
    launcher = (*TORCHRUN, f"--nproc_per_node={torchrun}") if torchrun else (sys.executable,)
    args = ["tests/inject_failure.py", "overflow", 0, *flags]
    if popen:
        return subprocess.Popen([*launcher, *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    result = run_cli(*args, launcher=launcher)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def test_float16_learns_like_float32(tmp_path, markov_dir):
    common = [*COMMON, "--data-dir", markov_dir, "--max-steps", 30, "--checkpoint-interval", 100]
    run_train(*common, "--out-dir", tmp_path / "fp32", "--dtype", "float32")
    run_train(*common, "--out-dir", tmp_path / "fp16", "--dtype", "float16")
    fp32, fp16 = read_log(tmp_path / "fp32", "loss"), read_log(tmp_path / "fp16", "loss")
    assert fp32.keys() == fp16.keys() == set(range(1, 31))
    assert fp16[30] < fp16[1] - 0.3, fp16  # it learns
    assert all(abs(fp32[s] - fp16[s]) < 0.02 for s in fp32), (fp32, fp16)
    assert set(read_log(tmp_path / "fp16", "skipped_steps").values()) == {0}  # the default scale fits
    assert not read_log(tmp_path / "fp32", "skipped_steps")  # only float16 has a scaler


def test_overflowing_steps_are_skipped_and_counted_not_a_nan_error(tmp_path, markov_dir):
    out = tmp_path / "out"
    result = overflowing(*FP16, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 16,
                         "--checkpoint-interval", 100)
    skipped, norms, losses = (read_log(out, key) for key in ("skipped_steps", "grad_norm", "loss"))
    n = sum(skipped.values())
    assert n >= 5 and [s for s in skipped if skipped[s]] == list(range(1, n + 1)), skipped  # then the scale fits
    assert all(norms[s] != norms[s] or abs(norms[s]) == float("inf") for s in range(1, n + 1))  # nan or inf
    assert all(abs(losses[s] - losses[1]) < 0.05 for s in range(1, n + 1)), losses  # skipped: the weights stay
    assert losses[16] < losses[1] - 0.2, losses  # then it learns
    assert "skipped 1" in result.stdout


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_nonfinite_loss_still_stops_with_a_clear_message(tmp_path, markov_dir, dtype):
    result = run_train(*COMMON, "--dtype", dtype, "--data-dir", markov_dir, "--out-dir", tmp_path / "out",
                       "--max-steps", 50, "--learning-rate", 1e30, "--warmup-steps", 1, "--grad-clip", 0, check=False)
    assert_one_line_error(result, "loss became nan or inf")


def test_float16_kill_9_and_resume_is_exact(tmp_path, markov_dir):
    """Killed while the scale still halves: a resume that restarted the scale at 2**30 would skip again."""
    common = [*FP16, "--data-dir", markov_dir, "--max-steps", 16, "--checkpoint-interval", 5, "--dropout", 0.1]
    overflowing(*common, "--out-dir", tmp_path / "full")
    out = tmp_path / "killed"
    proc = overflowing(*common, "--out-dir", out, popen=True)
    kill_once_saved(proc, out / "ckpt_0000010", timeout=120)
    run_train(*common, "--out-dir", out, "--resume")
    for key in ("loss", "skipped_steps"):
        assert read_log(out, key) == read_log(tmp_path / "full", key), key


@pytest.mark.slow
def test_fsdp_ranks_skip_the_same_steps_as_ddp(tmp_path, markov_dir):
    """Each FSDP rank holds a shard of the gradients: the scaler must find an overflow in any shard on every rank
    (torch reduces its found-inf flag over the DTensor's mesh), or the ranks' weights part ways."""
    common = [*FP16, "--batch-size", 2, "--data-dir", markov_dir, "--max-steps", 16, "--checkpoint-interval", 100]
    for parallel in ("ddp", "fsdp"):
        overflowing(*common, "--parallel", parallel, "--out-dir", tmp_path / parallel, torchrun=2)
    ddp, fsdp = (tmp_path / "ddp", tmp_path / "fsdp")
    assert read_log(ddp, "skipped_steps") == read_log(fsdp, "skipped_steps")
    assert sum(read_log(fsdp, "skipped_steps").values()) >= 5
    losses = read_log(ddp, "loss"), read_log(fsdp, "loss")
    assert all(abs(losses[0][s] - losses[1][s]) < 1e-3 for s in losses[0]), losses


@pytest.mark.parametrize("device, bf16, expected", [
    ("cuda", True, torch.bfloat16),  # Ampere and newer
    ("cuda", False, torch.float16),  # V100, T4: float16 tensor cores, no bfloat16
    ("cpu", True, torch.bfloat16),  # AMX or AVX512-BF16
    ("cpu", False, torch.float32),  # bfloat16 emulated: slower than float32
    ("mps", True, torch.float32),
])
def test_auto_dtype_per_device(monkeypatch, device, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: bf16)
    assert hardware.pick_dtype("auto", torch.device(device)) == expected


def test_float16_where_autocast_cannot_is_one_line_and_saves_nothing(tmp_path, markov_dir, monkeypatch, capsys):
    assert hardware.autocasts_to(torch.device("cpu"), torch.float16)  # this torch's CPU autocast has float16
    monkeypatch.setattr(hardware, "autocasts_to", lambda device, dtype: False)  # an older torch's would not
    result = in_process(monkeypatch, capsys, train, *FP16, "--data-dir", markov_dir, "--out-dir", tmp_path / "out",
                        "--max-steps", 1)
    assert_one_line_error(result, "--dtype float16", "cannot autocast", "bfloat16 or float32")
    assert not (tmp_path / "out").exists()
