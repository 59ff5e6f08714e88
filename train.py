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
import socket
import time
import uuid

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import runtime
import sharding
from config import GPTConfig, TrainConfig, add_config_args, check_values, parse_configs
from dataloader import DataLoader, DeviceBatches
from errors import UserError, run_main
from hooks import Hooks, RunLog, due
from model import GPT, count_params, estimate_mfu
from run_folder import RunFolder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    model_cfg, cfg, args = parse_configs(parser)
    check_values(model_cfg, cfg)
    ctx = runtime.setup_distributed(cfg.device)
    try:
        train(model_cfg, cfg, ctx, explicit=args.explicit)
    finally:
        runtime.teardown_distributed()


def train(model_cfg: GPTConfig, cfg: TrainConfig, ctx: runtime.Dist, explicit=frozenset()):
    # ---- setup: data, run folder, model, optimizer, resume, hooks. Everything the run needs is resolved here.
    device, master = ctx.device, ctx.is_master
    dtype = runtime.pick_dtype(cfg.dtype, device)
    runtime.configure_matmul(device)
    meta = read_data_meta(cfg.data_dir)
    if "vocab_size" in explicit and model_cfg.vocab_size != meta["vocab_size"]:
        raise UserError(f"--vocab-size {model_cfg.vocab_size} disagrees with the data's tokenizer "
                        f"({meta['vocab_size']} tokens, {cfg.data_dir}/meta.json); drop the flag or prepare the data "
                        f"with the tokenizer you mean")
    model_cfg = dataclasses.replace(model_cfg, vocab_size=meta["vocab_size"])
    if cfg.shuffle is None:
        cfg = dataclasses.replace(cfg, shuffle=bool(meta.get("shuffle", False)))
    accum = grad_accum_steps(cfg, model_cfg.block_size, ctx.world_size)
    train_loader = DataLoader(cfg.data_dir, "train", cfg.batch_size, model_cfg.block_size, ctx.rank,
                              ctx.world_size, shuffle_seed=cfg.seed if cfg.shuffle else None,
                              vocab_size=model_cfg.vocab_size)
    val_loader = DataLoader(cfg.data_dir, "val", cfg.batch_size, model_cfg.block_size, ctx.rank, ctx.world_size,
                            vocab_size=model_cfg.vocab_size)

    folder = RunFolder(cfg.out_dir)
    ckpt, run_id = choose_checkpoint(folder, cfg, ctx)
    state = checkpoint.load_train_state(ckpt) if ckpt else None
    if state is not None:
        check_resume(ckpt, state, model_cfg, cfg, data_identity(train_loader))

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(model_cfg).to(device)  # the module being trained: saved, evaluated, sampled
    step = 0
    if state is not None:
        model.load_state_dict(checkpoint.load_model(ckpt)[0].state_dict())
        train_loader.load_state_dict(state["train_loader"])
        step = state["step"]
        # Per-rank RNG streams continue exactly on the same world size; on another, each rank starts a new one.
        if len(state["rng"]) == ctx.world_size:
            runtime.set_rng_state(state["rng"][ctx.rank])
        else:
            torch.manual_seed(cfg.seed + ctx.rank + step * ctx.world_size)
    else:
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout differs per rank
    batches = DeviceBatches(train_loader, device)

    compile_on = device.type == "cuda" if cfg.compile is None else cfg.compile
    if cfg.parallel == "fsdp":
        if not torch.distributed.is_initialized():
            raise UserError("--parallel fsdp shards over the processes of torchrun; start it with torchrun (even "
                            "--nproc_per_node=1), or leave --parallel at ddp for one process")
        runner = sharding.shard(model, device, ctx.world_size, dtype, compile_on)  # in place: model is sharded
    else:
        runner = torch.compile(model) if compile_on else model  # what forward and backward run through
        if ctx.enabled:
            runner = DDP(runner, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, cfg, device)  # after sharding: it must hold the sharded parameters
    if state is not None:
        if sharding.has_sharded_optimizer(ckpt):
            load_optimizer_state(optimizer, lambda: sharding.load_optimizer(model, optimizer, ckpt))
        elif cfg.parallel == "fsdp":
            raise UserError(f"--resume: {ckpt} was written by a --parallel ddp run; resume it with --parallel ddp "
                            f"(an fsdp run saves its optimizer in shards, a ddp run whole)")
        else:
            load_optimizer_state(optimizer, lambda: optimizer.load_state_dict(state["optimizer"]))

    if master:
        folder.start_log(step)
    log = RunLog(folder, cfg, {**dataclasses.asdict(model_cfg), **dataclasses.asdict(cfg)}, enabled=master)
    hooks = Hooks(cfg, model_cfg, meta["tokenizer"], ctx, dtype, val_loader, log, sharded=cfg.parallel == "fsdp")
    stop = runtime.StopFlag()
    peak = cfg.peak_flops or runtime.peak_flops(device, dtype)
    if master:
        print(f"model {count_params(model_cfg) / 1e6:.1f}M params | {ctx.world_size} process(es) on {device}, "
              f"{str(dtype).removeprefix('torch.')}, compile {'on' if compile_on else 'off'} | "
              f"{cfg.total_batch_size:,} tokens/step = {cfg.batch_size} x {model_cfg.block_size} x "
              f"{ctx.world_size} x {accum} accum | " + (f"resumed at step {step} from {ckpt}" if ckpt else "fresh"),
              flush=True)
    # Parameters, gradients and AdamW's two moments, all float32: 4x the parameters this rank holds.
    state_mb = 4 * sharding.local_param_bytes(model) / 2**20
    if master:
        print(f"{cfg.parallel}: model state per rank {state_mb:,.1f} MB (parameters, gradients, AdamW moments)",
              flush=True)

    # A wsd run keeps the checkpoint where its decay starts: a longer run (larger --max-steps) extends from it.
    kept = (decay_start(cfg),) if cfg.lr_schedule == "wsd" else ()

    def save(at_step: int) -> str:
        rngs = runtime.gather_objects(runtime.rng_state())
        state = {"step": at_step, "train_loader": batches.state_dict(), "rng": rngs,
                 "train_config": dataclasses.asdict(cfg), "data": data_identity(train_loader)}
        weights = staged = None
        if sharding.is_sharded(model):  # every rank writes its optimizer shard, rank 0 the rest, then renames
            weights = sharding.full_weights(model)
            staged = checkpoint.staging_folder(cfg.out_dir, at_step, run_id)
            sharding.save_optimizer(model, optimizer, staged)
        else:
            state["optimizer"] = optimizer.state_dict()
        path = ""
        if master:
            path = checkpoint.save_checkpoint(cfg.out_dir, at_step, model, meta["tokenizer"], state, run_id=run_id,
                                              keep=cfg.keep_checkpoints, protect=kept, weights=weights, staged=staged)
        runtime.barrier()  # no rank runs on (or exits) while the checkpoint is still being renamed
        return path

    # ---- the loop. No host synchronisation between logging steps: the loss stays on the device until then.
    first_step, losses, nonfinite = step, [], torch.zeros((), device=device)
    t_last, steps_timed = time.perf_counter(), 0
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        loss, grad_norm = train_step(runner, optimizer, batches, accum, lr, cfg.grad_clip, dtype)
        step += 1
        losses.append(loss)
        nonfinite += ~torch.isfinite(loss)
        steps_timed += 1
        if step == first_step + 1:  # the first step compiles and warms up: the timing starts after it
            runtime.synchronize(device)
            t_last, steps_timed = time.perf_counter(), 0

        logged = due(step, cfg.log_interval, cfg.max_steps)
        saving = due(step, cfg.checkpoint_interval, cfg.max_steps) or step in kept or step == cfg.max_steps
        # One process reads its stop flag every step; ranks agree on it only where they meet anyway.
        if not (logged or saving or hooks.any_due(step) or (stop.signal and not ctx.enabled)):
            continue
        # All ranks agree here, not every step: a stop signal on any rank, a non-finite loss on any rank.
        stop_flag = torch.tensor(float(stop.signal is not None), device=device)
        nan_seen, stopping = runtime.all_reduce(torch.stack([nonfinite, stop_flag]), op=runtime.MAX).tolist()
        if nan_seen:
            last = checkpoint.list_checkpoints(cfg.out_dir) if master else []
            raise UserError(f"the loss became nan or inf by step {step}; stopping without saving. The last good "
                            f"checkpoint is {last[-1] if last else 'none'}: resume from it with a lower "
                            f"--learning-rate and --allow-lr-change")
        error = None
        try:
            if logged:
                mean_loss = runtime.all_reduce(torch.stack(losses).mean()) / ctx.world_size
                loss_value, norm_value = torch.stack([mean_loss, grad_norm.float()]).tolist()
                record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value}
                line = f"step {step:6d}/{cfg.max_steps} | loss {loss_value:.4f} | lr {lr:.2e} | norm {norm_value:.3f}"
                if steps_timed:  # none in the first window when it holds only the warm-up step
                    dt = (time.perf_counter() - t_last) / steps_timed
                    tps = cfg.total_batch_size / dt
                    mfu = estimate_mfu(model_cfg, model_cfg.block_size, tps, peak * ctx.world_size)
                    record.update(tokens_per_sec=tps, ms_per_step=dt * 1000, mfu=mfu)
                    line += f" | {dt * 1000:.0f} ms | {tps:,.0f} tok/s | mfu {mfu:.1%}"
                log.write(record, line)
            hooks.run(step, runner, model)
        except Exception as e:
            error = e
        # A failed hook never costs progress: the weights of this step are consistent, so every rank saves them.
        failed = runtime.all_reduce(torch.tensor(float(error is not None), device=device), op=runtime.MAX).item()
        if failed:
            path = save(step)
            if master:
                print(f"a hook failed after step {step}: saved {path}; fix the cause, then continue with --resume",
                      flush=True)
            raise error or UserError(f"a hook failed on another rank after step {step}; its message says why")
        if saving or stopping:
            path = save(step)
            if master and stopping:
                print(f"stopped by signal {stop.signal}: saved {path}; continue with --resume", flush=True)
        if stopping:
            return
        if logged:  # evaluations and saves are not training time: the clock restarts after them
            losses, steps_timed = [], 0
            t_last = time.perf_counter()


