"""What a cluster does to a run, on CPU ranks (gloo): a failure on one rank only ends every rank at once with the
step saved and the cause named; sharded sampling whose ranks draw different tokens; a file system that cannot
lock; a Python without fcntl; the collective timeout; wandb across a resume; the log line's memory and ETA."""
import datetime
import errno
import os
import subprocess
import sys

import pytest

import distributed
import markov
import run
from config import RunOptions
from helpers import COMMON, REPO, SMALL, TINY, TORCHRUN, read_log, run_cli

HELLASWAG_ROWS = 4


def injected(kind: str, rank: int, ranks: int, *flags):
    """train.py under torchrun with one failure planted on one rank (tests/inject_failure.py); a hang would hit
    the timeout, which is the failure this guards against."""
    return run_cli("tests/inject_failure.py", kind, rank, *flags, launcher=(*TORCHRUN, f"--nproc_per_node={ranks}"),
                   timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})


def checkpoints(out) -> list[int]:
    return sorted(int(p.name.removeprefix("ckpt_")) for p in out.glob("ckpt_*"))


@pytest.mark.parametrize("kind, rank, ranks, cause", [
    ("log", 0, 2, "Stale file handle (injected)"),
    ("val", 1, 2, "CUDA out of memory (injected)"),
    ("val", 2, 3, "CUDA out of memory (injected)"),
    ("sample", 0, 3, "CUDA out of memory (injected)"),
    ("hellaswag", 1, 2, "CUDA out of memory (injected)"),
])
def test_a_failure_on_one_rank_ends_every_rank_with_the_step_saved(tmp_path, gpt2_tiktoken, kind, rank, ranks,
                                                                   cause):
    markov.write_data(tmp_path / "data", n_train=20_000, n_val=5_000, tokenizer=str(gpt2_tiktoken))
    hooks = {"log": [], "val": ["--eval-interval", 3], "sample": ["--sample-interval", 3],
             "hellaswag": ["--hellaswag-interval", 3, "--hellaswag-limit", HELLASWAG_ROWS,
                           "--hellaswag-data", REPO.parent / "shared" / "data" / "hellaswag_val.jsonl.gz"]}[kind]
    if kind == "hellaswag" and not (REPO.parent / "shared" / "data" / "hellaswag_val.jsonl.gz").is_file():
        pytest.skip("../shared/data/hellaswag_val.jsonl.gz is absent")
    out = tmp_path / "out"
    result = injected(kind, rank, ranks, *SMALL, "--batch-size", 4, "--total-batch-size", 4 * 32 * ranks,
                      "--data-dir", tmp_path / "data", "--out-dir", out,
                      "--max-steps", 8, "--log-interval", 3, "--checkpoint-interval", 100, *hooks)
    assert result.returncode != 0
    assert cause in result.stderr, result.stderr[-2000:]
    assert "failed after step 3: saved" in result.stdout, result.stdout[-2000:]
    assert checkpoints(out) == [3]


def test_sharded_sampling_with_ranks_drawing_different_tokens_does_not_hang(tmp_path, english_dir):
    """Under FSDP every decode step is a collective: rank 1 drawing <|endoftext|> at once must not make it stop
    while rank 0 decodes on."""
    out = tmp_path / "out"
    result = injected("eot", 1, 2, *COMMON, "--data-dir", english_dir, "--out-dir", out, "--max-steps", 4,
                      "--sample-interval", 2, "--checkpoint-interval", 100, "--parallel", "fsdp")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("sample: Once upon a time") == 2 and checkpoints(out) == [4]


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_file_system_without_flock_warns_and_the_run_goes_on(tmp_path, monkeypatch, capsys, code):
    """NFS without lockd or Lustre mounted noflock answer flock with these: not "a live run holds the folder"."""
    def no_locks(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(run.fcntl, "flock", no_locks)
    run.lock(str(tmp_path))
    assert "cannot lock files" in capsys.readouterr().out


def test_a_held_lock_still_refuses_a_second_run(tmp_path, monkeypatch):
    def held(*args):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(run.fcntl, "flock", held)
    with pytest.raises(run.UserError, match="in use by a live run"):
        run.lock(str(tmp_path))


def test_the_scripts_import_and_train_without_fcntl(tmp_path, markov_dir):
    """Windows has no fcntl: train.py, generate.py, hellaswag.py and export_hf.py must import, and a run trains."""
    out = tmp_path / "out"
    code = ("import runpy, sys; sys.modules['fcntl'] = None; import generate, hellaswag, export_hf; "
            "sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_path('train.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, *map(str, TINY), "--data-dir", str(markov_dir),
                             "--out-dir", str(out), "--max-steps", "2"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no fcntl" in result.stdout and checkpoints(out) == [2]


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    distributed.setup("cpu", timeout_minutes=7)
    assert seen["timeout"] == datetime.timedelta(minutes=7)
    assert RunOptions().dist_timeout * 60 >= 30 * 60  # see README: gpt2-xl's checkpoint write under DDP


def test_wandb_resumed_run_continues_the_same_wandb_run_under_out_dir(tmp_path, markov_dir):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_DIR"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    out = tmp_path / "out"
    common = [*TINY, "--data-dir", markov_dir, "--out-dir", out, "--wandb", "--checkpoint-interval", 2]
    for steps, resume in ((2, []), (4, ["--resume"])):
        result = run_cli("train.py", *common, "--max-steps", steps, *resume, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs
    assert not (REPO / "wandb").exists() or not any((REPO / "wandb").glob(f"*{runs[0].name.rsplit('-', 1)[1]}*"))


def test_the_log_records_peak_memory_and_time_left(tmp_path, markov_dir):
    out = tmp_path / "out"
    result = run_cli("train.py", *COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 4)
    assert result.returncode == 0, result.stderr[-2000:]
    memory, left = read_log(out, "peak_memory_mb"), read_log(out, "seconds_left")
    assert all(mb > 10 for mb in memory.values())  # a Python with torch alone holds more than 10 MB
    assert left[4] == 0 and left[2] > 0
    assert " left | mem " in result.stdout
