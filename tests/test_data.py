"""Shards, the DataLoader, and prepare_data.py end to end on local files and local copies of the hub layouts."""
import base64
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import prepare_data
from dataloader import DataLoader
from shards import HEADER_BYTES, MAGIC, read_shard, write_shard
from errors import UserError
from helpers import REPO, assert_one_line_error, corrupt, make_docs, run_cli, write_jsonl
from hub_server import HubServer
from tokenizer import load_tokenizer


# ---- shards ----

def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.uint16)
    path = tmp_path / "train_000000.bin"
    write_shard(str(path), tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [MAGIC, 1, 5] and not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + 2 * 5
    assert np.array_equal(read_shard(str(path)), tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["train_000000.bin"]  # no .tmp left over


@pytest.mark.parametrize("how, message", [("magic", "wrong magic"), ("version", "version 2"),
                                          ("truncated body", "truncated"), ("count disagrees", "header says"),
                                          ("short header", "truncated")])
def test_corrupt_shards_are_user_errors(tmp_path, how, message):
    path = tmp_path / "val_000000.bin"
    write_shard(str(path), np.arange(10, dtype=np.uint16))
    corrupt(path, how)
    with pytest.raises(UserError, match=message) as e:
        read_shard(str(path))
    assert str(path) in str(e.value)


def test_missing_shard(tmp_path):
    with pytest.raises(UserError, match="cannot read shard"):
        read_shard(str(tmp_path / "nope.bin"))


# ---- the loader ----

B, T = 2, 4  # a batch is 2 windows of 4 tokens, each with 1 more for its targets


def make_shards(folder: Path, sizes, split="train"):
    """Shards whose tokens count up across shards, so every token says where it came from."""
    folder.mkdir(exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        write_shard(str(folder / f"{split}_{i:06d}.bin"), np.arange(start, start + n, dtype=np.uint16))
        start += n
    return folder


def windows(loader, n):
    """The first token of each window of the next n batches: which windows they were."""
    return [int(t) for _ in range(n) for t in loader.next_batch()[0][:, 0]]


def test_batches_are_consecutive_windows_shifted_by_one(tmp_path):
    # 20 tokens hold 4 windows (19 = 4*4 + 3: the +1 target of a window is the next one's first token).
    loader = DataLoader(make_shards(tmp_path / "d", [20, 9, 8]), "train", B, T)
    assert loader.windows_per_epoch == 4 + 2 + 1
    x, y = loader.next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert x.flatten().tolist() == list(range(8)) and y.flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert windows(loader, 3) == [8, 12, 20, 24, 29, 0]  # across shards, then into the next epoch


def test_resume_mid_shard_continues_exactly(tmp_path):
    data = make_shards(tmp_path / "d", [50, 40])
    loader = DataLoader(data, "train", B, T)
    windows(loader, 3)
    state = loader.state_dict()
    assert state == {"tokens": 3 * B * T}
    expected = [loader.next_batch() for _ in range(12)]  # runs past the end of the epoch
    resumed = DataLoader(data, "train", B, T)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # states go through checkpoints
    for (x, y), (rx, ry) in zip(expected, [resumed.next_batch() for _ in range(12)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    resumed.reset()
    assert windows(resumed, 1) == [0, 4]


@pytest.mark.parametrize("shuffle_seed", [None, 5])
def test_another_batch_size_or_world_size_continues_at_the_same_token(tmp_path, shuffle_seed):
    """The position is in tokens: 2 ranks of 1 window or 1 process of 4 windows after a run of batch 2 read on
    from exactly where it stopped, shuffled or not."""
    data = make_shards(tmp_path / "d", [50, 40, 30])
    loader = DataLoader(data, "train", B, T, shuffle_seed=shuffle_seed)
    windows(loader, 5)
    state = loader.state_dict()
    expected = windows(loader, 8)
    big = DataLoader(data, "train", 4, T, shuffle_seed=shuffle_seed)
    big.load_state_dict(state)
    assert windows(big, 4) == expected
    ranks = [DataLoader(data, "train", 1, T, rank=r, world_size=2, shuffle_seed=shuffle_seed) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    assert [w for _ in range(8) for r in ranks for w in windows(r, 1)] == expected


def test_ddp_ranks_split_what_one_process_reads(tmp_path):
    data = make_shards(tmp_path / "d", [50, 40, 30])
    single = DataLoader(data, "train", B, T)
    ranks = [DataLoader(data, "train", B, T, rank=r, world_size=2) for r in range(2)]
    for _ in range(9):  # 36 windows: across an epoch boundary (12 + 9 + 7 = 28 windows)
        assert windows(single, 2) == [w for r in ranks for w in windows(r, 1)]
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_epoch_wraps_to_the_start(tmp_path):
    loader = DataLoader(make_shards(tmp_path / "d", [30, 20]), "train", B, T)
    assert loader.windows_per_epoch == 7 + 4
    assert windows(loader, 11) == [0, 4, 8, 12, 16, 20, 24, 30, 34, 38, 42] * 2  # 22 windows: two epochs


def test_shuffle_permutes_windows_across_shards_each_epoch(tmp_path):
    """Every window of an epoch is read exactly once, in another order each epoch and for another seed; ranks
    of a DDP run still split one process's sequence."""
    data = make_shards(tmp_path / "d", [41, 33, 9])  # 10 + 8 + 2 windows
    plain = sorted(windows(DataLoader(data, "train", B, T), 10))
    a, b = DataLoader(data, "train", B, T, shuffle_seed=1), DataLoader(data, "train", B, T, shuffle_seed=1)
    epochs = [windows(a, 10) for _ in range(3)]
    assert epochs == [windows(b, 10) for _ in range(3)]
    assert all(sorted(e) == plain for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # a new order each epoch
    assert windows(DataLoader(data, "train", B, T, shuffle_seed=2), 10) != epochs[0]
    mixed = epochs[0][:10]  # the first half-epoch draws from more than one shard
    assert len({0 if w < 41 else 1 if w < 74 else 2 for w in mixed}) > 1
    ranks = [DataLoader(data, "train", B, T, rank=r, world_size=2, shuffle_seed=1) for r in range(2)]
    assert [w for _ in range(5) for r in ranks for w in windows(r, 1)] == epochs[0]


def test_a_position_from_another_block_size_or_format_is_refused(tmp_path):
    data = make_shards(tmp_path / "d", [50])
    with pytest.raises(UserError, match="not a multiple of block_size 4"):
        DataLoader(data, "train", B, T).load_state_dict({"tokens": 6})
    with pytest.raises(UserError, match="older format"):
        DataLoader(data, "train", B, T).load_state_dict({"next_chunk": 3})


def test_token_beyond_vocab_is_a_user_error(tmp_path):
    data = make_shards(tmp_path / "d", [30])
    loader = DataLoader(data, "train", B, T, vocab_size=20)
    windows(loader, 2)  # ids up to 16 are fine
    with pytest.raises(UserError, match=r"token id 2\d >= vocab size 20 in .*train_000000.bin"):
        loader.next_batch()


def test_loader_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist; run prepare_data.py"):
        DataLoader(tmp_path / "missing", "train", B, T)
    data = make_shards(tmp_path / "d", [30])
    with pytest.raises(UserError, match="no val_\\*.bin shards .* run prepare_data.py"):
        DataLoader(data, "val", B, T)
    make_shards(data, [5, 4], split="val")  # one window of 4 + 1 tokens: a batch needs 2
    with pytest.raises(UserError, match="9 tokens.*--batch-size"):
        DataLoader(data, "val", B, T)


# ---- prepare_data.py ----

def expected_tokens(enc, docs):
    return np.array([t for d in docs for t in [enc.eot_token] + enc.encode_ordinary(d)], dtype=np.uint16)


def all_tokens(out: Path):
    """val then train: the whole stream, in source order."""
    return np.concatenate([read_shard(str(p)) for split in ("val", "train")
                           for p in sorted(out.glob(f"{split}_*.bin"))])


def shard_bytes(out: Path):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def prepare(out, *argv):
    """prepare_data in this process (it still starts its worker processes); returns meta.json."""
    prepare_data.main(["--out", str(out), "--workers", "2", *map(str, argv)])
    return json.loads((out / "meta.json").read_text())


@pytest.fixture(scope="session")
def prepare_gpt2(gpt2_tiktoken):
    """prepare() with GPT-2's tokenizer."""
    return lambda out, *argv: prepare(out, "--tokenizer", gpt2_tiktoken, *argv)


def write_parquet(path: Path, docs, column="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: docs}), path)


def source_layouts(root: Path, docs):
    """Each --input kind holding docs, in order."""
    (root / "txt").mkdir(parents=True)
    for i, d in enumerate(docs):
        (root / "txt" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    write_jsonl(root / "one.jsonl", docs, text=True)
    write_parquet(root / "one.parquet", docs)
    mixed = root / "mixed"  # sorted: a.jsonl, b/c.parquet, d.txt
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", docs[:10], text=True)
    write_parquet(mixed / "b" / "c.parquet", docs[10:-1])
    (mixed / "d.txt").write_text(docs[-1], encoding="utf-8")
    (mixed / "notes.md").write_text("not a document")
    globbed = root / "glob"
    globbed.mkdir()
    write_jsonl(globbed / "p1.jsonl", docs[:15], text=True)
    write_jsonl(globbed / "p2.jsonl", docs[15:], text=True)
    write_jsonl(globbed / "skip.json", ["never read"], text=True)
    return {"txt": [root / "txt" / f"{i:03d}.txt" for i in range(len(docs))], "jsonl": [root / "one.jsonl"],
            "parquet": [root / "one.parquet"], "folder": [mixed], "glob": [str(globbed / "p*.jsonl")]}


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "folder", "glob"])
def test_each_input_kind_gives_tiktoken_tokens_plus_one_eot_per_document(tmp_path, enc, prepare_gpt2, kind):
    docs = make_docs(30)
    inputs = source_layouts(tmp_path / "src", docs)[kind]
    meta = prepare_gpt2(tmp_path / "out", "--input", *inputs, "--val-tokens", 200)
    assert np.array_equal(all_tokens(tmp_path / "out"), expected_tokens(enc, docs))
    splits = meta["splits"]
    assert splits["val"]["documents"] + splits["train"]["documents"] == 30
    assert sum(s["tokens"] for s in splits.values()) == len(expected_tokens(enc, docs))
    # val: whole first documents, just enough to reach --val-tokens
    val_lengths = [len(enc.encode_ordinary(d)) + 1 for d in docs[:splits["val"]["documents"]]]
    assert sum(val_lengths) == splits["val"]["tokens"] and sum(val_lengths[:-1]) < 200 <= sum(val_lengths)
    assert meta["tokenizer"] == "tokenizer.tiktoken" and meta["vocab_size"] == 50257 and meta["eot"] == 50256
    assert meta["shuffle"] is True  # a small local corpus: the loader shuffles its windows
    assert not (tmp_path / "out" / "job.json").exists()


def test_limit_docs_stops_within_a_file_and_provenance_lists_the_files_read(tmp_path, enc, prepare_gpt2):
    docs = make_docs(30, seed=4)
    for i in range(3):
        write_jsonl(tmp_path / f"p{i}.jsonl", docs[10 * i:10 * i + 10], text=True)
    meta = prepare_gpt2(tmp_path / "out", "--input", tmp_path / "p*.jsonl", "--limit-docs", 15, "--val-tokens", 50)
    assert np.array_equal(all_tokens(tmp_path / "out"), expected_tokens(enc, docs[:15]))
    files = [{"path": str(tmp_path / f"p{i}.jsonl"), "size": (tmp_path / f"p{i}.jsonl").stat().st_size}
             for i in range(2)]
    assert meta["provenance"] == {"files": files}  # the third was never opened


def fineweb_copy(root: Path, sample_docs, other_docs):
    """A local folder laid out as the Hub repo: subsets declared in the README's YAML header."""
    write_parquet(root / "sample" / "10BT" / "000_00000.parquet", sample_docs)
    write_parquet(root / "data" / "CC-MAIN-2024-10" / "train-00000.parquet", other_docs)
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/*/*\n- config_name: sample-10BT\n  data_files:\n"
                                    "  - split: train\n    path: sample/10BT/*\n---\n# fineweb-edu\n")
    return root


def test_fineweb_edu_path_on_a_local_copy(tmp_path, enc, prepare_gpt2):
    sample, other = make_docs(20, seed=1), make_docs(5, seed=2)
    hub = fineweb_copy(tmp_path / "fw", sample, other)
    meta = prepare_gpt2(tmp_path / "out", "--dataset", "fineweb-edu", "--hub-path", hub, "--val-tokens", 100)
    assert np.array_equal(all_tokens(tmp_path / "out"), expected_tokens(enc, sample))
    assert meta["shuffle"] is False  # documents already shuffled
    meta = prepare_gpt2(tmp_path / "all", "--dataset", "fineweb-edu", "--hub-path", hub, "--fineweb-name", "default",
                        "--val-tokens", 10, "--hub-revision", "v1.2.0")
    assert meta["settings"]["hub_revision"] == "v1.2.0" and meta["settings"]["fineweb_name"] == "default"
    assert np.array_equal(all_tokens(tmp_path / "all"), expected_tokens(enc, other))


def test_bookcorpus_path_on_a_local_copy_joins_sentences(tmp_path, enc, prepare_gpt2):
    per_doc = prepare_data.BOOKCORPUS_SENTENCES_PER_DOC
    sentences = [f"sentence {i} of the book ." for i in range(2 * per_doc + 5)]
    write_parquet(tmp_path / "bc" / "plain_text" / "train" / "0000.parquet", sentences)  # the parquet export
    meta = prepare_gpt2(tmp_path / "out", "--dataset", "bookcorpus", "--hub-path", tmp_path / "bc",
                        "--val-tokens", 1)
    docs = [" ".join(sentences[i:i + per_doc]) for i in range(0, len(sentences), per_doc)]
    assert np.array_equal(all_tokens(tmp_path / "out"), expected_tokens(enc, docs))
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 2
    assert meta["shuffle"] is True  # books in order: windows need shuffling
    assert meta["settings"]["hub_revision"] == "refs/convert/parquet"  # bookcorpus's parquet export by default


def test_trained_tokenizer_end_to_end(tmp_path):
    docs = make_docs(200, seed=3)
    write_jsonl(tmp_path / "c.jsonl", docs, text=True)
    meta = prepare(tmp_path / "out", "--input", tmp_path / "c.jsonl", "--train-tokenizer", "--vocab-size", 300,
                   "--val-tokens", 500)
    assert meta["tokenizer"] == "tokenizer.tiktoken" and meta["vocab_size"] == 300 and meta["eot"] == 299
    enc = load_tokenizer(str(tmp_path / "out" / meta["tokenizer"]))
    assert np.array_equal(all_tokens(tmp_path / "out"), expected_tokens(enc, docs))


def test_tinytales_trains_its_own_tokenizer(tmp_path):
    out = tmp_path / "tiny"
    prepare_data.main(["--dataset", "tinytales", "--out", str(out), "--tinytales-tokens", "60000",
                       "--vocab-size", "512", "--val-tokens", "2000", "--workers", "2"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "tokenizer.tiktoken" and meta["vocab_size"] == 512
    enc = load_tokenizer(str(out / "tokenizer.tiktoken"))
    stories = enc.decode(all_tokens(out).tolist()).split("<|endoftext|>")
    assert stories[0] == "" and len(stories) - 1 == sum(s["documents"] for s in meta["splits"].values())


# -- determinism, resume, overwrite: one larger corpus, many small shards --

RUN = ("--shard-size", 40_000, "--val-tokens", 30_000)


@pytest.fixture(scope="module")
def big(tmp_path_factory, prepare_gpt2):
    """A corpus of about two million tokens and its 50-odd shards, prepared with 2 workers."""
    root = tmp_path_factory.mktemp("big")
    for i in range(4):
        write_jsonl(root / f"part{i}.jsonl", make_docs(1500, seed=10 + i, max_words=300), text=True)
    out = root / "reference"
    prepare_gpt2(out, "--input", root / "part*.jsonl", *RUN)
    assert len(shard_bytes(out)) > 10
    return root


def test_one_and_two_workers_give_identical_shards(tmp_path, big, gpt2_tiktoken):
    prepare_data.main(["--input", str(big / "part*.jsonl"), "--out", str(tmp_path / "one"), "--workers", "1",
                       "--tokenizer", str(gpt2_tiktoken), *map(str, RUN)])
    assert shard_bytes(tmp_path / "one") == shard_bytes(big / "reference")


@pytest.fixture
def jsonl_reads(monkeypatch):
    """The names of the .jsonl files prepare_data opens from now on, in order."""
    read, jsonl_texts = [], prepare_data.jsonl_texts

    def reading(path, counts):
        read.append(path.name)
        return jsonl_texts(path, counts)

    monkeypatch.setattr(prepare_data, "jsonl_texts", reading)
    return read


def resume_file(out: Path) -> int:
    """The first source file a rerun would read, as job.json says now (0 before it says anything)."""
    try:
        point = json.loads((out / "job.json").read_text())["resume"]  # replaced atomically: never half-read
    except FileNotFoundError:
        return 0
    return point["file"] if point else 0


def test_resume_after_sigkill_skips_finished_files_and_gives_identical_shards(tmp_path, big, gpt2_tiktoken,
                                                                              prepare_gpt2, jsonl_reads, capsys):
    out = tmp_path / "killed"
    argv = ("--input", big / "part*.jsonl", "--out", out, "--workers", 1, "--tokenizer", gpt2_tiktoken, *RUN)
    proc = subprocess.Popen([sys.executable, "prepare_data.py", *map(str, argv)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while resume_file(out) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-job
        proc.wait()
    assert not (out / "meta.json").exists(), "the run finished before it could be killed"
    skipped = resume_file(out)
    assert skipped >= 2, "the run was killed before two files were in finished shards"
    damaged = tmp_path / "damaged"  # the same killed job, less one shard before its resume point
    shutil.copytree(out, damaged)
    (damaged / "train_000001.bin").unlink()

    read = jsonl_reads
    prepare_gpt2(out, "--input", big / "part*.jsonl", *RUN)
    assert read == [f"part{i}.jsonl" for i in range(skipped, 4)]  # the files before the resume point: not read
    assert shard_bytes(out) == shard_bytes(big / "reference")
    assert not list(out.glob("*.tmp*"))

    read.clear()
    prepare_gpt2(damaged, "--input", big / "part*.jsonl", *RUN)
    assert "do not hold the unfinished job's resume point" in capsys.readouterr().err
    assert read == [f"part{i}.jsonl" for i in range(4)]  # from the start, to put the lost shard back
    assert shard_bytes(damaged) == shard_bytes(big / "reference")


def test_resume_after_a_bad_file_takes_up_a_val_split_spanning_files(tmp_path, prepare_gpt2, jsonl_reads):
    docs = make_docs(60, seed=5)
    src, fixed = tmp_path / "src", tmp_path / "fixed"
    for folder in (src, fixed):
        folder.mkdir()
        for i in range(3):
            write_jsonl(folder / f"p{i}.jsonl", docs[20 * i:20 * i + 20], text=True)
    good = (src / "p2.jsonl").read_bytes()
    (src / "p2.jsonl").write_bytes(b"[" + good[1:])  # not JSON, and the same size as once it is fixed
    run = ("--shard-size", 300, "--val-tokens", 2500)  # val: all of p0 and part of p1
    with pytest.raises(UserError, match="p2.jsonl:1: not valid JSON"):
        prepare_gpt2(tmp_path / "out", "--input", src, *run)
    assert resume_file(tmp_path / "out") == 1
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["resume"]["val"]["fill"] > 0  # val's tokens after its last shard, to be read back from the next
    (src / "p2.jsonl").write_bytes(good)
    jsonl_reads.clear()
    prepare_gpt2(tmp_path / "out", "--input", src, *run)
    assert jsonl_reads == ["p1.jsonl", "p2.jsonl"]
    prepare_gpt2(tmp_path / "reference", "--input", fixed, *run)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "reference")


def unfinished(big: Path, out: Path) -> Path:
    """The reference job's folder as if it had stopped right before writing meta.json."""
    shutil.copytree(big / "reference", out)
    (out / "meta.json").unlink()
    return out


def test_resume_ignores_half_written_and_damaged_files(tmp_path, big, prepare_gpt2):
    out = unfinished(big, tmp_path / "damaged")
    (out / "train_000005.bin").unlink()
    corrupt(out / "train_000002.bin", "truncated body")
    (out / "train_000007.bin.tmp-12345").write_bytes(b"half a shard")
    prepare_gpt2(out, "--input", big / "part*.jsonl", *RUN)
    assert shard_bytes(out) == shard_bytes(big / "reference")
    assert not list(out.glob("*.tmp*"))


def test_finished_job_is_not_redone_and_other_settings_need_overwrite(tmp_path, big, prepare_gpt2, gpt2_tiktoken):
    out = tmp_path / "done"
    shutil.copytree(big / "reference", out)
    argv = ["--input", big / "part*.jsonl", "--out", out, "--tokenizer", gpt2_tiktoken]
    result = run_cli("prepare_data.py", *argv, *RUN)
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert_one_line_error(run_cli("prepare_data.py", *argv, "--shard-size", 100_000, "--val-tokens", 30_000),
                          "--overwrite")
    meta = prepare_gpt2(out, "--input", big / "part*.jsonl", "--shard-size", 100_000, "--val-tokens", 30_000,
                   "--overwrite")
    assert len(shard_bytes(out)) == meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]
    assert np.array_equal(all_tokens(out), all_tokens(big / "reference"))


def test_unfinished_job_with_other_settings_needs_overwrite(tmp_path, big, prepare_gpt2):
    out = unfinished(big, tmp_path / "unfinished")
    (out / "job.json").write_text(json.dumps({"source": "custom", "shard_size": 1}))
    with pytest.raises(UserError, match="unfinished job with other settings"):
        prepare_gpt2(out, "--input", big / "part*.jsonl", *RUN)


# -- the Hub, played by a local server (tests/hub_server.py): downloads, resume, provenance --

FINEWEB = "HuggingFaceFW/fineweb-edu"
HUB_RUN = ("--dataset", "fineweb-edu", "--shard-size", 3000, "--val-tokens", 2000)  # several shards per file


def parquet_bytes(docs) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fineweb_docs():
    """sample-10BT of a small fineweb-edu: four files of documents."""
    return {f"sample/10BT/{i:03d}_00000.parquet": make_docs(100, seed=20 + i, max_words=100) for i in range(4)}


@pytest.fixture(scope="module")
def fineweb_files(fineweb_docs):
    return {path: parquet_bytes(docs) for path, docs in fineweb_docs.items()}


@pytest.fixture(scope="module")
def fineweb_reference(tmp_path_factory, fineweb_files, prepare_gpt2):
    """The shards of those files read from a local copy, in this process: what a run from the Hub must give."""
    root = tmp_path_factory.mktemp("fineweb")
    for path, data in fineweb_files.items():
        (root / "copy" / path).parent.mkdir(parents=True, exist_ok=True)
        (root / "copy" / path).write_bytes(data)
    prepare_gpt2(root / "out", "--hub-path", root / "copy", *HUB_RUN)
    return root / "out"


@pytest.fixture
def hub():
    threads = threading.active_count()
    with HubServer() as server:
        yield server
    assert threading.active_count() == threads  # its thread and every request's are gone, its port closed


@pytest.fixture
def run_hub(tmp_path, gpt2_tiktoken, hub):
    """prepare_data.py in a process of its own against the server, with its own empty Hugging Face cache (the
    Hub's address is read when huggingface_hub is imported, so this process cannot be pointed at it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # HF_HUB_OFFLINE, any token, ...
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    return lambda *argv: run_cli("prepare_data.py", "--tokenizer", gpt2_tiktoken, "--workers", 1, *argv, env=env)


def test_hub_files_are_downloaded_tokenized_and_recorded(tmp_path, hub, run_hub, fineweb_files, fineweb_reference):
    sha = hub.commit(FINEWEB, {**fineweb_files, "README.md": b"---\n---\n",
                               "data/CC-MAIN-2024-10/000_00000.parquet": parquet_bytes(["another subset"])})
    out = tmp_path / "out"
    result = run_hub("--out", out, *HUB_RUN, "--keep-downloads")
    assert result.returncode == 0, result.stderr
    assert shard_bytes(out) == shard_bytes(fineweb_reference)  # as from a local copy
    assert hub.downloads() == sorted(fineweb_files)  # the subset's files, each once, in order; nothing else
    meta = json.loads((out / "meta.json").read_text())
    files = [{"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
             for path, data in sorted(fineweb_files.items())]
    assert meta["provenance"] == {"repo": FINEWEB, "revision": "main", "commit": sha, "subset": "sample-10BT",
                                  "files": files}
    assert all((out / "downloads" / path).read_bytes() == data for path, data in fineweb_files.items())

    hub.log.clear()  # again with another shard size: the kept files are read, not downloaded
    result = run_hub("--out", out, *HUB_RUN, "--shard-size", 5000, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert hub.downloads() == []
    assert np.array_equal(all_tokens(out), all_tokens(fineweb_reference))
    assert not (out / "downloads").exists()  # not kept this time (the default)


def test_failed_download_is_one_line_and_the_rerun_fetches_only_the_rest(tmp_path, hub, run_hub, fineweb_files,
                                                                          fineweb_reference):
    hub.commit(FINEWEB, fineweb_files)
    paths = sorted(fineweb_files)
    hub.fail.add(paths[2])
    out = tmp_path / "out"
    result = run_hub("--out", out, *HUB_RUN)
    assert_one_line_error(result)
    assert re.fullmatch(rf"error: downloading {paths[2]} from {FINEWEB} failed \(.*500.*\); rerun the same "
                        rf"command: it goes on from the files already tokenized\n", result.stderr)
    assert hub.downloads() == paths[:3]
    # The first file's tokens are all in finished shards, the second's last ones still waited for a next shard.
    assert resume_file(out) == 1
    assert not (out / "downloads" / paths[0]).exists() and (out / "downloads" / paths[1]).exists()

    hub.fail.clear()
    hub.log.clear()
    result = run_hub("--out", out, *HUB_RUN)
    assert result.returncode == 0, result.stderr
    # No listing (the job's commit and file list are reused) and nothing about the first two files.
    assert [(method, path) for method, _, _, path in hub.log] == [("HEAD", paths[2]), ("GET", paths[2]),
                                                                  ("HEAD", paths[3]), ("GET", paths[3])]
    assert shard_bytes(out) == shard_bytes(fineweb_reference)
    assert not (out / "downloads").exists()


def test_pinned_revision_is_read_and_recorded_with_its_commit(tmp_path, hub, run_hub, enc, fineweb_docs,
                                                              fineweb_files):
    paths = sorted(fineweb_files)
    old = hub.commit(FINEWEB, {path: fineweb_files[path] for path in paths[:2]}, refs=("v1.0",))
    hub.commit(FINEWEB, fineweb_files)  # main moved on since
    out = tmp_path / "out"
    listing = run_hub("--out", out, *HUB_RUN, "--hub-revision", "v1.0", "--dry-run")
    assert listing.returncode == 0, listing.stderr
    assert f"{FINEWEB} at v1.0 = commit {old}: 2 files" in listing.stdout and paths[2] not in listing.stdout
    assert not out.exists() and hub.downloads() == []

    result = run_hub("--out", out, *HUB_RUN, "--hub-revision", "v1.0")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["hub_revision"] == "v1.0"
    assert (meta["provenance"]["revision"], meta["provenance"]["commit"]) == ("v1.0", old)
    assert [f["path"] for f in meta["provenance"]["files"]] == paths[:2]
    assert np.array_equal(all_tokens(out), expected_tokens(enc, fineweb_docs[paths[0]] + fineweb_docs[paths[1]]))


def test_bookcorpus_reads_the_hubs_parquet_export(tmp_path, hub, run_hub, enc):
    sentences = [f"sentence {i} of the book ." for i in range(prepare_data.BOOKCORPUS_SENTENCES_PER_DOC + 5)]
    hub.commit("bookcorpus/bookcorpus", {"bookcorpus.py": b"# a loading script"})  # main
    export = hub.commit("bookcorpus/bookcorpus", {"plain_text/train/0000.parquet": parquet_bytes(sentences)},
                        refs=("refs/convert/parquet",))
    result = run_hub("--dataset", "bookcorpus", "--out", tmp_path / "out", "--val-tokens", 1)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["provenance"]["revision"], meta["provenance"]["commit"]) == ("refs/convert/parquet", export)
    per_doc = prepare_data.BOOKCORPUS_SENTENCES_PER_DOC
    docs = [" ".join(sentences[:per_doc]), " ".join(sentences[per_doc:])]
    assert np.array_equal(all_tokens(tmp_path / "out"), expected_tokens(enc, docs))

    result = run_hub("--dataset", "bookcorpus", "--hub-path", "nobody/nothing", "--out", tmp_path / "none")
    assert_one_line_error(result, "cannot open dataset nobody/nothing at revision refs/convert/parquet")


# -- the user's mistakes --

def test_cli_user_error_is_one_line_and_exit_code_2(tmp_path):
    result = run_cli("prepare_data.py", "--input", tmp_path / "missing.jsonl", "--out", tmp_path / "out")
    assert_one_line_error(result, "missing.jsonl")
    assert run_cli("prepare_data.py", "--help").returncode == 0


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "ok"}\n\n{"text": broken\n', r"bad.jsonl:3: not valid JSON"),
    ("notext.jsonl", '{"text": "ok"}\n{"title": "no text"}\n', r"notext.jsonl:2: no 'text'"),
    ("list.jsonl", '["text"]\n', r"list.jsonl:1: no 'text'"),
    ("data.csv", "text\nhello\n", r"data.csv: unsupported file type"),
])
def test_bad_input_files(tmp_path, prepare_gpt2, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message):
        prepare_gpt2(tmp_path / "out", "--input", tmp_path / name)


def test_missing_inputs_and_empty_sources(tmp_path, prepare_gpt2):
    with pytest.raises(UserError, match="no such file or folder"):
        prepare_gpt2(tmp_path / "out", "--input", tmp_path / "nope.txt")
    with pytest.raises(UserError, match="no such file or folder"):
        prepare_gpt2(tmp_path / "out", "--input", str(tmp_path / "nope*.jsonl"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(UserError, match="no documents"):
        prepare_gpt2(tmp_path / "out0", "--input", tmp_path / "empty")
    write_parquet(tmp_path / "p" / "x.parquet", ["a"], column="body")
    with pytest.raises(UserError, match="x.parquet: no 'text' column"):
        prepare_gpt2(tmp_path / "out1", "--input", tmp_path / "p")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="junk.parquet: not a readable parquet file"):
        prepare_gpt2(tmp_path / "out2", "--input", tmp_path / "junk.parquet")


def test_invalid_utf8_is_replaced_and_counted(tmp_path, enc, prepare_gpt2, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"caf\xe9 au lait")
    (src / "b.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n')
    meta = prepare_gpt2(tmp_path / "out", "--input", src, "--val-tokens", 0)
    assert meta["invalid_utf8_documents"] == 2
    assert "warning: 2 documents had invalid UTF-8" in capsys.readouterr().err
    docs = ["caf\ufffd au lait", "fine", "bad \ufffd byte"]
    assert np.array_equal(all_tokens(tmp_path / "out"), expected_tokens(enc, docs))


def test_everything_in_val_is_an_error(tmp_path, prepare_gpt2):
    write_jsonl(tmp_path / "c.jsonl", make_docs(5), text=True)
    with pytest.raises(UserError, match="went to the val split; lower --val-tokens"):
        prepare_gpt2(tmp_path / "out", "--input", tmp_path / "c.jsonl", "--val-tokens", 10**9)


def test_vocab_beyond_uint16_is_refused(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", make_docs(5), text=True)
    with pytest.raises(UserError, match="vocab size 70000"):
        prepare(tmp_path / "out", "--input", tmp_path / "c.jsonl", "--train-tokenizer", "--vocab-size", 70000)
    big_vocab = tmp_path / "big.tiktoken"
    big_vocab.write_bytes(b"".join(b"%s %d\n" % (base64.b64encode(bytes([b])), b) for b in range(256)))
    (tmp_path / "big.json").write_text(json.dumps({"pat_str": r"\S+|\s+", "special_tokens": {"<|endoftext|>": 70000}}))
    with pytest.raises(UserError, match="65536"):
        prepare(tmp_path / "out", "--input", tmp_path / "c.jsonl", "--tokenizer", big_vocab)
    assert not (tmp_path / "out").exists()  # both refused before any work
