"""Benchmark the kit's hot paths on this machine and write the figures, with the command that made them, to
BENCHMARKS.md.

    python bench.py                               # every section at full size (see BENCHMARKS.md for how long)
    python bench.py --quick                       # tiny sizes, about a minute: a smoke test of the benchmark
    python bench.py --only generate,hellaswag     # a subset; the other sections of the file are kept
    python bench.py --threads 1                   # on a machine busy with other work (see BENCHMARKS.md)

Every figure is the median of timed repeats after a warm-up, with its spread (min-max), beside a baseline timed
in the same run: the candidates take turns repeat by repeat, so a change in the machine's load slows them
alike and their ratio holds on a busy machine. Nothing here is a test; a missed target just reads "no".
"""
import argparse
import contextlib
import copy
import datetime
import gc
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import checkpoint
import distributed
import export_hf
import generate
import hellaswag
import markov
import plot
import hardware
from atomic import write_file
from config import PRESETS, GPTConfig, TrainConfig, fill_schedule_defaults
from dataloader import DataLoader, DeviceBatches, read_data_meta
from errors import UserError, run_main
from evaluate import evaluate_loss
from model import GPT, estimate_mfu
from optimizer import build_optimizer, build_scaler
from log import read_log
from schedule import lr_at
from shards import write_shard
from tinytales import generate_stories
from tokenizer import load_tokenizer, train_tokenizer
from train import train_step

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parent / "shared" / "data"  # read-only data beside the repo; absent in a fresh clone
MB = 2**20


# ---------------------------------------------------------------- timing, memory, rows

@dataclass
class Stat:
    first: float  # seconds of the first call: compilation, allocation, caches
    times: list  # seconds of each timed repeat
    mem: Optional[float] = None  # most memory a timed repeat added to what was in use before it, bytes

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def rate(self, work: float) -> float:
        return work / self.median

    def spread(self, work: float) -> str:
        return f"{num(work / max(self.times))}-{num(work / min(self.times))}"


@dataclass
class Row:
    name: str
    value: str
    spread: str = ""
    details: str = ""
    ratio: str = ""
    target: str = ""
    meets: Optional[bool] = None  # None: no target


def num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def judged(ratio: float, target: float) -> dict:
    return dict(ratio=f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.2f}x", target=f">= {target:g}x",
                meets=ratio >= target)


def interleaved(fns: dict, warmup: int, repeats: int, sync, memory: Optional["Bench"] = None) -> dict:
    """{name: Stat} of each fn called warmup + repeats times, the fns taking turns call by call; sync() ends each
    call's clock (the device's queue, or a barrier of every rank). memory: a Bench, to take what each call adds."""
    times, mems = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(warmup + repeats):
        for k, fn in fns.items():
            before = memory and memory.memory_now()
            start = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - start)
            mems[k].append(None if before is None else memory.memory_peak() - before)
    return {k: Stat(t[0], t[warmup:], None if mems[k][0] is None else max(mems[k][warmup:]))
            for k, t in times.items()}


class Bench:
    """What every section shares: the device, the sizes (full or --quick), a scratch folder, lazily built data."""

    def __init__(self, args):
        self.device = hardware.pick_device(args.device)
        hardware.configure(self.device)  # as train.py does: TF32 on CUDA, the CPU's allocator
        self.quick, self.nanogpt = args.quick, args.nanogpt
        self.out = Path(args.out)  # the report; figures go beside it
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        # Compile times from an empty cache, as a first run sees them, not from whatever the last run left.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.tmp / "inductor")
        self.memo = {}

    def q(self, full, quick):
        return quick if self.quick else full

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory_now(self) -> Optional[int]:
        """Bytes in use now, after forgetting the peak so far: allocated on CUDA, resident (RSS) on Linux CPUs."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux: reset VmHWM (the peak RSS) to the current RSS
            return proc_status(os.getpid(), "VmRSS")
        except OSError:  # not Linux: no per-step peak on this platform
            return None

    def memory_peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return proc_status(os.getpid(), "VmHWM")

    def interleaved(self, fns: dict, warmup: int, repeats: int) -> dict:
        """{name: Stat} of each fn called warmup + repeats times, the fns taking turns call by call."""
        return interleaved(fns, warmup, repeats, self.sync, memory=self)

    def markov_data(self) -> str:
        """A data folder of a random Markov chain (markov.py): learnable, and cheap to make."""
        if "markov" not in self.memo:
            folder = self.tmp / "markov"
            markov.write_data(folder, vocab=512, n_train=self.q(1_500_000, 100_000), n_val=self.q(100_000, 20_000),
                              concentration=0.1)
            self.memo["markov"] = str(folder)
        return self.memo["markov"]

    def tinytales_data(self, tokens: int) -> Path:
        """A data folder of about `tokens` tokens of tinytales with its own tokenizer, as prepare_data.py makes it:
        documents of a few hundred tokens, each after an <|endoftext|>."""
        if ("tinytales", tokens) not in self.memo:
            folder = self.tmp / f"tinytales-{tokens}"
            run([sys.executable, "prepare_data.py", "--dataset", "tinytales", "--out", str(folder),
                 "--tinytales-tokens", str(tokens), "--val-tokens", "50000"])
            self.memo[("tinytales", tokens)] = folder
        return self.memo[("tinytales", tokens)]

    def offline_tokenizer(self, docs: list, try_cache: bool = True) -> str:
        """GPT-2's tokenizer where it can be read offline, else one of 4,096 tokens trained on docs. try_cache:
        look in tiktoken's cache too, which downloads when it is empty (a machine cut off from the network may
        hang there for minutes)."""
        spec = self.gpt2_tokenizer()
        if spec == "gpt2" and not (try_cache and tiktoken_gpt2_cached()):
            spec = str(self.tmp / "tinytales.tiktoken")
            train_tokenizer(iter(docs), 4096, spec)
        return spec

    def random_gpt2_data(self) -> str:
        """A data folder of uniformly random tokens of GPT-2's vocabulary: GPT-2's shapes, for speed alone."""
        if "random" not in self.memo:
            folder = self.tmp / "random-gpt2"
            folder.mkdir()
            rng = np.random.default_rng(0)
            for split, n in (("train", 8_000_000), ("val", 200_000)):
                write_shard(str(folder / f"{split}_000000.bin"), rng.integers(0, 50257, n, dtype=np.uint16))
            (folder / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256,
                                                          "source": "random"}))
            self.memo["random"] = str(folder)
        return self.memo["random"]

    def gpt2_tokenizer(self) -> str:
        """GPT-2's ranks from the shared data folder when present (offline), else tiktoken's (downloaded once)."""
        path = SHARED_DATA / "gpt2.tiktoken"
        return str(path) if path.is_file() else "gpt2"


def proc_status(pid: int, key: str) -> int:
    """A memory figure of /proc/<pid>/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


# ---------------------------------------------------------------- 1. training step

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}


class Trainer:
    """One setting (dtype, compile) of one model: step() is train.py's train_step of `accum` micro batches of
    `batch` rows, on the Markov data unless given a data folder."""

    def __init__(self, b: Bench, cfg: GPTConfig, batch: int, init: dict, dtype, compile_on: bool, tcfg,
                 data: Optional[str] = None, accum: int = 1):
        self.b, self.dtype, self.tcfg, self.data = b, dtype, tcfg, data or b.markov_data()
        self.raw = GPT(cfg).to(b.device)
        self.raw.load_state_dict(init)
        self.model = torch.compile(self.raw) if compile_on else self.raw
        self.optimizer = build_optimizer(self.raw, tcfg, b.device)
        self.scaler = build_scaler(dtype, b.device)
        self.batch, self.block_size, self.accum = batch, cfg.block_size, accum
        self.batches = DeviceBatches(DataLoader(self.data, "train", batch, cfg.block_size), b.device)
        self.step_count = 0

    def step(self):
        lr = lr_at(self.step_count, self.tcfg)
        loss, _ = train_step(self.model, self.optimizer, self.scaler, self.batches, self.accum, lr,
                             self.tcfg.grad_clip, self.dtype)
        self.step_count += 1
        return loss.item()  # train.py waits for the loss only at log steps; the timing must include the step

    def val_loss(self) -> float:
        loader = DataLoader(self.data, "val", self.batch, self.block_size)
        return evaluate_loss(self.raw, loader, 4, self.b.device, torch.float32)  # fp32 for every setting


def train_settings(b: Bench, fields: dict, batch: int, settings: list, warmup: int, repeats: int):
    """Train every setting from the same init on the same batches, steps interleaved; (cfg, stats, val losses)."""
    cfg = GPTConfig(**fields)
    tcfg = fill_schedule_defaults(TrainConfig(learning_rate=1e-3, warmup_steps=5, max_steps=warmup + repeats))
    torch.manual_seed(0)
    init = GPT(cfg).state_dict()
    trainers = {(dtype, comp): Trainer(b, cfg, batch, init, dtype, comp, tcfg) for dtype, comp in settings}
    stats = b.interleaved({k: t.step for k, t in trainers.items()}, warmup, repeats)
    return cfg, stats, {k: t.val_loss() for k, t in trainers.items()}


