"""A long run survives what clusters do to it: offline nodes, reused folders, cut-off logs, changed flags,
failing hooks, node-local folders and a second job on the same folder. Each case runs train.py for real."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpoint
import markov
from helpers import COMMON, REPO, assert_one_line_error, cut_back_to, read_log, run_train, start_train
from checkpoint import find_checkpoint


def steps_of(out: Path) -> list[int]:
    return [checkpoint.load_train_state(p)["step"] for p in checkpoint.list_checkpoints(str(out))]


# ---- 1. an offline node: HellaSwag is resolved before step 1 and turned off, training goes on

def test_offline_hellaswag_turns_the_hook_off_before_step_1(tmp_path, gpt2_tiktoken):
    markov.write_data(tmp_path / "data", n_train=20_000, n_val=5_000, tokenizer=str(gpt2_tiktoken))
    # No cached file (a fresh HOME) and every download through a proxy address that nothing answers.
    env = {**os.environ, "HOME": str(tmp_path), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = run_train(*COMMON, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", "--max-steps", 6,
                       "--hellaswag-interval", 2, "--checkpoint-interval", 3, env=env)
    assert "warning: HellaSwag is off for this run: cannot download" in result.stdout
    assert "--hellaswag-data PATH" in result.stdout
    assert steps_of(tmp_path / "out")[-1] == 6 and sorted(read_log(tmp_path / "out", "loss")) == list(range(1, 7))


# ---- a hook that fails never costs progress

def test_a_failing_hook_saves_the_step_it_ran_after(tmp_path):
    markov.write_data(tmp_path / "data", n_train=20_000, n_val=5_000)
    # The val split holds a token beyond the vocabulary: the first evaluation (step 3) fails on it.
    val = tmp_path / "data" / "val_000000.bin"
    from shards import read_shard, write_shard

    tokens = read_shard(str(val)).copy()
    tokens[5] = 99
    write_shard(str(val), tokens)
    result = run_train(*COMMON, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", "--max-steps", 10,
                       "--eval-interval", 3, "--checkpoint-interval", 100, check=False)
    assert_one_line_error(result, "token id 99 >= vocab size 8")
    assert "a hook failed after step 3: saved" in result.stdout
    assert steps_of(tmp_path / "out") == [3]


# ---- 2. a fresh run into a folder that holds an older run

def test_a_fresh_run_never_writes_over_an_older_one(tmp_path, markov_dir):
    out = tmp_path / "out"
    run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 4, "--checkpoint-interval", 2)
    before = sorted(os.listdir(out))
    result = run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 4, check=False)
    assert_one_line_error(result, "holds an earlier run", "--resume", "--overwrite")
    assert sorted(os.listdir(out)) == before and steps_of(out) == [2, 4]

    result = run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 3,
                       "--checkpoint-interval", 3, "--overwrite", "--seed", 7)
    assert "--overwrite: deleted the earlier run" in result.stdout
    assert steps_of(out) == [3] and sorted(read_log(out, "loss")) == [1, 2, 3]
    assert checkpoint.load_train_state(checkpoint.list_checkpoints(str(out))[-1])["train_config"]["seed"] == 7


# ---- 3. a log whose last line was cut short

def test_resume_after_a_cut_off_log_line(tmp_path, markov_dir):
    out = tmp_path / "out"
    run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 4, "--checkpoint-interval", 2)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    result = run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 6,
                       "--checkpoint-interval", 2, "--resume", "--allow-lr-change")
    assert "last line of" in result.stdout and "cut short" in result.stdout
    assert sorted(read_log(out, "loss")) == list(range(1, 7))


# ---- 4. resume with another batch size or process count continues at the same token

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, markov_dir) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 8, "--checkpoint-interval", 4,
              "--keep-checkpoints", 0)
    return out


@pytest.fixture
def resumable(tmp_path, uninterrupted) -> Path:
    """A copy of the uninterrupted run as if killed after its checkpoint at step 4."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    cut_back_to(out, 4)
    return out


@pytest.mark.parametrize("flags, torchrun", [
    (["--batch-size", 2], 0),  # the usual answer to running out of memory: half the micro batch, twice the steps
    (["--batch-size", 4], 2),  # the same tokens per step on two processes instead of one
])
def test_resume_with_another_batch_or_world_size_is_exact(markov_dir, uninterrupted, resumable, flags, torchrun):
    out = resumable
    run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 8, "--checkpoint-interval", 4,
              "--resume", *flags, torchrun=torchrun)
    full, resumed = read_log(uninterrupted, "loss"), read_log(out, "loss")
    assert sorted(resumed) == sorted(full) == list(range(1, 9))
    for step in range(5, 9):
        assert abs(resumed[step] - full[step]) < 1e-6, (step, resumed[step], full[step])


@pytest.mark.parametrize("flags, message", [
    (["--total-batch-size", 4 * 32 * 4], "total_batch_size was 256"),
    (["--seed", 1], "seed was 1337"),
    (["--shuffle"], "shuffle was False"),
    (["--learning-rate", 1e-3], "would jump from"),
    (["--vocab-size", 50257], "--vocab-size 50257 disagrees with the data's tokenizer (8 tokens"),
])
def test_resume_refuses_flags_that_change_the_run(markov_dir, resumable, flags, message):
    out = resumable
    result = run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 8, "--resume", *flags,
                       check=False)
    assert_one_line_error(result, message)
    assert steps_of(out) == [4]


