"""Pre-train a GPT: one process, or many under torchrun (DDP), with exact resume.

    python train.py --config tiny --device cpu                  # the CPU demo
    python train.py                                              # GPT-2 124M on fineweb-edu 10B, one GPU
    torchrun --standalone --nproc_per_node=8 train.py            # the same on eight
    python train.py --resume                                     # continue from the newest checkpoint

Every config field is a flag (see --help); a step is one optimizer update of total_batch_size tokens.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import generate
import hellaswag
import runtime
from config import GPTConfig, TrainConfig, add_config_args, check_values, parse_configs
from dataloader import DataLoader
from errors import UserError, run_main
from model import GPT, count_params, estimate_mfu
from tokenizer import load_tokenizer


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_steps (and min_lr after)."""
    min_lr = cfg.learning_rate * 0.1 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - min_lr)


def grad_accum_steps(cfg: TrainConfig, block_size: int, world_size: int) -> int:
    """Micro steps per optimizer step, so that each step sees exactly total_batch_size tokens."""
    per_micro = cfg.batch_size * block_size * world_size
    if cfg.total_batch_size % per_micro:
        raise UserError(f"--total-batch-size {cfg.total_batch_size} is not a multiple of batch_size x block_size x "
                        f"processes = {cfg.batch_size} x {block_size} x {world_size} = {per_micro}; "
                        f"change one of them")
    return cfg.total_batch_size // per_micro


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only: decaying biases and norm gains only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied head appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates all parameters in one pass instead of a dozen elementwise passes per tensor;
    # it exists for CUDA and for the CPU (the same code runs on both), not for MPS.
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=device.type in ("cuda", "cpu"))


def read_data_meta(data_dir: str) -> dict:
    """meta.json of prepare_data.py, with the tokenizer as a usable spec (a name or an absolute path)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"no prepared data in {data_dir} (no meta.json): run prepare_data.py first, "
                        f"e.g. python prepare_data.py --dataset tinytales, or point --data-dir at its output")
    try:
        with open(path) as f:
            meta = json.load(f)
        tokenizer = meta["tokenizer"]
        meta["vocab_size"] = int(meta["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path}: {e!r}; rerun prepare_data.py")
    if os.path.exists(os.path.join(data_dir, tokenizer)):
        meta["tokenizer"] = os.path.abspath(os.path.join(data_dir, tokenizer))
    return meta


class RunLog:
    """log.jsonl (one object per logged step or evaluation), the console, and wandb: rank 0 only."""

    def __init__(self, cfg: TrainConfig, enabled: bool, resume_step: int, config_dict: dict):
        self.enabled, self.wandb = enabled, None
        if not enabled:
            return
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.path = os.path.join(cfg.out_dir, "log.jsonl")
        self._truncate_after(resume_step)
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config_dict,
                                    resume="allow")

    def _truncate_after(self, step: int):
        """A run killed after its last checkpoint logged steps it will now redo: drop them (or all, if fresh)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if step > 0 and json.loads(line).get("step", 0) <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)

    def write(self, record: dict, console: str = ""):
        if not self.enabled:
            return
        if console:
            print(console, flush=True)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: name the file (a failed write does not)
            raise UserError(f"cannot append to {self.path}: {e.strerror or e}; make room, then continue with --resume")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])


class StopFlag:
    """SIGTERM (a preempted cloud job) or Ctrl-C: finish the step, save a checkpoint, exit cleanly."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once

    def is_set(self, device) -> bool:
        """Agreed by all ranks, so that they stop, and save, at the same step."""
        flag = torch.tensor(float(self.signal is not None), device=device)
        return bool(runtime.all_reduce(flag, op=dist.ReduceOp.MAX).item())


@torch.no_grad()
def evaluate_loss(model, loader: DataLoader, steps: int, device, dtype, world_size: int) -> float:
    """Mean validation loss over the same `steps` batches every time, averaged over ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
        with runtime.autocast(device, dtype):
            _, loss = model(x, y)
        total += loss.float()
    model.train()
    return (runtime.all_reduce(total) / (steps * world_size)).item()


