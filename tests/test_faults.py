"""Faults and bad input, end to end: a real SIGKILL in the middle of a checkpoint save, a real full disk (a tiny
tmpfs, or an injected ENOSPC where mounting is not allowed), corrupt and hostile files through the CLIs, and
--help from every script. Each bad input must exit 2 with one line on stderr that names the file and the fix.

Cases tested elsewhere are not repeated here: kill -9 and SIGTERM during training (test_train.py), kill -9 during
prepare_data.py, bad shards and bad source files in-process (test_data.py), hostile pickles, corrupt and
misshapen weights in-process (test_model.py), generation options (test_generate.py).
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import shards
import export_hf
import markov
import train
from shards import read_shard, write_shard
from errors import UserError, run_main
from helpers import (TINY, Exploit, assert_one_line_error, corrupt, in_process, make_docs, read_log, run_cli,
                     run_train, start_train, write_jsonl)


def complete_checkpoints(out: Path) -> list[str]:
    """list_checkpoints, after checking that each holds all of its files and loads."""
    found = checkpoint.list_checkpoints(str(out))
    for ckpt in found:
        assert sorted(os.listdir(ckpt)) == ["config.json", "model.safetensors", "state.pt"], ckpt
        assert checkpoint.load_train_state(ckpt)["step"] == int(ckpt.rsplit("_", 1)[1])
        checkpoint.load_model(ckpt)
    return found


def leftovers(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith(".ckpt_") or ".tmp" in n)


# ---- kill -9 while a checkpoint is being written ----


def files_in(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:  # renamed or removed meanwhile
        return []


def kill_during_a_save(out: Path, *flags, timeout: float = 120):
    """Train into out; once a checkpoint is complete, SIGKILL it as soon as the next save has written a file into
    its temporary folder. Returns that folder's name if it outlived the process (the kill hit the save), else None."""
    proc = start_train(*flags, "--out-dir", out)
    caught, deadline = None, time.time() + timeout
    try:
        while caught is None and proc.poll() is None and time.time() < deadline:
            names = files_in(out)
            if any(checkpoint.NAME_RE.match(n) for n in names):
                tmp = next((n for n in names if n.startswith(".ckpt_") and ".tmp-" in n), None)
                if tmp and files_in(out / tmp):
                    proc.send_signal(signal.SIGKILL)
                    caught = tmp
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    return caught if caught and (out / caught).is_dir() else None


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(tmp_path, markov_dir):
    # 1.6M parameters: a save writes ~20 MB (weights, Adam moments) and fsyncs them, a window of tens of ms.
    common = [*TINY, "--n-head", 4, "--n-embd", 256, "--data-dir", markov_dir, "--max-steps", 12,
              "--checkpoint-interval", 3, "--keep-checkpoints", 2, "--dropout", 0.1]
    run_train(*common, "--out-dir", tmp_path / "full")

    for attempt in range(5):  # the poll can miss the window; a fresh run tries again
        out = tmp_path / f"killed{attempt}"
        caught = kill_during_a_save(out, *common)
        if caught:
            break
    else:
        pytest.fail("five runs finished their saves before the kill landed")

    killed_step = int(caught.split(".")[1].removeprefix("ckpt_"))
    found = complete_checkpoints(out)
    assert found and all(int(c.rsplit("_", 1)[1]) < killed_step for c in found), (found, caught)
    assert checkpoint.find_checkpoint(str(out)) == found[-1]  # never the half-written folder, though newer
    model, _ = checkpoint.load_model(str(out))
    assert model.config.n_embd == 256

    run_train(*common, "--out-dir", out, "--resume")
    assert read_log(out, "loss") == read_log(tmp_path / "full", "loss")
    assert leftovers(out) == []  # the next save swept the killed one's folder


# ---- a full disk: a real one on a tiny tmpfs, and an injected ENOSPC that needs no mount ----