def train_step(model, optimizer, batches, accum: int, lr: float, grad_clip: float, dtype):
    """One optimizer step over `accum` micro batches; returns (mean loss, gradient norm) as device tensors, so
    that nothing here waits for the device. bench.py times exactly this function."""
    loss_sum = None
    for micro in range(accum):
        x, y = next(batches)
        with gradient_sync(model, micro == accum - 1):
            with runtime.autocast(x.device, dtype):
                _, loss = model(x, y)
            (loss / accum).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients: the norm is already global, as a DTensor
        grad_norm = grad_norm.full_tensor()
    return loss_sum.float() / accum, grad_norm


def gradient_sync(model, last_micro_step: bool):
    """Gradients are reduced across ranks once per step, on the last micro step only."""
    if isinstance(model, DDP):
        return contextlib.nullcontext() if last_micro_step else model.no_sync()
    if sharding.is_sharded(model):
        model.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then down to min_lr at max_steps (and min_lr after): a cosine, or (wsd)
    flat until decay_start and linear from there."""
    min_lr = cfg.learning_rate * 0.1 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    start = decay_start(cfg)
    progress = max(0, step - start) / max(1, cfg.max_steps - start)
    if cfg.lr_schedule == "wsd":
        return cfg.learning_rate + progress * (min_lr - cfg.learning_rate)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - min_lr)


def lrs_at(step: int, cfg: TrainConfig) -> list:
    """AdamW's learning rate at step, then Muon's when the run uses it: the schedule scales both alike."""
    lr = lr_at(step, cfg)
    return [lr] + ([lr * muon_lr(cfg) / cfg.learning_rate] if cfg.optimizer == "muon" else [])


def decay_start(cfg: TrainConfig) -> int:
    """The step where the learning rate starts to fall. A wsd run can be extended (a larger --max-steps) from any
    checkpoint before it, and the checkpoint at it is always kept; a cosine falls from the end of warmup."""
    if cfg.lr_schedule == "wsd":
        return max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_fraction * cfg.max_steps))
    return cfg.warmup_steps


def grad_accum_steps(cfg: TrainConfig, block_size: int, world_size: int) -> int:
    """Micro steps per optimizer step, so that each step sees exactly total_batch_size tokens."""
    per_micro = cfg.batch_size * block_size * world_size
    if cfg.total_batch_size % per_micro:
        raise UserError(f"--total-batch-size {cfg.total_batch_size} is not a multiple of batch_size x block_size x "
                        f"processes = {cfg.batch_size} x {block_size} x {world_size} = {per_micro}; "
                        f"change one of them")
    return cfg.total_batch_size // per_micro


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices and embeddings only: decaying biases and norm gains only hurts.
    With --optimizer muon the blocks' matrices go to Muon instead, and AdamW keeps the embedding, the head, the
    norm gains and the biases, which Muon's orthogonalised update does not suit. Every group carries lr_scale,
    its peak learning rate over --learning-rate, which the schedule multiplies (see train_step)."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied head appears once
    hidden = {id(p) for p in model.blocks.parameters() if p.dim() == 2} if cfg.optimizer == "muon" else set()
    rest = [p for p in params if id(p) not in hidden]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    # The fused kernel updates all parameters in one pass instead of a dozen elementwise passes per tensor;
    # it exists for CUDA and for the CPU (the same code runs on both), not for MPS.
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                              fused=device.type in ("cuda", "cpu"))
    if not hidden:
        return adamw
    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"--optimizer muon needs torch.optim.Muon, new in PyTorch 2.9; this is {torch.__version__}")
    # Moonshot's "Muon is Scalable for LLM Training" (Liu et al. 2025): scaled by 0.2 sqrt(max(rows, cols)), the
    # update has AdamW's typical RMS, so Muon takes AdamW's learning rate and weight decay as they are; momentum
    # 0.95 with Nesterov as in their paper and Keller Jordan's Muon.
    muon = torch.optim.Muon([p for p in params if id(p) in hidden], lr=muon_lr(cfg), weight_decay=cfg.weight_decay,
                            momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn="match_rms_adamw")
    muon.param_groups[0]["lr_scale"] = muon_lr(cfg) / cfg.learning_rate
    return Optimizers(muon, adamw)


def muon_lr(cfg: TrainConfig) -> float:
    return cfg.learning_rate if cfg.muon_lr is None else cfg.muon_lr


class Optimizers:
    """Several optimizers stepped as one, so train_step and checkpoints see a single object; iterating gives the
    parts, which is what torch.distributed.checkpoint takes for a sharded save."""

    def __init__(self, *parts):
        self.parts = parts

    def __iter__(self):
        return iter(self.parts)

    @property
    def param_groups(self) -> list:
        return [group for part in self.parts for group in part.param_groups]

    def step(self):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True):
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict):
        for part, part_state in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(part_state)


def load_optimizer_state(optimizer, load):
    """Run load(), which fills optimizer with a checkpoint's moments, then give the groups back this run's
    settings: load_state_dict would keep the saved ones (a changed --muon-lr, --weight-decay), and a checkpoint
    written before lr_scale existed has none."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    load()
    for group, ours in zip(optimizer.param_groups, settings, strict=True):
        group.update(ours)


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