def due(step: int, interval: int, max_steps: int) -> bool:
    """Every `interval` steps and at the end; never when interval is 0."""
    return interval > 0 and (step % interval == 0 or step == max_steps)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(ctx: runtime.Dist) -> list:
    """Every rank's RNG state (dropout differs per rank), gathered so rank 0 can save them all."""
    if not ctx.enabled:
        return [rng_state()]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, rng_state())
    return states


def resume_state(cfg: TrainConfig, model_cfg: GPTConfig):
    """(checkpoint path, its train state) to resume from, or (None, None) for a fresh run."""
    found = checkpoint.list_checkpoints(cfg.out_dir)
    if not found:
        print(f"no checkpoint in {cfg.out_dir}: starting from scratch")
        return None, None
    ckpt = found[-1]
    saved = checkpoint.read_meta(ckpt)["model"]
    if saved != model_cfg:
        diff = {k: (v, getattr(model_cfg, k)) for k, v in dataclasses.asdict(saved).items()
                if getattr(model_cfg, k) != v}
        raise UserError(f"--resume: {ckpt} was trained with a different model config "
                        f"({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in diff.items())}); "
                        f"use the same flags or another --out-dir")
    return ckpt, checkpoint.load_train_state(ckpt)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    model_cfg, cfg, _ = parse_configs(parser)
    train(model_cfg, cfg)


def train(model_cfg: GPTConfig, cfg: TrainConfig):
    check_values(model_cfg, cfg)
    ctx = runtime.setup_distributed(cfg.device)
    try:
        _train(model_cfg, cfg, ctx)
    finally:
        runtime.teardown_distributed()