@pytest.fixture
def tiny_disk(tmp_path):
    """mount(size) -> a folder on a fresh tmpfs of that size; resize(size) grows it. Skips where mount is denied."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(where)
        return where

    def resize(size: str):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    mount.resize = resize
    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_full_disk_while_training_saves_then_resume_after_making_room(tmp_path, tiny_disk, markov_dir):
    out = tiny_disk("4m") / "run"  # a checkpoint here is about 1.2 MB; all are kept, so the fourth cannot fit
    common = [*TINY, "--data-dir", markov_dir, "--out-dir", out, "--max-steps", 8,
              "--checkpoint-interval", 1, "--keep-checkpoints", 0, "--log-interval", 100]
    result = run_train(*common, check=False)
    assert_one_line_error(result, "cannot write checkpoint", "No space left on device",
                          out, "--out-dir")
    found = complete_checkpoints(out)
    assert 1 <= len(found) < 8 and leftovers(out) == []
    assert f"ckpt_{len(found) + 1:07d}" in result.stderr  # the failed one is named, the earlier ones load

    tiny_disk.resize("64m")
    run_train(*common, "--resume")
    assert complete_checkpoints(out)[-1].endswith("ckpt_0000008")


@pytest.mark.slow
def test_full_disk_while_writing_shards_then_rerun_completes(tmp_path, tiny_disk, gpt2_tiktoken):
    write_jsonl(tmp_path / "docs.jsonl", make_docs(600, seed=5, max_words=120), text=True)
    argv = ["--input", tmp_path / "docs.jsonl", "--tokenizer", gpt2_tiktoken, "--shard-size", 10_000,
            "--val-tokens", 2_000, "--workers", 1]
    prepare = lambda out: run_cli("prepare_data.py", *argv, "--out", out)
    assert prepare(tmp_path / "reference").returncode == 0
    reference = {p.name: p.read_bytes() for p in (tmp_path / "reference").glob("*.bin")}
    assert len(reference) >= 6

    # Room for the copied tokenizer and about half the shards (each ~20 kB, 5 pages of 4 kB).
    tokenizer_bytes = sum(p.stat().st_size for p in (tmp_path / "reference").glob("tokenizer.*"))
    out = tiny_disk(f"{tokenizer_bytes // 1024 + 8 + 10 * len(reference)}k") / "data"
    result = prepare(out)
    assert_one_line_error(result, "cannot write shard", out, "No space left on device",
                          "rerun prepare_data.py")
    written = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    assert 0 < len(written) < len(reference)
    assert all(reference[name] == data for name, data in written.items())  # the earlier shards are intact
    assert not list(out.glob("*.tmp*")) and not (out / "meta.json").exists()

    tiny_disk.resize("16m")
    result = prepare(out)
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.bin")} == reference


def test_injected_full_disk_while_saving_a_checkpoint(random_gpt, tmp_path, monkeypatch):
    """The errors torch and safetensors really raise on ENOSPC (seen on a full tmpfs), not OSError."""
    from safetensors import SafetensorError

    model = random_gpt()
    first = checkpoint.save_checkpoint(str(tmp_path), 1, model, "gpt2", {"step": 1})
    before = {name: Path(first, name).read_bytes() for name in os.listdir(first)}

    def safetensors_full(tensors, path):
        Path(path).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def torch_full(obj, f):
        f.write(b"half")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:  # torch's stream writer reports the failed write as this, chained to the OSError
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    for module, name, fake in ((checkpoint, "save_file", safetensors_full), (torch, "save", torch_full)):
        with monkeypatch.context() as m:
            m.setattr(module, name, fake)
            with pytest.raises(UserError, match=r"cannot write checkpoint .*ckpt_0000002: .*No space left on device"
                                                r".*--out-dir \(earlier checkpoints are intact\)"):
                checkpoint.save_checkpoint(str(tmp_path), 2, model, "gpt2", {"step": 2})
        assert checkpoint.list_checkpoints(str(tmp_path)) == [first] and leftovers(tmp_path) == []
        assert {name: Path(first, name).read_bytes() for name in os.listdir(first)} == before


def test_injected_full_disk_while_writing_a_shard(tmp_path, monkeypatch):
    first = tmp_path / "train_000000.bin"
    write_shard(str(first), np.arange(100, dtype=np.uint16))
    real_open = open

    class FullDisk:
        """A file that takes half of each write, then reports the disk full, as write(2) does."""

        def __init__(self, *args):
            self.f = real_open(*args)

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    with monkeypatch.context() as m, pytest.raises(
            UserError, match=r"cannot write shard .*train_000001.bin: No space left on device; make room and rerun "
                             r"prepare_data.py"):
        m.setattr(shards, "open", FullDisk, raising=False)
        write_shard(str(tmp_path / "train_000001.bin"), np.arange(100, dtype=np.uint16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_000000.bin"]  # no half shard, no .tmp
    assert np.array_equal(read_shard(str(first)), np.arange(100))


def test_any_other_full_disk_write_is_one_line_too(tmp_path, capsys):
    """A full disk can hit any write (log.jsonl, meta.json, loss.png): run_main makes each one line, naming the file;
    other OS errors are bugs or are handled where they happen, and keep their traceback."""
    def full(filename=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    with pytest.raises(SystemExit) as e:
        run_main(lambda: full("out/meta.json"))
    result = subprocess.CompletedProcess([], e.value.code, "", capsys.readouterr().err)
    assert_one_line_error(result, "No space left on device writing out/meta.json", "make room")
    with pytest.raises(IsADirectoryError):
        run_main(lambda: open(tmp_path, "w"))


# ---- bad data through train.py's CLI ----


@pytest.mark.parametrize("how, message", [("magic", "wrong magic"), ("version", "version 2"),
                                          ("truncated body", "truncated"), ("count disagrees", "header says")])
def test_corrupt_shard_through_train_cli(tmp_path, monkeypatch, capsys, how, message):
    markov.write_data(tmp_path / "data", n_train=5_000, n_val=2_000)
    corrupt(tmp_path / "data" / "train_000000.bin", how)
    result = in_process(monkeypatch, capsys, train, *TINY, "--data-dir", tmp_path / "data",
                        "--out-dir", tmp_path / "out", "--max-steps", 1)
    assert_one_line_error(result, message, tmp_path / "data" / "train_000000.bin", "re-run prepare_data.py")


@pytest.mark.slow
def test_token_ids_beyond_the_vocabulary_through_train_cli(tmp_path):
    markov.write_data(tmp_path / "data", vocab=8, n_train=5_000, n_val=2_000)
    meta = tmp_path / "data" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "vocab_size": 5}))  # ids 5..7 do not fit
    result = run_train(*TINY, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out", "--max-steps", 5,
                       check=False)
    assert_one_line_error(result, ">= vocab size 5", "train_000000.bin",
                          "prepared with a different tokenizer")


# ---- config and flags of train.py (--total-batch-size, devices, unknown options: test_train.py) ----


@pytest.mark.parametrize("flags, message", [
    (["--config", "gpt9"], "neither a preset"),
    (["--config", "{bad}.json"], "it must be a JSON object"),
    (["--batch-size", 0], "batch_size (--batch-size) must be at least 1"),
    (["--block-size", 0], "block_size (--block-size) must be at least 1"),
    (["--n-head", 3], "n_embd 64 is not a multiple of n_head 3"),
    (["--dropout", 1.5], "dropout must be in [0, 1)"),
])
def test_bad_config_through_train_cli(tmp_path, markov_dir, monkeypatch, capsys, flags, message):
    flags = [str(tmp_path / f) if str(f).endswith(".json") else f for f in flags]
    (tmp_path / "{bad}.json").write_text('{"n_layer": 2,}')
    result = in_process(monkeypatch, capsys, train, *TINY, "--data-dir", markov_dir, "--out-dir", tmp_path / "out",
                        "--max-steps", 1, *flags)
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, message", [("cuda", "no CUDA GPU"), ("tpu9", "unknown device 'tpu9'")])
@pytest.mark.parametrize("script", ["generate", "hellaswag"])  # train.py's: test_train.py
def test_unavailable_or_unknown_device(tmp_path, monkeypatch, capsys, script, device, message):
    import importlib

    result = in_process(monkeypatch, capsys, importlib.import_module(script), "--device", device,
                        "--checkpoint", tmp_path)
    assert_one_line_error(result, message, "use --device cpu" if device == "cuda" else "use auto, cpu")


def test_hellaswag_ending_longer_than_the_context_window(gpt2_tiktoken):
    """Block size vs the position table, per script: train.py --resume with a larger one is a config mismatch
    (above); generate.py crops the prompt (test_generate.py); hellaswag.py cuts long contexts (test_hellaswag.py),
    and an ending that alone fills the window cannot be scored: that is an error."""
    import hellaswag
    from tokenizer import load_tokenizer

    enc = load_tokenizer(str(gpt2_tiktoken))
    ex = {"ctx": "A man sits.", "endings": ["a b c d e f g h"] + ["x"] * 3, "label": 0}
    assert len(hellaswag.encode(enc, ex, 10)[0]) == 2  # the context loses its oldest tokens to fit
    with pytest.raises(UserError, match="an ending of 8 tokens does not fit block_size 8"):
        hellaswag.encode(enc, ex, 8)


# ---- bad checkpoints: through train.py --resume and the scripts that load a model ----


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder with one checkpoint (step 2) of the TINY model, and the data it was trained on."""
    root = tmp_path_factory.mktemp("trained")
    markov.write_data(root / "data", n_train=5_000, n_val=2_000)
    run_train(*TINY, "--data-dir", root / "data", "--out-dir", root / "run", "--max-steps", 2)
    assert checkpoint.list_checkpoints(str(root / "run"))[-1].endswith("ckpt_0000002")
    return root