def test_resume_on_moved_data_works_and_other_data_is_refused(tmp_path, markov_dir, uninterrupted, resumable):
    out = resumable
    shutil.copytree(markov_dir, tmp_path / "moved")
    markov.write_data(tmp_path / "other", n_train=31_000, n_val=5_000)
    result = run_train(*COMMON, "--data-dir", tmp_path / "other", "--out-dir", out, "--max-steps", 8, "--resume",
                       check=False)
    assert_one_line_error(result, "is not the data", "--data-dir")
    run_train(*COMMON, "--data-dir", tmp_path / "moved", "--out-dir", out, "--max-steps", 8, "--resume")
    assert read_log(out, "loss") == read_log(uninterrupted, "loss")


# ---- 5. a longer run: cosine cannot be extended, wsd extends from before its decay

def test_extending_a_cosine_run_is_an_error_that_points_to_wsd(tmp_path, markov_dir, uninterrupted):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    result = run_train(*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 16, "--resume", check=False)
    assert_one_line_error(result, "would jump", "max_steps 8 -> 16", "--lr-schedule wsd")


def test_a_wsd_run_extends_from_the_start_of_its_decay_without_a_jump(tmp_path, markov_dir):
    out = tmp_path / "out"
    wsd = [*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--lr-schedule", "wsd", "--decay-fraction", 0.25,
           "--warmup-steps", 2, "--checkpoint-interval", 2, "--keep-checkpoints", 1]
    run_train(*wsd, "--max-steps", 8)
    assert steps_of(out) == [6, 8]  # the decay starts at step 6: that checkpoint is kept
    old_lr = read_log(out, "lr")
    # A record's lr is the one its step used: steps 1-6 warm up and hold, 7-8 decay linearly towards 3e-4.
    assert old_lr[7] == old_lr[3] == pytest.approx(3e-3) and old_lr[8] == pytest.approx((3e-3 + 3e-4) / 2)

    result = run_train(*wsd, "--max-steps", 16, "--resume", check=False)  # the newest is past the decay
    assert_one_line_error(result, "would jump", "decay began (step 6)", "--resume-step")

    result = run_train(*wsd, "--max-steps", 16, "--resume", "--resume-step", 6)
    assert "moved the 1 later checkpoint(s)" in result.stdout
    assert steps_of(out / "after_0000006") == [8]  # the first ending is kept, not lost
    lr = read_log(out, "lr")
    assert lr[7] == old_lr[6] == pytest.approx(3e-3)  # continuous at the resume step: still the plateau
    assert lr[13] == pytest.approx(3e-3) and lr[16] == pytest.approx(3e-3 - 0.75 * 2.7e-3)  # decays from 12 to 16
    assert {s: v for s, v in lr.items() if s <= 6} == {s: v for s, v in old_lr.items() if s <= 6}


# ---- 6. multi-node with node-local folders: all ranks stop with one line, nothing diverges

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(tmp_path, markov_dir, *flags):
    """torchrun --nnodes=2 with one process each, each node in its own folder: --out-dir run is node-local."""
    port = free_port()
    procs = []
    for node in range(2):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", str(REPO / "train.py"),
               *map(str, COMMON), "--data-dir", markov_dir, "--out-dir", "run", *map(str, flags)]
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    return [(p.wait(timeout=300), *p.communicate()) for p in procs]


def test_two_nodes_with_node_local_out_dirs_stop_with_one_line(tmp_path, markov_dir):
    results = run_two_nodes(tmp_path, markov_dir, "--max-steps", 4, "--checkpoint-interval", 2)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:]
    assert steps_of(tmp_path / "node0" / "run") == [2, 4] and not (tmp_path / "node1" / "run").exists()

    results = run_two_nodes(tmp_path, markov_dir, "--max-steps", 6, "--checkpoint-interval", 2, "--resume",
                            "--allow-lr-change")
    for code, stdout, stderr in results:
        assert code != 0
        assert "error: rank 1 on host" in stderr and "cannot read run/ckpt_0000004" in stderr, stderr[-2000:]
        assert "must be one shared file system" in stderr
    assert steps_of(tmp_path / "node0" / "run") == [2, 4]


# ---- one live run per folder

def test_a_second_run_on_a_live_folder_stops_and_kill_9_leaves_no_stale_lock(tmp_path, markov_dir):
    out = tmp_path / "out"
    flags = [*COMMON, "--data-dir", markov_dir, "--out-dir", out, "--checkpoint-interval", 5]
    first = start_train(*flags, "--max-steps", 100000)
    try:
        deadline = time.time() + 60
        while not (out / "ckpt_0000005").exists() and time.time() < deadline:
            time.sleep(0.05)
        result = run_train(*flags, "--max-steps", 100000, "--resume", check=False)
        assert_one_line_error(result, "is in use by a live run", f"pid {first.pid}", socket.gethostname())
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    last = steps_of(out)[-1]
    run_train(*flags, "--max-steps", last + 5, "--resume", "--allow-lr-change")
    assert steps_of(out)[-1] == last + 5


# ---- 7. newest means highest step, everywhere

def test_newest_checkpoint_is_the_highest_step_whatever_the_mtimes(tmp_path, random_gpt):
    run = tmp_path / "runs" / "a"
    late = checkpoint.save_checkpoint(str(run), 10, random_gpt(), "gpt2")
    early = checkpoint.save_checkpoint(str(run), 2, random_gpt(), "gpt2")  # written last, so the newest mtime
    assert os.path.getmtime(early) >= os.path.getmtime(late)
    assert find_checkpoint(str(run)) == late == checkpoint.list_checkpoints(str(run))[-1]
    assert find_checkpoint(str(tmp_path / "runs")) == late  # the one run inside
    checkpoint.save_checkpoint(str(tmp_path / "runs" / "b"), 1, random_gpt(), "gpt2")
    with pytest.raises(Exception, match="holds several runs"):
        find_checkpoint(str(tmp_path / "runs"))