def train_shapes(b: Bench) -> dict:
    tiny = {k: v for k, v in PRESETS["tiny"].items() if k in GPTConfig.__dataclass_fields__}
    shapes = {  # name: (model fields, micro batch)
        "tiny preset": (tiny, PRESETS["tiny"]["batch_size"]),
        "6x384 reference": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304), 8),
        "GPT-2 124M, block 256": (dict(PRESETS["gpt2"], block_size=256, vocab_size=50257), 4),
    }
    if b.quick:  # the same code paths on a model of a few thousand weights (and the real vocabularies)
        shapes = {k: (dict(f, n_layer=1, n_head=2, n_embd=64, block_size=32), 2) for k, (f, _) in shapes.items()}
    return shapes


def bench_train(b: Bench):
    dtypes = [torch.float32, torch.bfloat16]
    settings = [(d, c) for c in ([False] if b.quick else [False, True]) for d in dtypes]
    # The best of a few tries: on a busy machine a single one understates what the device can do.
    peak = {d: max(hardware.measure_matmul_flops(b.device, d, *b.q((2048, 1.0), (512, 0.1))) for _ in range(3))
            for d in dtypes}
    datasheet = {d: hardware.peak_flops(b.device, d) for d in dtypes} if b.device.type == "cuda" else {}
    for d in dtypes:
        yield Row(f"matmul peak, {DTYPE_NAMES[d]}", f"{peak[d] / 1e9:,.0f} GFLOP/s",
                  details=f"measured ({'512' if b.quick else '2048'}^3 matmul); MFU below is against it",
                  ratio="" if d == torch.float32 else f"{peak[d] / peak[torch.float32]:.1f}x fp32")
    if b.quick:
        print("train: --quick leaves out torch.compile (compiling takes minutes on a few cores)")
    for shape, (fields, batch) in train_shapes(b).items():
        reference = shape.startswith("6x384")  # the baseline of the targets
        warmup, repeats = b.q((4, 20) if reference else (3, 6), (1, 3))
        cfg, stats, val = train_settings(b, fields, batch, settings, warmup, repeats)
        tokens = batch * cfg.block_size
        base = stats[(torch.float32, False)].rate(tokens)
        for (dtype, comp), st in stats.items():
            tps = st.rate(tokens)
            mfu = [f"MFU {estimate_mfu(cfg, cfg.block_size, tps, peak[dtype]):.1%} of measured peak"]
            if datasheet.get(dtype):
                mfu.append(f"{estimate_mfu(cfg, cfg.block_size, tps, datasheet[dtype]):.1%} of datasheet")
            mem = f"step peak +{st.mem / MB:,.0f} MB" if st.mem is not None else ""
            compiled = f"compile + first step {st.first:.0f} s (excluded; empty cache)" if comp else ""
            details = "; ".join(filter(None, [*mfu, mem, f"val loss {val[(dtype, comp)]:.3f}", compiled]))
            name = f"{shape}: {DTYPE_NAMES[dtype]}, {'compiled' if comp else 'eager'}"
            row = Row(name, f"{num(tps)} tok/s", st.spread(tokens), details, f"{tps / base:.2f}x")
            if reference and not comp and dtype == torch.float32:
                row.target = ">= 650 tok/s (a well-written fp32 GPT on the 2-core dev CPU, quiet)"
                row.meets = None if b.quick else tps >= 650
            yield row
        best = max(stats, key=lambda k: stats[k].rate(tokens))
        best_name = f"{DTYPE_NAMES[best[0]]}, {'compiled' if best[1] else 'eager'}"
        ratio = stats[best].rate(tokens) / base
        yield Row(f"{shape}: best ({best_name}) over fp32 eager", f"{num(stats[best].rate(tokens))} tok/s",
                  details=f"{batch} x {cfg.block_size} tokens per step",
                  **(judged(ratio, 2) if reference else dict(ratio=f"{ratio:.2f}x")))
        if reference:
            v0, v1 = val[(torch.float32, False)], val[best]
            yield Row(f"{shape}: equal loss, {warmup + repeats} steps, same init and batches",
                      f"{v1:.4f} vs {v0:.4f}", details=f"val loss (fp32 eval) of {best_name} vs fp32 eager",
                      ratio=f"{v1 / v0:.4f}", target="within 1%", meets=abs(v1 / v0 - 1) <= 0.01)
        if shape == "tiny preset":
            b.memo["tiny_steps_per_sec"] = stats[best].rate(1)


# ---------------------------------------------------------------- 2. data loading

def bench_data(b: Bench):
    fields, batch = train_shapes(b)["tiny preset"]
    if b.memo.get("tiny_steps_per_sec") is None:  # the train section did not run: time the tiny step now
        settings = [(torch.float32, False), (torch.bfloat16, False)]
        _, stats, _ = train_settings(b, fields, batch, settings, 2, b.q(5, 2))
        b.memo["tiny_steps_per_sec"] = max(s.rate(1) for s in stats.values())
    demand = b.memo["tiny_steps_per_sec"]
    loader = DataLoader(b.markov_data(), "train", batch, fields["block_size"])
    calls = b.q(500, 50)
    st = b.interleaved({"load": lambda: [loader.next_batch() for _ in range(calls)]}, 1, b.q(7, 3))["load"]
    rate = st.rate(calls)
    yield Row(f"DataLoader.next_batch, {batch} x {fields['block_size']} tokens", f"{num(rate)} batches/s",
              st.spread(calls), f"the tiny preset's fastest step consumes {demand:.3g} batches/s",
              **judged(rate / demand, 100))


# ---------------------------------------------------------------- 3. prepare_data

def bench_prepare(b: Bench):
    docs = list(generate_stories(b.q(2_000_000, 400_000), seed=0))
    spec = b.offline_tokenizer(docs)
    enc = load_tokenizer(spec)
    n_tokens = sum(map(len, enc.encode_ordinary_batch(docs)))
    cores = os.cpu_count()
    corpus, one = b.tmp / "docs.jsonl", b.tmp / "one.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    one.write_text(json.dumps({"text": docs[0]}) + "\n")

    def cli(workers, source):  # the real script in its own process: its spawned workers import only it
        cmd = [sys.executable, "prepare_data.py", "--input", str(source), "--out", str(b.tmp / "prepared"),
               "--tokenizer", spec, "--workers", str(workers), "--val-tokens", "0", "--overwrite"]
        return lambda: run(cmd)

    fns = {"batch": lambda: enc.encode_ordinary_batch(docs), "loop": lambda: [enc.encode_ordinary(d) for d in docs]}
    for workers in sorted({1, cores}):
        fns[workers], fns[(workers, "one")] = cli(workers, corpus), cli(workers, one)
    stats = b.interleaved(fns, 1, b.q(3, 2))
    base, loop = stats["batch"].rate(n_tokens), stats["loop"].rate(n_tokens)
    size = f"{sum(map(len, docs)) / MB:.1f} MB of tinytales, {n_tokens:,} tokens ({Path(spec).stem})"
    yield Row("tiktoken encode_ordinary_batch, in one process (baseline)", f"{num(base)} tok/s",
              stats["batch"].spread(n_tokens), size)
    yield Row("tiktoken encode_ordinary, one document at a time, one thread", f"{num(loop)} tok/s",
              stats["loop"].spread(n_tokens), "the speed of one core: the workers' ceiling is cores x this",
              f"{loop / base:.2f}x")
    for workers in sorted({1, cores}):
        full, fixed = stats[workers], stats[(workers, "one")]
        # Throughput: the time of the corpus less the fixed cost, measured as the time of a single document.
        net = Stat(0, [a - c for a, c in zip(full.times, fixed.times)])
        name = f"python prepare_data.py --input, {workers} worker{'s' if workers > 1 else ''}"
        if min(net.times) <= 0:  # a corpus too small (--quick) to tell from the noise in the fixed cost
            yield Row(name, "n/a", details=f"fixed cost {fixed.median:.2f} s, more than the corpus itself")
            continue
        yield Row(name, f"{num(net.rate(n_tokens))} tok/s", net.spread(n_tokens),
                  f"end to end {num(full.rate(n_tokens))} tok/s, of which {fixed.median:.2f} s fixed cost "
                  f"(start-up, tokenizer, one document); {net.rate(n_tokens) / loop:.2f}x one core, out of a "
                  f"possible {workers}x",
                  **judged(net.rate(n_tokens) / base, 0.8 if workers == 1 else 0.5 * workers))


def run(cmd: list):
    result = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed: {result.stderr.strip()[-1000:]}")


def tiktoken_gpt2_cached() -> bool:
    try:
        load_tokenizer("gpt2")
        return True
    except UserError:
        return False


# ---------------------------------------------------------------- 4. generation