def _train(model_cfg: GPTConfig, cfg: TrainConfig, ctx: runtime.Dist):
    device, master = ctx.device, ctx.is_master
    dtype = runtime.pick_dtype(cfg.dtype, device)
    runtime.configure_matmul(device)
    meta = read_data_meta(cfg.data_dir)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=meta["vocab_size"])
    accum = grad_accum_steps(cfg, model_cfg.block_size, ctx.world_size)
    train_loader = DataLoader(cfg.data_dir, "train", cfg.batch_size, model_cfg.block_size, ctx.rank,
                              ctx.world_size, shuffle_seed=cfg.seed if cfg.shuffle else None,
                              vocab_size=model_cfg.vocab_size)
    val_loader = DataLoader(cfg.data_dir, "val", cfg.batch_size, model_cfg.block_size, ctx.rank, ctx.world_size,
                            vocab_size=model_cfg.vocab_size)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    step = 0
    ckpt, state = resume_state(cfg, model_cfg) if cfg.resume else (None, None)
    if state is not None:
        model.load_state_dict(checkpoint.load_model(ckpt)[0].state_dict())
        optimizer.load_state_dict(state["optimizer"])
        train_loader.load_state_dict(state["train_loader"])
        step = state["step"]
        rngs = state["rng"]
        set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
    else:
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout differs per rank

    raw_model = model
    compile_on = device.type == "cuda" if cfg.compile is None else cfg.compile
    if compile_on:
        model = torch.compile(model)
    if ctx.enabled:
        model = DDP(model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)

    log = RunLog(cfg, master, step, {**dataclasses.asdict(model_cfg), **dataclasses.asdict(cfg)})
    stop = StopFlag()
    peak = cfg.peak_flops or runtime.peak_flops(device, dtype)
    if master:
        print(f"model {count_params(model_cfg) / 1e6:.1f}M params | {ctx.world_size} process(es) on {device}, "
              f"{str(dtype).removeprefix('torch.')}, compile {'on' if compile_on else 'off'} | "
              f"{cfg.total_batch_size:,} tokens/step = {cfg.batch_size} x {model_cfg.block_size} x "
              f"{ctx.world_size} x {accum} accum | " + (f"resumed at step {step} from {ckpt}" if ckpt else "fresh"),
              flush=True)

    def save(at_step: int) -> str:
        rngs = gather_rng_states(ctx)
        if not master:
            return ""
        state = {"step": at_step, "optimizer": optimizer.state_dict(), "train_loader": train_loader.state_dict(),
                 "rng": rngs, "train_config": dataclasses.asdict(cfg)}
        return checkpoint.save_checkpoint(cfg.out_dir, at_step, raw_model, meta["tokenizer"], state,
                                          keep=cfg.keep_checkpoints)

    enc = examples = None  # the tokenizer and HellaSwag rows, loaded when first needed
    t_last, steps_timed = time.perf_counter(), 0
    while step < cfg.max_steps:
        loss_accum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = (t.to(device, non_blocking=True) for t in train_loader.next_batch())
            # Gradients are averaged across ranks once per step, on the last micro step only.
            sync = contextlib.nullcontext() if not ctx.enabled or micro == accum - 1 else model.no_sync()
            with sync:
                with runtime.autocast(device, dtype):
                    _, loss = model(x, y)
                loss = loss / accum
                loss_accum += loss.detach()
                loss.backward()
        runtime.all_reduce(loss_accum)
        loss_accum /= ctx.world_size
        grad_norm = (torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in raw_model.parameters()
                                                                if p.grad is not None])))
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_value = loss_accum.item()
        if not math.isfinite(loss_value):
            last = checkpoint.list_checkpoints(cfg.out_dir)
            raise UserError(f"loss is {loss_value} at step {step + 1}; stopping. The last good checkpoint is "
                            f"{last[-1] if last else 'none'}: resume from it with a lower --learning-rate")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_timed += 1

        logged = due(step, cfg.log_interval, cfg.max_steps)
        if logged:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t_last) / steps_timed
            tps = cfg.total_batch_size / dt
            mfu = estimate_mfu(model_cfg, model_cfg.block_size, tps, peak * ctx.world_size)
            log.write({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                       "tokens_per_sec": tps, "ms_per_step": dt * 1000, "mfu": mfu},
                      f"step {step:6d}/{cfg.max_steps} | loss {loss_value:.4f} | lr {lr:.2e} | "
                      f"norm {grad_norm.item():.3f} | {dt * 1000:.0f} ms | {tps:,.0f} tok/s | mfu {mfu:.1%}")
        if due(step, cfg.eval_interval, cfg.max_steps):
            val_loss = evaluate_loss(model, val_loader, cfg.eval_steps, device, dtype, ctx.world_size)
            log.write({"step": step, "val_loss": val_loss}, f"step {step:6d} | val loss {val_loss:.4f}")
        if due(step, cfg.hellaswag_interval, cfg.max_steps):
            enc = enc or load_tokenizer(meta["tokenizer"])
            examples = examples or hellaswag.load_examples(cfg.hellaswag_data, cfg.hellaswag_limit)
            result = hellaswag.evaluate(raw_model, enc, examples, device, dtype, dist=ctx)
            log.write({"step": step, "hellaswag_acc_norm": result["acc_norm"], "hellaswag_acc": result["acc"]},
                      f"step {step:6d} | hellaswag acc_norm {result['acc_norm']:.4f} ({result['n']} examples)")
        if master and due(step, cfg.sample_interval, cfg.max_steps):
            # A private generator: sampling must not move the training RNG, or resume would not be exact.
            gen = torch.Generator(device).manual_seed(cfg.seed)
            enc = enc or load_tokenizer(meta["tokenizer"])
            text = generate.complete(raw_model, enc, cfg.sample_prompt, max_new_tokens=48, generator=gen,
                                     dtype=dtype)[0]
            print(f"step {step:6d} | sample: {cfg.sample_prompt}{text}".replace("\n", " "), flush=True)
        stopping = stop.is_set(device)
        if due(step, cfg.checkpoint_interval, cfg.max_steps) or step == cfg.max_steps or stopping:
            path = save(step)
            if master and stopping:
                print(f"stopped by signal {stop.signal}: saved {path}; continue with --resume", flush=True)
        if stopping:
            return
        if logged:  # evaluations and saves above are not training time: restart the clock after them
            t_last, steps_timed = time.perf_counter(), 0


if __name__ == "__main__":
    run_main(main)