def data_identity(loader: DataLoader) -> list:
    """What the training data is, whatever folder it sits in: each shard's name and token count."""
    return [[os.path.basename(p), len(s)] for p, s in zip(loader.paths, loader.shards)]


# ---- resume: which checkpoint (one choice for all ranks), and whether the new flags continue the same run

def choose_checkpoint(folder: RunFolder, cfg: TrainConfig, ctx: runtime.Dist):
    """(checkpoint or None, run id). Rank 0 holds the folder and chooses; every rank then checks that it reads
    the same checkpoint, since a node-local --out-dir would otherwise let ranks resume from different steps."""
    choice = None
    if ctx.is_master:
        try:
            folder.hold()
            ckpt = folder.choose(cfg.resume, cfg.overwrite, cfg.resume_step)
            run_id = checkpoint.read_meta(ckpt).get("run_id") if ckpt else uuid.uuid4().hex
            choice = {"ckpt": ckpt, "run_id": run_id}
        except UserError as e:
            choice = {"error": str(e)}
    choice = runtime.broadcast_object(choice)
    if "error" in choice:
        raise UserError(choice["error"])
    ckpt, run_id = choice["ckpt"], choice["run_id"]
    if ckpt is not None:
        problem = None  # rank 0 read it above; a damaged file is then the same error on every rank, later
        if not ctx.is_master:
            try:
                if checkpoint.read_meta(ckpt).get("run_id") != run_id:
                    problem = "another run's checkpoint of that name"
            except UserError:
                problem = "no such checkpoint"
        problems = [p for p in runtime.gather_objects((ctx.rank, socket.gethostname(), problem)) if p[2]]
        if problems:
            rank, host, problem = problems[0]
            raise UserError(f"rank {rank} on host {host} cannot read {ckpt}, which rank 0 resumes from ({problem} "
                            f"there): --out-dir must be one shared file system for all nodes")
    return ckpt, run_id