def bench_generate(b: Bench):
    """Greedy decoding against transformers' generate on the same weights, at batch 1: in float32 (identical
    tokens), and as generate.py runs by default (its weights in bf16 where that is native) against transformers'
    default float32; then --num-samples 8 as one batch against 8 samples one after the other."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()

    new = b.q(128, 16)
    enc = load_tokenizer(b.gpt2_tokenizer())
    prompt = torch.tensor([enc.encode("Once upon a time")], device=b.device)
    default = hardware.pick_dtype("auto", b.device)  # generate.py's --dtype auto
    shapes = {"6x384": dict(n_layer=6, n_head=6, n_embd=384), "GPT-2 124M": dict(n_layer=12, n_head=12, n_embd=768)}
    if b.quick:
        shapes = {"2x64": dict(n_layer=2, n_head=2, n_embd=64)}
    for shape, fields in shapes.items():
        torch.manual_seed(0)
        model = GPT(GPTConfig(**fields, block_size=1024, vocab_size=50257)).to(b.device).eval()
        folder = b.tmp / f"hf-{shape.replace(' ', '')}"
        export_hf.export(checkpoint.save_checkpoint(str(b.tmp / "ckpt"), 0, model, "gpt2"), str(folder))
        hf = GPT2LMHeadModel.from_pretrained(folder).float().to(b.device).eval()  # its default dtype
        hf.generation_config.eos_token_id = None  # random weights may well pick <|endoftext|>: keep going
        hf.generation_config.pad_token_id = enc.eot_token
        fast = generate.for_inference(copy.deepcopy(model), default)
        out = {}

        def ours(key, m, use_cache=True):
            out[key] = torch.stack(list(m.generate(prompt, new, temperature=0.0, use_cache=use_cache)), dim=1)

        def theirs():
            ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False)
            out["hf"] = ids[:, prompt.shape[1]:]

        fns = {"cache": lambda: ours("cache", model), "hf": theirs}
        if default != torch.float32:
            fns["default"] = lambda: ours("default", fast)
        if shape != "GPT-2 124M":  # without a cache 124M takes minutes per run: timed on the small model only
            fns["nocache"] = lambda: ours("nocache", model, use_cache=False)
        stats = b.interleaved(fns, 1, b.q(3, 2))
        rate = {k: st.rate(new) for k, st in stats.items()}
        same = all(torch.equal(out["cache"], out[k]) for k in ("hf", "nocache") if k in out)
        what = f"{shape}, greedy, {new} new tokens, batch 1"
        yield Row(f"{what}: transformers generate, float32 (baseline)", f"{num(rate['hf'])} tok/s",
                  stats["hf"].spread(new), "GPT2LMHeadModel, same weights via export_hf")
        yield Row(f"{what}: ours, float32, KV cache", f"{num(rate['cache'])} tok/s", stats["cache"].spread(new),
                  f"identical tokens to transformers{' and to ours uncached' if 'nocache' in out else ''}: "
                  f"{'yes' if same else 'NO'}", ratio=f"{rate['cache'] / rate['hf']:.2f}x")
        if "nocache" in rate:
            yield Row(f"{what}: ours, float32, no cache", f"{num(rate['nocache'])} tok/s",
                      stats["nocache"].spread(new), ratio=f"{rate['nocache'] / rate['hf']:.2f}x")
        if "default" in rate:
            agree = int((out["default"] == out["hf"]).cumprod(dim=1).sum())
            yield Row(f"{what}: ours as generate.py runs it ({str(default).removeprefix('torch.')} weights)",
                      f"{num(rate['default'])} tok/s", stats["default"].spread(new),
                      f"random weights: the first {agree} of {new} greedy tokens equal float32 transformers' "
                      f"(a trained model's logits have wider margins)", **judged(rate["default"] / rate["hf"], 2))
    yield from bench_batched_samples(b, fast, enc, prompt, new)


def bench_batched_samples(b: Bench, model: GPT, enc, prompt, new: int):
    """generate.py --num-samples 8 (one batch) against 8 runs of one sample, as generate.py samples by default."""
    n = 8
    sampling = dict(temperature=0.8, top_k=200)

    def batched():
        list(model.generate(prompt.expand(n, -1), new, generator=torch.Generator(b.device).manual_seed(0),
                            **sampling))

    def one_by_one():
        for i in range(n):
            list(model.generate(prompt, new, generator=torch.Generator(b.device).manual_seed(i), **sampling))

    stats = b.interleaved({"batched": batched, "sequential": one_by_one}, 1, b.q(2, 1))
    rate = {k: st.rate(n * new) for k, st in stats.items()}
    what = f"{n} samples of {new} tokens, temperature 0.8, top-k 200, the last model above"
    yield Row(f"{what}: one by one (baseline)", f"{num(rate['sequential'])} tok/s", stats["sequential"].spread(n * new))
    yield Row(f"{what}: one batch (--num-samples {n})", f"{num(rate['batched'])} tok/s",
              stats["batched"].spread(n * new), **judged(rate["batched"] / rate["sequential"], 4))


# ---------------------------------------------------------------- 5. HellaSwag

def bench_hellaswag(b: Bench):
    n = b.q(32, 4)
    path = SHARED_DATA / "hellaswag_val.jsonl.gz"
    examples = hellaswag.load_examples(str(path) if path.is_file() else None, limit=n)
    enc = load_tokenizer(b.gpt2_tokenizer())
    fields = b.q(dict(n_layer=12, n_head=12, n_embd=768), dict(n_layer=2, n_head=2, n_embd=64))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**fields, block_size=1024, vocab_size=50257)).to(b.device).eval()
    out = {}
    fns = {"batched": lambda: out.update(batched=hellaswag.score(model, enc, examples, b.device, torch.float32)),
           "plain": lambda: out.update(plain=hellaswag.score_plain(model, enc, examples, b.device, torch.float32))}
    stats = b.interleaved(fns, 1, b.q(3, 2))
    (lb, cb), (lp, cp) = out["batched"], out["plain"]
    agree = [int(((lb / cb).argmin(1) == (lp / cp).argmin(1)).sum()), int((lb.argmin(1) == lp.argmin(1)).sum())]
    what = f"{'GPT-2 124M' if not b.quick else '2x64'} shape, {n} real validation examples, fp32"
    yield Row(f"hellaswag.score, 4 examples per forward ({what})", f"{num(stats['batched'].rate(n))} ex/s",
              stats["batched"].spread(n), f"same predictions as plain: acc_norm {agree[0]}/{n}, acc {agree[1]}/{n}; "
              f"largest loss difference {(lb - lp).abs().max():.2g}",
              **judged(stats["batched"].rate(n) / stats["plain"].rate(n), 3))
    yield Row("hellaswag.score_plain, one forward per candidate (baseline)", f"{num(stats['plain'].rate(n))} ex/s",
              stats["plain"].spread(n))


# ---------------------------------------------------------------- 6. memory of a long run

def bench_memory(b: Bench):
    early, late = b.q((100, 2000), (20, 200))
    out = b.tmp / "memory-run"
    cmd = [sys.executable, "train.py", "--config", "tiny", "--device", "cpu", "--data-dir", b.markov_data(),
           "--out-dir", str(out), "--n-layer", "2", "--n-head", "4", "--n-embd", "128", "--block-size", "128",
           "--batch-size", "8", "--total-batch-size", "1024", "--max-steps", str(late + 50), "--log-interval", "10",
           "--eval-interval", str(late // 4), "--eval-steps", "5", "--checkpoint-interval", str(late // 2),
           "--sample-interval", "0", "--dtype", "float32", "--compile", "false"]
    marks = [early] + [late * i // 4 for i in range(1, 5)]  # a steady climb is a leak; a single step is not
    rss, step, seen = {}, 0, 0
    started = time.perf_counter()
    with open(b.tmp / "memory-run.err", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=err)
        log = out / "log.jsonl"
        while proc.poll() is None:
            if log.is_file():  # the newest step logged; only whole lines
                text = log.read_text()
                lines = text[:text.rfind("\n") + 1].splitlines()
                step = max([step] + [json.loads(line)["step"] for line in lines[seen:]])
                seen = len(lines)
            try:
                now = proc_status(proc.pid, "VmRSS")
            except (OSError, AttributeError):  # the process is exiting
                break
            rss.update({mark: now for mark in marks if step >= mark and mark not in rss})
            time.sleep(0.02)
        if proc.wait() != 0 or len(rss) < len(marks):
            err.seek(0)
            raise RuntimeError(f"the training run failed: {err.read()[-2000:]}")
    growth = (rss[late] - rss[early]) / MB
    yield Row(f"RSS of train.py, tiny preset shrunk (2x128, block 128), step {early} -> {late}",
              f"{rss[early] / MB:,.1f} -> {rss[late] / MB:,.1f} MB", details=f"CPU, fp32; eval every "
              f"{late // 4} steps, checkpoint every {late // 2}; RSS at steps {', '.join(map(str, marks))}: "
              f"{', '.join(f'{rss[m] / MB:,.1f}' for m in marks)} MB; {time.perf_counter() - started:.0f} s in all",
              ratio=f"{growth:+.1f} MB", target="growth < 5 MB", meets=growth < 5)


# ---------------------------------------------------------------- 7. train.py itself against nanoGPT

def bench_nanogpt(b: Bench):
    """../shared/tools/vs_nanogpt.py: nanoGPT's own train.py and ours, alternating on the same tokens (the figure
    a user gets, not a copy of our step). Needs --nanogpt PATH, a karpathy/nanoGPT work tree."""
    tool = HERE.parent / "shared" / "tools" / "vs_nanogpt.py"
    if not b.nanogpt or not tool.is_file():
        print("nanogpt: skipped (give --nanogpt PATH; needs ../shared/tools/vs_nanogpt.py)", flush=True)
        return
    steps, repeats = b.q((25, 2), (8, 1))
    out = subprocess.run([sys.executable, str(tool), "--nanogpt", b.nanogpt, "--steps", str(steps),
                          "--repeats", str(repeats)], cwd=HERE, capture_output=True, text=True)
    if out.returncode:
        raise UserError(f"vs_nanogpt.py failed: {out.stderr.strip()[-300:]}")
    rows = [line.strip("|").split("|") for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    for name, tps, ratio, rss, val in ([c.strip() for c in r] for r in rows[1:]):
        target = {"train.py defaults": 2.0, "train.py --compile": 2.5}.get(name)
        ratio_value = float(ratio.rstrip("x"))
        yield Row(name, f"{tps} tok/s", details=f"peak RSS {rss} MB; val loss {val}", ratio=ratio,
                  target=f">= {target}x nanoGPT" if target else "", meets=ratio_value >= target if target else None)


# ---------------------------------------------------------------- 8. peak memory of one training step

def bench_stepmem(b: Bench):
    """Peak RSS of a fresh process through one training step of two micro steps at GPT-2 124M's shape: nanoGPT's
    own model and optimizer (float32, as on a CPU) against train.train_step, each in its own process."""
    if not b.nanogpt:
        print("stepmem: skipped (give --nanogpt PATH, a karpathy/nanoGPT work tree)", flush=True)
        return
    shape = b.q(dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=4),
                dict(n_layer=2, n_head=2, n_embd=64, block_size=128, batch=2))
    runs = {"nanoGPT, float32 (baseline)": ("nanogpt", "float32"), "train.py's step, defaults": ("ours", "auto"),
            "train.py's step, --dtype float32": ("ours", "float32")}
    got = {}
    for name, (which, dtype) in runs.items():
        code = f"import bench; bench.step_peak({which!r}, {b.nanogpt!r}, {shape!r}, {dtype!r})"
        p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"the {which} step failed: {p.stderr.strip()[-300:]}")
        got[name] = json.loads(p.stdout.strip().splitlines()[-1])
    base = got["nanoGPT, float32 (baseline)"]["peak"]
    what = (f"{shape['n_layer']}x{shape['n_embd']}, batch {shape['batch']} x block {shape['block_size']}, "
            f"2 micro steps")
    for name, m in got.items():
        ratio = m["peak"] / base
        row = Row(f"{name}: peak RSS of the process", f"{m['peak'] / MB:,.0f} MB",
                  details=f"{what}; {m['before'] / MB:,.0f} MB before the step (model, optimizer, torch), "
                          f"{m['dtype']}", ratio=f"{ratio:.2f}x")
        if name != "nanoGPT, float32 (baseline)":
            row.target, row.meets = "<= 1x nanoGPT", ratio <= 1
        yield row


def step_peak(which: str, nanogpt: str, shape: dict, dtype_name: str):
    """In a fresh process: build the model and AdamW, run one step of two micro steps, print its memory (JSON)."""
    import importlib.util

    cfg = {k: v for k, v in shape.items() if k != "batch"}
    B, T, device = shape["batch"], shape["block_size"], torch.device("cpu")
    torch.manual_seed(0)
    batches = iter([(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in torch.randint(0, 50257, (2, B, T + 1))])
    if which == "nanogpt":
        spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(nanogpt, "model.py"))
        nano = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nano)
        with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter counts; stdout is our JSON
            model = nano.GPT(nano.GPTConfig(**cfg, vocab_size=50304, dropout=0.0, bias=True))
            optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
        dtype, before = torch.float32, proc_status(os.getpid(), "VmRSS")
        for x, y in batches:  # nanoGPT's loop on a CPU: float32, no autocast, loss / accumulation
            _, loss = model(x, y)
            (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model = GPT(GPTConfig(**cfg, vocab_size=50257))
        optimizer = build_optimizer(model, TrainConfig(), device)
        dtype, before = hardware.pick_dtype(dtype_name, device), proc_status(os.getpid(), "VmRSS")
        train_step(model, optimizer, build_scaler(dtype, device), batches, 2, 6e-4, 1.0, dtype)
    print(json.dumps({"before": before, "peak": proc_status(os.getpid(), "VmHWM"),
                      "dtype": str(dtype).removeprefix("torch.")}))


# ---------------------------------------------------------------- 9. the modern recipe against GPT-2's

# train.py's flags for each recipe. AdamW at nanoGPT's 1e-3 for this 6 x 384 shape (its shakespeare_char config);
# Muon at 5e-3, which under match_rms_adamw moves the matrices about as far per step as Keller Jordan's 0.02 does
# under his own scaling. The one sweep behind them (modern, tinytales, 80 steps, validation loss): AdamW 1e-3 2.446,
# 3e-3 3.222; Muon (AdamW at 1e-3) 1e-3 1.298, 5e-3 1.036.
RECIPES = {
    "gpt2 + AdamW": ["--arch", "gpt2", "--learning-rate", "1e-3"],
    "modern + AdamW": ["--arch", "modern", "--learning-rate", "1e-3"],
    "modern + Muon": ["--arch", "modern", "--learning-rate", "1e-3", "--optimizer", "muon", "--muon-lr", "5e-3"],
}
BASELINE, CANDIDATE = "gpt2 + AdamW", "modern + Muon"


def recipe_corpora(b: Bench) -> dict:
    """{name: prepared data folder}: tinytales with its own tokenizer, and real English (HellaSwag's contexts with
    their right endings, GPT-2's tokens) when ../shared/data has it."""
    corpora = {"tinytales": b.tinytales_data(b.q(2_000_000, 200_000))}
    source, ranks = SHARED_DATA / "hellaswag_val.jsonl.gz", SHARED_DATA / "gpt2.tiktoken"
    if not (source.is_file() and ranks.is_file()):
        print(f"recipe: real English skipped ({source} or {ranks} is absent)", flush=True)
        return corpora
    corpus = b.tmp / "english.jsonl"
    with gzip.open(source, "rt", encoding="utf-8") as f:
        examples = [json.loads(line) for line in f]
    corpus.write_text("".join(json.dumps({"text": ex["ctx"] + " " + ex["endings"][int(ex["label"])]}) + "\n"
                              for ex in examples))
    corpora["real English"] = b.tmp / "recipe-english"
    run([sys.executable, "prepare_data.py", "--input", str(corpus), "--tokenizer", str(ranks),
         "--out", str(corpora["real English"]), "--val-tokens", "50000"])
    return corpora


def train_curve(b: Bench, data: Path, flags: list, steps: int, every: int) -> dict:
    """Run train.py as a user would; its validation curve and training seconds from log.jsonl."""
    out = Path(tempfile.mkdtemp(dir=b.tmp))
    shape = b.q(dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
                dict(n_layer=1, n_head=2, n_embd=64, block_size=32, batch_size=2))
    batch = shape["block_size"] * shape["batch_size"]  # one micro step per step
    run([sys.executable, "train.py", "--data-dir", str(data), "--out-dir", str(out), "--device", str(b.device),
         *(f"--{k}={v}" for k, v in shape.items()), "--total-batch-size", str(batch), "--max-steps", str(steps),
         "--warmup-steps", str(max(1, steps // 10)), "--eval-interval", str(every), "--eval-steps", str(b.q(8, 2)),
         "--log-interval", "1", "--checkpoint-interval", "0", "--hellaswag-interval", "0", "--sample-interval", "0",
         *flags])
    records = read_log(str(out / "log.jsonl"))
    ms = {r["step"]: r["ms_per_step"] for r in records if "ms_per_step" in r}
    first = statistics.median(ms.values())  # the first step (warm-up) is untimed: count it as a typical one
    seconds = np.cumsum([ms.get(step, first) / 1000 for step in range(1, steps + 1)])
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    shutil.rmtree(out)
    return {"steps": sorted(val), "val": [val[k] for k in sorted(val)], "seconds": seconds, "tokens": batch,
            "tok_s": batch / (first / 1000)}


def reached_at(curve: dict, target: float) -> Optional[float]:
    """The step where the validation curve first falls to target, linear between evaluations; None if never."""
    points = list(zip(curve["steps"], curve["val"]))
    for i, (step, value) in enumerate(points):
        if value <= target:
            if i == 0:
                return float(step)
            s0, v0 = points[i - 1]
            return s0 + (v0 - target) / (v0 - value) * (step - s0)
    return None


def seconds_at(curve: dict, step: float) -> float:
    return float(np.interp(step, np.arange(1, len(curve["seconds"]) + 1), curve["seconds"]))


def bench_recipe(b: Bench):
    """gpt2 + AdamW, modern + AdamW and modern + Muon through train.py on the same tokens and batches: the tokens
    and training time each needs to reach gpt2 + AdamW's final validation loss, and where each ends."""
    steps, every = b.q((80, 10), (6, 3))  # 80 steps: the whole section in about half an hour on 2 cores
    curves = {}
    for corpus, data in recipe_corpora(b).items():
        curves[corpus] = {name: train_curve(b, data, flags, steps, every) for name, flags in RECIPES.items()}
        base = curves[corpus][BASELINE]
        target = base["val"][-1]
        for name, curve in curves[corpus].items():
            final, at = curve["val"][-1], reached_at(curve, target)
            if at is None:
                reach, ratio = f"does not reach {target:.4f} in {steps * curve['tokens']:,} tokens", None
            else:
                ratio = at / steps
                reach = (f"reaches {target:.4f} at {at * curve['tokens']:,.0f} tokens, {seconds_at(curve, at):.0f} s "
                         f"of training ({seconds_at(curve, at) / base['seconds'][-1]:.2f}x gpt2 + AdamW's time)")
            row = Row(f"{corpus}: {name}", f"val loss {final:.4f}",
                      details=f"{reach}; {num(curve['tok_s'])} tok/s (median step); {final - target:+.4f} nats "
                              f"against gpt2 + AdamW", ratio="" if ratio is None else f"{ratio:.2f}x tokens")
            if name == CANDIDATE:
                row.target = "<= 0.7x tokens and >= 0.05 nats lower"
                row.meets = ratio is not None and ratio <= 0.7 and final <= target - 0.05
            yield row
    png = b.out.with_name(b.out.stem + "-recipe.png")
    plot_recipe(curves, steps, str(png))
    yield Row("validation curves", f"[{png.name}]({png.name})",
              details=f"{steps} steps of {base['tokens']:,} tokens, eval every {every} steps")


def plot_recipe(curves: dict, steps: int, path: str):
    fig = plot.figure(figsize=(6 * len(curves), 4.5), layout="constrained")
    for ax, (corpus, runs) in zip(fig.subplots(1, len(curves), squeeze=False)[0], curves.items()):
        for name, curve in runs.items():
            ax.plot([s * curve["tokens"] for s in curve["steps"]], curve["val"], marker="o", markersize=3,
                    label=f"{name} ({curve['val'][-1]:.3f})")
        ax.axhline(runs[BASELINE]["val"][-1], color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{corpus}, {steps} steps")
        ax.set_xlabel("tokens")
        ax.set_ylabel("validation loss (nats per token)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    plot.save_png(fig, path)


# ---------------------------------------------------------------- 10. --doc-mask

def bench_docmask(b: Bench):
    """train.py's step on the tiny preset with --doc-mask against without, same init and batches, in train.py's
    default dtype and compile setting: on a CPU the boolean mask through scaled_dot_product_attention, on CUDA
    FlexAttention under compile."""
    fields, batch = train_shapes(b)["tiny preset"]
    data = str(b.tinytales_data(b.q(1_000_000, 200_000)))  # the tiny preset's own corpus
    meta = read_data_meta(data)
    fields, eot = dict(fields, vocab_size=meta["vocab_size"]), meta["eot"]
    dtype, compile_on = hardware.pick_dtype("auto", b.device), b.device.type == "cuda"
    tcfg = fill_schedule_defaults(TrainConfig(learning_rate=1e-3, warmup_steps=5))
    torch.manual_seed(0)
    init = GPT(GPTConfig(**fields)).state_dict()
    trainers = {mask: Trainer(b, GPTConfig(**fields, doc_mask=mask, eot_token=eot), batch, init, dtype, compile_on,
                              tcfg, data) for mask in (False, True)}
    stats = b.interleaved({mask: t.step for mask, t in trainers.items()}, *b.q((3, 20), (1, 3)))
    tokens = batch * fields["block_size"]
    x, _ = DataLoader(data, "train", batch, fields["block_size"]).next_batch()
    setting = (f"{batch} x {fields['block_size']} tokens, {DTYPE_NAMES[dtype]}, "
               f"{'compiled' if compile_on else 'eager'}")
    base = stats[False].rate(tokens)
    yield Row("tiny preset: plain causal attention (baseline)", f"{num(base)} tok/s", stats[False].spread(tokens),
              setting)
    yield Row("tiny preset: --doc-mask", f"{num(stats[True].rate(tokens))} tok/s", stats[True].spread(tokens),
              f"tinytales: {(x == eot).sum().item() / batch + 1:.1f} documents per window",
              f"{stats[True].rate(tokens) / base:.2f}x")


# ---------------------------------------------------------------- 11. distributed Muon

MUON_RUNS = {  # name: (processes, optimizer, layout)
    "torch.optim.Muon, 1 process (baseline)": (1, "torch", "whole"),
    "muon.py, 1 process": (1, "ours", "whole"),
    "muon.py, 2 ranks, whole parameters (DDP)": (2, "ours", "whole"),
    "muon.py, 2 ranks, row shards (FSDP)": (2, "ours", "fsdp"),
    "torch.optim.Muon, 2 ranks, row shards (FSDP)": (2, "torch", "fsdp"),
}


def bench_muon(b: Bench):
    """The Muon step alone (momentum, Newton-Schulz, update) on the 48 block matrices of GPT-2 124M: the runs of one
    process in one fresh process, those of 2 CPU ranks (gloo) in one torchrun, each taking turns step by step; on
    the same cores (2 ranks get half the threads each, at least one). A CPU that emulates bfloat16 matmuls (1 GFLOP/s on the
    2-core dev box) would take a quarter of an hour for a 124M step: it gets the same 12 layers at width 192, whose
    48 matrices balance over the ranks as 124M's do."""
    width = b.q(768 if hardware.cpu_has_bf16() else 192, 64)
    warmup, repeats = b.q((1, 3), (1, 2))
    threads, ms = torch.get_num_threads(), {}
    for ranks in (1, 2):
        runs = {name: (which, layout) for name, (n, which, layout) in MUON_RUNS.items() if n == ranks}
        code = f"import bench; bench.muon_step_times({runs!r}, {width}, {warmup}, {repeats})"
        launcher = [sys.executable]
        if ranks > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                        "--no-python", sys.executable]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // ranks))}
        p = subprocess.run([*launcher, "-c", code], cwd=HERE, capture_output=True, text=True, env=env)
        if p.returncode:
            raise RuntimeError(f"the {ranks}-process runs failed: {p.stderr.strip()[-500:]}")
        ms.update({name: [t * 1000 for t in times] for name, times in
                   json.loads(p.stdout.strip().splitlines()[-1]).items()})
    base = statistics.median(ms[next(iter(MUON_RUNS))])
    for name, (ranks, which, _) in MUON_RUNS.items():
        median = statistics.median(ms[name])
        qkv = "q, k, v orthogonalised apart (7% more FLOPs)" if which == "ours" else "c_attn orthogonalised whole"
        yield Row(f"12 x {width}: {name}", f"{median:,.0f} ms/step", f"{min(ms[name]):,.0f}-{max(ms[name]):,.0f} ms",
                  details=f"{ranks} x {max(1, threads // ranks)} threads; {qkv}", ratio=f"{base / median:.2f}x")


def muon_step_times(runs: dict, width: int, warmup: int, repeats: int):
    """In the fresh process (or each torchrun rank) of bench_muon: time each run's step, the runs taking turns; rank
    0 prints {run: [seconds of each repeat]} as JSON."""
    world = distributed.setup("cpu")
    steps = {name: muon_stepper(which, layout, width, world) for name, (which, layout) in runs.items()}
    stats = interleaved(steps, warmup, repeats, distributed.barrier)
    if world.is_master:
        print(json.dumps({name: stat.times for name, stat in stats.items()}))
    distributed.teardown()


def muon_stepper(which: str, layout: str, width: int, world):
    """One Muon step (torch.optim.Muon or muon.py's) on its own copy of GPT-2's 48 block matrices at this width,
    whole or sharded by rows over the ranks as FSDP2 shards them, with the same gradients every step."""
    import muon
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)  # the same matrices and gradients on every rank
    shapes = [(3 * width, width)] * 12 + [(width, width), (4 * width, width), (width, 4 * width)] * 12  # c_attn first
    place = lambda t: t  # noqa: E731
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world.world_size,))
        place = lambda t: distribute_tensor(t, mesh, [Shard(0)])  # noqa: E731
    params = [torch.nn.Parameter(place(torch.randn(s) * 0.02)) for s in shapes]
    grads = [place(torch.randn(s)) for s in shapes]
    if which == "torch":
        optimizer = torch.optim.Muon(params, lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    else:
        optimizer = muon.Muon([{"params": params[:12], "split": 3}, {"params": params[12:]}], lr=1e-3,
                              weight_decay=0.1)

    def step():
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()

    return step


# ---------------------------------------------------------------- 12. memory of a resume

def bench_resumemem(b: Bench):
    """Memory of each rank of a 2-process CPU resume (torchrun, DDP) that restores a checkpoint and stops before
    a step, against the same ranks' fresh run of one step and a save: no rank should hold copies of the
    checkpoint it does not need (issue 23). On a CPU state.pt is read whole (its moments are the run's); on a GPU
    it is memory-mapped, which this CPU section cannot show."""
    fields = b.q(dict(n_layer=8, n_head=8, n_embd=512), dict(n_layer=2, n_head=2, n_embd=64))
    out = b.tmp / "resume-run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--data-dir", b.markov_data(), "--out-dir", str(out), "--device", "cpu", "--block-size", "64",
           *(f"--{k.replace('_', '-')}={v}" for k, v in fields.items()), "--batch-size", "2",
           "--total-batch-size", "256", "--eval-interval", "0", "--hellaswag-interval", "0", "--sample-interval",
           "0", "--log-interval", "1", "--dtype", "float32", "--compile", "false", "--max-steps", "1"]
    fresh = rank_memory(cmd)  # one step, then ckpt_0000001
    ckpt = Path(checkpoint.list_checkpoints(str(out))[-1])
    sizes = {name: (ckpt / name).stat().st_size for name in ("model.safetensors", "state.pt")}
    resumed = rank_memory(cmd + ["--resume"])  # at max_steps already: restores, then ends without a step
    what = f"{fields['n_layer']}x{fields['n_embd']}, fp32, 2 CPU ranks (DDP, gloo)"
    yield Row("checkpoint", f"{sum(sizes.values()) / MB:,.0f} MB",
              details=f"{what}: weights {sizes['model.safetensors'] / MB:,.0f} MB, state.pt (AdamW moments) "
                      f"{sizes['state.pt'] / MB:,.0f} MB")
    yield Row("fresh run, one step and a save: peak RSS of the largest rank (baseline)", f"{fresh / MB:,.0f} MB",
              details="VmHWM")
    yield Row("resume, restore only: peak RSS of the largest rank", f"{resumed / MB:,.0f} MB",
              details=f"VmHWM; {(resumed - fresh) / MB:+,.0f} MB against the fresh run",
              ratio=f"{resumed / fresh:.2f}x")


def rank_memory(cmd: list) -> int:
    """Run cmd (torchrun); the largest peak RSS (VmHWM) of its ranks, its child processes, in bytes. VmHWM only
    grows, so its last reading before a rank ends (read every 5 ms) is that rank's peak."""
    peak, ranks = 0, []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            ranks = ranks if len(ranks) == 2 else child_pids(proc.pid)  # the two ranks, once both are up
            for pid in ranks:
                with contextlib.suppress(OSError, AttributeError):  # a rank that has just ended
                    peak = max(peak, proc_status(pid, "VmHWM"))
            time.sleep(0.005)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"torchrun train.py failed: {err.read()[-1500:]}")
    return peak