def damage(ckpt: Path, how: str):
    weights = ckpt / "model.safetensors"
    if how == "corrupt weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "weights of another shape":
        tensors = load_file(weights)
        tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:16].clone()
        save_file(tensors, weights)
    elif how == "no state.pt":
        (ckpt / "state.pt").unlink()
    elif how == "config.json not JSON":
        (ckpt / "config.json").write_text("{")


@pytest.mark.parametrize("how, flags, message", [
    ("corrupt weights", [], "model.safetensors: "),
    ("weights of another shape", [], "transformer.wpe.weight (16, 64) does not fit"),
    ("no state.pt", [], "has no state.pt"),
    ("config.json not JSON", [], "config.json: "),
    # A longer context than the checkpoint's position table is another model: the config mismatch.
    ("nothing", ["--block-size", 64, "--total-batch-size", 256], "block_size: 32 there, 64 now"),
])
def test_resume_from_a_bad_checkpoint_is_one_line(trained, tmp_path, monkeypatch, capsys, how, flags, message):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    damage(run / "ckpt_0000002", how)
    result = in_process(monkeypatch, capsys, train, *TINY, "--data-dir", trained / "data", "--out-dir", run,
                        "--max-steps", 4, "--resume", *flags)
    assert_one_line_error(result, message, run / "ckpt_0000002")


