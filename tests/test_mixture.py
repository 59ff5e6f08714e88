"""dataloader.py's Mixture: several data folders read in proportion to their weights, each through its own epochs, resumed
exactly; and train.py's mixture runs (per-folder tokens and val losses, kill -9 and resume, the inputs refused)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import markov
import train
from dataloader import DataLoader, Mixture, common_meta, parse_sources
from errors import UserError
from helpers import (COMMON, TINY, assert_one_line_error, cut_back_to, in_process, kill_and_resume, read_log,
                     run_train)
from shards import write_shard

B, T = 2, 4
BIG, SMALL = 1000, 20_000  # the first token of each folder: a window's tokens say which folder it came from


def tagged(folder: Path, first: int, n_train: int, n_val: int = 100, tokenizer="gpt2", vocab_size=50257) -> Path:
    """A data folder whose tokens count up from `first`, with meta.json as prepare_data.py writes it."""
    folder.mkdir(parents=True)
    write_shard(str(folder / "train_000000.bin"), np.arange(first, first + n_train, dtype=np.uint16))
    write_shard(str(folder / "val_000000.bin"), np.arange(first, first + n_val, dtype=np.uint16))
    (folder / "meta.json").write_text(json.dumps({"tokenizer": tokenizer, "vocab_size": vocab_size}))
    return folder


@pytest.fixture
def two(tmp_path):
    """big (1,000 windows) and small (10 windows) as a --data-dir value."""
    return f"{tagged(tmp_path / 'big', BIG, 4001)},{tagged(tmp_path / 'small', SMALL, 41)}"


def mixture(data_dir, weights, batch_size=B, **kwargs):
    return Mixture(parse_sources(data_dir, weights), "train", batch_size, T, **kwargs)


def firsts(loader, n):
    """The first token of each window of the next n batches."""
    return [int(t) for _ in range(n) for t in loader.next_batch()[0][:, 0]]


def from_small(windows) -> list:
    return [w >= SMALL for w in windows]


@pytest.mark.parametrize("weights", ["3,1", "0.75,0.25", "6,2"])
def test_a_3_to_1_mixture_reads_3_to_1_in_every_cycle_of_4_windows(two, weights):
    loader = mixture(two, weights)
    windows = firsts(loader, 200)  # 400 windows, the small folder through 10 epochs
    # each folder's windows in its own order, none skipped or read twice within an epoch
    assert [w for w in windows if w < SMALL] == list(range(BIG, BIG + 300 * T, T))
    assert [w for w in windows if w >= SMALL] == list(range(SMALL, SMALL + 10 * T, T)) * 10
    read = from_small(windows)
    assert [sum(read[i:i + 4]) for i in range(0, 400, 4)] == [1] * 100  # exactly one window in 4 from small
    running = np.cumsum(read)
    assert all(abs(running[n - 1] - n / 4) < 1 for n in range(1, 401))  # and never a window off its share
    assert loader.state_dict()["sources"] == {"big": {"tokens": 300 * T, "epoch": 0},
                                              "small": {"tokens": 100 * T, "epoch": 10}}


def test_each_folder_runs_through_its_own_epochs(two, capsys):
    loader = mixture(two, "1,1", shuffle_seed=3, announce=True)
    windows = firsts(loader, 30)  # 30 windows of each
    big, small = [w for w in windows if w < SMALL], [w for w in windows if w >= SMALL]
    assert len(set(big)) == 30  # big is still in its first epoch
    epochs = [small[i:i + 10] for i in range(0, 30, 10)]  # small is in its fourth
    assert all(sorted(e) == list(range(SMALL, SMALL + 40, 4)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # each epoch in another order
    out = capsys.readouterr().out
    assert [line.split(",")[0] for line in out.splitlines()] == [f"data: small finished epoch {e} (40 tokens each)"
                                                                  for e in (1, 2, 3)]


@pytest.mark.parametrize("shuffle_seed", [None, 5])
def test_another_batch_size_or_world_size_continues_at_the_same_tokens(two, shuffle_seed):
    loader = mixture(two, "3,1", shuffle_seed=shuffle_seed)
    firsts(loader, 7)  # 14 windows: not a whole number of cycles
    state = json.loads(json.dumps(loader.state_dict()))
    expected = firsts(loader, 20)
    big = mixture(two, "3,1", batch_size=4, shuffle_seed=shuffle_seed)
    big.load_state_dict(state)
    assert firsts(big, 10) == expected
    ranks = [mixture(two, "3,1", batch_size=1, rank=r, world_size=2, shuffle_seed=shuffle_seed) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    assert [w for _ in range(20) for r in ranks for w in firsts(r, 1)] == expected
    assert ranks[0].state_dict() == ranks[1].state_dict() == loader.state_dict()


def test_one_folder_is_its_dataloader(tmp_path):
    folder = tagged(tmp_path / "one", 0, 403)
    assert firsts(mixture(str(folder), None, shuffle_seed=2), 120) == \
        firsts(DataLoader(folder, "train", B, T, shuffle_seed=2), 120)


def test_a_position_from_another_schedule_is_refused(two):
    state = mixture(two, "3,1").state_dict() | {"tokens": 8 * T}  # its sources still at 0
    with pytest.raises(UserError, match="mixture schedule"):
        mixture(two, "3,1").load_state_dict(state)


@pytest.mark.parametrize("data_dir, weights, message", [
    ("a,b", "3,x", "'x' is not a positive number"),
    ("a,b", "3,0", "'0' is not a positive number"),
    ("a,b", "3,-1", "'-1' is not a positive number"),
    ("a,b", "3,nan", "'nan' is not a positive number"),
    ("a,b", "3,inf", "'inf' is not a positive number"),
    ("a,b", "3", "gives 1 weight(s) for 2 --data-dir folder(s)"),
    ("a,b,c", "1,2,3,4", "gives 4 weight(s) for 3"),
    ("a,,b", None, "has an empty entry"),
    ("x/a,y/a", None, "two folders called a"),
    ("a,b", "0.333333,0.666667", "repeat only every 1,000,000 windows"),
])
def test_bad_sources_are_user_errors(data_dir, weights, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_sources(data_dir, weights)


def test_weights_are_exact_ratios():
    assert [s.share for s in parse_sources("a,b,c", "0.5,0.3,0.2")] == [5, 3, 2]
    assert [s.share for s in parse_sources("a,b", "1/3,2/3")] == [1, 2]
    assert [s.share for s in parse_sources("a,b", "6,2")] == [3, 1]  # the same data as 3,1: it resumes a 3,1 run
    assert [(s.folder, s.share) for s in parse_sources("d/a/,e", None)] == [("d/a/", 1), ("e", 1)]
    assert parse_sources("d/a/,e", None)[0].name == "a"


# ---- train.py on a mixture

@pytest.fixture(scope="module")
def markov_pair(tmp_path_factory):
    """Two Markov folders of different chains: 'big' and 'small', whose 1,000 training tokens (31 windows of 32) run
    out after some 15 steps of a 3:1 mixture."""
    root = tmp_path_factory.mktemp("pair")
    markov.write_data(root / "big", n_train=30_000, n_val=2_000, seed=0)
    markov.write_data(root / "small", n_train=1_000, n_val=2_000, seed=7)
    return f"{root / 'big'},{root / 'small'}"


# 8 windows a step, 6 from big and 2 from small: small's 31 windows run out in steps 16 and 31. Saved every 5 steps,
# evaluated at 20 and 40.
MIXED = [*COMMON, "--data-weights", "3,1", "--shuffle", "--max-steps", 40, "--checkpoint-interval", 5,
         "--keep-checkpoints", 0, "--eval-interval", 20, "--eval-steps", 2]
PER_STEP = 4 * 32 * 2  # COMMON: two micro batches of 4 windows of 32 tokens


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, markov_pair):
    """A 3:1 run never stopped, every checkpoint kept: its folder and its console output."""
    out = tmp_path_factory.mktemp("mixed") / "out"
    return out, run_train(*MIXED, "--data-dir", markov_pair, "--out-dir", out).stdout


def test_a_mixture_run_logs_each_folders_tokens_and_val_loss(mixed_run):
    out, console = mixed_run
    assert read_log(out, "source_tokens") == {step: {"big": step * PER_STEP * 3 // 4, "small": step * PER_STEP // 4}
                                              for step in range(1, 41)}
    records = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in records] == [20, 40]
    for r in records:
        assert r["val_loss"] == pytest.approx((3 * r["val_loss_big"] + r["val_loss_small"]) / 4, rel=1e-12)
        assert r["val_loss_big"] != r["val_loss_small"]
    assert [line for line in console.splitlines() if line.startswith("data:")] == \
        [f"data: small finished epoch {e} (992 tokens each), starting epoch {e + 1}" for e in (1, 2)]


def test_kill_and_resume_of_a_mixture_is_exact(tmp_path, markov_pair, mixed_run):
    """kill -9 in the middle of the run, before its small folder's first epoch ends, --resume: the loss curve, the
    tokens read from each folder and the val losses equal the run never stopped, exactly."""
    out = tmp_path / "killed"
    kill_and_resume(out, 15, *MIXED, "--data-dir", markov_pair)
    for key in ("loss", "source_tokens", "val_loss", "val_loss_small"):
        assert read_log(out, key) == read_log(mixed_run[0], key)


def test_a_mixture_resumed_on_two_processes_with_another_batch_size_reads_on_at_the_same_tokens(tmp_path,
                                                                                               markov_pair,
                                                                                               mixed_run):
    out = shutil.copytree(mixed_run[0], tmp_path / "out")
    cut_back_to(out, 30)
    # 2 processes x 2 micro steps of 2 windows: the same 8 windows a step, across small's second epoch's end
    run_train(*MIXED, "--data-dir", markov_pair, "--out-dir", out, "--resume", "--batch-size", 2, torchrun=2)
    full, resumed = read_log(mixed_run[0], "loss"), read_log(out, "loss")
    assert read_log(out, "source_tokens") == read_log(mixed_run[0], "source_tokens")
    assert all(abs(resumed[s] - full[s]) < 1e-5 for s in range(31, 41)), (resumed, full)


def test_a_resume_with_other_weights_or_folders_is_refused(tmp_path, monkeypatch, capsys, markov_pair):
    run_train(*TINY, "--data-dir", markov_pair, "--data-weights", "3,1", "--out-dir", tmp_path / "run",
              "--max-steps", 2)
    big, small = markov_pair.split(",")
    for i, (data_dir, weights) in enumerate(((markov_pair, "1,1"), (f"{small},{big}", "1,3"), (big, "1"))):
        out = shutil.copytree(tmp_path / "run", tmp_path / f"copy{i}")  # a refused run still holds its folder
        result = in_process(monkeypatch, capsys, train, *TINY, "--out-dir", out, "--max-steps", 2, "--resume",
                            "--data-dir", data_dir, "--data-weights", weights)
        assert_one_line_error(result, "is not the data", "--data-weights")


def tokenizer_folder(folder: Path, ranks: bytes) -> Path:
    """A Markov folder whose meta.json names a tokenizer file of its own."""
    markov.write_data(folder, n_train=2_000, n_val=1_000, tokenizer="tokenizer.tiktoken")
    (folder / "tokenizer.tiktoken").write_bytes(ranks)
    return folder


def test_folders_of_one_tokenizer_mix_and_of_another_are_refused_by_name(tmp_path, monkeypatch, capsys):
    a = tokenizer_folder(tmp_path / "a", b"the same ranks\n")
    twin = tokenizer_folder(tmp_path / "twin", b"the same ranks\n")
    other = tokenizer_folder(tmp_path / "other", b"other ranks\n")
    named = tmp_path / "named"
    markov.write_data(named, n_train=2_000, n_val=1_000, tokenizer="gpt2")
    wide = tmp_path / "wide"
    markov.write_data(wide, vocab=9, n_train=2_000, n_val=1_000, tokenizer="gpt2")
    run = [*TINY, "--max-steps", 1, "--out-dir", tmp_path / "out"]
    for folder, message in ((other, "its tokenizer.tiktoken has other contents"),
                            (named, "tokenizer gpt2, not tokenizer.tiktoken"),
                            (wide, "a vocabulary of 9 tokens, not 8")):
        result = in_process(monkeypatch, capsys, train, *run, "--data-dir", f"{a},{folder}")
        assert_one_line_error(result, f"{folder} was prepared with another tokenizer than {a}", message)
        assert not (tmp_path / "out").exists()
    assert common_meta(parse_sources(f"{a},{twin}", None))["tokenizer"] == str(a / "tokenizer.tiktoken")


@pytest.mark.parametrize("case, message", [
    ("weights", "'three' is not a positive number"),
    ("count", "gives 3 weight(s) for 2"),
    ("missing", "no prepared data in"),
    ("no val", "no val_*.bin shards in"),
])
def test_bad_mixture_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, markov_dir, case, message):
    other = tmp_path / "other"
    markov.write_data(other, n_train=2_000, n_val=1_000)
    weights = {"weights": "three,1", "count": "1,2,3"}.get(case, "1,1")
    if case == "missing":
        other = tmp_path / "missing"
    if case == "no val":
        (other / "val_000000.bin").unlink()
    result = in_process(monkeypatch, capsys, train, *TINY, "--max-steps", 1, "--out-dir", tmp_path / "out",
                        "--data-dir", f"{markov_dir},{other}", "--data-weights", weights)
    assert_one_line_error(result, message)
    if case in ("missing", "no val"):
        assert str(other) in result.stderr
    assert not (tmp_path / "out").exists()