def child_pids(pid: int) -> list:
    pids = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry))
    return pids


# ---------------------------------------------------------------- 13. the CPU step against its matmul bound

def bench_cpubound(b: Bench):
    """train.train_step of GPT-2 124M (block 256, micro batch 4), bf16 autocast where the CPU has it, against the
    tokens/s its GEMMs alone allow in that dtype; then torch.profiler's split of one step into GEMMs and the rest."""
    fields, batch = train_shapes(b)["GPT-2 124M, block 256"]
    cfg, dtype = GPTConfig(**fields), hardware.pick_dtype("auto", b.device)
    tcfg = fill_schedule_defaults(TrainConfig(learning_rate=1e-3, warmup_steps=5, max_steps=100))
    torch.manual_seed(0)
    trainer = Trainer(b, cfg, batch, GPT(cfg).state_dict(), dtype, False, tcfg)
    tokens = batch * cfg.block_size
    step = b.interleaved({"step": trainer.step}, 1, b.q(4, 2))["step"]
    bound = gemm_bound(cfg, batch, dtype)
    name = f"{cfg.n_layer}x{cfg.n_embd} (GPT-2 124M at full size), {DTYPE_NAMES.get(dtype, str(dtype))}"
    yield Row(f"{name}: the step's GEMMs alone (the bound)", f"{num(bound)} tok/s",
              details=f"{batch} x {cfg.block_size} tokens: the block's four linears, attention's two products "
                      f"(causal: half), the head; backward as twice the forward; each shape's fastest of 5 calls")
    yield Row(f"{name}: train_step, eager", f"{num(step.rate(tokens))} tok/s", step.spread(tokens),
              "shared, noisy machine: the ratio is the figure to read", f"{step.rate(tokens) / bound:.2f}x the bound")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.step()
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(ops.values())
    gemm = sum(t for k, t in ops.items() if k in GEMM_OPS)
    rest = sorted(((t, k) for k, t in ops.items() if k not in GEMM_OPS), reverse=True)[:6]
    yield Row(f"{name}: GEMMs' share of one profiled step", f"{gemm / total:.0%}",
              details="torch.profiler, self CPU time; the rest, most first: " + ", ".join(f"{k} {t / total:.0%}" for t, k in rest))


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise",
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def gemm_bound(cfg: GPTConfig, batch: int, dtype, repeats: int = 5) -> float:
    """Tokens/s of a step that were nothing but its GEMMs, timed here in dtype (forward; backward counted as two
    GEMMs of each forward's size)."""
    n, c, t, hd = batch * cfg.block_size, cfg.n_embd, cfg.block_size, cfg.n_embd // cfg.n_head
    bh = batch * cfg.n_head
    shapes = [((n, c), (c, 3 * c), cfg.n_layer), ((n, c), (c, c), cfg.n_layer), ((n, c), (c, 4 * c), cfg.n_layer),
              ((n, 4 * c), (4 * c, c), cfg.n_layer), ((n, c), (c, cfg.padded_vocab_size), 1),
              ((bh, t, hd), (bh, hd, t), cfg.n_layer / 2), ((bh, t, t), (bh, t, hd), cfg.n_layer / 2)]
    seconds = 0.0
    with torch.no_grad():
        for a_shape, b_shape, count in shapes:
            x, w = torch.randn(a_shape, dtype=dtype), torch.randn(b_shape, dtype=dtype)
            out = x @ w
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                torch.matmul(x, w, out=out)
                times.append(time.perf_counter() - start)
            seconds += count * min(times)
    return n / (3 * seconds)


