"""What several test files share, as plain functions: running the scripts and checking how they fail, small
train.py runs, and the inputs the tests make (documents, damaged shards, hostile pickles). Fixtures are in
conftest.py."""
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
from errors import run_main

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone")


# ---- running the scripts

def run_cli(script: str, *args, launcher=(sys.executable,), timeout: float = 600, env=None):
    """A script of the repo root in a process of its own, from the root: its CompletedProcess, output as text.
    The timeout only guards against a hang."""
    return subprocess.run([*launcher, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def in_process(monkeypatch, capsys, module, *argv) -> subprocess.CompletedProcess:
    """module.main() as its CLI runs it (run_main, argv from sys.argv) without an interpreter start, as a
    CompletedProcess. Only for inputs that fail before training starts; an unexpected exception fails the test
    like a traceback."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(SystemExit) as e:
            run_main(module.main)
    finally:  # train.py installs its own handlers once it trains; pytest keeps its own
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, e.value.code, out.out, out.err)


def assert_one_line_error(result, *needles):
    """Exit code 2 and exactly one line on stderr, no traceback: "error: ..." with each needle (the file, the fix)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    for needle in needles:
        assert str(needle) in result.stderr, (needle, result.stderr)


# ---- train.py

# Milliseconds a step: 2 layers of width 64 on 32-token windows in float32, no hooks, and a given peak FLOP/s
# (no timed matmul at start-up to measure it).
SMALL = ["--device", "cpu", "--dtype", "float32", "--n-layer", 2, "--n-head", 2, "--n-embd", 64, "--block-size", 32,
         "--pad-vocab-multiple", 1, "--log-interval", 1, "--eval-interval", 0, "--hellaswag-interval", 0,
         "--sample-interval", 0, "--warmup-steps", 5, "--learning-rate", 3e-3, "--peak-flops", 1e12]
TINY = [*SMALL, "--batch-size", 4, "--total-batch-size", 4 * 32]  # one micro step of 4 windows
COMMON = [*SMALL, "--batch-size", 4, "--total-batch-size", 4 * 32 * 2]  # two micro steps


def run_train(*flags, torchrun: int = 0, check: bool = True, env=None):
    """train.py with flags, on that many processes under torchrun if torchrun; check: a failure raises, with the
    end of its output."""
    launcher = (*TORCHRUN, f"--nproc_per_node={torchrun}") if torchrun else (sys.executable,)
    if torchrun:
        env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    result = run_cli("train.py", *flags, launcher=launcher, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def start_train(*flags, torchrun: int = 0, **popen) -> subprocess.Popen:
    """train.py started and left running (to be killed), its output thrown away unless popen says otherwise. It
    leads a process group of its own, so that os.killpg reaches every rank under torchrun."""
    launcher = [*TORCHRUN, f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    return subprocess.Popen([*launcher, "train.py", *map(str, flags)], cwd=REPO, start_new_session=True, **popen)


def kill_once_saved(proc: subprocess.Popen, ckpt: Path, timeout: float = 300):
    """kill -9 the run proc (and its ranks) once ckpt exists (it may have run on a little); fails if the run ended
    first."""
    deadline = time.time() + timeout
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError):  # it may have ended already
        if os.getpgid(proc.pid) == proc.pid:  # a group of its own (start_train): torchrun and its ranks
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def kill_and_resume(out: Path, step: int, *flags, torchrun: int = 0, timeout: float = 120):
    """train.py with flags in out, killed with kill -9 once it has saved ckpt_<step>, then run again with
    --resume to its end: the resumed run's result."""
    proc = start_train(*flags, "--out-dir", out, torchrun=torchrun)
    kill_once_saved(proc, out / checkpoint.checkpoint_name(step), timeout)
    return run_train(*flags, "--out-dir", out, "--resume", torchrun=torchrun)


def read_log(out: Path, key: str) -> dict:
    """{step: value} of key in out/log.jsonl."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def cut_back_to(out: Path, step: int):
    """A run killed right after saving ckpt_<step>: the later checkpoints never happened."""
    for path in checkpoint.list_checkpoints(str(out)):
        if checkpoint.load_train_state(path)["step"] > step:
            shutil.rmtree(path)


# ---- inputs

def shared_data(name: str) -> Path:
    """A file of the read-only data folder beside the repo, or a skip: a fresh clone has no such folder."""
    path = REPO.parent / "shared" / "data" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (it lives next to the repo, not in a fresh clone)")
    return path


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh LayerNorms are 1 and 0 and fresh biases 0: nudge every tensor so a mix-up of any of them shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def hf_gpt2(folder):
    """transformers' GPT-2 from a Hugging Face folder, in eval mode: the reference our model is checked against."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder).eval()


WORDS = "the a cat dog sat ran on under mat tree naïve café 日本語 😀 42 1999 don't it's".split()


def make_docs(n, seed=0, max_words=80) -> list[str]:
    """n documents of random words, with the accents, emoji, CJK and whitespace runs where tokenizers differ."""
    rng = random.Random(seed)
    seps = [" ", " ", " ", "\n", "  ", "\t", ", ", ".\n\n"]
    return ["".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(rng.randint(1, max_words)))
            for _ in range(n)]


def write_jsonl(path: Path, rows, text: bool = False) -> str:
    """rows as a .jsonl file, its path returned: a dict as a JSON line, a str as it is (a line meant to be bad).
    text=True: each row is a document's text, as prepare_data.py reads it ({"text": row, "id": i})."""
    if text:
        rows = [{"text": row, "id": i} for i, row in enumerate(rows)]
    lines = (row if isinstance(row, str) else json.dumps(row) for row in rows)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def corrupt(path: Path, how: str):
    """Damage a shard the way disks and interrupted copies do."""
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[0:4] = (123).to_bytes(4, "little")
    elif how == "version":
        data[4:8] = (2).to_bytes(4, "little")
    elif how == "truncated body":
        data = data[:-2]
    elif how == "count disagrees":
        data += b"\0\0"
    elif how == "short header":
        data = data[:100]
    path.write_bytes(bytes(data))


class Exploit:
    """Unpickling this would create `path`: what a hostile checkpoint would do with a more harmful call."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")