DATA_FIELDS = ("total_batch_size", "seed", "shuffle")  # batch_size and world size resume exactly (see DataLoader)
SCHEDULE_FIELDS = ("max_steps", "learning_rate", "muon_lr", "min_lr", "warmup_steps", "lr_schedule",
                   "decay_fraction")


def check_resume(ckpt: str, state: dict, model_cfg: GPTConfig, cfg: TrainConfig, data: list):
    """Refuse, in one line, new flags that would silently change what the resumed run trains on or jump its
    learning rate; batch size and process count may change (the data position is in tokens)."""
    saved_model = checkpoint.read_meta(ckpt)["model"]
    if saved_model != model_cfg:
        diff = [f"{k}: {v} there, {getattr(model_cfg, k)} now" for k, v in dataclasses.asdict(saved_model).items()
                if getattr(model_cfg, k) != v]
        raise UserError(f"--resume: {ckpt} was trained with a different model config ({', '.join(diff)}); "
                        f"use the same flags or another --out-dir")
    saved = TrainConfig(**{k: v for k, v in state["train_config"].items() if k in TrainConfig.__dataclass_fields__})
    for name in DATA_FIELDS:
        if getattr(saved, name) != getattr(cfg, name):
            raise UserError(f"--resume: {name} was {getattr(saved, name)} in {ckpt}, now {getattr(cfg, name)}; that "
                            f"changes which data the run reads. Use the saved value, or start a new --out-dir")
    if saved.optimizer != cfg.optimizer:
        raise UserError(f"--resume: {ckpt} was trained with --optimizer {saved.optimizer}, now {cfg.optimizer}; its "
                        f"optimizer state does not fit another optimizer. Use --optimizer {saved.optimizer}, or start "
                        f"a new --out-dir")
    if state.get("data", data) != data:
        raise UserError(f"--resume: the training data in {cfg.data_dir} is not the data {ckpt} was trained on "
                        f"(shards or their sizes differ; it read {saved.data_dir}); point --data-dir at that data")
    step = state["step"]
    old, new = lrs_at(step, saved), lrs_at(step, cfg)
    if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(old, new)) and not cfg.allow_lr_change:
        changed = [f"{n} {getattr(saved, n)} -> {getattr(cfg, n)}" for n in SCHEDULE_FIELDS
                   if getattr(saved, n) != getattr(cfg, n)]
        hint = ("a cosine schedule cannot be extended: train with --lr-schedule wsd, which extends from any "
                "checkpoint before its decay" if saved.lr_schedule == "cosine" and saved.max_steps != cfg.max_steps
                else f"a wsd run extends from a checkpoint before its decay began (step {decay_start(saved)}): "
                     f"--resume --resume-step N" if saved.lr_schedule == "wsd" else "use the saved values")
        old, new = (" and ".join(f"{lr:.3e}" for lr in lrs) for lrs in (old, new))
        raise UserError(f"--resume: the learning rate at step {step} would jump from {old} to {new} "
                        f"({', '.join(changed)}); {hint}, or pass --allow-lr-change to accept the jump")


if __name__ == "__main__":
    run_main(main)