# ---------------------------------------------------------------- 14. --activation-checkpointing

def bench_actckpt(b: Bench):
    """train.py's step at GPT-2 124M's shape (batch 1 x 1024) with --activation-checkpointing against without, in
    train.py's default dtype and compile setting: the memory a step adds to the weights and AdamW's state
    (activations, gradients), each setting alone in a fresh process as in stepmem (freed memory that the allocator
    keeps would hide the second one's peak), and the time per step, both settings taking turns in one process."""
    memory = {}
    for on in (False, True):
        run = actckpt_run(b, (on,), repeats=1)
        memory[str(on)] = dict(run[str(on)], peak=run["peak"], before=run["before"])
    timed = actckpt_run(b, (False, True), repeats=2)
    base = memory["False"]
    for on in ("False", "True"):
        name = "--activation-checkpointing" if on == "True" else "without (baseline)"
        m, t = memory[on], timed[on]
        yield Row(f"{name}: memory a step adds", f"{m['added'] / MB:,.0f} MB",
                  details=f"{timed['setting']}; process peak {m['peak'] / MB:,.0f} MB, of which "
                          f"{m['before'] / MB:,.0f} MB before its first step (weights, torch)",
                  ratio=f"{m['added'] / base['added']:.2f}x")
        yield Row(f"{name}: time per step", f"{t['ms']:,.0f} ms", f"{min(t['all_ms']):,.0f}-{max(t['all_ms']):,.0f}",
                  ratio=f"{t['ms'] / timed['False']['ms']:.2f}x")