@pytest.mark.slow
def test_resume_never_unpickles_code(trained, tmp_path):
    """A state.pt crafted to create a file when unpickled, through the real CLI: refused, and no file."""
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    marker = tmp_path / "pwned"
    torch.save({"step": Exploit(marker)}, run / "ckpt_0000002" / "state.pt")
    result = run_train(*TINY, "--data-dir", trained / "data", "--out-dir", run, "--max-steps", 4, "--resume",
                       check=False)
    assert_one_line_error(result, "refusing", run / "ckpt_0000002" / "state.pt")
    assert not marker.exists()


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_missing_or_empty_checkpoint_folder(tmp_path, monkeypatch, capsys, folder):
    source = tmp_path / folder
    if folder == "empty":
        source.mkdir()
        with pytest.raises(UserError, match="no checkpoint in .*train one with train.py"):
            checkpoint.load_model(str(source))
    assert_one_line_error(in_process(monkeypatch, capsys, export_hf, source, tmp_path / "hf"), source)
    assert not (tmp_path / "hf").exists()


# ---- every script answers --help; an unknown option is refused without a traceback ----

SCRIPTS = ["train", "prepare_data", "generate", "hellaswag", "export_hf", "plot", "bench", "config"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    result = run_cli(f"{script}.py", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_an_unknown_option(script, monkeypatch, capsys):
    import importlib

    result = in_process(monkeypatch, capsys, importlib.import_module(script), "--no-such-option")
    # argparse's own error is a usage line, then the error; train.py's is one line (test_train.py).
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr, result.stderr