def actckpt_run(b: Bench, settings: tuple, repeats: int) -> dict:
    """actckpt_step in a fresh process."""
    code = f"import bench; bench.actckpt_step({str(b.device)!r}, {b.quick!r}, {settings!r}, {repeats})"
    # glibc keeps freed blocks below its mmap threshold, which grows to 32 MB as large blocks are freed: the
    # warm-up step's memory would stay resident and hide the timed step's. At 64 KB every large block is returned
    # on free, so the resident size follows what is alive.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"the step with activation checkpointing {settings} failed: {p.stderr.strip()[-300:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def actckpt_step(device: str, quick: bool, settings: tuple, repeats: int):
    """In a fresh process, a trainer per setting (activation checkpointing off or on) from the same weights: a
    warm-up step (AdamW's moments), then `repeats` timed steps taking turns; prints each one's memory and time
    (JSON)."""
    b = Bench(argparse.Namespace(device=device, quick=quick, nanogpt=None, out=""))
    try:
        fields, batch = b.q((dict(n_layer=12, n_head=12, n_embd=768, block_size=1024), 1),
                            (dict(n_layer=2, n_head=2, n_embd=64, block_size=128), 2))
        dtype, compile_on = hardware.pick_dtype("auto", b.device), b.device.type == "cuda"
        torch.manual_seed(0)
        init = GPT(GPTConfig(**fields)).state_dict()
        trainers = {}
        for on in settings:
            trainers[on] = Trainer(b, GPTConfig(**fields), batch, init, dtype, compile_on,
                                   fill_schedule_defaults(TrainConfig(warmup_steps=5)))
            trainers[on].raw.activation_checkpointing = on
        del init
        before = b.memory_now()
        stats = b.interleaved({on: t.step for on, t in trainers.items()}, 1, repeats)
        result = {str(on): {"added": s.mem, "ms": s.median * 1000, "all_ms": [t * 1000 for t in s.times]}
                  for on, s in stats.items()}
        result.update(peak=b.memory_peak(), before=before,
                      setting=f"{fields['n_layer']}x{fields['n_embd']}, {batch} x {fields['block_size']} tokens, "
                              f"{DTYPE_NAMES[dtype]}, {'compiled' if compile_on else 'eager'}")
        print(json.dumps(result))
    finally:
        shutil.rmtree(b.tmp, ignore_errors=True)


# ---------------------------------------------------------------- 15. one GPU machine

GPU_BUDGET_S = 270  # the whole section; a part that would start after it is reported as not run
GIB = 2**30


def bench_gpu(b: Bench):
    """GPT-2 124M on this machine's GPUs, each part through the code users run: train.train_step eager and
    compiled, train.py under torchrun (DDP over all GPUs, FSDP), generate.py's decoding, hellaswag.py's scorer,
    and the head's GEMM at the real against the padded vocabulary. A part that fails is reported as FAILED and
    the next one runs: a GPU minute is dear."""
    if b.device.type != "cuda":
        print("gpu: skipped: no CUDA GPU here (the section measures GPT-2 124M on GPUs; run it where "
              "torch.cuda.is_available())", flush=True)
        return
    deadline = time.perf_counter() + GPU_BUDGET_S
    count = torch.cuda.device_count()
    yield Row("device", f"{torch.cuda.get_device_name(b.device)} x {count}",
              details=f"torch {torch.__version__}, CUDA {torch.version.cuda}; datasheet bf16 peak "
                      f"{hardware.peak_flops(b.device, torch.bfloat16) / 1e12:,.0f} TFLOP/s per GPU (MFU below)")
    parts = {"head GEMM": gpu_head_gemm, "gpt2 124M step": gpu_train, "generation": gpu_generate,
             "HellaSwag": gpu_hellaswag, "FSDP": lambda b, d: gpu_torchrun(b, d, "fsdp", count),
             "DDP": lambda b, d: gpu_torchrun(b, d, "ddp", count)}
    for name, part in parts.items():
        left = deadline - time.perf_counter()
        if left < 15:
            yield Row(f"{name}: not run", f"the section's {GPU_BUDGET_S} s were spent")
            continue
        try:
            yield from part(b, deadline)
        except Exception as e:
            traceback.print_exc()
            yield Row(f"{name}: FAILED", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        finally:
            gc.collect()
            torch.cuda.empty_cache()


def gpu_config() -> GPTConfig:
    return GPTConfig(**PRESETS["gpt2"], vocab_size=50257)  # the embedding padded to 50,304 as in training


def gpu_head_gemm(b: Bench, deadline: float):
    """The head's forward GEMM, (64 x 1024, 768) @ W.T, with W of the real and of the padded vocabulary."""
    x = torch.randn(64 * 1024, 768, device=b.device, dtype=torch.bfloat16)
    heads = {rows: torch.randn(rows, 768, device=b.device, dtype=torch.bfloat16) for rows in (50257, 50304)}
    stats = b.interleaved({rows: lambda w=w: x @ w.T for rows, w in heads.items()}, 3, 20)
    ms = {rows: st.median * 1000 for rows, st in stats.items()}
    for rows in heads:
        tflops = 2 * x.shape[0] * 768 * rows / stats[rows].median / 1e12
        yield Row(f"head GEMM x @ W.T, W {rows:,} x 768, x 65,536 x 768, bf16", f"{ms[rows]:.3f} ms",
                  details=f"{tflops:,.0f} TFLOP/s", ratio=f"{ms[rows] / ms[50257]:.2f}x the time at 50,257")


def gpu_train(b: Bench, deadline: float):
    """train.train_step at the gpt2 preset's default micro batch, 64 x 1024, bf16, eager and compiled, steps
    interleaved; on an out-of-memory error a smaller micro batch with accumulation (the same 65,536 tokens)."""
    cfg, dtype = gpu_config(), torch.bfloat16
    tcfg = fill_schedule_defaults(TrainConfig(learning_rate=6e-4, warmup_steps=2, max_steps=100))
    torch.manual_seed(0)
    init = GPT(cfg).state_dict()
    peak = hardware.peak_flops(b.device, dtype)
    stats = None
    for micro in (64, 32, 16, 8):
        try:
            trainers = {comp: Trainer(b, cfg, micro, init, dtype, comp, tcfg, b.random_gpt2_data(), 64 // micro)
                        for comp in (False, True)}
            stats = b.interleaved({comp: t.step for comp, t in trainers.items()}, 2, 10)
            break
        except Exception as e:  # torch.compile may wrap the out-of-memory error in its own
            if "out of memory" not in str(e):
                raise
            print(f"gpu: micro batch {micro} x 1024 ran out of memory; trying {micro // 2}", flush=True)
        trainers = None  # out of the except block, so that its traceback no longer holds the step's tensors
        torch.compiler.reset()
        gc.collect()
        torch.cuda.empty_cache()
    if stats is None:
        raise RuntimeError("out of memory even at micro batch 8 x 1024")
    tokens = 64 * 1024
    base = stats[False].rate(tokens)
    for comp, st in stats.items():
        t = trainers[comp]
        state = sum(p.numel() * p.element_size() for p in t.raw.parameters()) + sum(
            v.numel() * v.element_size() for s in t.optimizer.state.values() for v in s.values()
            if torch.is_tensor(v))
        tps = st.rate(tokens)
        oom = f"; micro batch {micro} x {64 // micro} accumulated (64 ran out of memory)" if micro < 64 else ""
        yield Row(f"gpt2 124M train_step, 64 x 1024 tokens, bf16, {'compiled' if comp else 'eager'}",
                  f"{num(tps)} tok/s", st.spread(tokens),
                  f"MFU {estimate_mfu(cfg, cfg.block_size, tps, peak):.1%}; peak memory "
                  f"{(state + st.mem) / GIB:.1f} GiB (its weights and moments {state / GIB:.1f} + the step's "
                  f"{st.mem / GIB:.1f}, torch.cuda.max_memory_allocated)"
                  + (f"; compile + first step {st.first:.0f} s (excluded)" if comp else "") + oom,
                  f"{tps / base:.2f}x")


def gpu_generate(b: Bench, deadline: float):
    """generate.py's decoding (for_inference: bf16 weights, KV cache) of GPT-2 124M's shape: greedy at batch 1,
    and --num-samples 8 as one batch with its default sampling."""
    model = generate.for_inference(GPT(gpu_config()).to(b.device), hardware.pick_dtype("auto", b.device))
    prompt = torch.tensor([[50256, 464, 2068, 7586, 21831]], device=b.device)
    new = 256
    fns = {1: lambda: list(model.generate(prompt, new, temperature=0.0)),
           8: lambda: list(model.generate(prompt.expand(8, -1), new, temperature=0.8, top_k=200,
                                          generator=torch.Generator(b.device).manual_seed(0)))}
    stats = b.interleaved(fns, 1, 3)
    for n, st in stats.items():
        yield Row(f"generate, {new} new tokens, batch {n} ({'greedy' if n == 1 else '--num-samples 8'})",
                  f"{num(st.rate(n * new))} tok/s", st.spread(n * new),
                  f"{st.median / new * 1000:.2f} ms per decoding step; weights in {next(model.parameters()).dtype}",
                  ratio=f"{st.rate(n * new) / stats[1].rate(new):.2f}x batch 1")


def gpu_hellaswag(b: Bench, deadline: float):
    """hellaswag.score as training calls it (float32 weights, bf16 autocast), GPT-2 124M's shape."""
    n = 400
    path = SHARED_DATA / "hellaswag_val.jsonl.gz"
    docs = list(generate_stories(300_000, seed=0))
    if path.is_file():
        examples, what = hellaswag.load_examples(str(path), limit=n), "real validation examples"
    else:  # offline without ../shared: stories cut into a context and four endings of HellaSwag's length
        sentences = [s.strip() + "." for d in docs for s in d.split(".") if len(s.strip()) > 20]
        examples = [{"ctx": " ".join(sentences[i:i + 2]), "endings": sentences[i + 2:i + 6], "label": 0}
                    for i in range(0, len(sentences) - 5, 6)][:n]
        what = "synthetic examples (stories; ../shared/data absent)"
    enc = load_tokenizer(b.offline_tokenizer(docs, try_cache=False))
    model = GPT(gpu_config()).to(b.device).eval()
    st = b.interleaved({"score": lambda: hellaswag.score(model, enc, examples, b.device, torch.bfloat16)}, 1, 3)
    yield Row(f"hellaswag.score, {len(examples)} {what}", f"{num(st['score'].rate(len(examples)))} ex/s",
              st["score"].spread(len(examples)), "float32 weights, bf16 autocast, 4 examples per forward")


def gpu_torchrun(b: Bench, deadline: float, parallel: str, gpus: int):
    """train.py under torchrun on every visible GPU, a few steps of GPT-2 124M at micro batch 64 x 1024 (16 with
    accumulation after an out-of-memory error): tokens/s, MFU and rank 0's peak memory from its log.jsonl."""
    if parallel == "ddp" and gpus < 2:
        yield Row("DDP: not measured", "one GPU visible")
        return
    steps = 6
    peak = hardware.peak_flops(b.device, torch.bfloat16)
    for micro in (64, 16):
        out = Path(tempfile.mkdtemp(dir=b.tmp))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "train.py",
               "--data-dir", b.random_gpt2_data(), "--out-dir", str(out), "--device", b.device.type,
               "--parallel", parallel, *(f"--{k.replace('_', '-')}={v}" for k, v in PRESETS["gpt2"].items()),
               "--batch-size", str(micro), "--total-batch-size", str(64 * 1024 * gpus), "--max-steps", str(steps),
               "--warmup-steps", "2", "--log-interval", "1", "--eval-interval", "0", "--hellaswag-interval", "0",
               "--sample-interval", "0", "--checkpoint-interval", "0", "--peak-flops", str(peak)]
        # One compile (the DDP part's) fits the section's time; the FSDP step runs eager, as its row says.
        cmd += ["--compile", "false" if parallel == "fsdp" else "true"]
        p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, err = p.communicate(timeout=max(10, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.terminate()  # torchrun stops the ranks it started on SIGTERM, and they free the GPUs
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
            raise RuntimeError(f"torchrun {parallel} did not finish in the section's time ({GPU_BUDGET_S} s)")
        if p.returncode == 0 or "out of memory" not in err:
            break
    if p.returncode:
        raise RuntimeError(f"torchrun {parallel}: {err.strip()[-300:]}")
    records = [r for r in read_log(str(out / "log.jsonl")) if "tokens_per_sec" in r and r["step"] > 2]
    if not records:
        raise RuntimeError(f"torchrun {parallel}: no timed step in {out / 'log.jsonl'}")
    tps = statistics.median(r["tokens_per_sec"] for r in records)
    mfu = statistics.median(r["mfu"] for r in records)
    compiled = "eager" if parallel == "fsdp" else "compiled"
    yield Row(f"train.py --parallel {parallel}, {gpus} GPU(s), 64 x 1024 x {gpus} tokens per step, {compiled}",
              f"{num(tps)} tok/s", f"{num(min(r['tokens_per_sec'] for r in records))}-"
              f"{num(max(r['tokens_per_sec'] for r in records))}",
              f"MFU {mfu:.1%} (--peak-flops {peak:.3g} per GPU); rank 0 peak memory "
              f"{records[-1]['peak_memory_mb'] / 1024:.1f} GiB; steps 3-{steps} of log.jsonl"
              + (f"; micro batch 64 ran out of memory: {micro} x {64 // micro} accumulated" if micro < 64 else ""),
              ratio=f"{tps / gpus:,.0f} tok/s per GPU")


# ---------------------------------------------------------------- the report

SECTIONS = {  # name: (title, function)
    "train": ("Training step", bench_train),
    "data": ("Data loading", bench_data),
    "prepare": ("prepare_data tokenization", bench_prepare),
    "generate": ("Generation", bench_generate),
    "hellaswag": ("HellaSwag scoring", bench_hellaswag),
    "memory": ("Memory of a long run", bench_memory),
    "nanogpt": ("train.py against nanoGPT", bench_nanogpt),
    "stepmem": ("Peak memory of one training step", bench_stepmem),
    "recipe": ("The modern recipe against GPT-2's (train.py end to end)", bench_recipe),
    "docmask": ("--doc-mask: a training step with the document mask", bench_docmask),
    "muon": ("Muon's optimizer step, one process and 2 ranks", bench_muon),
    "resumemem": ("Memory of a resume under torchrun", bench_resumemem),
    "cpubound": ("The CPU step against its matmul bound", bench_cpubound),
    "actckpt": ("--activation-checkpointing: memory and time of a training step", bench_actckpt),
    "gpu": ("GPT-2 124M on GPUs", bench_gpu),
}
# recipe and muon: half an hour and several minutes on the 2-core dev CPU; gpu: CUDA, five minutes of GPU time
OPT_IN = ("recipe", "muon", "gpu")

INTRO = """# Benchmarks

Written by `python bench.py`; each section below names the command, machine and date that produced it.

How to rerun:

- `python bench.py`: every section but recipe, muon and gpu at full size (12 minutes on the 2-core dev machine when
  quiet, 20-30 busy). `python bench.py --only recipe --threads 1` trains the three recipes of that section through
  train.py (about half an hour); `python bench.py --only muon --threads 1` times Muon's step on 1 and 2 ranks
  (several minutes).
- `python bench.py --only gpu` on a CUDA machine: GPT-2 124M's step (eager, compiled), train.py under torchrun
  (DDP on all GPUs, FSDP), generation, HellaSwag scoring and the head's GEMM, in under 5 minutes; a part that
  fails is reported and the others run. Without CUDA it says so in one line and writes nothing.
- `python bench.py --only NAME[,NAME]`: some sections ({names}); the others in this file are kept.
- `python bench.py --quick`: tiny sizes in about a minute, to check that the benchmark itself works; its figures
  say nothing about speed.
- `--threads N` sets torch's threads (default: one per core). On a machine busy with other work use fewer threads
  than cores: OpenMP threads spin-waiting for each other made steps 10x slower and worse on a loaded 2-core box.
- `--device`, `--out`: see `python bench.py --help`.

Method: every figure is the median of timed repeats after a warm-up, with its spread (min-max). Warm-up excludes
compilation (reported on its own, from an empty inductor cache) and first-call allocation. Every ratio is against
a baseline timed in the same run, the two taking turns repeat by repeat, so a change of load hits both alike.
"meets target" is a yes/no reading; nothing here is a test.

"""


def environment(b: Bench) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, AttributeError):
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"^model name\s*:\s*(.*)$", info, re.M).group(1)
        flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M).group(1).split()
        cpu += " (AMX bf16)" if "amx_bf16" in flags else " (AVX-512 bf16)" if "avx512_bf16" in flags else ""
    device = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else str(b.device)
    return {"date": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "device": device,
            "CPU": f"{cpu}, {os.cpu_count()} cores", "torch threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "sizes": "--quick (not figures of speed)" if b.quick else "full"}


def table(header: list, rows: list) -> list:
    return [f"| {' | '.join(cells)} |" for cells in [header, ["---"] * len(header), *rows]]


def section_markdown(title: str, command: str, env: dict, rows: list) -> str:
    lines = [f"## {title}", "", *table(["command", *env], [[f"`{command}`", *env.values()]]), "",
             *table(["measurement", "median", "spread (min-max)", "details", "ratio", "target", "meets target"],
                    [[r.name, r.value, r.spread, r.details, r.ratio, r.target,
                      "" if r.meets is None else "yes" if r.meets else "no"] for r in rows])]
    return "\n".join(lines) + "\n"


def write_report(path: str, blocks: dict):
    """Replace the sections run in path's markdown, keep the others; atomically (a reader sees old or new)."""
    old = Path(path).read_text() if os.path.isfile(path) else ""
    kept = dict(re.findall(r"<!-- bench:(\w+) -->\n(.*?)<!-- /bench:\1 -->", old, re.S))
    kept.update(blocks)
    text = INTRO.format(names=", ".join(SECTIONS)) + "\n".join(
        f"<!-- bench:{name} -->\n{kept[name]}<!-- /bench:{name} -->\n" for name in SECTIONS if name in kept)
    write_file(path, text)


def print_row(section: str, r: Row):
    meets = "" if r.meets is None else " | meets target" if r.meets else " | MISSES target"
    print(f"{section:9} {r.name}: {r.value}" + (f" [{r.spread}]" if r.spread else "")
          + (f" | {r.ratio}" if r.ratio else "") + meets, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, about a minute: a smoke test")
    defaults = [name for name in SECTIONS if name not in OPT_IN]
    p.add_argument("--only", default=",".join(defaults), help=f"comma-separated sections of {','.join(SECTIONS)} "
                                                             f"(default: all but {','.join(OPT_IN)})")
    p.add_argument("--out", default="BENCHMARKS.md", help="the markdown file to write (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--nanogpt", metavar="PATH", help="a karpathy/nanoGPT work tree: the nanogpt section runs only with it")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise UserError(f"--only {args.only}: unknown section(s) {', '.join(unknown)}; "
                        f"choose from {', '.join(SECTIONS)}")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the memory section's training subprocess
    b = Bench(args)
    command = " ".join(["python bench.py", *(argv if argv is not None else sys.argv[1:])])
    env = environment(b)
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    blocks, failed = {}, []
    try:
        for name in sorted(names, key=list(SECTIONS).index):  # data reuses the train section's step rate
            title, fn = SECTIONS[name]
            start, rows = time.perf_counter(), []
            try:
                for r in fn(b):  # printed as they come: a full section takes minutes
                    r.meets = None if b.quick else r.meets  # tiny sizes say nothing about the targets
                    rows.append(r)
                    print_row(name, r)
            except Exception as e:  # one broken section should not cost the others' figures
                traceback.print_exc()
                failed.append(name)
                rows.append(Row("FAILED", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
                print_row(name, rows[-1])
            print(f"{name:9} ({time.perf_counter() - start:.0f} s)", flush=True)
            if rows:  # a skipped section keeps its earlier figures
                blocks[name] = section_markdown(title, command, env, rows)
        if blocks:  # nothing ran (the gpu section without a GPU, say): the file stays as it was
            write_report(args.out, blocks)
            print(f"wrote {args.out}")
    finally:
        shutil.rmtree(b.tmp, ignore_errors=True)
    if failed:
        raise UserError(f"section(s) {', '.join(failed)} failed; see {args.out}")


if __name__ == "__main__":
    run_main(main)
